using System.Collections.Immutable;
using Akka.Actor;
using Mamo.Actors.Pipeline;
using Mamo.Actors.Run;
using Mamo.Actors.Sources;
using Mamo.Model;
using Serilog;
using static TorchSharp.torch;

namespace Mamo.Actors.Cluster;

/// <summary>The hooks that make a node's pipeline a cluster replica (Run/IReplica): its folder, its seed, its assigned
/// source, and its link to the coordinator. One per node for the run's life; the link is made anew with each
/// pipeline.</summary>
/// <param name="stopping">the node's stop: a replica stopping gives up the all-gather it waits in</param>
public sealed class ReplicaHooks(MamoSettings settings, string node, IActorRef coordinator, CancellationToken stopping = default) : IReplica
{
    public CancellationToken Stopping => stopping;
    AssignedSource? assigned;
    long finalStep = -1;

    public string Node => node;
    public string Dir => ClusterRun.NodeDir(settings.RunDir, node);
    /// <summary>DiLoCo: masks and negatives differ between replicas, the seed mixes in the node. Every-step: a row's
    /// masks and negatives depend on its step and its row of the global batch only.</summary>
    public int Seed => EveryStep ? settings.Seed : Seeds.Mix(settings.Seed, Seeds.StableHash(node));
    bool EveryStep => settings.Cluster.Sync == ClusterSettings.EveryStep;

    /// <summary>The run's last step, once the coordinator has said the run is over; -1 before.</summary>
    public long FinalStep => Interlocked.Read(ref finalStep);
    internal void Finished(long step) => Interlocked.Exchange(ref finalStep, step);

    public ITrainingSource Assigned(ITrainingSource source) => assigned = new AssignedSource(source);

    public Props Props(IActorRef trainer, IActorRef metrics) =>
        Akka.Actor.Props.Create(() => new Replica(settings, node, coordinator, assigned!, trainer, metrics, this)).WithDispatcher(Dispatchers.Model);
}

/// <summary>A replica pipeline's link to its coordinator, a child of the node's run supervisor. It registers; for each
/// round it assigns the source the round's records (a cursor range, or the next records of the node's partitions) and
/// gives the trainer the round's weights and the objective's state; it hands the coordinator what the trainer (and the
/// teacher) hand it back: the deltas of a DiLoCo round (θ − θᵢ). every-step replicas exchange with each other, not
/// through the coordinator: each step's features for the all-gathers and gradients go to every peer, and each replica
/// makes the step's update itself from their sum (the coordinator sends the state only to a replica that holds none;
/// one replica, the reporter, tells it each update made and reports its state where the coordinator asks, for its
/// checkpoints, a replica that joins, or a run that goes on after a loss). Once a cluster checkpoint is durable, it
/// acknowledges to the source what it covers and marks in the ledger which rounds it applied.</summary>
public sealed class Replica : ReceiveActor, IWithTimers
{
    /// <summary>Reply Drained (every-step: at once) once everything handed in has been sent, and the coordinator has said whether it applied it
    /// (at most a round's deadline later): a stopping node waits for it before it leaves.</summary>
    public sealed record Drain;
    public sealed record Drained;
    internal sealed record RegisterAgain;
    sealed record DrainDeadline;
    /// <summary>From the trainer's thread: the Part-th all-gather of a step, its own tensors, and where the gathered ones go.</summary>
    sealed record Gather(long Attempt, int Part, List<(string Name, Tensor Value)> Tensors, TaskCompletionSource<IReadOnlyList<Tensor>> Gathered);

    /// <summary>How often a replica offers itself again: a coordinator that moved to another node learns of it so.</summary>
    internal static readonly TimeSpan RegisterEvery = TimeSpan.FromSeconds(3);

    public ITimerScheduler Timers { get; set; } = null!;

    /// <summary>A round started: how it was given (RoundStart or StepStart), the round, and, once here, its weights.</summary>
    sealed class Started(object start, Round round, IActorRef deltaReceiver, IReadOnlyDictionary<string, string> state)
    {
        public object Start { get; } = start;
        public Round Round { get; } = round;
        public IActorRef DeltaReceiver { get; } = deltaReceiver;
        public IReadOnlyDictionary<string, string> State { get; } = state;
        public WeightTransfer.Received? Weights { get; set; }
        public bool Loaded { get; set; }
        public Trainer.RoundTrained? Trained { get; set; }
        public Checkpointer.Parts? Teacher { get; set; }
    }

