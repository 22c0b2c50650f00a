using Akka.Actor;
using Mamo.Data.Kafka;
using Mamo.Model;
using Serilog;
using static TorchSharp.torch;
using Mamo.Actors.Run;
using Mamo.Actors.Pipeline;
using Mamo.Actors.Sources;

namespace Mamo.Actors.Cluster;

/// <summary>The evaluator or the publisher of a cluster run: a cluster singleton on the oldest node with that role,
/// so that the work is done once however many nodes have the role, and moves when that node is lost. It follows the
/// run's checkpoints in the shared run directory and hands each new one to its worker: an Evaluator, whose weights it
/// gives from the checkpoint (the teacher, or a fine-tuned student with its head, as the run's task says: what a
/// single node evaluates), or an EmbeddingPublisher. It reads the directory rather than waiting for a word from the
/// coordinator: a follower that moved or restarted catches up on the newest checkpoint by itself.</summary>
public sealed class CheckpointFollower : ReceiveActor, IWithTimers
{
    /// <summary>Reply Followed once the work on a checkpoint at or past Step is done (a node leaves after that).</summary>
    public sealed record AwaitStep(long Step) : IClusterMessage;
    public sealed record Followed(long Step) : IClusterMessage;
    sealed record Poll;

    public const string EvaluatorName = "evaluator", PublisherName = "publisher";
    /// <summary>Listing a directory each second costs nothing next to a checkpoint's interval.</summary>
    static readonly TimeSpan PollInterval = TimeSpan.FromSeconds(1);

    public ITimerScheduler Timers { get; set; } = null!;

    readonly string runDir;
    readonly IActorRef worker;
    readonly IActorRef? metrics;
    readonly bool evaluatesStudent, evaluating;
    readonly CancellationTokenSource stopping = new();
    readonly List<(long Step, IActorRef ReplyTo)> waiters = [];
    string? newest;
    long seen, done;   // the newest checkpoint handed on, and the newest whose work is done (step 0: nothing trained)

    public CheckpointFollower(string runDir, Func<IUntypedActorContext, CancellationToken, (IActorRef Worker, IActorRef? Metrics)> create, bool evaluating,
        bool evaluatesStudent)
    {
        this.runDir = runDir;
        this.evaluating = evaluating;
        this.evaluatesStudent = evaluatesStudent;
        (worker, metrics) = create(Context, stopping.Token);

        Receive<Poll>(_ => Follow());
        Receive<AwaitStep>(a =>
        {
            waiters.Add((a.Step, Sender));
            Answer();
        });
        // The evaluator's weights: the newest checkpoint's (an older one if it was pruned meanwhile).
        Receive<Evaluator.GetWeights>(g => Sender.Tell(LoadWeights(g.Step)));
        Receive<Evaluator.EvaluationDone>(e => Done(e.Step));
        Receive<Evaluator.EvalCompleted>(e => metrics!.Forward(e));
        Receive<Evaluator.ClassifyCompleted>(e => metrics!.Forward(e));
        Receive<EmbeddingPublisher.Drained>(d => Done(d.Step));
    }

    /// <summary>Evaluates each new checkpoint on the held-out sets; results go to RUN_DIR/metrics.jsonl, as single-node's do.</summary>
    public static Props Evaluating(MamoSettings s, TrainingTask task, Device device, IReadOnlyList<HeldOutSet> sets)
    {
        Func<IUntypedActorContext, CancellationToken, (IActorRef, IActorRef?)> create = (context, token) =>
        {
            var metrics = context.ActorOf(Metrics.Props(s.RunDir, s.RunDir, s.MetricsEverySteps, false, null, _ => null), "metrics");
            return (context.ActorOf(Evaluator.Props(s.Model, device, sets, context.Self, context.Self, s.EvalK, s.EvalBatchSize, token), "evaluator"), metrics);
        };
        return Props.Create(() => new CheckpointFollower(s.RunDir, create, true, task.EvaluatesStudent)).WithDispatcher(Dispatchers.Io);
    }

    /// <summary>Publishes the embeddings of each new checkpoint (and the task's predictions) to a sink it opens.</summary>
    public static Props Publishing(MamoSettings s, TrainingTask task, Device device, IReadOnlyList<EmbeddingItem> items, Func<IEmbeddingSink> open)
    {
        Func<IUntypedActorContext, CancellationToken, (IActorRef, IActorRef?)> create = (context, _) =>
            (context.ActorOf(EmbeddingPublisher.Props(items, open(), s.PublishModality, s.PublishBatchSize, device, 0, task.Predictions, s.RunDir), "publisher"), null);
        return Props.Create(() => new CheckpointFollower(s.RunDir, create, false, task.EvaluatesStudent)).WithDispatcher(Dispatchers.Io);
    }

    protected override void PreStart() => Timers.StartPeriodicTimer("poll", new Poll(), TimeSpan.Zero, PollInterval);

    protected override void PostStop() => stopping.Cancel();

    void Follow()
    {
        if (Checkpoint.Complete(runDir).FirstOrDefault() is not { } dir) return;
        Checkpoint.State state;
        try { state = Checkpoint.ReadState(dir); }
        catch (Exception e) when (e is IOException or System.Text.Json.JsonException) { return; }   // pruned while read: the next poll sees the newer one
        if (state.Step < seen || state.Step == seen && newest is not null) return;
        (seen, newest) = (state.Step, dir);
        Log.Information("{Follower} follows checkpoint {Checkpoint} (step {Step})", Self.Path.Parent.Name, dir, state.Step);
        if (evaluating) worker.Tell(new Evaluator.EvaluateNow(state.Step));
        else
        {
            worker.Tell(new Checkpointer.CheckpointDurable(state.Step, StreamPosition.FromExtra(state.Extra), dir));
            worker.Tell(new EmbeddingPublisher.Drain(state.Step));
        }
    }

    /// <summary>The weights the run evaluates, from the newest readable checkpoint: its teacher, or (fine-tuning) its
    /// student with the objective's parts and state.</summary>
    Evaluator.Weights LoadWeights(long step)
    {
        foreach (var dir in (newest is null ? [] : new[] { newest }).Concat(Checkpoint.Complete(runDir)))
        {
            try
            {
                var state = Checkpoint.ReadState(dir);
                var part = evaluatesStudent ? Checkpoint.StudentPart : Checkpoint.InferencePart(dir);
                var weights = Checkpoint.LoadPart(Path.Combine(dir, Checkpoint.PartFile(part))).Select(kv => (kv.Key, kv.Value)).ToList();
                foreach (var other in Checkpoint.Parts(state).Except([Checkpoint.StudentPart, Checkpoint.TeacherPart, Checkpoint.OptimizerPart, RoundCoordinator.OuterOptimizerPart]))
                    weights.AddRange(Checkpoint.LoadPart(Path.Combine(dir, Checkpoint.PartFile(other))).Select(kv => ($"{other}.{kv.Key}", kv.Value)));
                return new Evaluator.Weights(step, state.Step, [.. weights], state.Extra);
            }
            catch (Exception e) when (e is IOException or InvalidDataException or System.Text.Json.JsonException)
            {
                Log.Warning("checkpoint {Checkpoint} cannot be read ({Error}); trying the one before", dir, e.Message);
            }
        }
        throw new InvalidDataException($"no readable checkpoint in {runDir}");
    }

    void Done(long step)
    {
        done = Math.Max(done, step);
        Answer();
    }

    void Answer()
    {
        foreach (var w in waiters.Where(w => done >= w.Step).ToList())
        {
            w.ReplyTo.Tell(new Followed(done));
            waiters.Remove(w);
        }
    }
}
