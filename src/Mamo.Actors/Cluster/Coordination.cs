using System.Globalization;
using Akka.Actor;
using Mamo.Actors.Pipeline;
using Mamo.Actors.Run;
using Mamo.Actors.Sources;
using Mamo.Model;
using Serilog;

namespace Mamo.Actors.Cluster;

/// <summary>The protocol both coordinators speak with their replicas, and what they share: the replicas that
/// registered, their recoveries and rounds for `mamo cluster status`, the run's training curve, and the cluster
/// checkpoint, written by a Checkpointer of their own (the one writer) and acknowledged to the replicas once durable
/// (Commit). A subclass says how a round goes (RoundCoordinator: DiLoCo; StepCoordinator: every-step).</summary>
public abstract class Coordination : ReceiveActor, IWithTimers
{
    /// <summary>A replica (the sender) offers itself; Receiver takes θ.</summary>
    public sealed record Register(string Node, IActorRef Receiver) : IClusterMessage;
    /// <summary>A cluster checkpoint is durable: it covers these stream positions, which the sources may acknowledge, and
    /// Through rounds (every-step: steps); of the attempts since the last Commit it applied Applied.</summary>
    public sealed record Commit(IReadOnlyDictionary<string, long> Positions, long Through, IReadOnlyList<long> Applied) : IClusterMessage;
    /// <summary>The run is done and checkpointed at Step (after Round rounds, every-step: steps): the replica may stop.</summary>
    public sealed record Finish(long Round, long Step) : IClusterMessage;
    /// <summary>Its node leaves (ClusterRun asks it, in CoordinatedShutdown), or it hands the singleton over (the
    /// singleton's termination message): it starts no round (step) any more, checkpoints the work it holds
    /// (CheckpointBeforeStop), replies Done and stops. Local only.</summary>
    public sealed record Stop
    {
        public static readonly Stop Instance = new();
    }
    /// <summary>Asks for a Progress (mamo cluster status).</summary>
    public sealed record GetProgress : IClusterMessage;
    /// <summary>The round in progress (or next), the last durable cluster checkpoint ("" before the first), and the
    /// coordinator's recent history.</summary>
    public sealed record Progress(long Round, string LastCheckpoint, IReadOnlyList<RunHistory.Round> Recent, IReadOnlyList<RunHistory.Recovery> Recoveries)
        : IClusterMessage;

    public ITimerScheduler Timers { get; set; } = null!;

    protected readonly MamoSettings Settings;
    protected readonly ClusterSettings Cluster;
    protected readonly TrainingTask Task;
    /// <summary>The registered replicas, by their actor: node name and data-plane receiver.</summary>
    protected readonly Dictionary<IActorRef, (string Node, IActorRef Receiver)> Replicas = new();
    protected readonly RunHistory History;
    protected readonly TrainCurve Curve;
    protected readonly IActorRef Writer, Receiver;
    /// <summary>Attempts applied since the last checkpoint was written, and the ones the last durable one applied (which
    /// it keeps in its state, so that a coordinator that resumes from it can tell a replica that registers).</summary>
    readonly List<long> applied = [];
    IReadOnlyList<long> lastApplied = [];
    public const string AppliedKey = "applied", ScheduleKey = "schedule";
    /// <summary>Unique among the run's attempts, across coordinators: a new one counts on from its start time.</summary>
    long attempts = DateTimeOffset.UtcNow.ToUnixTimeMilliseconds() * 1_000_000;
    /// <summary>What the last durable cluster checkpoint covers of the stream.</summary>
    protected StreamPosition Durable = StreamPosition.None;

