using System.Diagnostics;
using Akka.Actor;
using Mamo.Actors.Pipeline;
using Mamo.Actors.Run;
using Mamo.Actors.Sources;
using Mamo.Model;
using Serilog;
using TorchSharp;
using static TorchSharp.torch;

namespace Mamo.Actors.Cluster;

/// <summary>The cluster singleton of every-step training (cluster.sync = every-step). The replicas are data-parallel
/// peers, as DDP's: each holds θ, AdamW's moments and the teacher; each step they all-gather their features (ITC sees the
/// whole global batch) and exchange their gradients among themselves, and each makes the single-node update from the
/// sum in node order, so all hold the same bits (checked by hash every cluster.hash-every-steps). The coordinator gives
/// each step (the next batch-size cursors of the file source per replica; the replicas' rows, in node order, make the
/// global batch) and gives a step ahead (while one runs, the next: the replicas prepare its batch meanwhile). It makes
/// no update itself: one replica, the reporter, says it made each one, and reports the state it holds where the
/// coordinator needs it (torchft's way): after a step due a checkpoint, for a replica that joins, and, after a step
/// is dropped, the state a survivor holds, from which the run goes on. The coordinator writes single-node checkpoints
/// of those states, and never waits for one to be durable to give a step.</summary>
public sealed class StepCoordinator : Coordination
{
    /// <summary>A replica of a step: its node and its data-plane receiver.</summary>
    public sealed record Peer(string Node, IActorRef Receiver);
    /// <summary>Attempt Attempt of step Step: train BatchSize cursors from Cursor, as row FirstRow on of the global batch
    /// and Index-th of its Peers (every replica of the step, in node order: their receivers take this one's features
    /// and gradient). WithState: the state to start from follows (MamoTrainer.ReplicaState and the teacher, with the
    /// objective's State, AdamW at OptimizerStep, the teacher after TeacherStep updates); else the replica goes on from
    /// its own. Reports: after its update it tells the coordinator (StepMade), and with ReportsState sends Receiver the
    /// state after it (StateReport). CheckHash: its StepDone carries the hash of the state it starts from. Schedule: where
    /// the learning-rate schedule stands at the step (one node's steps the cluster has trained).</summary>
    public sealed record StepStart(long Attempt, long Step, long Schedule, long Cursor, int BatchSize, int Index, long FirstRow, bool WithState,
        IReadOnlyDictionary<string, string> State, long OptimizerStep, long TeacherStep, IReadOnlyList<Peer> Peers, bool Reports, bool ReportsState, bool CheckHash,
        IActorRef Receiver) : IClusterMessage
    {
        public int Replicas => Peers.Count;
    }
    /// <summary>A replica's account of an attempt: its pairs, its share of the loss, what its objective observed, and
    /// (StepStart.CheckHash) the hash of the state it started from, else "" (the gradient goes to its peers).</summary>
    public sealed record StepDone(long Attempt, string Node, long Samples, double Loss, IReadOnlyDictionary<string, double> Terms,
        IReadOnlyDictionary<string, string> Observations, string Hash = "") : IClusterMessage;
    /// <summary>The reporter made the update of the attempt: its learning rate and gradient norm, or that it skipped.</summary>
    public sealed record StepMade(long Attempt, double GradNorm, bool Skipped, double LearningRate) : IClusterMessage;
    /// <summary>Asks a replica for the state it holds after its last update: a StateReport tagged Request, to To.</summary>
    public sealed record ReportState(long Request, IActorRef To) : IClusterMessage;
    /// <summary>A replica's state after Step steps, AdamW at OptimizerStep, the teacher after TeacherStep updates (one
    /// fewer where it is pipelined), with the objective's State; its tensors
    /// (MamoTrainer.ReplicaState and the teacher's) follow on the data plane, tagged State, Request and Node. Request: the
    /// attempt whose update it follows (StepStart.ReportsState), a ReportState's, or 0: the reporter's last word as its
    /// node stops.</summary>
    public sealed record StateReport(long Request, string Node, long Step, long OptimizerStep, long TeacherStep, IReadOnlyDictionary<string, string> State) : IClusterMessage;
    /// <summary>The coordinator dropped the attempt and gives its work again: every-step, when a replica of the step
    /// left; DiLoCo, when a round is abandoned (too few reported). A replica that handed it in knows then that it will
    /// never be applied: a stopping node waits for that word.</summary>
    public sealed record Abort(long Attempt) : IClusterMessage;
    sealed record Deadline(long Attempt);
    sealed record RecoveryDeadline(long Request);

