using System.Diagnostics;
using Akka.Actor;
using Mamo.Actors.Pipeline;
using Mamo.Actors.Run;
using Mamo.Actors.Sources;
using Mamo.Model;
using Serilog;
using static TorchSharp.torch;

namespace Mamo.Actors.Cluster;

/// <summary>The cluster singleton of every-step training (cluster.sync = every-step): the run's one student, AdamW
/// state, teacher and objective, as a single-node trainer holds them. Each step it gives every replica θ and the next
/// batch-size cursors of the file source (the replicas' rows, in node order, make the global batch), relays the
/// all-gather of their features (ITC sees the whole global batch), replays what their objectives observed (in node
/// order: the global batch's), sums their gradients, and makes the single-node update: clipping, AdamW, the
/// temperature clamp and the teacher's EMA. Its checkpoints are single-node checkpoints.</summary>
public sealed class StepCoordinator : Coordination
{
    /// <summary>Attempt Attempt of step Step: train BatchSize cursors from Cursor, as row FirstRow on of the global
    /// batch and Index-th of its Replicas, from the θ and objective state that follow (and the teacher, WithTeacher);
    /// send the features and the gradient to Receiver.</summary>
    public sealed record StepStart(long Attempt, long Step, long Cursor, int BatchSize, int Index, int Replicas, long FirstRow, bool WithTeacher,
        IReadOnlyDictionary<string, string> State, IActorRef Receiver) : IClusterMessage;
    /// <summary>A replica's account of an attempt: its pairs, its share of the loss, and what its objective observed
    /// (the gradient follows on the data plane).</summary>
    public sealed record StepDone(long Attempt, string Node, long Samples, double Loss, IReadOnlyDictionary<string, double> Terms,
        IReadOnlyDictionary<string, string> Observations) : IClusterMessage;
    /// <summary>The coordinator dropped the attempt and gives its work again: every-step, when a replica of the step
    /// left; DiLoCo, when a round is abandoned (too few reported). A replica that handed it in knows then that it will
    /// never be applied: a stopping node waits for that word.</summary>
    public sealed record Abort(long Attempt) : IClusterMessage;
    sealed record Deadline(long Attempt);

    sealed record Participant(string Node, IActorRef Replica, IActorRef Receiver, long Cursor);

    sealed class Attempt(long number, IReadOnlyList<Participant> assigned)
    {
        public long Number { get; } = number;
        public IReadOnlyList<Participant> Assigned { get; } = assigned;
        public Dictionary<string, WeightTransfer.Received> Features { get; } = new();
        public Dictionary<string, WeightTransfer.Received> Gradients { get; } = new();
        public Dictionary<string, StepDone> Done { get; } = new();
        public Stopwatch Clock { get; } = Stopwatch.StartNew();
        /// <summary>When θ had reached every replica.</summary>
        public TimeSpan Broadcast { get; set; }
        public int Broadcasts { get; set; }

        public void Dispose()
        {
            foreach (var r in Features.Values.Concat(Gradients.Values)) foreach (var (_, t) in r.Tensors) t.Dispose();
            Features.Clear();
            Gradients.Clear();
        }
    }

    readonly MamoTrainer trainer;
    /// <summary>Since the last metrics line: the steps' seconds in all, to broadcast θ, and until the last gradient (the
    /// rest is the update).</summary>
    (int Steps, double Total, double Broadcast, double Gradients) timing;
    /// <summary>The step of the θ each replica last received: its teacher follows from there without being sent.</summary>
    readonly Dictionary<IActorRef, long> holds = new();
    readonly long steps;
    long cursor;
    Attempt? current;
    /// <summary>Since the last checkpoint: checkpoint.every bounds the work a lost coordinator takes with it.</summary>
    readonly Stopwatch sinceCheckpoint = Stopwatch.StartNew();

