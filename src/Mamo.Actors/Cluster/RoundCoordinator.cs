using System.Collections.Immutable;
using System.Diagnostics;
using System.Globalization;
using Akka.Actor;
using Mamo.Data.Kafka;
using Mamo.Model;
using Serilog;
using static TorchSharp.torch;
using Mamo.Actors.Sources;
using Mamo.Actors.Run;
using Mamo.Actors.Pipeline;

namespace Mamo.Actors.Cluster;

/// <summary>The cluster singleton of DiLoCo training. It holds the global weights θ, the teacher, the outer optimiser
/// and the round; each round it gives every registered replica θ and a disjoint range of the file source's cursor
/// (so each sample of an epoch is trained once across the cluster), gathers their deltas, applies the outer step,
/// averages the replicas' teachers (an EMA is linear: the mean of EMAs that started equal is the EMA of the mean
/// student's path), and writes the cluster checkpoint before the next round starts.</summary>
public sealed class RoundCoordinator : ReceiveActor, IWithTimers
{
    public ITimerScheduler Timers { get; set; } = null!;

    /// <summary>A replica (the sender) offers itself; Receiver takes θ.</summary>
    public sealed record Register(string Node, IActorRef Receiver) : IClusterMessage;
    /// <summary>Train Steps steps of BatchSize samples, from the θ that follows: from Cursor on for a file source; for
    /// a Kafka source, on from the last batch, or from the last Commit's positions where Rewind (this replica's last
    /// round was not applied). Send the delta to DeltaReceiver.</summary>
    public sealed record RoundStart(long Round, long Cursor, int Steps, int BatchSize, bool Rewind, IActorRef DeltaReceiver) : IClusterMessage;
    /// <summary>A replica's account of its round: the samples it trained on (its delta's weight), the stream
    /// positions they reach, and its inner steps' mean loss and terms (NaN and none when every step was skipped).</summary>
    public sealed record RoundDone(long Round, string Node, long Samples, IReadOnlyDictionary<string, long> Positions, double Loss,
        IReadOnlyDictionary<string, double> Terms) : IClusterMessage;
    /// <summary>A cluster checkpoint covering these stream positions is durable: the sources may acknowledge them.</summary>
    public sealed record Commit(IReadOnlyDictionary<string, long> Positions) : IClusterMessage;
    /// <summary>The last round is done and checkpointed: the replica may stop.</summary>
    public sealed record Finish(long Round) : IClusterMessage;
    /// <summary>Asks for a Progress (mamo cluster status).</summary>
    public sealed record GetProgress : IClusterMessage;
    /// <summary>The round in progress (or next), the last durable cluster checkpoint ("" before the first), and the
    /// coordinator's recent history.</summary>
    public sealed record Progress(long Round, string LastCheckpoint, IReadOnlyList<RunHistory.Round> Recent, IReadOnlyList<RunHistory.Recovery> Recoveries)
        : IClusterMessage;
    sealed record Deadline(long Round);

    public const string OuterOptimizerPart = "outer-optimizer", RoundKey = "round", UnfinishedKey = "unfinished";
    const string StudentPrefix = "student.", TeacherPrefix = "teacher.";

    sealed class Round(long number, IReadOnlyList<(string Node, IActorRef Replica, long Cursor)> assigned, int fresh)
    {
        public long Number { get; } = number;
        public IReadOnlyList<(string Node, IActorRef Replica, long Cursor)> Assigned { get; } = assigned;
        /// <summary>Ranges taken from the cursor's front this round (the others were unfinished ones given again).</summary>
        public int Fresh { get; } = fresh;
        /// <summary>Each replica's account: its samples, stream positions and losses.</summary>
        public Dictionary<string, RoundDone> Reports { get; } = new();
        public Dictionary<string, WeightTransfer.Received> Deltas { get; } = new();
        /// <summary>Replicas that left during the round: the round does not wait for them.</summary>
        public HashSet<string> Lost { get; } = new();
        public bool Expired { get; set; }
        /// <summary>The round's time line, for its breakdown in the log: θ sent to every replica, the last replica's
        /// inner steps done, the last delta in.</summary>
        public Stopwatch Clock { get; } = Stopwatch.StartNew();
        public int Broadcasts { get; set; }
        public TimeSpan Broadcast { get; set; }
        public TimeSpan InnerSteps { get; set; }
        public TimeSpan Gathered { get; set; }
    }