    sealed record Participant(string Node, IActorRef Replica, IActorRef Receiver, long Cursor);

    sealed class Attempt(long number, long step, long schedule, long cursor, IReadOnlyList<Participant> assigned, Participant reporter, bool reportsState)
    {
        public long Number { get; } = number;
        public long Step { get; } = step;
        /// <summary>Where the learning-rate schedule stands at it (one node's steps trained before it).</summary>
        public long Schedule { get; } = schedule;
        /// <summary>The cursor of its first pair.</summary>
        public long Cursor { get; } = cursor;
        public IReadOnlyList<Participant> Assigned { get; } = assigned;
        public Participant Reporter { get; } = reporter;
        /// <summary>The reporter sends the state after its update.</summary>
        public bool ReportsState { get; } = reportsState;
        /// <summary>A checkpoint of the state after it is due.</summary>
        public bool Checkpoints { get; init; }
        public Dictionary<string, StepDone> Done { get; } = new();
        /// <summary>The reporter's word that it made the update.</summary>
        public StepMade? Word { get; set; }
        public bool Accounted => Assigned.All(p => Done.ContainsKey(p.Node));
        public Stopwatch Clock { get; } = Stopwatch.StartNew();
        /// <summary>Some replica was sent the state to start it from.</summary>
        public bool SentState { get; init; }
    }

    /// <summary>A replica's state report: its account, then its tensors, in either order.</summary>
    sealed class Report
    {
        public StateReport? Account { get; set; }
        public WeightTransfer.Received? State { get; set; }
        public bool Ready => Account is not null && State is not null;

        public void Dispose()
        {
            foreach (var (_, t) in State?.Tensors ?? []) t.Dispose();
            State = null;
        }
    }

    /// <summary>The state of the last report taken up (or of the checkpoint the coordinator started from), at its
    /// Step: what it checkpoints and sends a replica that holds none. It makes no update of its own.</summary>
    readonly MamoTrainer trainer;
    /// <summary>Since the last metrics line: the steps made, and the seconds since the line before.</summary>
    (int Steps, Stopwatch Clock) timing = (0, Stopwatch.StartNew());
    /// <summary>The step whose state each replica holds next (it makes the updates of the steps it was given).</summary>
    readonly Dictionary<IActorRef, long> holds = new();
    readonly long steps;
    /// <summary>The step, cursor and schedule (one node's steps trained) the next attempt is given; the steps the
    /// cluster made (the reporter's word), and the cursor and schedule after them; the cursor and schedule at the
    /// trainer's state (schedule -1: from a checkpoint written before it was kept, counted as then at the next step).</summary>
    long nextStep, cursor, nextSchedule, made, madeCursor, schedule, stateCursor, stateSchedule;
    /// <summary>The updates the trainer's teacher holds: one fewer than its student's where the replicas' teachers are
    /// pipelined (their targets of step t come from the teacher after t - 1 updates).</summary>
    long teacherStep;
    /// <summary>The steps made since the trainer's state, for a run that goes on from a state before them.</summary>
    readonly List<(long Attempt, long Step, long Cursor, long Schedule)> trail = [];
    /// <summary>The attempts given whose accounts are coming in, in order: at most two, the next step given while one
    /// runs so that the replicas prepare its batch meanwhile; then those accounted for whose word is still to come.</summary>
    readonly List<Attempt> given = [];
    readonly Queue<Attempt> accounted = new();
    /// <summary>Attempts dropped since the run last went on: a state a replica reports may have made some of them.</summary>
    readonly List<Attempt> dropped = [];
    readonly Dictionary<(long Request, string Node), Report> reports = new();
    /// <summary>A state asked of a replica (after a dropped step, or at a stop): no step is given until it is here, its
    /// deadline passes, or the replica leaves.</summary>
    (long Request, IActorRef? Source)? recovering;
    /// <summary>The replica whose word the last step made came with: it holds the newest state.</summary>
    IActorRef? reporter;
    /// <summary>Since the last step given that a checkpoint follows: checkpoint.every bounds the work a lost coordinator
    /// takes with it.</summary>
    readonly Stopwatch sinceCheckpoint = Stopwatch.StartNew();
    /// <summary>The step of the last checkpoint.</summary>
    long written;

