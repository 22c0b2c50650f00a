using System.Collections.Immutable;
using System.Diagnostics;
using System.Globalization;
using Akka.Actor;
using Mamo.Actors.Pipeline;
using Mamo.Actors.Run;
using Mamo.Actors.Sources;
using Mamo.Model;
using Serilog;
using static TorchSharp.torch;

namespace Mamo.Actors.Cluster;

/// <summary>The cluster singleton of DiLoCo training. It holds the global weights θ (the student and the objective's
/// parts), the teacher, the objective's state, the outer optimiser and the round. Each round it gives every registered
/// replica θ and its share of the data: a disjoint range of a file source's cursor (so each sample of an epoch is
/// trained once across the cluster), or the next records of the node's Kafka partitions. It gathers their deltas,
/// replays what each replica's objective observed (in node order, so the label map and the prequential sums are what
/// one process would have), applies the outer step, averages the replicas' teachers (an EMA is linear: the mean of EMAs
/// that started equal is the EMA of the mean student's path), and writes the cluster checkpoint; the next round starts
/// once it is durable.</summary>
public sealed class RoundCoordinator : Coordination
{
    /// <summary>Train the round's records from the θ and objective state that follow: cursors [Cursor, Cursor + Records)
    /// of a file source, or the next Records records of the node's Kafka partitions (Rewind: read the stream again from
    /// the last cluster checkpoint first: this replica's last round was not applied). Its steps are numbered from
    /// FirstStep, where the learning-rate schedule stands at Schedule (one node's steps the cluster has trained); Replicas
    /// train the round side by side. Send the delta to DeltaReceiver.</summary>
    public sealed record RoundStart(long Attempt, long Round, long FirstStep, int Replicas, long Schedule, long Cursor, int Records, bool Rewind, IReadOnlyDictionary<string, string> State,
        IActorRef DeltaReceiver) : IClusterMessage;
    /// <summary>A replica's account of its attempt: the samples it trained on (its delta's weight), the stream positions
    /// they reach, its steps' mean loss and terms (NaN and none when every step was skipped), what its objective
    /// observed, and whether it was cut short (its node stopped: the rest of its range is trained by another).</summary>
    public sealed record RoundDone(long Attempt, long Round, string Node, long Samples, IReadOnlyDictionary<string, long> Positions, double Loss,
        IReadOnlyDictionary<string, double> Terms, IReadOnlyDictionary<string, string> Observations, bool Partial) : IClusterMessage;
    sealed record Deadline(long Round);

    public const string OuterOptimizerPart = "outer-optimizer", RoundKey = "round", UnfinishedKey = "unfinished";

    sealed record Assignment(string Node, IActorRef Replica, long Attempt, long Cursor, int Records);

    sealed class Round(long number, IReadOnlyList<Assignment> assigned, int fresh)
    {
        public long Number { get; } = number;
        public IReadOnlyList<Assignment> Assigned { get; } = assigned;
        /// <summary>Ranges taken from the cursor's front this round (the others were unfinished ones given again).</summary>
        public int Fresh { get; } = fresh;
        /// <summary>Each attempt's account, and its delta.</summary>
        public Dictionary<long, RoundDone> Reports { get; } = new();
        public Dictionary<long, WeightTransfer.Received> Deltas { get; } = new();
        /// <summary>Attempts whose replica left during the round: the round does not wait for them.</summary>
        public HashSet<long> Lost { get; } = new();
        public bool Expired { get; set; }
        /// <summary>The round's time line, for its breakdown in the log: θ sent to every replica, the last replica's
        /// inner steps done, the last delta in.</summary>
        public Stopwatch Clock { get; } = Stopwatch.StartNew();
        public int Broadcasts { get; set; }
        public TimeSpan Broadcast { get; set; }
        public TimeSpan InnerSteps { get; set; }
        public TimeSpan Gathered { get; set; }

        public void Dispose()
        {
            foreach (var d in Deltas.Values) foreach (var (_, t) in d.Tensors) t.Dispose();
            Deltas.Clear();
        }
    }