    readonly MamoSettings settings;
    readonly ClusterSettings cluster;
    readonly MamoModel theta, teacher;
    readonly OuterOptimizer outer;
    readonly IActorRef receiver;
    readonly Dictionary<IActorRef, (string Node, IActorRef Receiver)> replicas = new();
    readonly RunHistory history;
    readonly TrainCurve curve;
    readonly long rounds;
    long round, cursor;
    /// <summary>The stream positions the last cluster checkpoint covers (a Kafka source: each partition's last offset).</summary>
    StreamPosition positions = StreamPosition.None;
    /// <summary>A Kafka source: the group assigns the partitions, the coordinator keeps only their positions.</summary>
    readonly bool stream;
    /// <summary>Replicas whose last round was not applied: they read their stream again from the checkpoint.</summary>
    readonly HashSet<IActorRef> rewind = new();
    /// <summary>Ranges (their first cursor) whose replica left or missed the deadline: assigned again first.</summary>
    readonly List<long> unfinished = new();
    Round? current;

    /// <param name="init">a new run's θ and teacher come from this checkpoint (pretrain --init); null: from the seed</param>
    public RoundCoordinator(MamoSettings settings, string? init = null)
    {
        this.settings = settings;
        cluster = settings.Cluster;
        history = new RunHistory(Path.Combine(settings.RunDir, RunHistory.JournalFile));
        curve = new TrainCurve(settings.RunDir);
        stream = KafkaSpec.IsKafka(settings.Source);
        rounds = settings.MaxSteps > 0 ? (settings.MaxSteps + cluster.InnerSteps - 1) / cluster.InnerSteps : long.MaxValue;
        theta = MamoModel.Seeded(settings.Model, settings.Seed);
        teacher = Momentum.CreateTeacher(theta);
        outer = new OuterOptimizer(Checkpoint.Named(theta), cluster.OuterOptimizer);
        if (Checkpoint.Latest(settings.RunDir) is { } dir)
        {
            Resume(dir);
            history.CoordinatorStarted(Context.System);
        }
        else if (init is not null)
        {
            Checkpoint.LoadStart(init, theta, teacher);
            Log.Information("coordinator starts a new run from {Init}: θ {Hash}", init, Checkpoint.WeightHash(Checkpoint.Named(theta)));
        }
        receiver = Context.ActorOf(WeightTransfer.Receiver.Props(Self, maxBytes: 16L << 30), "deltas");

        Receive<Register>(r =>
        {
            if (!replicas.ContainsKey(Sender))
            {
                Context.Watch(Sender);
                Log.Information("replica {Node} registered ({Count} now)", r.Node, replicas.Count + 1);
                Sender.Tell(new Commit(positions.Offsets));   // where its stream would rewind to
            }
            replicas[Sender] = (r.Node, r.Receiver);
            if (round >= rounds) Sender.Tell(new Finish(round));
            else TryStartRound();
        });
        // A replica's node marked unreachable starts its recovery: that is when the cluster knows of the loss.
        Receive<Akka.Cluster.ClusterEvent.UnreachableMember>(u =>
        {
            foreach (var (_, r) in replicas.Where(r => r.Key.Path.Address == u.Member.Address)) history.Lost(r.Node, u.Member.Address.ToString());
        });
        Receive<Terminated>(t =>
        {
            rewind.Remove(t.ActorRef);
            if (!replicas.Remove(t.ActorRef, out var gone)) return;
            Log.Warning("replica {Node} left", gone.Node);
            history.Lost(gone.Node, t.ActorRef.Path.Address.ToString());
            if (current is not null && current.Assigned.Any(a => a.Replica.Equals(t.ActorRef)))
            {
                current.Lost.Add(gone.Node);
                TryComplete();
            }
        });
        Receive<RoundDone>(d =>
        {
            if (current is null || d.Round != current.Number) return;
            current.Reports[d.Node] = d;
            current.InnerSteps = current.Clock.Elapsed;
            TryComplete();
        });
        Receive<WeightTransfer.Received>(r =>
        {
            if (current is null || r.Tag.Split('/') is not ["delta", var number, var node] || number != current.Number.ToString(CultureInfo.InvariantCulture))
            {
                foreach (var (_, t) in r.Tensors) t.Dispose();
                return;
            }
            current.Deltas[node] = r;
            current.Gathered = current.Clock.Elapsed;
            TryComplete();
        });
        Receive<Deadline>(d =>
        {
            if (current is null || d.Round != current.Number) return;
            current.Expired = true;
            Log.Warning("round {Round} reached its deadline with {Count} of {Of} deltas", d.Round, current.Deltas.Count, current.Assigned.Count);
            TryComplete();
        });
        Receive<WeightTransfer.Sent>(_ =>
        {
            if (current is not null && ++current.Broadcasts == current.Assigned.Count) current.Broadcast = current.Clock.Elapsed;
        });
        Receive<GetProgress>(_ => Sender.Tell(new Progress(round, Checkpoint.Latest(settings.RunDir) ?? "", history.Rounds, history.Recoveries)));
    }