    /// <param name="init">a new run's weights come from this checkpoint (pretrain --init, finetune --from); null: from the seed</param>
    public StepCoordinator(MamoSettings settings, Device device, string? init = null) : base(settings, Parts(settings))
    {
        steps = settings.MaxSteps > 0 ? settings.MaxSteps : long.MaxValue;
        var resumed = StartingPoint.Resume(settings);
        if (resumed is { } r && CannotGoOn(Cluster, r.Dir, r.State) is { } why) throw new SettingsException(why);
        // As single-node, a new run's first checkpoint is its step 0: the weights every replica starts from.
        var (dir, state) = resumed ?? StartingPoint.Choose(settings, Task.Objective, init, device);
        trainer = MamoTrainer.Load(dir, settings.Optimizer, device, settings.Seed, withTeacher: true, settings.Model, Task.Objective);
        stateCursor = madeCursor = cursor = (StreamPosition.FromExtra(state.Extra)[TrainingSamples.CursorPartition] ?? -1) + 1;
        written = made = nextStep = trainer.Step;
        teacherStep = state.TeacherStep;
        stateSchedule = nextSchedule = schedule = ScheduleOf(state);
        // A new run's first step waits for start-replicas (the nodes started together begin together).
        if (resumed is not null) Resumed(state);
        if (state.Step > 0) History.CoordinatorStarted(Context.System);
        Log.Information("every-step coordinator at step {Step} (cursor {Cursor}), θ {Hash}", trainer.Step, cursor, Checkpoint.WeightHash(Checkpoint.Named(trainer.Student)));

        Receive<Deadline>(d =>
        {
            if (InFlight().Any(a => a.Number == d.Attempt)) Drop($"the deadline ({Cluster.RoundTimeout}) of attempt {d.Attempt} passed");
        });
        Receive<RecoveryDeadline>(d =>
        {
            if (recovering?.Request != d.Request) return;
            Log.Warning("no state came from the replica asked for it within the deadline");
            recovering = null;
            GoOnFrom(Newest());
        });
        Receive<StepDone>(d =>
        {
            if (InFlight().FirstOrDefault(a => a.Number == d.Attempt) is not { } a) return;
            a.Done[d.Node] = d;
            while (given.Count > 0 && given[0].Accounted)
            {
                accounted.Enqueue(given[0]);
                given.RemoveAt(0);
            }
            TryStart();
        });
        Receive<StepMade>(m =>
        {
            if (InFlight().Concat(dropped).FirstOrDefault(a => a.Number == m.Attempt) is not { } a) return;
            a.Word = m;
            reporter = a.Reporter.Replica;
            TryStart();
        });
        Receive<StateReport>(r =>
        {
            ReportOf(r.Request, r.Node).Account = r;
            Reported(r.Request, r.Node);
        });
        Receive<WeightTransfer.Received>(r =>
        {
            if (r.Tag.Kind != WeightTransfer.Kind.State)
            {
                foreach (var (_, t) in r.Tensors) t.Dispose();
                return;
            }
            var report = ReportOf(r.Tag.Attempt, r.Tag.Node);
            report.Dispose();
            report.State = r;
            Reported(r.Tag.Attempt, r.Tag.Node);
        });
    }

    public static Props Props(MamoSettings settings, Device device, string? init = null) =>
        Akka.Actor.Props.Create(() => new StepCoordinator(settings, device, init)).WithDispatcher(Dispatchers.Model);

    /// <summary>A single node's checkpoint parts: what its trainer holds.</summary>
    static IReadOnlyCollection<string> Parts(MamoSettings s)
    {
        using var objective = TrainingTask.Of(s).Objective(s.Model);
        return [Checkpoint.StudentPart, Checkpoint.OptimizerPart, .. objective.Parts.Keys, .. objective.TeacherMomentum is null ? Array.Empty<string>() : [Checkpoint.TeacherPart]];
    }

    protected override long Through => made;
    protected override long Total => steps;
    protected override long FinalStep => steps;
    protected override long StateThrough(Checkpointer.CheckpointDurable d) => d.Step;

    IEnumerable<Attempt> InFlight() => accounted.Concat(given);

    Report ReportOf(long request, string node) => reports.TryGetValue((request, node), out var r) ? r : reports[(request, node)] = new Report();

    /// <summary>A replica actor that restarted keeps its reference but has a new receiver, and holds nothing.</summary>
    protected override void Reregistered(IActorRef replica) => Lost(replica, "a replica of the step restarted");