    /// <summary>every-step: a step's exchange with its peers (StepStart.Peers): their features for each all-gather and
    /// their gradients, by node, this replica's own among them; it may begin before the step's StepStart is here.</summary>
    sealed class Exchange
    {
        public StepCoordinator.StepStart? Start { get; set; }
        public Dictionary<(int Part, string Node), IReadOnlyList<(string Name, Tensor Value)>> Features { get; } = [];
        public Dictionary<string, IReadOnlyList<(string Name, Tensor Value)>> Gradients { get; } = [];
        /// <summary>Since this replica's own gradient: what it waits for its peers'.</summary>
        public System.Diagnostics.Stopwatch SinceHandIn { get; } = new();

        public void Dispose()
        {
            foreach (var tensors in Features.Values.Concat(Gradients.Values)) foreach (var (_, t) in tensors) t.Dispose();
            Features.Clear();
            Gradients.Clear();
        }
    }

    readonly MamoSettings settings;
    readonly string node;
    readonly IActorRef coordinator, trainer, metrics, receiver;
    readonly AssignedSource source;
    readonly ReplicaHooks hooks;
    readonly bool keepsTeacher;
    readonly Dictionary<long, Started> started = [];
    /// <summary>Rounds handed in and not yet known applied or not: a Commit says.</summary>
    readonly List<Round> handedIn = [];
    /// <summary>Transfers under way: a stopping node waits for them.</summary>
    int sending;
    (long Attempt, int Part, TaskCompletionSource<IReadOnlyList<Tensor>> Gathered)? gather;
    readonly Dictionary<long, Exchange> exchanges = [];
    /// <summary>every-step: the attempts up to this one are updated or dropped; what still comes for them is disposed.</summary>
    long settled = long.MinValue;
    /// <summary>every-step: the attempts whose update this replica tells the coordinator it made (StepStart.Reports).</summary>
    readonly HashSet<long> reports = [];
    /// <summary>every-step: where this replica's state reports go, by request, until the trainer's report is here; then
    /// the reports and the teacher's parts, in order, until both of one are.</summary>
    readonly Dictionary<long, IActorRef> reportTo = [];
    readonly Queue<(IActorRef To, Trainer.StateReport Report)> reported = new();
    readonly Queue<(List<(string Name, Tensor Value)> Tensors, long Step)> teacherParts = new();
    /// <summary>every-step: the receiver of the coordinator this replica reported to last; where this replica's node
    /// stops, its state goes there (its last word, request 0), for the coordinator's last checkpoint.</summary>
    IActorRef? reportingTo;
    bool lastWordSent;
    /// <summary>every-step, since the last log line: steps, and the seconds waited for the peers' gradients after its own.</summary>
    (int Steps, double Waited) waits;
    IActorRef? drainer, lastCoordinator;