    public static Props Props(MamoSettings settings, string? init = null) =>
        Akka.Actor.Props.Create(() => new RoundCoordinator(settings, init)).WithDispatcher(Dispatchers.Model);

    void Resume(string dir)
    {
        var state = Checkpoint.ReadState(dir);
        Checkpoint.LoadModel(dir, Checkpoint.StudentFile, theta);
        Checkpoint.LoadModel(dir, Checkpoint.TeacherFile, teacher);
        var saved = Checkpoint.LoadPart(Path.Combine(dir, Checkpoint.PartFile(OuterOptimizerPart)));
        try { outer.LoadState(saved, long.Parse(state.Extra[RoundKey], CultureInfo.InvariantCulture)); }
        finally { foreach (var t in saved.Values) t.Dispose(); }
        round = outer.Step;
        positions = StreamPosition.FromExtra(state.Extra);
        cursor = (positions[TrainingSamples.CursorPartition] ?? -1) + 1;
        if (state.Extra.TryGetValue(UnfinishedKey, out var left) && left.Length > 0)
            unfinished.AddRange(left.Split(',').Select(x => long.Parse(x, CultureInfo.InvariantCulture)));
        Log.Information("coordinator resumes from {Checkpoint}: round {Round}, cursor {Cursor}", dir, round, cursor);
    }

    void TryStartRound()
    {
        if (current is not null || round >= rounds || replicas.Count < cluster.MinReplicas) return;
        var span = (long)cluster.InnerSteps * settings.BatchSize;
        var again = unfinished.Order().Take(replicas.Count).ToList();
        foreach (var start in again) unfinished.Remove(start);
        var assigned = replicas.OrderBy(r => r.Value.Node, StringComparer.Ordinal)
            .Select((r, i) => (r.Value.Node, r.Key, i < again.Count ? again[i] : cursor + (i - again.Count) * span)).ToList();
        current = new Round(round, assigned, assigned.Count - again.Count);
        var weights = Checkpoint.Named(theta).Select(p => (StudentPrefix + p.Name, p.Value))
            .Concat(Checkpoint.Named(teacher).Select(p => (TeacherPrefix + p.Name, p.Value))).ToList();
        foreach (var (node, replica, start) in assigned)
        {
            replica.Tell(new RoundStart(round, start, cluster.InnerSteps, settings.BatchSize, rewind.Remove(replica), receiver));
            Context.ActorOf(WeightTransfer.Sender.Props(replicas[replica].Receiver, Self, $"weights/{round}", weights, "float32", cluster.ChunkSize, cluster.Window));
        }
        Timers.StartSingleTimer("deadline", new Deadline(round), cluster.RoundTimeout);
        Log.Information("round {Round}: {Count} replicas from cursor {Cursor}", round, assigned.Count, cursor);
    }

