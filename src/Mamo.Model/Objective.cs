using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;
using static TorchSharp.torch.nn;

namespace Mamo.Model;

/// <summary>One unmasked batch as an objective sees it. Labels: each pair's label where the source has one.</summary>
/// <param name="ImageKeys">[B] identity of each image, so a duplicate is never taken as a negative; null: all distinct</param>
/// <param name="Shard">where this batch is one replica's share of a global batch (every-step sync); null: it is the whole</param>
public sealed record StepInput(Tensor Images, Tensor TokenIds, Tensor AttentionMask, Tensor? ImageKeys = null, IReadOnlyList<string?>? Labels = null,
    IBatchShard? Shard = null);

/// <summary>A replica's share of a global batch that several replicas train on in one step (every-step data
/// parallelism, docs/CLUSTER.md). Each loss becomes this replica's share of the global batch's loss, with the global
/// counts in its denominators and ITC over the gathered features, so that the replicas' gradients, summed, are the
/// gradient of one process's step on the whole batch.</summary>
public interface IBatchShard
{
    /// <summary>The global batch's row of this replica's first pair, as planned: each row's mask derives from it.</summary>
    long FirstRow { get; }

    /// <summary>This replica's place in the order the replicas' rows are concatenated in.</summary>
    int Index { get; }

    /// <summary>Every replica's tensors, each concatenated along dim 0 in replica order; blocks until all have given
    /// theirs. The result carries no gradient.</summary>
    IReadOnlyList<Tensor> AllGather(IReadOnlyList<Tensor> local);
}

/// <summary>What one training step computes from a batch, which parameters it trains, and which parts it needs.
/// Pre-training (MAMO's five losses) is one; a task head on the fused [CLS] is another. The trainer, the pipeline
/// and the checkpoint know only this seam: adding an objective touches no actor.</summary>
public interface IObjective : IDisposable
{
    /// <summary>The EMA decay of the momentum teacher the run keeps of the student; null: no teacher.</summary>
    double? TeacherMomentum { get; }

    /// <summary>Whether each step needs the teacher's targets of its unmasked batch.</summary>
    bool NeedsTargets { get; }

    /// <summary>The teacher's targets of an unmasked batch, on the teacher's own thread.</summary>
    TeacherTargets Targets(MamoModel teacher, StepInput batch);

    /// <summary>Modules of the objective's own (a task head), each a named part of the checkpoint.</summary>
    IReadOnlyDictionary<string, Module> Parts { get; }

    /// <summary>The parameters the optimiser trains, with names unique across the student and the parts.</summary>
    IEnumerable<(string Name, Parameter Parameter)> TrainedParameters(MamoModel student);

    /// <summary>The loss of one step, each term where it is named; every random choice derives from <paramref name="seed"/>.</summary>
    MamoLoss Loss(MamoModel student, StepInput batch, TeacherTargets? targets, int seed);

    /// <summary>State of the objective's own that is not tensors (a label map, running scores), saved with each checkpoint.</summary>
    IReadOnlyDictionary<string, string> SaveState() => new Dictionary<string, string>();

    /// <summary>Restores what SaveState saved, before the parts and the optimiser load (a head takes its saved size here).
    /// The saved state replaces the objective's own: a cluster replica loads the coordinator's at the start of each round.</summary>
    void LoadState(IReadOnlyDictionary<string, string> state) { }

    /// <summary>The running scores of its predictions (prequential accuracy); empty: none.</summary>
    IReadOnlyDictionary<string, double> Scores() => new Dictionary<string, double>();

    // Data parallelism (docs/CLUSTER.md): replicas train shares of the work from the coordinator's state and hand in
    // what they observed; the coordinator replays each replica's observations in replica order (the global batch's row
    // order), so its state is what one process would have recorded.

    /// <summary>Why a step of this objective cannot be split into shards of a global batch (every-step); null: it can.</summary>
    string? NotShardable => null;

    /// <summary>Records what the objective observes from now on (Observations), afresh; off until called, so that a
    /// run that never hands anything in keeps no record.</summary>
    void StartObserving() { }

    /// <summary>What it observed since StartObserving: the labels it admitted, its prequential hits.</summary>
    IReadOnlyDictionary<string, string> Observations() => new Dictionary<string, string>();

    /// <summary>Another replica's observations, recorded here as if this objective had trained its rows.</summary>
    void Replay(IReadOnlyDictionary<string, string> observations) { }

    /// <summary>A tensor of one of a replica's parts (a value or a change), laid out as this objective's part once the
    /// replica's observations are replayed: a head's rows moved to their labels' rows here, zero where the replica had none.</summary>
    /// <param name="name">the part's name and the tensor's, "PART.NAME"</param>
    Tensor Align(string name, Tensor value, IReadOnlyDictionary<string, string> observations) => value;
}

/// <summary>MAMO pre-training: joint masking, then ITC, ITM, MLM, MIM and MRM (MamoModel.Forward) against the momentum
/// teacher's targets.</summary>
public sealed class MamoPretraining(MamoConfig config, PretrainingConfig pretraining) : IObjective
{
    /// <summary>The objective of these settings, for MamoTrainer and TrainingRun.</summary>
    public static Func<MamoConfig, IObjective> With(PretrainingConfig pretraining) => c => new MamoPretraining(c, pretraining);

    public double? TeacherMomentum => pretraining.MomentumDecay;
    public bool NeedsTargets => pretraining.Weights.Mim > 0 || pretraining.Weights.Mrm > 0;
    public IReadOnlyDictionary<string, Module> Parts { get; } = new Dictionary<string, Module>();

    public IEnumerable<(string Name, Parameter Parameter)> TrainedParameters(MamoModel student) => student.named_parameters();

    public TeacherTargets Targets(MamoModel teacher, StepInput batch)
    {
        var device = teacher.Device;
        return teacher.Targets(batch.Images.to(device), batch.TokenIds.to(device), batch.AttentionMask.to(device), pretraining.MrmTopK);
    }

    public MamoLoss Loss(MamoModel student, StepInput batch, TeacherTargets? targets, int seed)
    {
        var device = student.Device;
        using var cpuMask = JointMasking.Sample(config, pretraining, batch.TokenIds, batch.AttentionMask, seed, batch.Shard?.FirstRow ?? 0);
        using var mask = cpuMask.To(device);
        using var generator = new Generator((ulong)seed, device);
        return student.Forward(batch.Images.to(device), batch.TokenIds.to(device), batch.AttentionMask.to(device), mask, pretraining, targets,
            batch.ImageKeys?.to(device), generator, batch.Shard);
    }

    public void Dispose() { }
}