    public Replica(MamoSettings settings, string node, IActorRef coordinator, AssignedSource source, IActorRef trainer, IActorRef metrics, ReplicaHooks hooks)
    {
        this.settings = settings;
        this.node = node;
        this.coordinator = coordinator;
        this.source = source;
        this.trainer = trainer;
        this.metrics = metrics;
        this.hooks = hooks;
        using (var objective = TrainingTask.Of(settings).Objective(settings.Model)) keepsTeacher = objective.TeacherMomentum is not null;
        receiver = Context.ActorOf(WeightTransfer.Receiver.Props(Self, maxBytes: 16L << 30), "data");

        Receive<RoundCoordinator.RoundStart>(s => Begin(s, new Round(s.Attempt, s.Round, s.FirstStep, ResetsTeacher: true, s.Replicas, s.Schedule), s.DeltaReceiver, s.State,
            s.Rewind ? "its last round was not applied" : null, new AssignedSource.Assignment(default!, s.Cursor, s.Records)));
        Receive<StepCoordinator.StepStart>(s =>
        {
            if (ExchangeOf(s.Attempt) is not { } x) return;
            x.Start = s;
            // The state given replaces whatever this replica made of the steps before (a new coordinator, a dropped step).
            if (s.WithState)
            {
                foreach (var (attempt, old) in exchanges.Where(e => e.Key < s.Attempt).ToList())
                {
                    exchanges.Remove(attempt);
                    old.Dispose();
                }
                settled = Math.Max(settled, s.Attempt - 1);
            }
            // A step given with the state brings the teacher: its targets wait for it, not for what this replica held before.
            Begin(s, new Round(s.Attempt, s.Step, s.Step, ResetsTeacher: s.WithState, s.Replicas, s.Schedule), s.Receiver, s.State, null,
                new AssignedSource.Assignment(default!, s.Cursor, s.BatchSize));
            // A replica that holds the state goes on from its own, the update of the step before applied.
            if (!s.WithState && started.TryGetValue(s.Attempt, out var st)) LoadStep(st, s, []);
        });
        Receive<WeightTransfer.Received>(OnReceived);
        Receive<StepCoordinator.Abort>(a =>
        {
            if (gather is { } g && g.Attempt == a.Attempt) g.Gathered.TrySetCanceled();
            if (exchanges.Remove(a.Attempt, out var x)) x.Dispose();
            reports.Remove(a.Attempt);
            settled = Math.Max(settled, a.Attempt);
            if (started.Remove(a.Attempt, out var s)) GiveUp(s, "its coordinator dropped it");
            if (handedIn.Find(r => r.Attempt == a.Attempt) is { } dropped)
            {
                if (EveryStep) trainer.Tell(new Trainer.GiveUpRound(a.Attempt));   // its update, if still to come, is not made
                metrics.Tell(new Metrics.RoundOutcome(dropped, Applied: false));
                handedIn.Remove(dropped);
                TryDrained();
            }
        });
        Receive<Gather>(g =>
        {
            if (!started.ContainsKey(g.Attempt) || !exchanges.TryGetValue(g.Attempt, out var x) || x.Start is not { } s)
            {
                g.Gathered.TrySetCanceled();
                foreach (var (_, v) in g.Tensors) v.Dispose();
                return;
            }
            gather = (g.Attempt, g.Part, g.Gathered);
            foreach (var peer in s.Peers.Where(p => p.Node != node)) Send(peer.Receiver, WeightTransfer.Kind.Features, g.Attempt, g.Tensors, "float32", g.Part);
            x.Features[(g.Part, node)] = g.Tensors;
            TryGather(x);
        });
        Receive<Trainer.StepApplied>(a =>
        {
            if (reports.Remove(a.Attempt)) coordinator.Tell(new StepCoordinator.StepMade(a.Attempt, a.GradNorm, a.Skipped, a.LearningRate));
        });
        Receive<StepCoordinator.ReportState>(r => AskReport(r.Request, r.To));
        Receive<Trainer.StateReport>(r =>
        {
            if (!reportTo.Remove(r.Request, out var to))
            {
                foreach (var (_, t) in r.Tensors) t.Dispose();
                return;
            }
            reported.Enqueue((to, r));
            SendReports();
        });
        Receive<Trainer.RoundTrained>(t =>
        {
            if (!started.TryGetValue(t.Round.Attempt, out var s))
            {
                foreach (var (_, v) in t.Tensors) v.Dispose();
                return;
            }
            s.Trained = t;
            TryHandIn(s);
        });
        // The teacher's part after the round's last update (DiLoCo), for the teacher's delta; every-step: for a state report.
        Receive<Checkpointer.Parts>(p =>
        {
            if (EveryStep)
            {
                teacherParts.Enqueue((p.Tensors.SelectMany(t => t.Tensors).Select(t => (MamoTrainer.TeacherPrefix + t.Name, t.Value)).ToList(), p.TeacherStep ?? p.Step));
                SendReports();
                return;
            }
            if (started.Values.FirstOrDefault(s => s.Loaded && s.Teacher is null && s.Start is RoundCoordinator.RoundStart) is not { } s)
            {
                foreach (var part in p.Tensors) foreach (var (_, v) in part.Tensors) v.Dispose();
                return;
            }
            s.Teacher = p;
            TryHandIn(s);
        });
        Receive<Coordination.Commit>(OnCommit);
        Receive<Coordination.Finish>(f =>
        {
            Log.Information("{Node}: the run is done at step {Step}", node, f.Step);
            hooks.Finished(f.Step);
            source.Complete();
        });
        Receive<WeightTransfer.Sent>(s =>
        {
            sending--;
            if (s.Tag is { Kind: WeightTransfer.Kind.State, Attempt: 0 }) lastWordSent = true;
            if (!s.Delivered) Log.Warning("{Node}: the {Kind} of attempt {Attempt} was not delivered", node, s.Tag.Kind, s.Tag.Attempt);
            TryDrained();
        });
        Receive<Drain>(_ =>
        {
            drainer = Sender;
            if (EveryStep && handedIn.Count > 0)
                Log.Information("{Node} leaves with {Steps} steps handed in since the last cluster checkpoint (a coordinator that stops checkpoints those it applied)",
                    node, handedIn.Count);
            Timers.StartSingleTimer(nameof(DrainDeadline), new DrainDeadline(), settings.Cluster.RoundTimeout);
            // The replica that reports to the coordinator sends it its state as its node stops: a coordinator that stops
            // too checkpoints it, one that goes on takes it up where that beats what the others hold.
            if (EveryStep && reportingTo is { } to) AskReport(0, to);
            else lastWordSent = true;
            TryDrained();
        });
        Receive<DrainDeadline>(_ =>
        {
            if (handedIn.Count > 0) Log.Warning("{Node} leaves without word whether its last rounds were applied", node);
            handedIn.Clear();
            lastWordSent = true;
            TryDrained();
        });
        Receive<RegisterAgain>(_ => coordinator.Tell(new Coordination.Register(node, receiver)));
        Receive<Metrics.Flushed>(_ =>
        {
            drainer?.Tell(new Drained());
            drainer = null;
        });
    }

