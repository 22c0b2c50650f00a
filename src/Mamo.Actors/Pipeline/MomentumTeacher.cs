using Akka.Actor;
using Mamo.Actors.Sources;
using Mamo.Model;
using TorchSharp;
using static TorchSharp.torch;

namespace Mamo.Actors.Pipeline;

/// <summary>Owns the momentum (EMA) weights, loaded from a checkpoint's teacher part: folds in each student update
/// and computes the targets.
/// Targets of step t use the teacher after exactly t - lag updates (lag 1 when pipelined, else 0), and a request
/// that arrives before those updates waits in the stash: the targets are the same whatever the timing, so a
/// seeded run is reproducible and a resumed run repeats the uninterrupted one. A cluster round that brings the
/// teacher (DiLoCo) resets it: the targets of its steps wait for that teacher.</summary>
public sealed class MomentumTeacher : UntypedActor, IWithStash
{
    /// <summary>Targets for step Step of an unmasked batch (of Round, where it is a replica's); the teacher owns (and
    /// disposes) the tensors.</summary>
    public sealed record ComputeTargets(long Step, Tensor Images, Tensor TokenIds, Tensor AttentionMask, Round? Round = null);
    /// <summary>Reply to ComputeTargets; the receiver owns the tensors. Null targets: the step's round was given up
    /// (GiveUpRound), and the trainer, told first, drops the step.</summary>
    public sealed record TargetsReady(long Step, TeacherTargets? Targets);
    /// <summary>From the trainer, once it drops a replica's round: the targets of its steps are never needed. Without
    /// it, a round whose weights never came (its coordinator died) would hold its steps here for ever, waiting for the
    /// round's reset, and every round behind them in the stream too.</summary>
    public sealed record GiveUpRound(long Attempt);
    /// <summary>The student after StepsDone steps (detached copies the teacher owns), of Round where it is a replica's.
    /// When SnapshotTo is set, the teacher sends it its checkpoint part, taken right after this update is due (FoldAll:
    /// every update so far, for a round's hand-in), for a consistent checkpoint.</summary>
    public sealed record StudentUpdated(long StepsDone, Tensor[] Weights, IActorRef? SnapshotTo = null, Round? Round = null, bool FoldAll = false);
    /// <summary>A round's teacher, after Through updates (DiLoCo: its first step's; every-step: the state's, one behind
    /// its student where the teacher is pipelined): the teacher from now on. The teacher owns the tensors.</summary>
    public sealed record Reset(Round Round, (string Name, Tensor Value)[] Weights, long Through);

    readonly MamoModel teacher;
    readonly IObjective objective;
    readonly Tensor[] parameters;
    readonly int lag;
    readonly double decay;
    readonly Queue<StudentUpdated> pending = new();
    readonly HashSet<long> givenUp = [];
    long emaThrough;
    /// <summary>The round whose teacher this is, where a round reset it.</summary>
    long? resetBy;

    public IStash Stash { get; set; } = null!;

    /// <param name="objective">says the EMA decay and what the targets are</param>
    /// <param name="checkpoint">the checkpoint whose teacher part and teacher step this actor starts from; null: a
    /// replica's, which each round resets</param>
    public MomentumTeacher(MamoConfig config, Func<MamoConfig, IObjective> objective, string? checkpoint, Device device, int lag)
    {
        this.objective = objective(config);
        teacher = new MamoModel(config);
        teacher.to(device);
        if (checkpoint is not null) Checkpoint.LoadModel(checkpoint, Checkpoint.TeacherFile, teacher);
        foreach (var p in teacher.parameters()) p.requires_grad = false;
        teacher.eval();
        this.lag = lag;
        decay = this.objective.TeacherMomentum ?? throw new ArgumentException("the objective keeps no momentum teacher");
        parameters = teacher.parameters().Select(p => (Tensor)p).ToArray();
        emaThrough = checkpoint is null ? -1 : Checkpoint.ReadState(checkpoint).TeacherStep;
    }