    /// <summary>θ (the student and the objective's parts), the teacher where the objective keeps one, and the objective
    /// whose state the replicas share. Its optimiser is never made: the replicas' own AdamW make the inner steps.</summary>
    readonly MamoTrainer global;
    OuterOptimizer outer = null!;
    readonly long rounds;
    readonly bool ranges;
    long round, cursor;
    /// <summary>Where the learning-rate schedule stands: the steps of one node's batch the applied rounds trained (-1:
    /// from a checkpoint written before it was kept, counted as then at the next round).</summary>
    long schedule;
    /// <summary>The stream positions the last cluster checkpoint covers (a Kafka source: each partition's last offset).</summary>
    StreamPosition positions = StreamPosition.None;
    /// <summary>Replicas whose last round was not applied: they read their stream again from the checkpoint.</summary>
    readonly HashSet<IActorRef> rewind = new();
    /// <summary>Ranges (first cursor, records) whose replica left, missed the deadline or stopped short: given again first.</summary>
    readonly List<(long Start, int Records)> unfinished = new();
    Round? current;

    /// <param name="init">a new run's θ and teacher come from this checkpoint (pretrain --init, finetune --from); null: from the seed</param>
    public RoundCoordinator(MamoSettings settings, string? init = null) : base(settings, Parts(settings))
    {
        rounds = settings.MaxSteps > 0 ? (settings.MaxSteps + Cluster.InnerSteps - 1) / Cluster.InnerSteps : long.MaxValue;
        ranges = ITrainingSource.ReadWholeSpec(settings.Source);
        global = new MamoTrainer(settings.Model, settings.Optimizer, CPU, settings.Seed, withTeacher: true, Task.Objective);
        if (StartingPoint.Resume(settings) is { } resumed) Resume(resumed.Dir, resumed.State);
        else
        {
            if (init is not null)
            {
                StartingPoint.StartFrom(init, global);
                Log.Information("coordinator starts a new run from {Init}: θ {Hash}", init, Checkpoint.WeightHash(Checkpoint.Named(global.Student)));
            }
            outer = new OuterOptimizer(Theta(), Cluster.OuterOptimizer);
            // Fine-tuning is judged against its starting model: step 0's checkpoint is the evaluators' baseline.
            if (Task.EvaluatesStudent) Write();
        }

        Receive<RoundDone>(d =>
        {
            if (current is null || current.Assigned.All(a => a.Attempt != d.Attempt)) return;
            current.Reports[d.Attempt] = d;
            current.InnerSteps = current.Clock.Elapsed;
            TryComplete();
        });
        Receive<WeightTransfer.Received>(r =>
        {
            if (current is null || r.Tag.Kind != WeightTransfer.Kind.Delta || current.Assigned.All(a => a.Attempt != r.Tag.Attempt))
            {
                foreach (var (_, t) in r.Tensors) t.Dispose();
                return;
            }
            current.Deltas[r.Tag.Attempt] = r;
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
    }

    public static Props Props(MamoSettings settings, string? init = null) =>
        Akka.Actor.Props.Create(() => new RoundCoordinator(settings, init)).WithDispatcher(Dispatchers.Model);

    /// <summary>The parts of a DiLoCo cluster checkpoint: θ's, the teacher's where the objective keeps one, and the outer optimiser's.</summary>
    static IReadOnlyCollection<string> Parts(MamoSettings s)
    {
        using var objective = TrainingTask.Of(s).Objective(s.Model);
        return [Checkpoint.StudentPart, .. objective.TeacherMomentum is null ? Array.Empty<string>() : [Checkpoint.TeacherPart], .. objective.Parts.Keys, OuterOptimizerPart];
    }

    /// <summary>θ: the student's and the objective parts' weights, as MamoTrainer.Weights names them (views).</summary>
    List<(string Name, Tensor Value)> Theta() => global.Weights().Where(w => !w.Name.StartsWith(MamoTrainer.TeacherPrefix)).ToList();

    protected override long Through => round;
    protected override long Total => rounds;
    protected override long FinalStep => rounds * Cluster.InnerSteps;
    protected override long StateThrough(Checkpointer.CheckpointDurable d) => d.Step / Cluster.InnerSteps;

    void Resume(string dir, Checkpoint.State state)
    {
        global.Objective.LoadState(state.Extra);
        Checkpoint.LoadModel(dir, Checkpoint.StudentFile, global.Student);
        foreach (var (name, module) in global.Objective.Parts) Checkpoint.LoadModel(dir, Checkpoint.PartFile(name), module);
        if (global.Objective.TeacherMomentum is not null) Checkpoint.LoadModel(dir, Checkpoint.TeacherFile, global.Teacher);
        var synchronous = !Wrote(state);
        Resumed(state, first: synchronous);
        schedule = ScheduleOf(state);
        if (synchronous)
        {
            // A synchronous start (every-step or one node): DiLoCo goes on from its step with a fresh outer optimiser, and
            // each replica takes that checkpoint's AdamW for its first round (Trainer.LoadOptimizer).
            if (CannotGoOn(Cluster, dir, state) is { } why) throw new SettingsException(why);
            round = state.Step / Cluster.InnerSteps;
            outer = new OuterOptimizer(Theta(), Cluster.OuterOptimizer);
            Log.Information("diloco goes on from the synchronous checkpoint {Checkpoint} at step {Step}: round {Round}, a fresh outer optimizer", dir, state.Step, round);
        }
        else
        {
            round = StateNumber(state, RoundKey, 0);
            LoadOuter(dir);
        }
        positions = StreamPosition.FromExtra(state.Extra);
        cursor = (positions[TrainingSamples.CursorPartition] ?? -1) + 1;
        if (state.Extra.TryGetValue(UnfinishedKey, out var left))
            foreach (var range in left.Split(',', StringSplitOptions.RemoveEmptyEntries))
            {
                // "start:records"; a bare start is a whole round's range (checkpoints before partial rounds).
                var parts = range.Split(':');
                unfinished.Add((long.Parse(parts[0], CultureInfo.InvariantCulture),
                    parts.Length > 1 ? int.Parse(parts[1], CultureInfo.InvariantCulture) : Cluster.InnerSteps * Settings.BatchSize));
            }
        History.CoordinatorStarted(Context.System);
        Log.Information("coordinator resumes from {Checkpoint}: round {Round}, cursor {Cursor}", dir, round, cursor);
    }

    /// <summary>Whether a checkpoint is a DiLoCo coordinator's (else a synchronous run's: every-step's or one node's).</summary>
    public static bool Wrote(Checkpoint.State state) => state.Extra.ContainsKey(RoundKey);

    /// <summary>The outer optimiser of a DiLoCo checkpoint, at the round it was saved at.</summary>
    void LoadOuter(string dir)
    {
        var saved = Checkpoint.LoadPart(Path.Combine(dir, Checkpoint.PartFile(OuterOptimizerPart)));
        try
        {
            // Before parts were named, the outer optimiser's buffers were the student's own names.
            var named = saved.ToDictionary(kv => kv.Key.StartsWith(MamoTrainer.StudentPrefix) || global.Objective.Parts.Keys.Any(p => kv.Key.StartsWith(p + "."))
                ? kv.Key : MamoTrainer.StudentPrefix + kv.Key, kv => kv.Value);
            outer = new OuterOptimizer(Theta(), Cluster.OuterOptimizer);
            outer.LoadState(named, round);
        }
        finally { foreach (var t in saved.Values) t.Dispose(); }
    }

    protected override void TryStart()
    {
        if (current is not null || Writing || round >= rounds || !Quorum) return;
        var span = Cluster.InnerSteps * Settings.BatchSize;
        var again = unfinished.OrderBy(u => u.Start).Take(Replicas.Count).ToList();
        if (!ranges) again.Clear();
        foreach (var range in again) unfinished.Remove(range);
        var fresh = 0;
        var assigned = Replicas.OrderBy(r => r.Value.Node, StringComparer.Ordinal).Select((r, i) =>
        {
            var (start, records) = !ranges ? (-1L, span) : i < again.Count ? again[i] : (cursor + (long)fresh++ * span, span);
            return new Assignment(r.Value.Node, r.Key, NextAttempt(), start, records);
        }).ToList();
        current = new Round(round, assigned, fresh);
        if (schedule < 0) schedule = round * Cluster.InnerSteps * assigned.Count;
        var weights = global.Weights().ToList();
        var state = global.Objective.SaveState();
        foreach (var a in assigned)
        {
            a.Replica.Tell(new RoundStart(a.Attempt, round, round * Cluster.InnerSteps, current.Assigned.Count, schedule, a.Cursor, a.Records, rewind.Remove(a.Replica), state, Receiver));
            Context.ActorOf(WeightTransfer.Sender.Props(Replicas[a.Replica].Receiver, Self, new WeightTransfer.Tag(WeightTransfer.Kind.Weights, a.Attempt), weights,
                "float32", Cluster.ChunkSize, Cluster.Window));
        }
        Timers.StartSingleTimer("deadline", new Deadline(round), Cluster.RoundTimeout);
        Log.Information("round {Round}: {Count} replicas from cursor {Cursor}", round, assigned.Count, cursor);
    }

    protected override void Left(IActorRef replica, string node)
    {
        rewind.Remove(replica);
        if (current?.Assigned.FirstOrDefault(a => a.Replica.Equals(replica)) is not { } a) return;
        current.Lost.Add(a.Attempt);
        TryComplete();
    }

    protected override void Sent(WeightTransfer.Sent sent)
    {
        if (current is not null && ++current.Broadcasts == current.Assigned.Count) current.Broadcast = current.Clock.Elapsed;
    }

    void TryComplete()
    {
        var r = current!;
        var reported = r.Assigned.Where(a => r.Reports.ContainsKey(a.Attempt) && r.Deltas.ContainsKey(a.Attempt)).ToList();
        // A replica that stopped after it handed in its (partial) round is reported, not waited for.
        var waiting = r.Assigned.Count(a => !r.Lost.Contains(a.Attempt) && !reported.Contains(a));
        if (waiting > 0 && !r.Expired) return;
        if (!ranges) reported = OnePerPartition(r, reported);
        var missed = r.Assigned.Where(a => !reported.Contains(a)).ToList();
        if (reported.Count == 0 || reported.Count < Cluster.MinReplicas)
        {
            if (waiting > 0) return;   // past the deadline but short of min-replicas: the ones still training may yet report
            // Nobody left to report: the round is given again from the same θ, its ranges first.
            Log.Warning("round {Round} abandoned: {Count} of the {Min} replicas it needs reported", r.Number, reported.Count, Cluster.MinReplicas);
            // Those that handed it in hear it is not applied: no later commit would settle it if the run stops now.
            foreach (var a in r.Assigned.Where(a => !r.Lost.Contains(a.Attempt))) a.Replica.Tell(new StepCoordinator.Abort(a.Attempt));
            GiveAgain(r.Assigned);
            cursor += r.Fresh * (long)Cluster.InnerSteps * Settings.BatchSize;
            r.Dispose();
            current = null;
            TryStart();
            return;
        }
        var outerStart = r.Clock.Elapsed;
        try { OuterStep(reported.Select(a => (r.Reports[a.Attempt], r.Deltas[a.Attempt])).ToList()); }
        finally { r.Dispose(); }
        cursor += r.Fresh * (long)Cluster.InnerSteps * Settings.BatchSize;
        foreach (var a in reported)
        {
            var done = r.Reports[a.Attempt];
            schedule += (done.Samples + Settings.BatchSize - 1) / Settings.BatchSize;   // its steps (a last batch cut short by dead letters counts)
            if (ranges)
            {
                // A replica that stopped short trained its range up to its position: the rest is trained by another.
                var reached = done.Positions.TryGetValue(TrainingSamples.CursorPartition, out var c) ? c : a.Cursor - 1;
                var end = a.Cursor + a.Records;
                if (reached + 1 < end) unfinished.Add((reached + 1, (int)(end - reached - 1)));
            }
            // A stream's records past the checkpoint are read again by whoever holds their partition, but for what applied
            // rounds trained (AssignedSource skips it).
            else positions = positions.Merge(new StreamPosition(done.Positions.ToImmutableSortedDictionary()));
        }
        GiveAgain(missed);
        round++;
        current = null;
        var outerStep = r.Clock.Elapsed - outerStart;
        Applied(reported.Select(a => a.Attempt));
        var path = Write();
        Log.Information("round {Round} done with {Count} replicas ({Participants}); attempts {Attempts}; checkpoint {Path}", round - 1, reported.Count,
            string.Join(",", reported.Select(a => a.Node)), string.Join(",", reported.Select(a => a.Attempt)), path);
        History.Committed(round - 1, reported.Select(a => a.Node), r.Clock.Elapsed, Members());
        WriteCurve(r, reported.Select(a => r.Reports[a.Attempt]).ToList());
        // The gather is the time from the last replica's inner steps to its last delta (the delta transfers overlap the
        // inner steps of slower replicas).
        Log.Information("round {Round} took {Total:F2} s: broadcast of θ {Broadcast:F2} s, inner steps until the last replica's end {Inner:F2} s, " +
            "gather of the deltas {Gather:F2} s, outer step {Outer:F2} s", round - 1, r.Clock.Elapsed.TotalSeconds,
            r.Broadcast.TotalSeconds, r.InnerSteps.TotalSeconds, Math.Max(0, (r.Gathered - r.InnerSteps).TotalSeconds), outerStep.TotalSeconds);
    }

    /// <summary>A stream's partition is trained by one replica in a round. Two that hand in the same partition trained
    /// the same records: the group moved it during the round, and its new owner began at the committed offset, behind
    /// what its old owner trained in this round. The hand-in with more samples is applied (the node name breaks a tie);
    /// the other is not, and its replica reads its stream again from the checkpoint.</summary>
    List<Assignment> OnePerPartition(Round r, List<Assignment> reported)
    {
        var held = new Dictionary<string, string>();
        var kept = new List<Assignment>();
        foreach (var a in reported.OrderByDescending(a => r.Reports[a.Attempt].Samples).ThenBy(a => a.Node, StringComparer.Ordinal))
        {
            var partitions = r.Reports[a.Attempt].Positions.Keys;
            if (partitions.FirstOrDefault(held.ContainsKey) is { } shared)
            {
                Log.Warning("round {Round}: {Node} and {Other} both trained {Partition} (the group moved it during the round); the first's " +
                    "hand-in is not applied: it reads its stream again from the checkpoint", r.Number, a.Node, held[shared], shared);
                continue;
            }
            foreach (var p in partitions) held[p] = a.Node;
            kept.Add(a);
        }
        return reported.Where(kept.Contains).ToList();
    }

    /// <summary>What was assigned and not applied is given again: a file source's range to whoever comes next, a
    /// stream's records by the replica itself, which reads them again from the checkpoint.</summary>
    void GiveAgain(IEnumerable<Assignment> assignments)
    {
        foreach (var a in assignments)
            if (ranges) unfinished.Add((a.Cursor, a.Records));
            else if (Replicas.ContainsKey(a.Replica)) rewind.Add(a.Replica);
    }

    /// <summary>Each replica's observations replayed in node order, then the outer step on the samples-weighted mean of
    /// their deltas (θ − θᵢ, each laid out as θ is), and the teacher moved by the mean of the teachers' deltas and by the
    /// outer step's extrapolation.</summary>
    void OuterStep(IReadOnlyList<(RoundDone Report, WeightTransfer.Received Delta)> replicas)
    {
        foreach (var (report, _) in replicas) global.Objective.Replay(report.Observations);
        using var scope = NewDisposeScope();
        Tensor[] Mean(IReadOnlyList<(string Name, Tensor Value)> of)
        {
            var deltas = replicas.Select(x =>
            {
                var given = x.Delta.Tensors.ToDictionary(t => t.Name, t => t.Value);
                return ((IReadOnlyList<Tensor>)of.Select(w => given.TryGetValue(w.Name, out var d) ? global.Objective.Align(w.Name, d, x.Report.Observations)
                    : throw new InvalidDataException($"a delta lacks '{w.Name}'")).ToList(), x.Report.Samples);
            }).ToList();
            return OuterOptimizer.OuterGradient(deltas);
        }
        var theta = Theta();
        var gradient = Mean(theta);
        var before = global.Objective.TeacherMomentum is null ? null : theta.Select(t => t.Value.detach().clone()).ToList();
        outer.Apply(theta.Select(t => t.Value).ToList(), gradient);
        if (before is null) return;
        // The replicas' teachers started from this one; their weighted mean is it minus the mean delta. Then the teacher
        // follows the student's outer step beyond the mean of the replicas' students (θ_new − (θ − g), Nesterov's
        // extrapolation), so that it stays the EMA of the path θ takes, the last round's jump included.
        var extrapolation = theta.Select((t, i) => (t.Name, Value: t.Value - before[i] + gradient[i]))
            .ToDictionary(e => e.Name, e => e.Value);
        var teacher = global.Weights().Where(w => w.Name.StartsWith(MamoTrainer.TeacherPrefix)).ToList();
        using var noGrad = no_grad();
        foreach (var (t, d) in teacher.Zip(Mean(teacher)))
        {
            t.Value.sub_(d);
            if (extrapolation.TryGetValue(MamoTrainer.StudentPrefix + t.Name[MamoTrainer.TeacherPrefix.Length..], out var jump)) t.Value.add_(jump);
        }
    }

    /// <summary>The round's train line: its replicas' inner-step losses and terms, each replica weighted by its
    /// samples (as its delta is), at the global step the round ends on, with the objective's scores after it.</summary>
    void WriteCurve(Round r, IReadOnlyList<RoundDone> reports)
    {
        Curve.Trained(reports.Sum(d => d.Samples));
        var counted = reports.Where(d => double.IsFinite(d.Loss) && d.Samples > 0).ToList();
        double Mean(Func<RoundDone, double> value) => counted.Sum(d => d.Samples * value(d)) / counted.Sum(d => d.Samples);
        var loss = counted.Count == 0 ? double.NaN : Mean(d => d.Loss);
        var terms = counted.Count == 0 ? new Dictionary<string, double>()
            : counted[0].Terms.Keys.Where(k => counted.All(d => d.Terms.ContainsKey(k))).ToDictionary(k => k, k => Mean(d => d.Terms[k]));
        Curve.Write(new TrainLine(round * Cluster.InnerSteps, loss, terms) { Scores = global.Objective.Scores(), Round = r.Number, Replicas = reports.Count });
    }

    /// <summary>The cluster checkpoint of the round just applied (or of step 0); the next round starts once it is durable.</summary>
    string Write()
    {
        var step = round * Cluster.InnerSteps;
        if (ranges) positions = TrainingSamples.BeforeCursor(cursor);
        var extra = new Dictionary<string, string>(global.Objective.SaveState())
        {
            [RoundKey] = round.ToString(CultureInfo.InvariantCulture),
            [UnfinishedKey] = string.Join(",", unfinished.OrderBy(u => u.Start).Select(u => FormattableString.Invariant($"{u.Start}:{u.Records}"))),
        };
        var parts = new List<(string, IEnumerable<(string, Tensor)>)> { (Checkpoint.StudentPart, Checkpoint.Named(global.Student)) };
        if (global.Objective.TeacherMomentum is not null) parts.Add((Checkpoint.TeacherPart, Checkpoint.Named(global.Teacher)));
        parts.AddRange(global.Objective.Parts.Select(p => (p.Key, (IEnumerable<(string, Tensor)>)Checkpoint.Named(p.Value))));
        parts.Add((OuterOptimizerPart, outer.State()));
        WriteCheckpoint(step, parts, positions, extra, schedule);
        return Path.Combine(Settings.RunDir, Checkpoint.RunFolder, Checkpoint.StepFolderName(step));
    }

    protected override void PostStop()
    {
        current?.Dispose();
        global.Dispose();
        outer.Dispose();
        base.PostStop();
    }
}