    protected override void Left(IActorRef replica, string node) => Lost(replica, $"replica {node} left");

    void Lost(IActorRef replica, string why)
    {
        holds.Remove(replica);
        if (replica.Equals(reporter)) reporter = null;
        if (InFlight().Any(a => a.Assigned.Any(p => p.Replica.Equals(replica)))) Drop(why);
        else if (recovering is { Source: { } source } && source.Equals(replica))
        {
            recovering = null;
            Recover();
        }
        // Nobody holds the state at the next step any more: the run goes on from the newest there is.
        else if (recovering is null && holds.Count == 0 && made > trainer.Step) Recover();
    }

    /// <summary>The steps made that can be counted, then the next step if it can be given.</summary>
    protected override void TryStart()
    {
        TryCount();
        TryGive();
    }

    void TryGive()
    {
        while (given.Count < 2 && recovering is null && !Stopping && nextStep < steps && Quorum && Give()) { }
    }

    /// <summary>A coordinator that stops checkpoints the newest state it can get, where it is newer than its last
    /// checkpoint: a coordinator that takes over, or a restart, goes on from there and trains none of its steps again.</summary>
    protected override bool CheckpointBeforeStop()
    {
        TryCount();
        if (Writing || recovering is not null) return true;
        if (made == written && trainer.Step == written) return false;
        if (made > trainer.Step)
        {
            Log.Information("step {Step}: the coordinator stops, and checkpoints the newest state a replica holds", made);
            DropInFlight("the coordinator stops");
            Recover();   // checkpoints the state it goes on from, and asks this again
            return true;
        }
        Write();
        return true;
    }

    /// <summary>Gives the next step if it can: the step ahead only where the one before sent no state (a replica waiting
    /// for its state takes no other step). A replica that holds no state is sent the coordinator's, where it is the
    /// state at the step; else the replicas that hold one take the step alone and report the state after it.</summary>
    bool Give()
    {
        if (given.Count > 0 && given[^1].SentState) return false;
        var replicas = Replicas.OrderBy(r => r.Value.Node, StringComparer.Ordinal).ToList();
        var withState = replicas.Where(r => !holds.TryGetValue(r.Key, out var h) || h != nextStep).Select(r => r.Key).ToHashSet();
        var forJoin = false;
        if (withState.Count > 0 && trainer.Step != nextStep)
        {
            if (InFlight().LastOrDefault() is { ReportsState: true }) return false;   // the state at nextStep is on its way
            replicas = replicas.Where(r => !withState.Contains(r.Key)).ToList();
            if (replicas.Count == 0) return false;
            withState.Clear();
            forJoin = true;
        }
        var assigned = replicas.Select((r, i) => new Participant(r.Value.Node, r.Key, r.Value.Receiver, cursor + (long)i * Settings.BatchSize)).ToList();
        // The reporter is best a replica on this node: its state report is a copy in memory.
        var reporting = assigned.FirstOrDefault(p => p.Receiver.Path.Address.HasLocalScope) ?? assigned[0];
        if (schedule < 0) stateSchedule = schedule = nextSchedule = trainer.Step * assigned.Count;
        var every = Settings.CheckpointEverySteps;
        var checkpoints = nextStep + 1 >= steps || every > 0 && (nextStep + 1) % every == 0
            || Settings.CheckpointEvery > TimeSpan.Zero && sinceCheckpoint.Elapsed >= Settings.CheckpointEvery;
        if (checkpoints) sinceCheckpoint.Restart();   // from the step given, so that checkpoint.every is the grid
        var a = new Attempt(NextAttempt(), nextStep, nextSchedule, cursor, assigned, reporting, checkpoints || forJoin)
        {
            SentState = withState.Count > 0, Checkpoints = checkpoints,
        };
        given.Add(a);
        var peers = assigned.Select(p => new Peer(p.Node, p.Receiver)).ToList();
        var checkHash = Cluster.HashEverySteps > 0 && a.Step % Cluster.HashEverySteps == 0;
        var state = withState.Count > 0 ? trainer.ReplicaState().ToList() : null;
        var objectiveState = withState.Count > 0 ? trainer.Objective.SaveState() : new Dictionary<string, string>();
        for (int i = 0; i < assigned.Count; i++)
        {
            var p = assigned[i];
            var sent = withState.Contains(p.Replica);
            var reports = p == reporting;
            p.Replica.Tell(new StepStart(a.Number, a.Step, a.Schedule, p.Cursor, Settings.BatchSize, i, (long)i * Settings.BatchSize, sent,
                sent ? objectiveState : new Dictionary<string, string>(), trainer.Optimizer.Step, teacherStep, peers, reports, reports && a.ReportsState, checkHash, Receiver));
            if (sent)
                Context.ActorOf(WeightTransfer.Sender.Props(p.Receiver, Self, new WeightTransfer.Tag(WeightTransfer.Kind.Weights, a.Number), state!, "float32",
                    Cluster.ChunkSize, Cluster.Window));
            holds[p.Replica] = a.Step + 1;
        }
        if (withState.Count > 0)
            Log.Information("step {Step}: the state to {Nodes}", a.Step, string.Join(", ", assigned.Where(p => withState.Contains(p.Replica)).Select(p => p.Node)));
        if (forJoin) Log.Information("step {Step}: {Nodes} take it and {Reporter} reports the state after it, for the replicas that hold none", a.Step,
            string.Join(", ", assigned.Select(p => p.Node)), reporting.Node);
        nextStep++;
        nextSchedule += assigned.Count;
        cursor += (long)assigned.Count * Settings.BatchSize;
        Timers.StartSingleTimer(a.Number, new Deadline(a.Number), Cluster.RoundTimeout);
        if (a.Step % Settings.MetricsEverySteps == 0) Log.Information("step {Step}: {Count} replicas from cursor {Cursor}", a.Step, assigned.Count, a.Cursor);
        return true;
    }