    /// <param name="parts">the parts of each cluster checkpoint</param>
    protected Coordination(MamoSettings settings, IReadOnlyCollection<string> parts)
    {
        Settings = settings;
        Cluster = settings.Cluster;
        Task = TrainingTask.Of(settings);
        History = new RunHistory(Path.Combine(settings.RunDir, RunHistory.JournalFile));
        Curve = new TrainCurve(settings.RunDir);
        Writer = Context.ActorOf(Checkpointer.Props(settings.RunDir, settings.Model, parts, settings.KeepLast, settings.Seed, [Self]), "checkpointer");
        Receiver = Context.ActorOf(WeightTransfer.Receiver.Props(Self, maxBytes: 16L << 30), "data");

        Receive<Register>(r =>
        {
            if (!Replicas.ContainsKey(Sender))
            {
                Context.Watch(Sender);
                Log.Information("replica {Node} registered ({Count} now)", r.Node, Replicas.Count + 1);
                Sender.Tell(new Commit(Durable.Offsets, Through, lastApplied));   // where its stream would rewind to, and what the checkpoint holds
            }
            else if (!Replicas[Sender].Receiver.Equals(r.Receiver)) Reregistered(Sender);
            Replicas[Sender] = (r.Node, r.Receiver);
            if (Through >= Total) Sender.Tell(new Finish(Through, FinalStep));
            else TryStart();
        });
        // A replica's node marked unreachable starts its recovery: that is when the cluster knows of the loss.
        Receive<Akka.Cluster.ClusterEvent.UnreachableMember>(u =>
        {
            foreach (var (_, r) in Replicas.Where(r => r.Key.Path.Address == u.Member.Address)) History.Lost(r.Node, u.Member.Address.ToString());
        });
        Receive<Terminated>(t =>
        {
            if (!Replicas.Remove(t.ActorRef, out var gone)) return;
            Log.Warning("replica {Node} left", gone.Node);
            History.Lost(gone.Node, t.ActorRef.Path.Address.ToString());
            Left(t.ActorRef, gone.Node);
        });
        Receive<Checkpointer.CheckpointDurable>(d =>
        {
            Durable = d.Position;
            var commit = new Commit(d.Position.Offsets, StateThrough(d), lastApplied = writing);
            foreach (var replica in Replicas.Keys) replica.Tell(commit);
            if (commit.Through >= Total)
                foreach (var replica in Replicas.Keys) replica.Tell(new Finish(commit.Through, FinalStep));
            Writing = false;
            if (Stopping) StopOnceCheckpointed();
            else TryStart();
        });
        Receive<Stop>(_ =>
        {
            Stopping = true;
            stoppedBy.Add(Sender);
            if (!Writing) StopOnceCheckpointed();
        });
        Receive<WeightTransfer.Sent>(Sent);
        Receive<GetProgress>(_ => Sender.Tell(new Progress(Through, Model.Checkpoint.Latest(settings.RunDir) ?? "", History.Rounds, History.Recoveries)));
    }

    /// <summary>Rounds (every-step: steps) done and applied so far.</summary>
    protected abstract long Through { get; }
    /// <summary>Rounds (every-step: steps) the run takes; long.MaxValue without max-steps.</summary>
    protected abstract long Total { get; }
    /// <summary>The global step the run ends on.</summary>
    protected abstract long FinalStep { get; }
    /// <summary>Starts the next round if it can.</summary>
    protected abstract void TryStart();
    /// <summary>A replica left (its node died, or it stopped).</summary>
    protected abstract void Left(IActorRef replica, string node);
    /// <summary>Told to stop: no round (step) starts any more.</summary>
    protected bool Stopping { get; private set; }

    /// <summary>Starts a checkpoint of the work not yet in one, where the coordinator holds such work; false: nothing to write.</summary>
    protected virtual bool CheckpointBeforeStop() => false;

    readonly List<IActorRef> stoppedBy = [];

    void StopOnceCheckpointed()
    {
        if (CheckpointBeforeStop()) return;
        foreach (var asker in stoppedBy) asker.Tell(Akka.Done.Instance);
        Context.Stop(Self);
    }

    /// <summary>A replica actor registered again with a new receiver: it restarted and holds nothing of before.</summary>
    protected virtual void Reregistered(IActorRef replica) { }
    protected virtual void Sent(WeightTransfer.Sent sent) { }

    /// <summary>A cluster checkpoint is being written: the next round (step) starts once it is durable and the replicas
    /// know what it covers, so a round always starts from a durable θ.</summary>
    protected bool Writing { get; private set; }
    /// <summary>The attempts the checkpoint being written applies.</summary>
    IReadOnlyList<long> writing = [];

    /// <summary>The rounds (steps) a durable checkpoint covers, from its step.</summary>
    protected abstract long StateThrough(Checkpointer.CheckpointDurable d);

    /// <summary>A new attempt's number.</summary>
    protected long NextAttempt()
    {
        fresh = false;
        return ++attempts;
    }

    /// <summary>A coordinator that has neither resumed nor started an attempt: the run's first round is still to come.</summary>
    bool fresh = true;

    /// <summary>Enough replicas registered to start a round: start-replicas for a fresh run's first, min-replicas after.</summary>
    protected bool Quorum => Replicas.Count >= (fresh ? Cluster.StartReplicas : Cluster.MinReplicas);

    /// <summary>The attempts a checkpoint about to be written applies: the replicas learn it with the Commit.</summary>
    protected void Applied(IEnumerable<long> attemptsApplied) => applied.AddRange(attemptsApplied);

    /// <summary>Attempts counted applied that the state the run goes on from does not hold after all: no checkpoint
    /// says they were.</summary>
    protected void Unapplied(IReadOnlyCollection<long> attempts) => applied.RemoveAll(attempts.Contains);

