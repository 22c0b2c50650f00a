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
/// run's checkpoints in the shared run directory and hands each new one (the global θ's teacher, as single-node
/// evaluates and publishes the teacher) to its worker: an Evaluator, whose teacher it plays by loading the
/// checkpoint's teacher part, or an EmbeddingPublisher. It reads the directory rather than waiting for a word from
/// the coordinator: a follower that moved or restarted catches up on the newest checkpoint by itself.</summary>
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
    readonly int sets;
    readonly CancellationTokenSource stopping = new();
    readonly List<(long Step, IActorRef ReplyTo)> waiters = [];
    readonly Dictionary<long, int> setsDone = new();
    string? newest;
    long seen, done;   // the newest checkpoint handed on, and the newest whose work is done (step 0: nothing trained)

    public CheckpointFollower(string runDir, Func<IUntypedActorContext, CancellationToken, (IActorRef Worker, IActorRef? Metrics)> create, int sets)
    {
        this.runDir = runDir;
        this.sets = sets;
        (worker, metrics) = create(Context, stopping.Token);

        Receive<Poll>(_ => Follow());
        Receive<AwaitStep>(a =>
        {
            waiters.Add((a.Step, Sender));
            Answer();
        });
        // The evaluator's teacher: the newest checkpoint's teacher part (an older one if it was pruned meanwhile).
        Receive<MomentumTeacher.GetWeights>(g => Sender.Tell(LoadTeacher(g.Step)));
        Receive<Evaluator.EvalCompleted>(e =>
        {
            metrics!.Forward(e);
            if ((setsDone[e.Step] = setsDone.GetValueOrDefault(e.Step) + 1) < this.sets) return;
            setsDone.Remove(e.Step);
            Done(e.Step);
        });
        Receive<EmbeddingPublisher.Drained>(d => Done(d.Step));
    }

    /// <summary>Evaluates each new checkpoint on the sets; results go to RUN_DIR/metrics.jsonl, as single-node's do.</summary>
    public static Props Evaluating(MamoSettings s, Device device, IReadOnlyList<Evaluator.NamedSet> sets)
    {
        Func<IUntypedActorContext, CancellationToken, (IActorRef, IActorRef?)> create = (context, token) =>
        {
            var metrics = context.ActorOf(Metrics.Props(s.RunDir, s.MetricsEverySteps, false, null, _ => null), "metrics");
            return (context.ActorOf(Evaluator.Props(s.Model, device, sets, context.Self, context.Self, s.EvalK, s.EvalBatchSize, token), "evaluator"), metrics);
        };
        return Props.Create(() => new CheckpointFollower(s.RunDir, create, sets.Count)).WithDispatcher(Dispatchers.Io);
    }

    /// <summary>Publishes the embeddings of each new checkpoint to a sink it opens.</summary>
    public static Props Publishing(MamoSettings s, Device device, IReadOnlyList<EmbeddingItem> items, Func<IEmbeddingSink> open)
    {
        Func<IUntypedActorContext, CancellationToken, (IActorRef, IActorRef?)> create = (context, _) =>
            (context.ActorOf(EmbeddingPublisher.Props(items, open(), s.PublishModality, s.PublishBatchSize, device, 0), "publisher"), null);
        return Props.Create(() => new CheckpointFollower(s.RunDir, create, 0)).WithDispatcher(Dispatchers.Io);
    }

    protected override void PreStart() => Timers.StartPeriodicTimer("poll", new Poll(), TimeSpan.Zero, PollInterval);

    protected override void PostStop() => stopping.Cancel();

    void Follow()
    {
        if (Checkpoint.Complete(runDir).FirstOrDefault() is not { } dir) return;
        Checkpoint.State state;
        try { state = Checkpoint.ReadState(dir); }
        catch (Exception e) when (e is IOException or System.Text.Json.JsonException) { return; }   // pruned while read: the next poll sees the newer one
        if (state.Step <= seen) return;
        (seen, newest) = (state.Step, dir);
        Log.Information("{Follower} follows checkpoint {Checkpoint} (step {Step})", Self.Path.Parent.Name, dir, state.Step);
        if (sets > 0) worker.Tell(new Evaluator.EvaluateNow(state.Step));
        else
        {
            worker.Tell(new Checkpointer.CheckpointDurable(state.Step, StreamPosition.FromExtra(state.Extra), dir));
            worker.Tell(new EmbeddingPublisher.Drain(state.Step));
        }
    }

    MomentumTeacher.TeacherSnapshot LoadTeacher(long step)
    {
        foreach (var dir in (newest is null ? [] : new[] { newest }).Concat(Checkpoint.Complete(runDir)))
        {
            try
            {
                var state = Checkpoint.ReadState(dir);
                var weights = Checkpoint.LoadPart(Path.Combine(dir, Checkpoint.TeacherFile)).Select(kv => (kv.Key, kv.Value)).ToArray();
                return new MomentumTeacher.TeacherSnapshot(step, state.TeacherStep, weights);
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