    /// <summary>Counts each step accounted for whose reporter made its update, in order; where the step reports its
    /// state, the state once it is here: the coordinator takes it up, and checkpoints it where that is due.</summary>
    void TryCount()
    {
        while (!Writing && recovering is null && accounted.TryPeek(out var a) && a.Word is { } word)
        {
            Report? report = null;
            if (a.ReportsState && (!reports.TryGetValue((a.Number, a.Reporter.Node), out report) || !report.Ready)) return;
            if (!Agree(a)) return;
            accounted.Dequeue();
            Timers.Cancel(a.Number);
            Count(a, word);
            if (report is null) continue;
            reports.Remove((a.Number, a.Reporter.Node));
            TakeUp(report);
            if (a.Checkpoints) Write();
        }
    }

    /// <summary>A step the cluster made: its account to the training curve and the history, and the attempt among those
    /// the next checkpoint applies. Word: the reporter's (null: a step a reported state made, whose word never came).</summary>
    void Count(Attempt a, StepMade? word)
    {
        var done = a.Assigned.Where(p => a.Done.ContainsKey(p.Node)).Select(p => a.Done[p.Node]).ToList();
        // Replayed in node order (the global batch's row order): the labels admitted, as every replica admitted them.
        foreach (var d in done) trainer.Objective.Replay(d.Observations);
        Curve.Trained(done.Sum(d => d.Samples));
        var loss = done.Sum(d => d.Loss);
        if (word is { Skipped: true }) Log.Warning("step {Step} skipped: loss {Loss}, gradient norm {Norm}", a.Step, loss, word.GradNorm);
        else if (word is not null && done.Count == a.Assigned.Count && (a.Step + 1) % Settings.MetricsEverySteps == 0)
        {
            Log.Information("step {Step} loss {Loss:F4} over {Pairs} pairs from {Count} replicas", a.Step + 1, loss, done.Sum(d => d.Samples), done.Count);
            var terms = done.SelectMany(d => d.Terms).GroupBy(t => t.Key).ToDictionary(g => g.Key, g => g.Sum(t => t.Value));
            Curve.Write(new TrainLine(a.Step + 1, loss, terms)
            {
                Scores = trainer.Objective.Scores(), LearningRate = word.LearningRate, GradNorm = word.GradNorm, Replicas = done.Count,
            });
        }
        Timed(log: (a.Step + 1) % Settings.MetricsEverySteps == 0);
        History.Committed(a.Step, a.Assigned.Select(p => p.Node), a.Clock.Elapsed, Members());
        Applied([a.Number]);
        made = a.Step + 1;
        madeCursor = a.Cursor + (long)a.Assigned.Count * Settings.BatchSize;
        schedule = a.Schedule + a.Assigned.Count;
        trail.Add((a.Number, a.Step, madeCursor, schedule));
    }