    /// <param name="init">a new run's weights come from this checkpoint (pretrain --init, finetune --from); null: from the seed</param>
    public StepCoordinator(MamoSettings settings, Device device, string? init = null) : base(settings, Parts(settings))
    {
        steps = settings.MaxSteps > 0 ? settings.MaxSteps : long.MaxValue;
        var resumed = StartingPoint.Resume(settings);
        if (resumed?.State.Extra.ContainsKey(RoundCoordinator.RoundKey) == true)
            throw new SettingsException($"{resumed.Value.Dir} is a checkpoint of a diloco run; every-step resumes from a single-node or every-step checkpoint");
        // As single-node, a new run's first checkpoint is its step 0: the weights every replica starts from.
        var (dir, state) = resumed ?? StartingPoint.Choose(settings, Task.Objective, init, device);
        trainer = MamoTrainer.Load(dir, settings.Optimizer, device, settings.Seed, withTeacher: true, settings.Model, Task.Objective);
        cursor = (StreamPosition.FromExtra(state.Extra)[TrainingSamples.CursorPartition] ?? -1) + 1;
        Resumed(state);
        if (state.Step > 0) History.CoordinatorStarted(Context.System);
        Log.Information("every-step coordinator at step {Step} (cursor {Cursor}), θ {Hash}", trainer.Step, cursor, Checkpoint.WeightHash(Checkpoint.Named(trainer.Student)));

        Receive<Deadline>(d =>
        {
            if (current?.Number == d.Attempt) Drop($"the step's deadline ({Cluster.RoundTimeout}) passed");
        });
        Receive<StepDone>(d =>
        {
            if (current?.Number != d.Attempt) return;
            current.Done[d.Node] = d;
            TryApply();
        });
        Receive<WeightTransfer.Received>(r =>
        {
            if (current is null || r.Tag.Attempt != current.Number || r.Tag.Kind is not (WeightTransfer.Kind.Features or WeightTransfer.Kind.Gradient))
            {
                foreach (var (_, t) in r.Tensors) t.Dispose();
                return;
            }
            (r.Tag.Kind == WeightTransfer.Kind.Features ? current.Features : current.Gradients)[r.Tag.Node] = r;
            if (r.Tag.Kind == WeightTransfer.Kind.Features) TryGather();
            else TryApply();
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

    /// <summary>A replica actor that restarted keeps its reference but has a new receiver, and no teacher.</summary>
    protected override void Reregistered(IActorRef replica) => holds.Remove(replica);

    protected override void Sent(WeightTransfer.Sent sent)
    {
        if (current is { } a && sent.Tag.Kind == WeightTransfer.Kind.Weights && sent.Tag.Attempt == a.Number && ++a.Broadcasts == a.Assigned.Count)
            a.Broadcast = a.Clock.Elapsed;
    }

    protected override void Left(IActorRef replica, string node)
    {
        holds.Remove(replica);
        if (current?.Assigned.Any(a => a.Replica.Equals(replica)) == true) Drop($"replica {node} left");
    }

    protected override void TryStart()
    {
        if (current is not null || Writing || trainer.Step >= steps || !Quorum) return;
        var step = trainer.Step;
        var assigned = Replicas.OrderBy(r => r.Value.Node, StringComparer.Ordinal)
            .Select((r, i) => new Participant(r.Value.Node, r.Key, r.Value.Receiver, cursor + (long)i * Settings.BatchSize)).ToList();
        current = new Attempt(NextAttempt(), assigned);
        var weights = trainer.Weights().ToList();
        var withoutTeacher = weights.Where(w => !w.Name.StartsWith(MamoTrainer.TeacherPrefix)).ToList();
        var state = trainer.Objective.SaveState();
        for (int i = 0; i < assigned.Count; i++)
        {
            var p = assigned[i];
            // A replica that took the last step (or was given this one) holds the teacher this step starts from.
            var sendTeacher = !holds.TryGetValue(p.Replica, out var held) || held < step - 1;
            p.Replica.Tell(new StepStart(current.Number, step, p.Cursor, Settings.BatchSize, i, assigned.Count, (long)i * Settings.BatchSize, sendTeacher, state, Receiver));
            Context.ActorOf(WeightTransfer.Sender.Props(p.Receiver, Self, new WeightTransfer.Tag(WeightTransfer.Kind.Weights, current.Number),
                sendTeacher ? weights : withoutTeacher, "float32", Cluster.ChunkSize, Cluster.Window));
        }
        Timers.StartSingleTimer("deadline", new Deadline(current.Number), Cluster.RoundTimeout);
        if (step % Settings.MetricsEverySteps == 0) Log.Information("step {Step}: {Count} replicas from cursor {Cursor}", step, assigned.Count, cursor);
    }

    /// <summary>Once every replica's features are in: each tensor concatenated in replica order, to every replica.</summary>
    void TryGather()
    {
        var a = current!;
        // A step may all-gather more than once (ITC's features, then a classifier's labels), each after the one before.
        if (a.Assigned.Any(p => !a.Features.ContainsKey(p.Node))) return;
        using var scope = NewDisposeScope();
        var first = a.Features[a.Assigned[0].Node].Tensors;
        var gathered = first.Select((t, i) => (t.Name, cat(a.Assigned.Select(p => a.Features[p.Node].Tensors[i].Value).ToArray(), 0))).ToList();
        foreach (var p in a.Assigned)
            Context.ActorOf(WeightTransfer.Sender.Props(p.Receiver, Self, new WeightTransfer.Tag(WeightTransfer.Kind.Gathered, a.Number), gathered, "float32",
                Cluster.ChunkSize, Cluster.Window));
        foreach (var f in a.Features.Values) foreach (var (_, t) in f.Tensors) t.Dispose();
        a.Features.Clear();
    }

    /// <summary>Once every replica's gradient is in: their sum is the global batch's gradient; the update is single-node's.</summary>
    void TryApply()
    {
        var a = current!;
        if (a.Assigned.Any(p => !a.Gradients.ContainsKey(p.Node) || !a.Done.ContainsKey(p.Node))) return;
        var gradients = a.Clock.Elapsed;
        using (var scope = NewDisposeScope())
        {
            var done = a.Assigned.Select(p => a.Done[p.Node]).ToList();
            foreach (var d in done) trainer.Objective.Replay(d.Observations);
            var sums = new Dictionary<string, Tensor>();
            foreach (var p in a.Assigned)
                foreach (var (name, g) in a.Gradients[p.Node].Tensors)
                {
                    var aligned = trainer.Objective.Align(name, g, a.Done[p.Node].Observations);
                    sums[name] = sums.TryGetValue(name, out var s) ? s + aligned : aligned;
                }
            trainer.SetGradients(sums);
            // N replicas' global batch is N steps of one node: the schedule and the teacher's EMA follow the samples.
            trainer.StartAt(trainer.Step, a.Assigned.Count);
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
            Timed(a, gradients, log: (result.Step + 1) % Settings.MetricsEverySteps == 0);
        }
        foreach (var p in a.Assigned) holds[p.Replica] = trainer.Step - 1;
        History.Committed(trainer.Step - 1, a.Assigned.Select(p => p.Node), a.Clock.Elapsed, Members());
        Applied([a.Number]);
        cursor += (long)a.Assigned.Count * Settings.BatchSize;
        a.Dispose();
        current = null;
        var every = Settings.CheckpointEverySteps;
        var byTime = Settings.CheckpointEvery > TimeSpan.Zero && sinceCheckpoint.Elapsed >= Settings.CheckpointEvery;
        if (trainer.Step >= steps || every > 0 && trainer.Step % every == 0 || byTime) Write();
        else TryStart();
    }

    /// <summary>Adds a step's times; with log, writes the means since the last line: the communication is what is
    /// not the replicas' forward and backward (which lie within "until the last gradient", with the all-gather and the
    /// gradients' transfer).</summary>
    void Timed(Attempt a, TimeSpan gradients, bool log)
    {
        timing = (timing.Steps + 1, timing.Total + a.Clock.Elapsed.TotalSeconds, timing.Broadcast + a.Broadcast.TotalSeconds,
            timing.Gradients + gradients.TotalSeconds);
        if (!log) return;
        var n = timing.Steps;
        Log.Information("a step took {Total:F3} s over the last {Steps}: θ to every replica {Broadcast:F3} s, until the last gradient {Gradients:F3} s, " +
            "the update {Update:F3} s", timing.Total / n, n, timing.Broadcast / n, timing.Gradients / n, (timing.Total - timing.Gradients) / n);
        timing = default;
    }

    /// <summary>An attempt that cannot complete: its replicas drop it and the step is given again from the same θ.</summary>
    void Drop(string why)
    {
        var a = current!;
        Log.Warning("step {Step} (attempt {Attempt}) given again: {Why}", trainer.Step, a.Number, why);
        foreach (var p in a.Assigned) p.Replica.Tell(new Abort(a.Number));
        a.Dispose();
        current = null;
        TryStart();
    }

    /// <summary>A single-node checkpoint of the trainer; the next step starts once it is durable.</summary>
    void Write()
    {
        sinceCheckpoint.Restart();
        WriteCheckpoint(trainer.Step, trainer.Parts().Select(p => (p.Name, (IEnumerable<(string, Tensor)>)p.Tensors)), TrainingSamples.BeforeCursor(cursor),
            trainer.Objective.SaveState(), trainer.Optimizer.Step);
        Log.Information("step {Step}: checkpoint", trainer.Step);
    }

    protected override void PostStop()
    {
        current?.Dispose();
        trainer.Dispose();
        base.PostStop();
    }
}
