using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;
using static TorchSharp.torch.nn;

namespace Mamo.Model;

/// <summary>ALBEF's retrieval fine-tuning: ITC, where pairs of the same image are positives, plus ITM with hard
/// negatives, on whole (unmasked) pairs of the target domain; with momentum distillation, ITC's targets mix in the
/// teacher's similarities (alpha). Its prequential score is each text's in-batch IR@1, taken from the step's own
/// ITC before the update. The MAMO heads that this objective does not use stay as they were.</summary>
public sealed class RetrievalFineTuning : IObjective
{
    readonly PretrainingConfig retrieval;
    readonly MamoPretraining forward;
    readonly Prequential prequential;
    const string PrequentialKey = "finetune.prequential", HitsKey = "finetune.hits";
    /// <summary>Each text's hit since StartObserving; null: not observing.</summary>
    System.Text.StringBuilder? observed;

    /// <param name="pretraining">its momentum and ITM settings; masking and the masked-modelling losses are off</param>
    /// <param name="alpha">the distillation weight; 0: no teacher</param>
    public RetrievalFineTuning(MamoConfig config, PretrainingConfig pretraining, double alpha, int window = 1000, double fading = 0.995)
    {
        retrieval = pretraining with
        {
            ImageMaskRatio = 0, TextMaskRatio = 0, AlignOnVisiblePatches = false, DistillAlpha = alpha,
            Weights = new LossWeights(pretraining.Weights.Itc, pretraining.Weights.Itm, Mlm: 0, Mim: 0, Mrm: 0),
        };
        forward = new MamoPretraining(config, retrieval);
        prequential = new Prequential(window, fading);
    }

    public static Func<MamoConfig, IObjective> With(PretrainingConfig pretraining, double alpha, int window, double fading) =>
        c => new RetrievalFineTuning(c, pretraining, alpha, window, fading);

    public double? TeacherMomentum => retrieval.DistillAlpha > 0 ? retrieval.MomentumDecay : null;
    public bool NeedsTargets => retrieval.DistillAlpha > 0;
    public string? NotShardable => retrieval.DistillAlpha > 0 ? "momentum distillation needs the teacher's embeddings of the whole batch" : null;
    public IReadOnlyDictionary<string, Module> Parts { get; } = new Dictionary<string, Module>();
    public IEnumerable<(string Name, Parameter Parameter)> TrainedParameters(MamoModel student) => student.named_parameters();

    public TeacherTargets Targets(MamoModel teacher, StepInput batch)
    {
        var device = teacher.Device;
        return teacher.Embeddings(batch.Images.to(device), batch.TokenIds.to(device), batch.AttentionMask.to(device));
    }

    /// <summary>Pre-training's step with these settings (no masks, ITC and ITM, distillation), and the texts' in-batch hits
    /// added to the prequential sums.</summary>
    public MamoLoss Loss(MamoModel student, StepInput batch, TeacherTargets? targets, int seed)
    {
        var loss = forward.Loss(student, batch, targets, seed);
        if (loss.TextToImageHits is { } hits)
            foreach (var hit in hits.cpu().data<bool>().ToArray()) Record(hit);
        return new MamoLoss { Total = loss.Total, Terms = loss.Terms, ItmNegatives = loss.ItmNegatives, TextToImageHits = loss.TextToImageHits, Scores = Scores() };
    }

    void Record(bool hit)
    {
        prequential.Add(hit);
        observed?.Append(hit ? '1' : '0');
    }

    public IReadOnlyDictionary<string, double> Scores() =>
        new Dictionary<string, double> { ["preq_ir1"] = prequential.Cumulative, ["preq_ir1_window"] = prequential.Windowed, ["preq_ir1_faded"] = prequential.Faded };

    public void StartObserving() => observed = new();

    public IReadOnlyDictionary<string, string> Observations() =>
        observed is null ? new Dictionary<string, string>() : new Dictionary<string, string> { [HitsKey] = observed.ToString() };

    public void Replay(IReadOnlyDictionary<string, string> observations)
    {
        foreach (var hit in observations.GetValueOrDefault(HitsKey, "")) Record(hit == '1');
    }

    public IReadOnlyDictionary<string, string> SaveState() => new Dictionary<string, string> { [PrequentialKey] = prequential.Save() };

    public void LoadState(IReadOnlyDictionary<string, string> state)
    {
        if (state.TryGetValue(PrequentialKey, out var p)) prequential.Load(p);
    }

    public void Dispose() => forward.Dispose();
}