    protected override void PreStart()
    {
        coordinator.Tell(new Coordination.Register(node, receiver));
        Timers.StartPeriodicTimer("register", new RegisterAgain(), RegisterEvery);
    }

    /// <summary>A round given: its records to the source, and (once its weights are here) its weights to the trainer.</summary>
    void Begin(object start, Round round, IActorRef deltaReceiver, IReadOnlyDictionary<string, string> state, string? rewind, AssignedSource.Assignment share)
    {
        var stream = !source.ReadWhole;
        // A stream's records since the last durable cluster checkpoint are read again where a round of them was not
        // applied: the coordinator said so, or it is a new one (the old one died with what it had not checkpointed).
        // Trained and not yet settled by a checkpoint: a round loaded, or handed in and neither applied nor refused. (The
        // new coordinator's first commit, on registering, settles nothing of the old one's rounds.)
        var unsettled = handedIn.Count > 0 || started.Values.Any(s => s.Loaded);
        if (stream && rewind is null && unsettled && lastCoordinator is not null && !Sender.Equals(lastCoordinator)) rewind = "its coordinator changed";
        lastCoordinator = Sender;
        if (stream && rewind is not null)
        {
            Context.Parent.Tell(new RunSupervisor.RestartPipeline($"{node} reads its stream again from the last cluster checkpoint: {rewind}"));
            return;
        }
        // A round still without its weights will not get them now: its coordinator moved on.
        foreach (var old in started.Values.Where(s => !s.Loaded).ToList())
        {
            started.Remove(old.Round.Attempt);
            GiveUp(old, "its coordinator gave another round");
        }
        started[round.Attempt] = new Started(start, round, deltaReceiver, state);
        source.Assign(share with { Round = round });
    }

    void OnReceived(WeightTransfer.Received r)
    {
        var tag = r.Tag;
        if (tag.Kind is WeightTransfer.Kind.Features or WeightTransfer.Kind.Gradient)
        {
            if (ExchangeOf(tag.Attempt) is not { } x)
            {
                Dispose(r);
                return;
            }
            if (tag.Kind == WeightTransfer.Kind.Features)
            {
                x.Features[(tag.Part, tag.Node)] = r.Tensors;
                TryGather(x);
            }
            else
            {
                x.Gradients[tag.Node] = r.Tensors;
                TryUpdate(x);
            }
            return;
        }
        if (tag.Kind != WeightTransfer.Kind.Weights || !started.TryGetValue(tag.Attempt, out var s))
        {
            Dispose(r);
            return;
        }
        if (s.Start is StepCoordinator.StepStart step)
        {
            s.Weights = r with { Tensors = [] };   // the trainer owns them
            LoadStep(s, step, r.Tensors);
            return;
        }
        s.Weights = r;
        if (s.Round.ResetsTeacher)
            Log.Information("{Node} round {Round} starts from θ {Hash}", node, s.Round.Number, Checkpoint.WeightHash(r.Tensors
                .Where(t => t.Name.StartsWith(MamoTrainer.StudentPrefix)).Select(t => (t.Name[MamoTrainer.StudentPrefix.Length..], t.Value))));
        // The trainer owns what it is given; a DiLoCo round keeps θ here, to hand in θ − θᵢ.
        trainer.Tell(new Trainer.LoadRound(s.Round, r.Tensors.Select(t => (t.Name, Tensors.Copy(t.Value))).ToList(), s.State, null));
        s.Loaded = true;
    }