    public static Props Props(MamoConfig config, Func<MamoConfig, IObjective> objective, string? checkpoint, Device device, int lag) =>
        Akka.Actor.Props.Create(() => new MomentumTeacher(config, objective, checkpoint, device, lag)).WithDispatcher(Dispatchers.Model);

    protected override void OnReceive(object message)
    {
        switch (message)
        {
            case ComputeTargets c when c.Round is { } given && givenUp.Contains(given.Attempt):
                Sender.Tell(new TargetsReady(c.Step, null));
                c.Images.Dispose(); c.TokenIds.Dispose(); c.AttentionMask.Dispose();
                break;
            case ComputeTargets c:
                if (c.Round is { ResetsTeacher: true } r && r.Attempt != resetBy || !FoldThrough(c.Step - lag)) { Stash.Stash(); return; }
                using (var scope = NewDisposeScope())
                {
                    var targets = objective.Targets(teacher, new StepInput(c.Images, c.TokenIds, c.AttentionMask));
                    foreach (var t in targets.All) t.DetachFromDisposeScope();
                    Sender.Tell(new TargetsReady(c.Step, targets));
                }
                c.Images.Dispose(); c.TokenIds.Dispose(); c.AttentionMask.Dispose();
                break;
            case StudentUpdated u:
                // An update of a round whose teacher was replaced since is of no use.
                if (u.Round is { ResetsTeacher: true } of && of.Attempt != resetBy)
                {
                    Dispose(u.Weights);
                    return;
                }
                // Every target request up to this step has been served (the student could not have taken it
                // otherwise), so folding now cannot change any target; it keeps at most one copy pending.
                pending.Enqueue(u);
                FoldThrough(u.FoldAll ? u.StepsDone : u.StepsDone - lag);
                u.SnapshotTo?.Tell(new Checkpointer.Parts(u.StepsDone, [new Checkpoint.Part(Checkpoint.TeacherPart, Copy())], TeacherStep: emaThrough));
                Stash.UnstashAll();
                break;
            case Reset reset:
                Checkpoint.Load(teacher, reset.Weights.ToDictionary(w => w.Name, w => w.Value), $"round {reset.Round.Number}'s teacher");
                foreach (var u in pending) Dispose(u.Weights);
                pending.Clear();
                emaThrough = reset.Through;
                resetBy = reset.Round.Attempt;
                foreach (var (_, t) in reset.Weights) t.Dispose();
                Stash.UnstashAll();
                break;
            case GiveUpRound g:
                givenUp.Add(g.Attempt);
                Stash.UnstashAll();
                break;
            case Evaluator.GetWeights g:
                // Labelled with the step asked about (the evaluation's step); WeightsStep says how many updates it holds.
                Sender.Tell(new Evaluator.Weights(g.Step, emaThrough, Copy()));
                break;
            default:
                Unhandled(message);
                break;
        }
    }

    /// <summary>Applies pending updates until the teacher holds `through` of them; false if some have not arrived.</summary>
    bool FoldThrough(long through)
    {
        while (emaThrough < through)
        {
            if (!pending.TryDequeue(out var next)) return false;
            if (next.StepsDone <= emaThrough) { Dispose(next.Weights); continue; }
            // A step of one of a round's N replicas stands for N steps of one node: the EMA moves as N would.
            Momentum.Update(parameters, next.Weights, Math.Pow(decay, next.Round?.Replicas ?? 1));
            emaThrough = next.StepsDone;
            Dispose(next.Weights);
        }
        return true;
    }

    (string, Tensor)[] Copy() => teacher.named_parameters().Select(p => (p.name, Tensors.Copy(p.parameter))).ToArray();

    static void Dispose(Tensor[] tensors) { foreach (var t in tensors) t.Dispose(); }

    protected override void PostStop()
    {
        foreach (var u in pending) Dispose(u.Weights);
        pending.Clear();
        teacher.Dispose();
        objective.Dispose();
        base.PostStop();
    }
}
