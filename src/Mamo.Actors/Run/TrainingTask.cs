using Mamo.Actors.Pipeline;
using Mamo.Actors.Sources;
using Mamo.Data;
using Mamo.Data.Kafka;
using Mamo.Model;
using static TorchSharp.torch;

namespace Mamo.Actors.Run;

/// <summary>What a run trains and how it is judged: MAMO pre-training, or a fine-tuning task (docs/FINETUNE.md). The one
/// place that knows the tasks: the objective's factory (every trainer is built from it, the coordinators' included),
/// the admission of each record, the held-out sets and whose weights they score, and what a publisher sends beside the
/// embeddings. The pipeline asks; it never names a task.</summary>
public abstract class TrainingTask(MamoSettings settings)
{
    protected MamoSettings Settings => settings;

    /// <summary>The task of these settings (finetune.task; none: pre-training).</summary>
    public static TrainingTask Of(MamoSettings s) => s.FineTune.Task switch
    {
        FineTuneSettings.Classify => new Classification(s),
        FineTuneSettings.Retrieval => new RetrievalFineTuningTask(s),
        _ => new Pretraining(s),
    };

    /// <summary>The embedded defaults a fine-tuning task layers over mamo.conf (hocon/finetune*.conf), the first on top.</summary>
    public static IReadOnlyList<string> ConfigLayers(string task) =>
        task == FineTuneSettings.Retrieval ? ["finetune-retrieval.conf", "finetune.conf"] : ["finetune.conf"];

    /// <summary>Builds the objective of each trainer, coordinator and evaluator of the run.</summary>
    public abstract Func<MamoConfig, IObjective> Objective { get; }

    /// <summary>Whether evaluation scores the student it trains (fine-tuning, which also scores its starting model
    /// before the first step: the baseline that forgetting is measured against) rather than the momentum teacher.</summary>
    public abstract bool EvaluatesStudent { get; }

    /// <summary>The sample to prepare, or why the record is a dead letter.</summary>
    public virtual (ImageTextSample? Sample, string? Reason) Admit(ImageTextSample sample) => (sample, null);

    /// <summary>The held-out sets the run is judged on, by spec: retrieval sets, and a classifier's labelled sets.</summary>
    public abstract IEnumerable<(string Spec, bool Labelled)> HeldOut { get; }

    /// <summary>Whether the run evaluates while it trains: eval.every-steps and a held-out set.</summary>
    public bool Evaluates => settings.EvalEverySteps > 0 && HeldOut.Any();

    /// <summary>Loads the held-out sets into <paramref name="into"/> (the caller disposes them, also when one fails to load).</summary>
    public void LoadHeldOut(HeldOutLoader load, List<HeldOutSet> into)
    {
        foreach (var (spec, labelled) in HeldOut.Distinct()) into.Add(labelled ? load.Labelled(spec, Classifier) : load.Retrieval(spec));
    }

    /// <summary>A classifier of the run's settings, for its labelled sets; only a classification task has those.</summary>
    protected virtual OnlineClassification Classifier(MamoConfig config) => throw new InvalidOperationException("only a classifier has labelled sets");

    /// <summary>An item of the publish set as this task publishes it.</summary>
    public virtual EmbeddingItem ForPublishing(EmbeddingItem item, TextTokenizer tokenizer, int maxTextLength) => item;

    /// <summary>What goes out beside each version's embeddings; null: nothing.</summary>
    public virtual IPredictionPublisher? Predictions => null;
}

/// <summary>Loads the held-out sets a task names, each from its spec (dataset:NAME/SPLIT or manifest:PATH).</summary>
public sealed class HeldOutLoader(MamoSettings s, TextTokenizer tokenizer, DecodeLimits limits, Action<string> log)
{
    readonly ImageTransform transform = new(new ImageTransformOptions(ImageSize: s.Model.ImageSize));

    public RetrievalSet Retrieval(string spec)
    {
        var set = EvalSet.Load(TrainingSamples.EvalManifest(spec, log), transform, tokenizer, s.Model.MaxTextLength, limits);
        Serilog.Log.Information("eval set {Spec}: {Images} images, {Texts} captions", spec, set.ImageCount, set.TextCount);
        return new RetrievalSet(HeldOutSet.NameOf(spec), set);
    }