    void TryComplete()
    {
        var r = current!;
        var reported = r.Assigned.Where(a => r.Reports.ContainsKey(a.Node) && r.Deltas.ContainsKey(a.Node)).ToList();
        var waiting = r.Assigned.Count(a => !r.Lost.Contains(a.Node)) - reported.Count;
        if (waiting > 0 && !r.Expired) return;
        var missed = r.Assigned.Where(a => !reported.Contains(a)).Select(a => a.Cursor).ToList();
        if (reported.Count == 0 || reported.Count < cluster.MinReplicas)
        {
            if (waiting > 0) return;   // past the deadline but short of min-replicas: the ones still training may yet report
            // Nobody left to report: the round is given again from the same θ, its ranges first.
            Log.Warning("round {Round} abandoned: {Count} of the {Min} replicas it needs reported", r.Number, reported.Count, cluster.MinReplicas);
            foreach (var d in r.Deltas.Values) foreach (var (_, t) in d.Tensors) t.Dispose();
            unfinished.AddRange(r.Assigned.Select(a => a.Cursor));
            if (stream) rewind.UnionWith(r.Assigned.Select(a => a.Replica).Where(replicas.ContainsKey));   // what they read is read again
            cursor += r.Fresh * (long)cluster.InnerSteps * settings.BatchSize;
            current = null;
            TryStartRound();
            return;
        }
        var outerStart = r.Clock.Elapsed;
        try
        {
            var student = Checkpoint.Named(theta).Select(p => p.Value).ToList();
            var teachers = Checkpoint.Named(teacher).Select(p => p.Value).ToList();
            var replicaDeltas = reported.Select(a => (Tensors: r.Deltas[a.Node].Tensors.ToDictionary(t => t.Name, t => t.Value), Samples: r.Reports[a.Node].Samples)).ToList();
            var studentNames = Checkpoint.Named(theta).Select(p => StudentPrefix + p.Name).ToList();
            var teacherNames = Checkpoint.Named(teacher).Select(p => TeacherPrefix + p.Name).ToList();
            var g = OuterOptimizer.OuterGradient(replicaDeltas.Select(d => ((IReadOnlyList<Tensor>)studentNames.Select(n => d.Tensors[n]).ToList(), d.Samples)).ToList());
            outer.Apply(student, g);
            // The replicas' teachers started from this one; their weighted mean is it minus the mean delta.
            var gTeacher = OuterOptimizer.OuterGradient(replicaDeltas.Select(d => ((IReadOnlyList<Tensor>)teacherNames.Select(n => d.Tensors[n]).ToList(), d.Samples)).ToList());
            using (no_grad()) foreach (var (t, d) in teachers.Zip(gTeacher)) t.sub_(d);
            foreach (var t in g.Concat(gTeacher)) t.Dispose();
        }
        finally
        {
            foreach (var d in r.Deltas.Values) foreach (var (_, t) in d.Tensors) t.Dispose();
        }
        cursor += r.Fresh * (long)cluster.InnerSteps * settings.BatchSize;
        if (stream)
        {
            // At least once: a stream's records past the checkpoint are read again by whoever holds their partition.
            positions = reported.Aggregate(positions, (p, a) => p.Merge(new StreamPosition(r.Reports[a.Node].Positions.ToImmutableSortedDictionary())));
            rewind.UnionWith(r.Assigned.Where(a => !reported.Contains(a)).Select(a => a.Replica).Where(replicas.ContainsKey));
        }
        else unfinished.AddRange(missed);   // at least once: what a lost replica trained is trained again
        round++;
        current = null;
        var outerStep = r.Clock.Elapsed - outerStart;
        var path = WriteCheckpoint();
        Log.Information("round {Round} done with {Count} replicas ({Participants}); checkpoint {Path}", round - 1, reported.Count,
            string.Join(",", reported.Select(a => a.Node)), path);
        history.Committed(round - 1, reported.Select(a => a.Node), r.Clock.Elapsed, ClusterStatus.MembersOf(Akka.Cluster.Cluster.Get(Context.System)));
        WriteCurve(r, reported.Select(a => r.Reports[a.Node]).ToList());
        // The gather is the time from the last replica's inner steps to its last delta (the delta transfers overlap the
        // inner steps of slower replicas).
        Log.Information("round {Round} took {Total:F2} s: broadcast of θ {Broadcast:F2} s, inner steps until the last replica's end {Inner:F2} s, " +
            "gather of the deltas {Gather:F2} s, outer step {Outer:F2} s, checkpoint {Checkpoint:F2} s", round - 1, r.Clock.Elapsed.TotalSeconds,
            r.Broadcast.TotalSeconds, r.InnerSteps.TotalSeconds, Math.Max(0, (r.Gathered - r.InnerSteps).TotalSeconds), outerStep.TotalSeconds,
            (r.Clock.Elapsed - outerStart - outerStep).TotalSeconds);
        foreach (var replica in replicas.Keys) replica.Tell(new Commit(positions.Offsets));
        if (round >= rounds)
            foreach (var replica in replicas.Keys) replica.Tell(new Finish(round));
        else TryStartRound();
    }

