using Mamo.Data;
using Mamo.Model;

namespace Mamo.Actors.Run;

/// <summary>What a run trains, from its settings: MAMO pre-training, or a fine-tuning task (docs/FINETUNE.md); and
/// what a fine-tuning task asks of each record before it is prepared.</summary>
public static class FineTuning
{
    public static Func<MamoConfig, IObjective> Objective(MamoSettings s) => s.FineTune.Task switch
    {
        FineTuneSettings.Classify => OnlineClassification.With(new ClassificationConfig(s.FineTune.Labels, s.FineTune.Window, s.FineTune.Fading, s.FineTune.Prompt, s.Seed, s.FineTune.Probe)),
        FineTuneSettings.Retrieval => RetrievalFineTuning.With(s.Pretraining, s.FineTune.DistillAlpha, s.FineTune.Window, s.FineTune.Fading),
        _ => MamoPretraining.With(s.Pretraining),
    };

    /// <summary>Classify: a record needs a label, one a closed set knows, and takes the fixed prompt as its text (the
    /// built-in captions name the emoji's group). Null: every record is taken as it is.</summary>
    public static Func<ImageTextSample, (ImageTextSample? Sample, string? Reason)>? Admission(FineTuneSettings f)
    {
        if (f.Task != FineTuneSettings.Classify) return null;
        var known = f.Labels?.ToHashSet();
        return sample =>
        {
            if (sample.Label is null) return (null, $"no label (manifest field '{f.LabelField}', Kafka header 'label')");
            if (known is not null && !known.Contains(sample.Label))
                return (null, $"unknown label '{sample.Label}': finetune.labels closes the set to {known.Count} labels");
            return (f.Prompt is null ? sample : sample with { Captions = [f.Prompt] }, null);
        };
    }
}