    public ClassificationSet Labelled(string spec, Func<MamoConfig, OnlineClassification> classifier)
    {
        LabelledSet set;
        try { set = LabelledSet.Load(TrainingSamples.EvalManifest(spec, log), transform, tokenizer, s.Model.MaxTextLength, s.FineTune.Prompt, s.FineTune.LabelField, limits); }
        catch (Exception e) when (e is InvalidDataException or FileNotFoundException) { throw new SettingsException($"'mamo.eval.sets' {spec}: {e.Message}"); }
        Serilog.Log.Information("labelled eval set {Spec}: {Count} images ({Skipped} skipped)", spec, set.Count, set.Bad.Count);
        return new ClassificationSet(HeldOutSet.NameOf(spec), set, classifier);
    }
}

/// <summary>MAMO pre-training: the five losses; evaluation scores the momentum teacher on retrieval.</summary>
sealed class Pretraining(MamoSettings s) : TrainingTask(s)
{
    public override Func<MamoConfig, IObjective> Objective => MamoPretraining.With(Settings.Pretraining);
    public override bool EvaluatesStudent => false;

    public override IEnumerable<(string Spec, bool Labelled)> HeldOut => Settings.EvalSets.Select(spec => (spec, false));
}

/// <summary>Online classification: a record needs a label (one a closed set knows) and takes the fixed prompt as its
/// text; labelled sets score the classifier, the forgetting sets the retrieval it started with; each published
/// version also predicts every item's class.</summary>
sealed class Classification(MamoSettings s) : TrainingTask(s)
{
    readonly ClassificationConfig config = new(s.FineTune.Labels, s.FineTune.Window, s.FineTune.Fading, s.FineTune.Prompt, s.Seed, s.FineTune.Probe);
    readonly HashSet<string>? known = s.FineTune.Labels?.ToHashSet();

    public override Func<MamoConfig, IObjective> Objective => OnlineClassification.With(config);
    public override bool EvaluatesStudent => true;

    public override (ImageTextSample? Sample, string? Reason) Admit(ImageTextSample sample)
    {
        if (sample.Label is null) return (null, $"no label (manifest field '{Settings.FineTune.LabelField}', Kafka header 'label')");
        if (known is not null && !known.Contains(sample.Label))
            return (null, $"unknown label '{sample.Label}': finetune.labels closes the set to {known.Count} labels");
        return (Settings.FineTune.Prompt is null ? sample : sample with { Captions = [Settings.FineTune.Prompt] }, null);
    }

    public override IEnumerable<(string Spec, bool Labelled)> HeldOut =>
        Settings.EvalSets.Select(spec => (spec, true)).Concat(Settings.FineTune.ForgettingSets.Select(spec => (spec, false)));

    protected override OnlineClassification Classifier(MamoConfig c) => new(c, config);

    /// <summary>A classifier trained on a fixed prompt predicts each image paired with that prompt.</summary>
    public override EmbeddingItem ForPublishing(EmbeddingItem item, TextTokenizer tokenizer, int maxTextLength) =>
        Settings.FineTune.Prompt is { } prompt ? item with { Prompt = tokenizer.Encode(prompt, maxTextLength) } : item;

    public override IPredictionPublisher Predictions => new ClassifierPredictions();
}

/// <summary>ALBEF's retrieval fine-tuning: ITC and ITM on the target domain's pairs; evaluation scores the student on
/// the target's sets and the forgetting sets alike.</summary>
sealed class RetrievalFineTuningTask(MamoSettings s) : TrainingTask(s)
{
    public override Func<MamoConfig, IObjective> Objective => RetrievalFineTuning.With(Settings.Pretraining, Settings.FineTune.DistillAlpha, Settings.FineTune.Window, Settings.FineTune.Fading);
    public override bool EvaluatesStudent => true;

    public override IEnumerable<(string Spec, bool Labelled)> HeldOut => Settings.EvalSets.Concat(Settings.FineTune.ForgettingSets).Select(spec => (spec, false));
}
