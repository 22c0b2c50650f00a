using Akka.Actor;
using Mamo.Data;
using Mamo.Model;
using TorchSharp;
using static TorchSharp.torch;

namespace Mamo.Actors;

/// <summary>The student and its optimiser. Trains on each batch it is sent, hands the teacher its new weights,
/// and at checkpoint time sends a consistent snapshot to the checkpointer.</summary>
public sealed class TrainerReplica : ReceiveActor
{
    /// <summary>Train step Step on a batch. Position: the stream records the batch covers. The trainer owns
    /// (and disposes) the batch and the targets.</summary>
    public sealed record Train(long Step, Batch Batch, TeacherTargets? Targets, StreamPosition Position);
    /// <summary>Reply to Train; Position is where the stream stands after this step.</summary>
    public sealed record StepCompleted(StepResult Result, StreamPosition Position, string[] Ids, int NonFiniteInARow);
    /// <summary>Write a checkpoint now (at shutdown); the reply is the step it covers.</summary>
    public sealed record CheckpointNow;
    /// <summary>The student half of a checkpoint; the receiver owns the tensors.</summary>
    public sealed record StudentSnapshot(long Step, long OptimizerStep, StreamPosition Position, (string Name, Tensor Value)[] Student, (string Name, Tensor Value)[] Optimizer);

    /// <summary>Too many non-finite losses in a row: the run stops rather than restarts.</summary>
    public sealed class DivergedException(string message) : Exception(message);

    readonly MamoTrainer trainer;
    readonly IActorRef teacher, checkpointer;
    readonly MamoSettings settings;
    readonly Tensor[] studentParameters;
    readonly System.Diagnostics.Stopwatch sinceCheckpoint = System.Diagnostics.Stopwatch.StartNew();
    StreamPosition position;
    long lastCheckpointStep;
    int nonFiniteInARow;

    public TrainerReplica(MamoTrainer trainer, StreamPosition position, IActorRef teacher, IActorRef checkpointer, MamoSettings settings)
    {
        this.trainer = trainer;
        this.position = position;
        lastCheckpointStep = trainer.Step;
        this.teacher = teacher;
        this.checkpointer = checkpointer;
        this.settings = settings;
        studentParameters = trainer.Student.parameters().Select(p => (Tensor)p).ToArray();

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
        Receive<CheckpointNow>(_ =>
        {
            if (trainer.Step != lastCheckpointStep) SendSnapshots();
            Sender.Tell(trainer.Step);
        });
    }

    public static Props Props(MamoTrainer trainer, StreamPosition position, IActorRef teacher, IActorRef checkpointer, MamoSettings settings) =>
        Akka.Actor.Props.Create(() => new TrainerReplica(trainer, position, teacher, checkpointer, settings)).WithDispatcher(Dispatchers.Model);

    StepCompleted TrainStep(Train t)
    {
        if (t.Step != trainer.Step) throw new InvalidOperationException($"batch for step {t.Step} reached a trainer at step {trainer.Step}");
        var b = t.Batch;
        StepResult result;
        using (var scope = NewDisposeScope())
        {
            var keys = tensor(b.Ids.Select(Seeds.StableHash).ToArray());
            result = trainer.StudentStep(b.Images, b.TokenIds, b.AttentionMask, t.Targets, keys);
        }
        position = position.Merge(t.Position);
        nonFiniteInARow = result.Skipped ? nonFiniteInARow + 1 : 0;
        if (nonFiniteInARow >= settings.MaxNonFiniteSteps)
            throw new DivergedException($"{nonFiniteInARow} non-finite losses in a row (last at step {result.Step}): the run diverged; lower optimizer.learning-rate or check the data");

        var due = settings.CheckpointEverySteps > 0 && trainer.Step % settings.CheckpointEverySteps == 0
               || settings.CheckpointEvery > TimeSpan.Zero && sinceCheckpoint.Elapsed >= settings.CheckpointEvery;
        if (due) SendSnapshots();
        else teacher.Tell(new MomentumTeacher.StudentUpdated(trainer.Step, CopyStudent()));
        return new StepCompleted(result, position, b.Ids, nonFiniteInARow);
    }

    /// <summary>The new student goes to the teacher (which then snapshots itself) and, with the optimiser state,
    /// to the checkpointer; both halves carry the same step.</summary>
    void SendSnapshots()
    {
        sinceCheckpoint.Restart();
        lastCheckpointStep = trainer.Step;
        teacher.Tell(new MomentumTeacher.StudentUpdated(trainer.Step, CopyStudent(), SnapshotTo: checkpointer));
        var student = trainer.Student.named_parameters().Select(p => (p.name, Tensors.Copy(p.parameter))).ToArray();
        var optimizer = trainer.Optimizer.State().Select(s => (s.Name, Tensors.Copy(s.Value))).ToArray();
        checkpointer.Tell(new StudentSnapshot(trainer.Step, trainer.Optimizer.Step, position, student, optimizer));
    }

    Tensor[] CopyStudent() => studentParameters.Select(Tensors.Copy).ToArray();
}
