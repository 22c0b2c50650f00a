using System.Diagnostics;
using Akka.Actor;
using Mamo.Actors.Pipeline;
using Mamo.Actors.Run;
using Mamo.Actors.Sources;
using Mamo.Model;
using Serilog;
using static TorchSharp.torch;

namespace Mamo.Actors.Cluster;

/// <summary>The cluster singleton of every-step training (cluster.sync = every-step). The replicas are data-parallel
/// peers, as DDP's: each holds θ, AdamW's moments and the teacher; each step they all-gather their features (ITC sees the
/// whole global batch) and exchange their gradients among themselves, and each makes the single-node update from the
/// sum in node order, so all hold the same bits (checked by hash every cluster.hash-every-steps). The coordinator gives
/// each step (the next batch-size cursors of the file source per replica; the replicas' rows, in node order, make the
/// global batch), sends the state to a replica that holds none (one that joins, or all after a dropped step), and keeps
/// the run's copy: one replica reports the sum it applied, and the coordinator makes the same update, replays what
/// their objectives observed, and writes single-node checkpoints. It gives a step ahead (while one runs, the next: the
/// replicas prepare its batch meanwhile) and never waits for its own copy's update to give one, nor for a checkpoint to
/// be durable.</summary>
public sealed class StepCoordinator : Coordination
{
    /// <summary>A replica of a step: its node and its data-plane receiver.</summary>
    public sealed record Peer(string Node, IActorRef Receiver);
    /// <summary>Attempt Attempt of step Step: train BatchSize cursors from Cursor, as row FirstRow on of the global batch
    /// and Index-th of its Peers (every replica of the step, in node order: their receivers take this one's features
    /// and gradient). WithState: the state to start from follows (MamoTrainer.ReplicaState and the teacher, with the
    /// objective's State, AdamW at OptimizerStep); else the replica goes on from its own. Reports: after its update it
    /// sends the sum to Receiver. CheckHash: its StepDone carries the hash of the state it starts from. Schedule: where
    /// the learning-rate schedule stands at the step (one node's steps the cluster has trained).</summary>
    public sealed record StepStart(long Attempt, long Step, long Schedule, long Cursor, int BatchSize, int Index, long FirstRow, bool WithState,
        IReadOnlyDictionary<string, string> State, long OptimizerStep, IReadOnlyList<Peer> Peers, bool Reports, bool CheckHash, IActorRef Receiver)
        : IClusterMessage
    {
        public int Replicas => Peers.Count;
    }
    /// <summary>A replica's account of an attempt: its pairs, its share of the loss, what its objective observed, and
    /// (StepStart.CheckHash) the hash of the state it started from, else "" (the gradient goes to its peers).</summary>
    public sealed record StepDone(long Attempt, string Node, long Samples, double Loss, IReadOnlyDictionary<string, double> Terms,
        IReadOnlyDictionary<string, string> Observations, string Hash = "") : IClusterMessage;
    /// <summary>The coordinator dropped the attempt and gives its work again: every-step, when a replica of the step
    /// left; DiLoCo, when a round is abandoned (too few reported). A replica that handed it in knows then that it will
    /// never be applied: a stopping node waits for that word.</summary>
    public sealed record Abort(long Attempt) : IClusterMessage;
    sealed record Deadline(long Attempt);

    sealed record Participant(string Node, IActorRef Replica, IActorRef Receiver, long Cursor);

    sealed class Attempt(long number, long step, long schedule, long cursor, IReadOnlyList<Participant> assigned, IActorRef reporter)
    {
        public long Number { get; } = number;
        public long Step { get; } = step;
        /// <summary>Where the learning-rate schedule stands at it (one node's steps trained before it).</summary>
        public long Schedule { get; } = schedule;
        /// <summary>The cursor of its first pair.</summary>
        public long Cursor { get; } = cursor;
        public IReadOnlyList<Participant> Assigned { get; } = assigned;
        public IActorRef Reporter { get; } = reporter;
        public Dictionary<string, StepDone> Done { get; } = new();
        public WeightTransfer.Received? Sum { get; set; }
        public bool Accounted => Assigned.All(p => Done.ContainsKey(p.Node));
        public Stopwatch Clock { get; } = Stopwatch.StartNew();
        /// <summary>Some replica was sent the state to start it from.</summary>
        public bool SentState { get; init; }