    /// <summary>A stop that waited for work to checkpoint goes on (CheckpointBeforeStop is asked again).</summary>
    protected void GoOnStopping()
    {
        if (Stopping && !Writing) StopOnceCheckpointed();
    }

    /// <summary>A coordinator that resumes from a checkpoint: what it covers and which attempts it applied.</summary>
    /// <param name="first">the checkpoint is another sync's (a warm start): the first round waits for start-replicas, as a new run's</param>
    protected void Resumed(Model.Checkpoint.State state, bool first = false)
    {
        fresh = first;
        Durable = StreamPosition.FromExtra(state.Extra);
        lastApplied = state.Extra.TryGetValue(AppliedKey, out var a)
            ? a.Split(',', StringSplitOptions.RemoveEmptyEntries).Select(x => long.Parse(x, CultureInfo.InvariantCulture)).ToList() : [];
    }

    /// <summary>Writes a cluster checkpoint through the checkpointer: copies of <paramref name="parts"/> (the caller may
    /// change them at once), with the run's seed and the objective's state.</summary>
    /// <param name="schedule">where the learning-rate schedule stands after it: the steps of one node's batch trained</param>
    /// <param name="teacherStep">the updates the teacher part holds (null: step's)</param>
    protected void WriteCheckpoint(long step, IEnumerable<(string Part, IEnumerable<(string Name, TorchSharp.torch.Tensor Value)> Tensors)> parts,
        StreamPosition position, IReadOnlyDictionary<string, string> extra, long schedule, long optimizerStep = 0, long? teacherStep = null)
    {
        Writing = true;
        writing = [.. applied];
        applied.Clear();
        extra = new Dictionary<string, string>(extra)
        {
            [AppliedKey] = string.Join(",", writing.Select(a => a.ToString(CultureInfo.InvariantCulture))),
            [ScheduleKey] = schedule.ToString(CultureInfo.InvariantCulture),
        };
        var copies = parts.Select(p => new Model.Checkpoint.Part(p.Part, p.Tensors.Select(t => (t.Name, Tensors.Copy(t.Value))).ToArray())).ToArray();
        Writer.Tell(new Checkpointer.Parts(step, copies, position, optimizerStep, TeacherStep: teacherStep ?? step, Extra: extra));
    }

    /// <summary>The cluster's members now, for the history.</summary>
    protected IReadOnlyList<ClusterStatus.Member> Members() => ClusterStatus.MembersOf(Akka.Cluster.Cluster.Get(Context.System));

    /// <summary>Why the configured sync cannot go on from a run folder's checkpoint; null where it can. DiLoCo goes on from
    /// a synchronous checkpoint (every-step's or one node's: a warm start) at a round boundary; every-step needs AdamW's
    /// state, which a DiLoCo checkpoint does not hold (each replica keeps its own).</summary>
    public static string? CannotGoOn(ClusterSettings cluster, string dir, Model.Checkpoint.State state)
    {
        var diloco = RoundCoordinator.Wrote(state);
        if (cluster.Sync == ClusterSettings.EveryStep && diloco)
            return $"{dir} is a checkpoint of a diloco run; every-step goes on from a single-node or every-step checkpoint";
        if (cluster.Sync == ClusterSettings.DiLoCo && !diloco && state.Step % cluster.InnerSteps != 0)
            return $"{dir} is step {state.Step} of a synchronous run; diloco goes on from it in rounds of cluster.inner-steps = {cluster.InnerSteps}, " +
                $"which must divide {state.Step}";
        return null;
    }

    /// <summary>Where the learning-rate schedule stands at a checkpoint: the steps of one node's batch its run trained
    /// (a single node's checkpoint: its step); -1 where a coordinator wrote it before it kept that count: then it is
    /// taken as it was counted, the next step times the replicas that train it.</summary>
    protected static long ScheduleOf(Model.Checkpoint.State state) =>
        state.Extra.ContainsKey(ScheduleKey) ? StateNumber(state, ScheduleKey, 0) : state.Extra.ContainsKey(AppliedKey) ? -1 : state.Step;

    /// <summary>A number of the checkpoint's state, or <paramref name="otherwise"/>.</summary>
    protected static long StateNumber(Model.Checkpoint.State state, string key, long otherwise) =>
        state.Extra.TryGetValue(key, out var v) ? long.Parse(v, CultureInfo.InvariantCulture) : otherwise;

    protected override void PreStart() =>
        Akka.Cluster.Cluster.Get(Context.System).Subscribe(Self, Akka.Cluster.ClusterEvent.SubscriptionInitialStateMode.InitialStateAsEvents,
            typeof(Akka.Cluster.ClusterEvent.UnreachableMember));

    protected override void PostStop()
    {
        Akka.Cluster.Cluster.Get(Context.System).Unsubscribe(Self);
        base.PostStop();
    }
}
