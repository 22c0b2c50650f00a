using Akka.Actor;
using Mamo.Model;
using TorchSharp;
using static TorchSharp.torch;

namespace Mamo.Actors.Pipeline;

/// <summary>Owns the momentum (EMA) weights, loaded from a checkpoint's teacher part: folds in each student update
/// and computes the targets.
/// Targets of step t use the teacher after exactly t - lag updates (lag 1 when pipelined, else 0), and a request
/// that arrives before those updates waits in the stash: the targets are the same whatever the timing, so a
/// seeded run is reproducible and a resumed run repeats the uninterrupted one.</summary>
public sealed class MomentumTeacher : UntypedActor, IWithStash
{
    /// <summary>Targets for step Step of an unmasked batch; the teacher owns (and disposes) the tensors.</summary>
    public sealed record ComputeTargets(long Step, Tensor Images, Tensor TokenIds, Tensor AttentionMask);
    /// <summary>Reply to ComputeTargets; the receiver owns the tensors.</summary>
    public sealed record TargetsReady(long Step, TeacherTargets Targets);
    /// <summary>The student after StepsDone steps (detached copies the teacher owns). When SnapshotTo is set, the
    /// teacher sends it its checkpoint part, taken right after this update is due, for a consistent checkpoint.</summary>
    public sealed record StudentUpdated(long StepsDone, Tensor[] Weights, IActorRef? SnapshotTo = null);
    /// <summary>Asks for a copy of the current weights (for an evaluation).</summary>
    public sealed record GetWeights(long Step);
    /// <summary>A copy of the teacher's weights after TeacherStep updates; the receiver owns the tensors.</summary>
    /// <param name="State">the objective's state where the weights are a fine-tuned student's (its label map); null: none</param>
    public sealed record TeacherSnapshot(long Step, long TeacherStep, (string Name, Tensor Value)[] Weights, IReadOnlyDictionary<string, string>? State = null);

    readonly MamoModel teacher;
    readonly IObjective objective;
    readonly Tensor[] parameters;
    readonly int lag;
    readonly double decay;
    readonly Queue<StudentUpdated> pending = new();
    long emaThrough;

    public IStash Stash { get; set; } = null!;

    /// <param name="objective">says the EMA decay and what the targets are</param>
    /// <param name="checkpoint">the checkpoint whose teacher part and teacher step this actor starts from</param>
    public MomentumTeacher(MamoConfig config, Func<MamoConfig, IObjective> objective, string checkpoint, Device device, int lag)
    {
        this.objective = objective(config);
        teacher = new MamoModel(config);
        teacher.to(device);
        Checkpoint.LoadModel(checkpoint, Checkpoint.TeacherFile, teacher);
        foreach (var p in teacher.parameters()) p.requires_grad = false;
        teacher.eval();
        this.lag = lag;
        decay = this.objective.TeacherMomentum ?? throw new ArgumentException("the objective keeps no momentum teacher");
        parameters = teacher.parameters().Select(p => (Tensor)p).ToArray();
        emaThrough = Checkpoint.ReadState(checkpoint).TeacherStep;
    }

    public static Props Props(MamoConfig config, Func<MamoConfig, IObjective> objective, string checkpoint, Device device, bool pipelined) =>
        Akka.Actor.Props.Create(() => new MomentumTeacher(config, objective, checkpoint, device, pipelined ? 1 : 0)).WithDispatcher(Dispatchers.Model);

    protected override void OnReceive(object message)
    {
        switch (message)
        {
            case ComputeTargets c:
                if (!FoldThrough(c.Step - lag)) { Stash.Stash(); return; }
                using (var scope = NewDisposeScope())
                {
                    var targets = objective.Targets(teacher, new StepInput(c.Images, c.TokenIds, c.AttentionMask));
                    foreach (var t in targets.All) t.DetachFromDisposeScope();
                    Sender.Tell(new TargetsReady(c.Step, targets));
                }
                c.Images.Dispose(); c.TokenIds.Dispose(); c.AttentionMask.Dispose();
                break;
            case StudentUpdated u:
                // Every target request up to this step has been served (the student could not have taken it
                // otherwise), so folding now cannot change any target; it keeps at most one copy pending.
                pending.Enqueue(u);
                FoldThrough(u.StepsDone - lag);
                u.SnapshotTo?.Tell(new Checkpointer.Parts(u.StepsDone, [new Checkpoint.Part(Checkpoint.TeacherPart, Copy())], TeacherStep: emaThrough));
                Stash.UnstashAll();
                break;
            case GetWeights g:
                // Labelled with the step asked about (the evaluation's step); TeacherStep says how many updates it holds.
                Sender.Tell(new TeacherSnapshot(g.Step, emaThrough, Copy()));
                break;
            default:
                Unhandled(message);
                break;
        }
    }

    Device Device => parameters[0].device;

    /// <summary>Applies pending updates until the teacher holds `through` of them; false if some have not arrived.</summary>
    bool FoldThrough(long through)
    {
        while (emaThrough < through)
        {
            if (!pending.TryDequeue(out var next)) return false;
            if (next.StepsDone <= emaThrough) { Dispose(next.Weights); continue; }
            Momentum.Update(parameters, next.Weights, decay);
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