        public void Dispose()
        {
            foreach (var (_, t) in Sum?.Tensors ?? []) t.Dispose();
            Sum = null;
        }
    }

    readonly MamoTrainer trainer;
    /// <summary>Since the last metrics line: the steps the copy made, and the seconds since the line before.</summary>
    (int Steps, Stopwatch Clock) timing = (0, Stopwatch.StartNew());
    /// <summary>The step whose state each replica holds next (it makes the updates of the steps it was given).</summary>
    readonly Dictionary<IActorRef, long> holds = new();
    readonly long steps;
    /// <summary>The step, cursor and schedule (one node's steps trained) the next attempt is given; the cursor and
    /// schedule after the copy's last update (schedule -1: from a checkpoint written before it was kept, counted as then
    /// at the next step).</summary>
    long nextStep, cursor, appliedCursor, nextSchedule, schedule;
    /// <summary>The attempts given whose accounts are coming in, in order: at most two, the next step given while one
    /// runs so that the replicas prepare its batch meanwhile; then those accounted for whose sum is still to come.</summary>
    readonly List<Attempt> given = [];
    readonly Queue<Attempt> accounted = new();
    /// <summary>Since the last checkpoint: checkpoint.every bounds the work a lost coordinator takes with it.</summary>
    readonly Stopwatch sinceCheckpoint = Stopwatch.StartNew();
    /// <summary>The step of the copy's last checkpoint.</summary>
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
        appliedCursor = cursor = (StreamPosition.FromExtra(state.Extra)[TrainingSamples.CursorPartition] ?? -1) + 1;
        written = nextStep = trainer.Step;
        nextSchedule = schedule = ScheduleOf(state);
        // A new run's first step waits for start-replicas (the nodes started together begin together).
        if (resumed is not null) Resumed(state);
        if (state.Step > 0) History.CoordinatorStarted(Context.System);
        Log.Information("every-step coordinator at step {Step} (cursor {Cursor}), θ {Hash}", trainer.Step, cursor, Checkpoint.WeightHash(Checkpoint.Named(trainer.Student)));