    /// <summary>An every-step step to the trainer: from the state given (a replica that held none), or from its own.</summary>
    void LoadStep(Started s, StepCoordinator.StepStart step, IReadOnlyList<(string Name, Tensor Value)> state)
    {
        trainer.Tell(new Trainer.LoadRound(s.Round, state, s.State, new Shard(step, Self, settings.Cluster.RoundTimeout, hooks.Stopping), step.OptimizerStep,
            step.CheckHash, step.TeacherStep));
        s.Loaded = true;
    }

    /// <summary>A step's exchange, begun where it is the first word of the attempt; null where the attempt is settled.</summary>
    Exchange? ExchangeOf(long attempt)
    {
        if (exchanges.TryGetValue(attempt, out var x)) return x;
        return attempt <= settled ? null : exchanges[attempt] = new Exchange();
    }

    /// <summary>Once every peer's features of the all-gather this replica waits in are here: each tensor concatenated in
    /// node order (the global batch's row order).</summary>
    void TryGather(Exchange x)
    {
        if (gather is not { } g || x.Start is not { } s || g.Attempt != s.Attempt || s.Peers.Any(p => !x.Features.ContainsKey((g.Part, p.Node)))) return;
        gather = null;
        var parts = s.Peers.Select(p => x.Features[(g.Part, p.Node)]).ToList();
        foreach (var p in s.Peers) x.Features.Remove((g.Part, p.Node));
        var all = parts[0].Select((_, i) => cat(parts.Select(p => p[i].Value).ToArray(), 0)).ToList();
        foreach (var p in parts) foreach (var (_, t) in p) t.Dispose();
        if (!g.Gathered.TrySetResult(all)) foreach (var t in all) t.Dispose();
    }

    /// <summary>Once every peer's gradient (and this replica's own) is here: the trainer makes the step's update.</summary>
    void TryUpdate(Exchange x)
    {
        if (x.Start is not { } s || s.Peers.Any(p => !x.Gradients.ContainsKey(p.Node))) return;
        exchanges.Remove(s.Attempt);
        settled = Math.Max(settled, s.Attempt);
        var gradients = s.Peers.Select(p => x.Gradients[p.Node]).ToList();
        x.Gradients.Clear();
        x.Dispose();
        if (s.Reports)
        {
            reports.Add(s.Attempt);
            reportingTo = s.Receiver;
            if (s.ReportsState) reportTo[s.Attempt] = s.Receiver;
        }
        else reportingTo = null;   // another replica reports now
        trainer.Tell(new Trainer.ApplyStep(s.Attempt, gradients, s.Reports, s.ReportsState));
        waits = (waits.Steps + 1, waits.Waited + x.SinceHandIn.Elapsed.TotalSeconds);
        if ((s.Step + 1) % settings.MetricsEverySteps != 0) return;
        Log.Information("{Node}: its peers' gradients were here {Waited:F3} s after its own (mean of the last {Steps} steps)", node, waits.Waited / waits.Steps, waits.Steps);
        waits = default;
    }

    /// <summary>Once the trainer's work (and, where the objective keeps one, the teacher's part) is here: DiLoCo's deltas
    /// and account of the round, or every-step's gradient and account of the step, to the coordinator.</summary>
    void TryHandIn(Started s)
    {
        if (s.Trained is not { } t) return;
        var everyStep = s.Start is StepCoordinator.StepStart;
        if (!everyStep && keepsTeacher && s.Teacher is null) return;
        started.Remove(s.Round.Attempt);
        handedIn.Add(s.Round);
        if (everyStep)
        {
            HandInStep(s, t);
            return;
        }
        try
        {
            var given = s.Weights!.Tensors.ToDictionary(w => w.Name, w => w.Value);
            var teacher = s.Teacher?.Tensors.SelectMany(p => p.Tensors).Select(w => (Name: MamoTrainer.TeacherPrefix + w.Name, w.Value)) ?? [];
            using var scope = NewDisposeScope();
            var deltas = t.Tensors.Concat(teacher).Select(w => (w.Name, Delta(given, w.Name, w.Value))).ToList();
            coordinator.Tell(new RoundCoordinator.RoundDone(s.Round.Attempt, s.Round.Number, node, t.Samples, t.Position.Offsets, t.Loss, t.Terms, t.Observations, t.Partial));
            Send(s.DeltaReceiver, WeightTransfer.Kind.Delta, s.Round.Attempt, deltas, settings.Cluster.DeltaDType);
            if (t.Partial) Log.Information("{Node} hands in round {Round} cut short after {Samples} samples", node, s.Round.Number, t.Samples);
        }
        finally
        {
            foreach (var (_, v) in t.Tensors) v.Dispose();
            foreach (var part in s.Teacher?.Tensors ?? []) foreach (var (_, v) in part.Tensors) v.Dispose();
            if (s.Weights is { } w) Dispose(w);
        }
    }