    /// <summary>A replica's state, as the coordinator's: the state at the steps made so far.</summary>
    void TakeUp(Report r)
    {
        var account = r.Account!;
        using (var scope = NewDisposeScope())
        {
            trainer.Objective.LoadState(account.State);
            trainer.LoadReplicaState(r.State!.Tensors.ToDictionary(t => t.Name, t => t.Value), account.OptimizerStep);
            foreach (var part in trainer.Objective.Parts.Values) part.to(trainer.Device);
        }
        r.Dispose();
        trainer.StartAt(account.Step, 1, schedule);
        teacherStep = account.TeacherStep;
        (stateCursor, stateSchedule) = (madeCursor, schedule);
        trail.Clear();
        // Reports of this state or older ones (a last word) are of no use now.
        foreach (var (key, old) in reports.Where(x => x.Value.Account is { } older && older.Step <= account.Step).ToList())
        {
            old.Dispose();
            reports.Remove(key);
        }
    }

    /// <summary>Where the step checks hashes: every replica started it from the same state, and from the coordinator's
    /// where that is the state at the step. A replica that does not is a bug or a machine that computes otherwise: the
    /// steps in flight are given again, with the reporter's state.</summary>
    bool Agree(Attempt a)
    {
        var hashes = a.Done.Values.Where(d => d.Hash != "").ToList();
        if (hashes.Count == 0) return true;
        var run = trainer.Step == a.Step ? trainer.ReplicaHash() : hashes.Find(d => d.Node == a.Reporter.Node)?.Hash ?? hashes[0].Hash;
        var differ = hashes.Where(d => d.Hash != run).Select(d => d.Node).ToList();
        if (differ.Count == 0)
        {
            Log.Information("step {Step}: {Count} replicas hold the run's state, bit for bit ({Hash})", a.Step, hashes.Count, run);
            return true;
        }
        Log.Error("step {Step}: replicas {Nodes} do not hold the run's state ({Hash}): every replica is sent it again", a.Step, string.Join(", ", differ), run);
        Drop("replicas diverged");
        return false;
    }

    /// <summary>Counts a step; with log, writes the mean step time since the last line.</summary>
    void Timed(bool log)
    {
        timing.Steps++;
        if (!log) return;
        Log.Information("a step took {Seconds:F3} s over the last {Steps}", timing.Clock.Elapsed.TotalSeconds / timing.Steps, timing.Steps);
        timing = (0, Stopwatch.StartNew());
    }

    /// <summary>Attempts that cannot complete: their replicas drop them, and the run goes on from the newest state a
    /// replica holds, with it to every replica.</summary>
    void Drop(string why)
    {
        DropInFlight(why);
        Recover();
    }

    void DropInFlight(string why)
    {
        foreach (var a in InFlight().ToList())
        {
            Log.Warning("step {Step} (attempt {Attempt}) dropped: {Why}", a.Step, a.Number, why);
            Timers.Cancel(a.Number);
            foreach (var p in a.Assigned) p.Replica.Tell(new Abort(a.Number));
            dropped.Add(a);
        }
        accounted.Clear();
        given.Clear();
    }

    /// <summary>The state to go on from: a report here (a reporter's last word, or the state after a dropped step), else
    /// the one a replica that holds a state reports now (the reporter's first: it made every step counted), else the
    /// coordinator's own.</summary>
    void Recover()
    {
        var holders = holds.Keys.Where(Replicas.ContainsKey).OrderByDescending(r => r.Equals(reporter)).ThenByDescending(r => r.Path.Address.HasLocalScope).ToList();
        if (Newest() is { } ready)
        {
            GoOnFrom(ready);
            return;
        }
        if (holders.Count == 0 && !reports.Values.Any(r => r.Account is { } x && x.Step >= trainer.Step))
        {
            GoOnFrom(null);
            return;
        }
        var request = NextAttempt();
        recovering = (request, holders.FirstOrDefault());
        if (holders.Count > 0)
        {
            holders[0].Tell(new ReportState(request, Receiver));
            Log.Information("step {Step}: asks {Node} for the state it holds", made, Replicas[holders[0]].Node);
        }
        Timers.StartSingleTimer(nameof(RecoveryDeadline), new RecoveryDeadline(request), Stopping ? TimeSpan.FromSeconds(20) : Cluster.RoundTimeout);
    }