        Receive<Deadline>(d =>
        {
            if (InFlight().Any(a => a.Number == d.Attempt)) Drop($"the deadline ({Cluster.RoundTimeout}) of attempt {d.Attempt} passed");
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
        Receive<WeightTransfer.Received>(r =>
        {
            if (r.Tag.Kind != WeightTransfer.Kind.Sum || InFlight().FirstOrDefault(a => a.Number == r.Tag.Attempt) is not { } a || a.Sum is not null)
            {
                foreach (var (_, t) in r.Tensors) t.Dispose();
                return;
            }
            a.Sum = r;
            TryStart();
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

    protected override long Through => trainer.Step;
    protected override long Total => steps;
    protected override long FinalStep => steps;
    protected override long StateThrough(Checkpointer.CheckpointDurable d) => d.Step;

    IEnumerable<Attempt> InFlight() => accounted.Concat(given);

    /// <summary>A replica actor that restarted keeps its reference but has a new receiver, and holds nothing.</summary>
    protected override void Reregistered(IActorRef replica)
    {
        holds.Remove(replica);
        if (InFlight().Any(a => a.Assigned.Any(p => p.Replica.Equals(replica)))) Drop("a replica of the step restarted");
    }

    protected override void Left(IActorRef replica, string node)
    {
        holds.Remove(replica);
        if (InFlight().Any(a => a.Assigned.Any(p => p.Replica.Equals(replica)))) Drop($"replica {node} left");
    }

    /// <summary>The copy's updates that can be made, then the next step if it can be given.</summary>
    protected override void TryStart()
    {
        TryApply();
        TryGive();
    }

    void TryGive()
    {
        while (given.Count < 2 && !Stopping && nextStep < steps && Quorum && Give()) { }
    }

    /// <summary>A coordinator that stops checkpoints the copy's updates since its last checkpoint, the complete steps it
    /// holds (accounted for, with their sum) applied first: a coordinator that takes over, or a restart, goes on from
    /// there and trains none of them again.</summary>
    protected override bool CheckpointBeforeStop()
    {
        TryApply();
        if (Writing) return true;
        if (trainer.Step == written) return false;
        Log.Information("step {Step}: the coordinator checkpoints before it stops", trainer.Step);
        Write();
        return true;
    }

    /// <summary>Gives the next step if it can: the step ahead only where the one before sent no state (a replica waiting
    /// for its state takes no other step), and the state only from a copy that has made every update before the step.</summary>
    bool Give()
    {
        if (given.Count > 0 && given[^1].SentState) return false;
        var assigned = Replicas.OrderBy(r => r.Value.Node, StringComparer.Ordinal)
            .Select((r, i) => new Participant(r.Value.Node, r.Key, r.Value.Receiver, cursor + (long)i * Settings.BatchSize)).ToList();
        var withState = assigned.Where(p => !holds.TryGetValue(p.Replica, out var h) || h != nextStep).Select(p => p.Replica).ToHashSet();
        if (withState.Count > 0 && trainer.Step != nextStep) return false;
        // The sum comes best from a replica on this node: its transfer is a copy in memory.
        var reporter = (assigned.FirstOrDefault(p => p.Receiver.Path.Address.HasLocalScope) ?? assigned[0]).Replica;
        if (schedule < 0) schedule = nextSchedule = trainer.Step * assigned.Count;
        var a = new Attempt(NextAttempt(), nextStep, nextSchedule, cursor, assigned, reporter) { SentState = withState.Count > 0 };
        given.Add(a);
        var peers = assigned.Select(p => new Peer(p.Node, p.Receiver)).ToList();
        var checkHash = Cluster.HashEverySteps > 0 && a.Step % Cluster.HashEverySteps == 0;
        var state = withState.Count > 0 ? trainer.ReplicaState().ToList() : null;
        var objectiveState = withState.Count > 0 ? trainer.Objective.SaveState() : new Dictionary<string, string>();
        for (int i = 0; i < assigned.Count; i++)
        {
            var p = assigned[i];
            var given = withState.Contains(p.Replica);
            p.Replica.Tell(new StepStart(a.Number, a.Step, a.Schedule, p.Cursor, Settings.BatchSize, i, (long)i * Settings.BatchSize, given,
                given ? objectiveState : new Dictionary<string, string>(), trainer.Optimizer.Step, peers, p.Replica.Equals(reporter), checkHash, Receiver));
            if (given)
                Context.ActorOf(WeightTransfer.Sender.Props(p.Receiver, Self, new WeightTransfer.Tag(WeightTransfer.Kind.Weights, a.Number), state!, "float32",
                    Cluster.ChunkSize, Cluster.Window));
            holds[p.Replica] = a.Step + 1;
        }
        if (withState.Count > 0)
            Log.Information("step {Step}: the state to {Nodes}", a.Step, string.Join(", ", assigned.Where(p => withState.Contains(p.Replica)).Select(p => p.Node)));
        nextStep++;
        nextSchedule += assigned.Count;
        cursor += (long)assigned.Count * Settings.BatchSize;
        Timers.StartSingleTimer(a.Number, new Deadline(a.Number), Cluster.RoundTimeout);
        if (a.Step % Settings.MetricsEverySteps == 0) Log.Information("step {Step}: {Count} replicas from cursor {Cursor}", a.Step, assigned.Count, a.Cursor);
        return true;
    }

    /// <summary>The run's copy makes the update of each step accounted for whose sum is here, in order: the one the
    /// replicas made, from the gradient they applied.</summary>
    void TryApply()
    {
        while (!Writing && accounted.TryPeek(out var a) && a.Sum is { } sum)
        {
            if (!Agree(a)) return;
            accounted.Dequeue();
            Timers.Cancel(a.Number);
            using (var scope = NewDisposeScope())
            {
                var done = a.Assigned.Select(p => a.Done[p.Node]).ToList();
                // Replayed in node order (the global batch's row order): the labels admitted, as every replica admitted them.
                foreach (var d in done) trainer.Objective.Replay(d.Observations);
                trainer.SetGradients(sum.Tensors.ToDictionary(t => t.Name, t => t.Value));
                // N replicas' global batch is N steps of one node: the schedule and the teacher's EMA follow the samples.
                trainer.StartAt(trainer.Step, a.Assigned.Count, a.Schedule);
                var terms = done.SelectMany(d => d.Terms).GroupBy(t => t.Key).ToDictionary(g => g.Key, g => g.Sum(t => t.Value));
                var result = trainer.Update(done.Sum(d => d.Loss), terms);
                trainer.FollowStudent();
                Curve.Trained(done.Sum(d => d.Samples));
                if (result.Skipped) Log.Warning("step {Step} skipped: loss {Loss}, gradient norm {Norm}", result.Step, result.Loss, result.GradNorm);
                else if ((result.Step + 1) % Settings.MetricsEverySteps == 0)
                {
                    Log.Information("step {Step} loss {Loss:F4} over {Pairs} pairs from {Count} replicas", result.Step + 1, result.Loss, done.Sum(d => d.Samples), done.Count);
                    Curve.Write(new TrainLine(result.Step + 1, result.Loss, result.Terms)
                    {
                        Scores = trainer.Objective.Scores(), LearningRate = result.LearningRate, GradNorm = result.GradNorm, Replicas = done.Count,
                    });
                }
                Timed(log: (result.Step + 1) % Settings.MetricsEverySteps == 0);
            }
            History.Committed(a.Step, a.Assigned.Select(p => p.Node), a.Clock.Elapsed, Members());
            Applied([a.Number]);
            appliedCursor = a.Cursor + (long)a.Assigned.Count * Settings.BatchSize;
            schedule = a.Schedule + a.Assigned.Count;
            a.Dispose();
            var every = Settings.CheckpointEverySteps;
            var byTime = Settings.CheckpointEvery > TimeSpan.Zero && sinceCheckpoint.Elapsed >= Settings.CheckpointEvery;
            if (trainer.Step >= steps || every > 0 && trainer.Step % every == 0 || byTime) Write();
        }
    }

    /// <summary>Where the step checks hashes: every replica started it from the state the run's copy holds. A replica
    /// that does not is a bug or a machine that computes otherwise: the steps in flight are given again, with the state.</summary>
    bool Agree(Attempt a)
    {
        var hashes = a.Done.Values.Where(d => d.Hash != "").ToList();
        if (hashes.Count == 0) return true;
        var own = trainer.ReplicaHash();
        var differ = hashes.Where(d => d.Hash != own).Select(d => d.Node).ToList();
        if (differ.Count == 0)
        {
            Log.Information("step {Step}: {Count} replicas hold the run's state, bit for bit ({Hash})", a.Step, hashes.Count, own);
            return true;
        }
        Log.Error("step {Step}: replicas {Nodes} do not hold the run's state ({Hash}): every replica is sent it again", a.Step, string.Join(", ", differ), own);
        Drop("replicas diverged");
        return false;
    }

    /// <summary>Counts a step; with log, writes the mean step time since the last line (the replicas' pace: the copy
    /// keeps up with them).</summary>
    void Timed(bool log)
    {
        timing.Steps++;
        if (!log) return;
        Log.Information("a step took {Seconds:F3} s over the last {Steps}", timing.Clock.Elapsed.TotalSeconds / timing.Steps, timing.Steps);
        timing = (0, Stopwatch.StartNew());
    }

    /// <summary>Attempts that cannot complete: their replicas drop them, and the steps are given again from the run's
    /// copy, with its state to every replica (some may have made updates the copy has not).</summary>
    void Drop(string why)
    {
        foreach (var a in InFlight().ToList())
        {
            Log.Warning("step {Step} (attempt {Attempt}) given again: {Why}", a.Step, a.Number, why);
            Timers.Cancel(a.Number);
            foreach (var p in a.Assigned) p.Replica.Tell(new Abort(a.Number));
            a.Dispose();
        }
        accounted.Clear();
        given.Clear();
        holds.Clear();
        nextStep = trainer.Step;
        cursor = appliedCursor;
        nextSchedule = schedule;
        TryGive();
    }

    /// <summary>A single-node checkpoint of the trainer; the next step starts once it is durable.</summary>
    void Write()
    {
        sinceCheckpoint.Restart();
        written = trainer.Step;
        WriteCheckpoint(trainer.Step, trainer.Parts().Select(p => (p.Name, (IEnumerable<(string, Tensor)>)p.Tensors)), TrainingSamples.BeforeCursor(appliedCursor),
            trainer.Objective.SaveState(), schedule, trainer.Optimizer.Step);
        Log.Information("step {Step}: checkpoint", trainer.Step);
    }

    protected override void PostStop()
    {
        foreach (var a in InFlight()) a.Dispose();
        trainer.Dispose();
        base.PostStop();
    }
}