    /// <summary>every-step: the step's account to the coordinator, and the gradient to every peer; this replica keeps its own.</summary>
    void HandInStep(Started s, Trainer.RoundTrained t)
    {
        var step = (StepCoordinator.StepStart)s.Start;
        coordinator.Tell(new StepCoordinator.StepDone(step.Attempt, node, t.Samples, t.Loss, t.Terms, t.Observations, t.Hash));
        if (t.Hash != "") Log.Information("{Node} started step {Step} from replica state {Hash}", node, step.Step, t.Hash);
        if (ExchangeOf(step.Attempt) is not { } x)
        {
            foreach (var (_, g) in t.Tensors) g.Dispose();
            return;
        }
        foreach (var peer in step.Peers.Where(p => p.Node != node)) Send(peer.Receiver, WeightTransfer.Kind.Gradient, step.Attempt, t.Tensors, "float32");
        x.Gradients[node] = t.Tensors;
        x.SinceHandIn.Start();
        TryUpdate(x);
    }

    /// <summary>θ − θᵢ; a tensor that grew rows in the round (a head's new classes) grew them from zero.</summary>
    static Tensor Delta(IReadOnlyDictionary<string, Tensor> given, string name, Tensor end)
    {
        if (!given.TryGetValue(name, out var start)) throw new InvalidDataException($"the round's weights lack '{name}'");
        if (start.shape.SequenceEqual(end.shape)) return start - end;
        var grown = zeros_like(end);
        grown[..(int)start.shape[0]].copy_(start);
        return grown - end;
    }

    /// <summary>every-step: asks the trainer for the state it holds, for <paramref name="to"/>.</summary>
    void AskReport(long request, IActorRef to)
    {
        reportTo[request] = to;
        trainer.Tell(new Trainer.ReportState(request));
    }

    /// <summary>Each state report with its teacher's part (none where the objective keeps no teacher): its account to
    /// the coordinator, its tensors to the coordinator's receiver.</summary>
    void SendReports()
    {
        while (reported.Count > 0 && (!keepsTeacher || teacherParts.Count > 0))
        {
            var (to, r) = reported.Dequeue();
            var (teacher, teacherStep) = keepsTeacher ? teacherParts.Dequeue() : ([], r.Step);
            coordinator.Tell(new StepCoordinator.StateReport(r.Request, node, r.Step, r.OptimizerStep, teacherStep, r.State));
            var tensors = r.Tensors.Concat(teacher).ToList();
            Send(to, WeightTransfer.Kind.State, r.Request, tensors, "float32");
            foreach (var (_, t) in tensors) t.Dispose();
            if (r.Request == 0) Log.Information("{Node} sent its coordinator its state at step {Step} as it stops", node, r.Step);
        }
    }

    void Send(IActorRef to, WeightTransfer.Kind kind, long attempt, IReadOnlyList<(string Name, Tensor Value)> tensors, string dtype, int part = 0)
    {
        Context.ActorOf(WeightTransfer.Sender.Props(to, Self, new WeightTransfer.Tag(kind, attempt, node, part), tensors, dtype, settings.Cluster.ChunkSize,
            settings.Cluster.Window));
        sending++;
    }

    /// <summary>A round that will not be applied: the trainer drops its steps, and a stream is read again from the
    /// last cluster checkpoint (what was assigned to it may be in the stream already).</summary>
    void GiveUp(Started s, string why)
    {
        Log.Information("{Node} gives up round {Round} (attempt {Attempt}): {Why}", node, s.Round.Number, s.Round.Attempt, why);
        trainer.Tell(new Trainer.GiveUpRound(s.Round.Attempt));
        if (s.Weights is { } w) Dispose(w);
        if (!source.ReadWhole && s.Loaded) Context.Parent.Tell(new RunSupervisor.RestartPipeline($"{node} reads its stream again: a round of it was given up"));
    }

