using Akka.Actor;
using Mamo.Data;
using Mamo.Model;
using TorchSharp;
using static TorchSharp.torch;
using Mamo.Actors.Sources;
using Mamo.Actors.Run;

namespace Mamo.Actors.Pipeline;

/// <summary>The student, the objective and the optimiser, loaded from a checkpoint when the actor starts (so a new
/// incarnation starts from durable state, never from a stale object). Trains on each batch it is sent, hands the
/// teacher (where the objective keeps one) its new weights, and at checkpoint time sends its parts to the
/// checkpointer. Fine-tuning evaluates the student: GetWeights gets a copy of it, its objective's parts and state.</summary>
public sealed class Trainer : ReceiveActor
{
    /// <summary>Train step Step on a batch. Position: the stream records the batch covers. The trainer owns
    /// (and disposes) the batch and the targets.</summary>
    public sealed record Train(long Step, Batch Batch, TeacherTargets? Targets, StreamPosition Position);
    /// <summary>Reply to Train; Position is where the stream stands after this step. Labels: each pair's, where the
    /// stream has them (the ledger sets them beside the step's predictions).</summary>
    public sealed record StepCompleted(StepResult Result, StreamPosition Position, string[] Ids, int NonFiniteInARow, IReadOnlyList<string?>? Labels = null);
    /// <summary>Send a checkpoint's parts now unless the last one covers this step; the reply is the step (a long).</summary>
    public sealed record CheckpointNow;

    /// <summary>Too many non-finite losses in a row: the run stops rather than restarts.</summary>
    public sealed class DivergedException(string message) : Exception(message);

    readonly MamoTrainer trainer;
    readonly IActorRef? teacher;
    readonly IActorRef checkpointer;
    readonly MamoSettings settings;
    readonly Tensor[] studentParameters;
    readonly System.Diagnostics.Stopwatch sinceCheckpoint = System.Diagnostics.Stopwatch.StartNew();
    StreamPosition position;
    long lastCheckpointStep;
    int nonFiniteInARow;

    /// <param name="checkpoint">the checkpoint to start from (a new run's is step 0)</param>
    /// <param name="teacher">the momentum teacher; null when the objective keeps none</param>
    public Trainer(MamoSettings settings, Func<MamoConfig, IObjective> objective, string checkpoint, Device device, IActorRef? teacher, IActorRef checkpointer)
    {
        trainer = MamoTrainer.Load(checkpoint, settings.Optimizer, device, settings.Seed, withTeacher: false, config: settings.Model, objective);
        var state = Checkpoint.ReadState(checkpoint);
        position = StreamPosition.FromExtra(state.Extra);
        lastCheckpointStep = trainer.Step;
        this.teacher = teacher;
        this.checkpointer = checkpointer;
        this.settings = settings;
        studentParameters = trainer.Student.parameters().Select(p => (Tensor)p).ToArray();
        // A pipelined teacher's checkpoint is one update behind the student's: hand it the update it lacks.
        if (state.TeacherStep < trainer.Step) teacher?.Tell(new MomentumTeacher.StudentUpdated(trainer.Step, CopyStudent()));

        Receive<Train>(t =>
        {
            try { Sender.Tell(TrainStep(t)); }
            catch (Exception e) { Sender.Tell(new Status.Failure(e)); }
            finally
            {
                t.Batch.Dispose();
                t.Targets?.Dispose();
            }
        });
        Receive<MomentumTeacher.GetWeights>(g => Sender.Tell(new MomentumTeacher.TeacherSnapshot(g.Step, trainer.Step,
            trainer.Parts().Where(p => p.Name != Checkpoint.OptimizerPart)
                .SelectMany(p => p.Tensors.Select(t => (p.Name == Checkpoint.StudentPart ? t.Name : $"{p.Name}.{t.Name}", Tensors.Copy(t.Value))))
                .ToArray(),
            trainer.Objective.SaveState())));
        Receive<CheckpointNow>(_ =>
        {
            if (trainer.Step != lastCheckpointStep) SendParts();
            Sender.Tell(trainer.Step);
        });
    }

    public static Props Props(MamoSettings settings, Func<MamoConfig, IObjective> objective, string checkpoint, Device device, IActorRef? teacher, IActorRef checkpointer) =>
        Akka.Actor.Props.Create(() => new Trainer(settings, objective, checkpoint, device, teacher, checkpointer)).WithDispatcher(Dispatchers.Model);

    StepCompleted TrainStep(Train t)
    {
        if (t.Step != trainer.Step) throw new InvalidOperationException($"batch for step {t.Step} reached a trainer at step {trainer.Step}");
        var b = t.Batch;
        StepResult result;
        using (var scope = NewDisposeScope())
        {
            var keys = tensor(b.Ids.Select(Seeds.StableHash).ToArray());
            result = trainer.StudentStep(new StepInput(b.Images, b.TokenIds, b.AttentionMask, keys, b.Labels), t.Targets);
        }
        position = position.Merge(t.Position);
        nonFiniteInARow = result.Skipped ? nonFiniteInARow + 1 : 0;
        if (nonFiniteInARow >= settings.MaxNonFiniteSteps)
            throw new DivergedException($"{nonFiniteInARow} non-finite losses in a row (last at step {result.Step}): the run diverged; lower optimizer.learning-rate or check the data");

        var due = settings.CheckpointEverySteps > 0 && trainer.Step % settings.CheckpointEverySteps == 0
               || settings.CheckpointEvery > TimeSpan.Zero && sinceCheckpoint.Elapsed >= settings.CheckpointEvery;
        if (due) SendParts();
        else teacher?.Tell(new MomentumTeacher.StudentUpdated(trainer.Step, CopyStudent()));
        return new StepCompleted(result, position, b.Ids, nonFiniteInARow, b.Labels);
    }

    /// <summary>The new student goes to the teacher (which then sends its own part) and this trainer's parts to the
    /// checkpointer; all carry the same step.</summary>
    void SendParts()
    {
        sinceCheckpoint.Restart();
        lastCheckpointStep = trainer.Step;
        teacher?.Tell(new MomentumTeacher.StudentUpdated(trainer.Step, CopyStudent(), SnapshotTo: checkpointer));
        var parts = trainer.Parts().Select(p => new Checkpoint.Part(p.Name, p.Tensors.Select(t => (t.Name, Tensors.Copy(t.Value))).ToArray())).ToArray();
        checkpointer.Tell(new Checkpointer.Parts(trainer.Step, parts, position, trainer.Optimizer.Step, Extra: trainer.Objective.SaveState()));
    }

    Tensor[] CopyStudent() => studentParameters.Select(Tensors.Copy).ToArray();

    protected override void PostStop()
    {
        trainer.Dispose();
        base.PostStop();
    }
}