    /// <summary>The round's train line: its replicas' inner-step losses and terms, each replica weighted by its
    /// samples (as its delta is), at the global step the round ends on.</summary>
    void WriteCurve(Round r, IReadOnlyList<RoundDone> reports)
    {
        curve.Trained(reports.Sum(d => d.Samples));
        var counted = reports.Where(d => double.IsFinite(d.Loss) && d.Samples > 0).ToList();
        double Mean(Func<RoundDone, double> value) => counted.Sum(d => d.Samples * value(d)) / counted.Sum(d => d.Samples);
        var loss = counted.Count == 0 ? double.NaN : Mean(d => d.Loss);
        var terms = counted.Count == 0 ? new Dictionary<string, double>()
            : counted[0].Terms.Keys.Where(k => counted.All(d => d.Terms.ContainsKey(k))).ToDictionary(k => k, k => Mean(d => d.Terms[k]));
        curve.Write(round * cluster.InnerSteps, loss, terms, new() { ["round"] = r.Number, ["replicas"] = reports.Count });
    }

    string WriteCheckpoint()
    {
        var step = round * cluster.InnerSteps;
        if (!stream) positions = StreamPosition.None.Advance(TrainingSamples.CursorPartition, cursor - 1);
        var extra = new Dictionary<string, string>(positions.ToExtra())
        {
            [Checkpointer.SeedKey] = settings.Seed.ToString(CultureInfo.InvariantCulture),
            [RoundKey] = round.ToString(CultureInfo.InvariantCulture),
            [UnfinishedKey] = string.Join(",", unfinished.Order().Select(x => x.ToString(CultureInfo.InvariantCulture))),
        };
        return Checkpoint.Commit(settings.RunDir, settings.Model,
            [new(Checkpoint.StudentPart, Checkpoint.Named(theta)), new(Checkpoint.TeacherPart, Checkpoint.Named(teacher)), new(OuterOptimizerPart, outer.State())],
            new Checkpoint.State(step, 0, step, extra), settings.KeepLast);
    }

    protected override void PreStart() =>
        Akka.Cluster.Cluster.Get(Context.System).Subscribe(Self, Akka.Cluster.ClusterEvent.SubscriptionInitialStateMode.InitialStateAsEvents,
            typeof(Akka.Cluster.ClusterEvent.UnreachableMember));

    protected override void PostStop()
    {
        Akka.Cluster.Cluster.Get(Context.System).Unsubscribe(Self);
        theta.Dispose();
        teacher.Dispose();
        outer.Dispose();
        base.PostStop();
    }
}