    /// <summary>A durable cluster checkpoint: the source acknowledges what it covers, and the ledger says which of the
    /// rounds handed in it applied (one before its last round that it did not apply never will be).</summary>
    void OnCommit(Coordination.Commit c)
    {
        source.Commit(new StreamPosition(c.Positions.ToImmutableSortedDictionary()));
        foreach (var round in handedIn.ToList())
        {
            var applied = c.Applied.Contains(round.Attempt);
            if (!applied && round.Number >= c.Through) continue;
            metrics.Tell(new Metrics.RoundOutcome(round, applied));
            handedIn.Remove(round);
        }
        TryDrained();
    }

    /// <summary>A stopping DiLoCo replica leaves once what it handed in is sent and known applied or not. A stopping
    /// every-step replica waits only for its last word, where it is the reporter: the coordinator drops the steps in
    /// flight when a replica leaves (what this one sends its peers is of no use then), and the state it sends is what a
    /// coordinator that stops with this node checkpoints.</summary>
    void TryDrained()
    {
        if (drainer is null || EveryStep && !lastWordSent || !EveryStep && (sending > 0 || handedIn.Count > 0 || started.Values.Any(s => s.Trained is not null))) return;
        metrics.Tell(new Metrics.Flush());   // Drained once the round outcomes told it are written (Metrics.Flushed)
    }

    bool EveryStep => settings.Cluster.Sync == ClusterSettings.EveryStep;

    static void Dispose(WeightTransfer.Received r)
    {
        foreach (var (_, t) in r.Tensors) t.Dispose();
    }

    protected override void PostStop()
    {
        gather?.Gathered.TrySetCanceled();
        foreach (var s in started.Values) if (s.Weights is { } w) Dispose(w);
        foreach (var x in exchanges.Values) x.Dispose();
        foreach (var (_, r) in reported) foreach (var (_, t) in r.Tensors) t.Dispose();
        foreach (var (part, _) in teacherParts) foreach (var (_, t) in part) t.Dispose();
        base.PostStop();
    }

    /// <summary>An every-step replica's place in the step's global batch; its all-gathers go to its peers, numbered in
    /// the step's order. Integer tensors (the image keys) travel as three exact float32 parts of 22, 21 and 21 bits.</summary>
    sealed class Shard(StepCoordinator.StepStart s, IActorRef replica, TimeSpan timeout, CancellationToken stopping) : IBatchShard
    {
        int gathers;
        public long FirstRow => s.FirstRow;
        public int Index => s.Index;

        public IReadOnlyList<Tensor> AllGather(IReadOnlyList<Tensor> local)
        {
            var wire = local.Select((t, i) => (Name: $"{i}", Value: t.dtype == ScalarType.Int64 ? Split(t) : t.detach().cpu().clone().DetachFromDisposeScope())).ToList();
            var gathered = new TaskCompletionSource<IReadOnlyList<Tensor>>(TaskCreationOptions.RunContinuationsAsynchronously);
            replica.Tell(new Gather(s.Attempt, gathers++, wire, gathered));
            // A node that stops drops the step here: the peers it would wait for may be stopping too, and never send.
            if (!gathered.Task.Wait((int)timeout.TotalMilliseconds, stopping)) throw new OperationCanceledException($"no gathered features within {timeout}");
            var all = gathered.Task.Result;
            try { return all.Select((t, i) => local[i].dtype == ScalarType.Int64 ? Join(t) : t.clone()).ToList(); }
            finally { foreach (var t in all) t.Dispose(); }
        }

        static Tensor Split(Tensor keys)
        {
            var k = keys.cpu().data<long>().ToArray();
            var parts = k.SelectMany(x => new float[] { (x >> 42) & 0x3FFFFF, (x >> 21) & 0x1FFFFF, x & 0x1FFFFF }).ToArray();
            return tensor(parts, new long[] { k.Length, 3 }).DetachFromDisposeScope();
        }

        static Tensor Join(Tensor parts)
        {
            var p = parts.data<float>().ToArray();
            return tensor(Enumerable.Range(0, p.Length / 3).Select(i => ((long)p[3 * i] << 42) | ((long)p[3 * i + 1] << 21) | (long)p[3 * i + 2]).ToArray());
        }
    }
}