    /// <summary>The newest state reported in full that the run can go on from: one at or after the coordinator's own,
    /// whose steps were given.</summary>
    Report? Newest() => reports.Values.Where(r => r.Ready && Countable(r.Account!.Step)).MaxBy(r => r.Account!.Step);

    /// <summary>The state after <paramref name="step"/> steps can be taken up: CountTo can count the steps made up to it.</summary>
    bool Countable(long step) =>
        step >= trainer.Step && (step <= made || Enumerable.Range(0, (int)Math.Min(step - made, int.MaxValue)).All(i => dropped.Concat(InFlight()).Any(a => a.Step == made + i)));

    /// <summary>A part of a state report is here: where the coordinator waits for a state, it goes on once one is. A
    /// report nobody waits for any more (of a step given before the run last went on) is of no use.</summary>
    void Reported(long request, string node)
    {
        if (request != 0 && request != recovering?.Request && !dropped.Concat(InFlight()).Any(a => a.Number == request))
        {
            reports.Remove((request, node), out var stale);
            stale?.Dispose();
            return;
        }
        if (recovering is not null && Newest() is { } ready) GoOnFrom(ready);
        else if (Stopping) GoOnStopping();
        else TryStart();
    }

    /// <summary>The run goes on from a replica's state (null: the coordinator's own): the steps made counted up to it,
    /// the state taken up, and every replica sent it with the next step. A stopping coordinator checkpoints it.</summary>
    void GoOnFrom(Report? r)
    {
        Timers.Cancel(nameof(RecoveryDeadline));
        recovering = null;
        var step = r?.Account!.Step ?? trainer.Step;
        var source = r is null ? "the coordinator's" : $"{r.Account!.Node}'s";
        if (!CountTo(step))
        {
            Log.Warning("step {Step}: {Source} state is of a step the coordinator did not give: the run goes on from its own, step {Own}", step, source, trainer.Step);
            r = null;
            CountTo(step = trainer.Step);
            source = "the coordinator's";
        }
        if (r is not null)
        {
            reports.Remove((r.Account!.Request, r.Account.Node));
            TakeUp(r);
        }
        foreach (var other in reports.Values) other.Dispose();
        reports.Clear();
        dropped.Clear();
        holds.Clear();
        (nextStep, cursor, nextSchedule) = (made, madeCursor, schedule);
        Log.Information("step {Step}: the run goes on from {Source} state", step, source);
        // A state got back after a loss is worth keeping: checkpointed at once.
        if (!Writing && trainer.Step > written) Write();
        if (Stopping) GoOnStopping();
        else TryGive();
    }

    /// <summary>Counts the steps made up to <paramref name="step"/>: back, where the state is of a step before some
    /// counted (they are given again), or on, through the dropped steps the state made; false where it cannot.</summary>
    bool CountTo(long step)
    {
        if (step < trainer.Step) return false;
        if (step <= made)
        {
            var undone = trail.Where(t => t.Step >= step).ToList();
            if (undone.Count == 0) return true;
            Unapplied(undone.Select(t => t.Attempt).ToList());
            trail.RemoveAll(t => t.Step >= step);
            made = step;
            (madeCursor, schedule) = trail.Count > 0 ? (trail[^1].Cursor, trail[^1].Schedule) : (stateCursor, stateSchedule);
            Log.Warning("steps {First} to {Last} are not in the state the run goes on from: they are given again", step, undone[^1].Step);
            return true;
        }
        var first = made;
        while (made < step)
        {
            if (dropped.Concat(InFlight()).FirstOrDefault(a => a.Step == made) is not { } a) return false;
            Count(a, a.Word);
        }
        Log.Information("steps {First} to {Last} were made before they were dropped: they are not given again", first, step - 1);
        return true;
    }

    /// <summary>A single-node checkpoint of the coordinator's state; steps go on being given while it is written.</summary>
    void Write()
    {
        written = trainer.Step;
        WriteCheckpoint(trainer.Step, trainer.Parts().Select(p => (p.Name, (IEnumerable<(string, Tensor)>)p.Tensors)), TrainingSamples.BeforeCursor(stateCursor),
            trainer.Objective.SaveState(), stateSchedule, trainer.Optimizer.Step, teacherStep);
        Log.Information("step {Step}: checkpoint", trainer.Step);
    }

    protected override void PostStop()
    {
        foreach (var r in reports.Values) r.Dispose();
        trainer.Dispose();
        base.PostStop();
    }
}
