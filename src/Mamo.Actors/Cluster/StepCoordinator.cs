using System.Globalization;
using Akka.Actor;
using Mamo.Model;
using Serilog;
using static TorchSharp.torch;
using Mamo.Actors.Run;
using Mamo.Actors.Sources;
using Mamo.Actors.Pipeline;

namespace Mamo.Actors.Cluster;

/// <summary>The cluster singleton of every-step training (cluster.sync = every-step): the run's one student, AdamW
/// state and teacher, as a single-node trainer holds them. Each step it gives every replica θ and the next batch-size
/// cursors of the file source (the replicas' rows, in node order, make the global batch), relays the all-gather of
/// their features (ITC sees the whole global batch), sums their gradients, and makes the single-node update: clipping,
/// AdamW, the temperature clamp and the teacher's EMA. Its checkpoints are single-node checkpoints.</summary>
public sealed class StepCoordinator : ReceiveActor, IWithTimers
{
    public ITimerScheduler Timers { get; set; } = null!;

    /// <summary>Attempt Attempt of step Step: train BatchSize cursors from Cursor, as row FirstRow on of the global
    /// batch and Index-th of its replicas, from the θ that follows (and the teacher, WithTeacher); send the features and
    /// the gradient to Receiver.</summary>
    public sealed record StepStart(long Attempt, long Step, long Cursor, int BatchSize, int Index, long FirstRow, bool WithTeacher, IActorRef Receiver)
        : IClusterMessage;
    /// <summary>A replica's account of an attempt: its pairs and its share of the loss (the gradient follows on the data plane).</summary>
    public sealed record StepDone(long Attempt, string Node, long Samples, double Loss, IReadOnlyDictionary<string, double> Terms) : IClusterMessage;
    /// <summary>A replica of the attempt left: drop it; the step is given again.</summary>
    public sealed record Abort(long Attempt) : IClusterMessage;
    sealed record Deadline(long Attempt);

    public const string FeaturesTag = "features", GatheredTag = "gathered", GradientTag = "gradient", WeightsTag = "weights";
    const string StudentPrefix = "student.", TeacherPrefix = "teacher.";

    sealed record Participant(string Node, IActorRef Replica, IActorRef Receiver, long Cursor);

    sealed class Attempt(long number, IReadOnlyList<Participant> assigned)
    {
        public long Number { get; } = number;
        public IReadOnlyList<Participant> Assigned { get; } = assigned;
        public Dictionary<string, WeightTransfer.Received> Features { get; } = new();
        public Dictionary<string, WeightTransfer.Received> Gradients { get; } = new();
        public Dictionary<string, StepDone> Done { get; } = new();
        public bool Gathered { get; set; }
        public System.Diagnostics.Stopwatch Clock { get; } = System.Diagnostics.Stopwatch.StartNew();

        public void Dispose()
        {
            foreach (var r in Features.Values.Concat(Gradients.Values)) foreach (var (_, t) in r.Tensors) t.Dispose();
            Features.Clear();
            Gradients.Clear();
        }
    }

    readonly MamoSettings settings;
    readonly ClusterSettings cluster;
    readonly MamoTrainer trainer;
    readonly IActorRef receiver;
    readonly Dictionary<IActorRef, (string Node, IActorRef Receiver)> replicas = new();
    /// <summary>The step of the θ each replica last received: its teacher follows from there without being sent.</summary>
    readonly Dictionary<IActorRef, long> holds = new();
    readonly RunHistory history;
    readonly TrainCurve curve;
    readonly long steps;
    long cursor, attempts;
    Attempt? current;
    /// <summary>Since the last checkpoint: checkpoint.every bounds the work a lost coordinator takes with it.</summary>
    readonly System.Diagnostics.Stopwatch sinceCheckpoint = System.Diagnostics.Stopwatch.StartNew();

    /// <param name="init">a new run's weights come from this checkpoint (pretrain --init); null: from the seed</param>
    public StepCoordinator(MamoSettings settings, Device device, string? init = null)
    {
        this.settings = settings;
        cluster = settings.Cluster;
        history = new RunHistory(Path.Combine(settings.RunDir, RunHistory.JournalFile));
        curve = new TrainCurve(settings.RunDir);
        steps = settings.MaxSteps > 0 ? settings.MaxSteps : long.MaxValue;
        var objective = MamoPretraining.With(settings.Pretraining);
        if (Checkpoint.Latest(settings.RunDir) is { } dir)
        {
            var state = Checkpoint.ReadState(dir);
            if (state.Extra.ContainsKey(RoundCoordinator.RoundKey))
                throw new InvalidOperationException($"{dir} is a checkpoint of a diloco run; every-step resumes from a single-node or every-step checkpoint");
            trainer = MamoTrainer.Load(dir, settings.Optimizer, device, settings.Seed, withTeacher: true, settings.Model, objective);
            cursor = (StreamPosition.FromExtra(state.Extra)[TrainingSamples.CursorPartition] ?? -1) + 1;
            Log.Information("every-step coordinator resumes from {Checkpoint}: step {Step}, cursor {Cursor}", dir, trainer.Step, cursor);
            history.CoordinatorStarted(Context.System);
        }
        else
        {
            // As single-node, a new run's first checkpoint is its step 0: the weights every replica starts from.
            trainer = new MamoTrainer(settings.Model, settings.Optimizer, device, settings.Seed, withTeacher: true, objective);
            if (init is not null) Checkpoint.LoadStart(init, trainer.Student, trainer.Teacher);
            WriteCheckpoint();
        }
        Log.Information("every-step coordinator at step {Step}, θ {Hash}", trainer.Step, Checkpoint.WeightHash(Checkpoint.Named(trainer.Student)));
        receiver = Context.ActorOf(WeightTransfer.Receiver.Props(Self, maxBytes: 16L << 30), "data");

        Receive<RoundCoordinator.Register>(r =>
        {
            if (!replicas.ContainsKey(Sender))
            {
                Context.Watch(Sender);
                Log.Information("replica {Node} registered ({Count} now)", r.Node, replicas.Count + 1);
            }
            // A replica actor that restarted keeps its reference but has a new receiver, and no teacher.
            else if (!replicas[Sender].Receiver.Equals(r.Receiver)) holds.Remove(Sender);
            replicas[Sender] = (r.Node, r.Receiver);
            if (trainer.Step >= steps) Sender.Tell(new RoundCoordinator.Finish(trainer.Step));
            else TryStart();
        });
        // A replica's node marked unreachable starts its recovery: that is when the cluster knows of the loss.
        Receive<Akka.Cluster.ClusterEvent.UnreachableMember>(u =>
        {
            foreach (var (_, r) in replicas.Where(r => r.Key.Path.Address == u.Member.Address)) history.Lost(r.Node, u.Member.Address.ToString());
        });
        Receive<Terminated>(t =>
        {
            if (!replicas.Remove(t.ActorRef, out var gone)) return;
            holds.Remove(t.ActorRef);
            Log.Warning("replica {Node} left", gone.Node);
            history.Lost(gone.Node, t.ActorRef.Path.Address.ToString());
            if (current?.Assigned.Any(a => a.Replica.Equals(t.ActorRef)) == true) Drop($"replica {gone.Node} left");
        });
        Receive<Deadline>(d =>
        {
            if (current?.Number == d.Attempt) Drop($"the step's deadline ({cluster.RoundTimeout}) passed");
        });
        Receive<StepDone>(d =>
        {
            if (current?.Number != d.Attempt) return;
            current.Done[d.Node] = d;
            TryApply();
        });
        Receive<WeightTransfer.Received>(r =>
        {
            var tag = r.Tag.Split('/');
            if (current is null || tag.Length != 3 || tag[1] != current.Number.ToString(CultureInfo.InvariantCulture) || tag[0] is not (FeaturesTag or GradientTag))
            {
                foreach (var (_, t) in r.Tensors) t.Dispose();
                return;
            }
            (tag[0] == FeaturesTag ? current.Features : current.Gradients)[tag[2]] = r;
            if (tag[0] == FeaturesTag) TryGather();
            else TryApply();
        });
        Receive<WeightTransfer.Sent>(_ => { });
        Receive<RoundCoordinator.GetProgress>(_ => Sender.Tell(new RoundCoordinator.Progress(trainer.Step, Checkpoint.Latest(settings.RunDir) ?? "",
            history.Rounds, history.Recoveries)));
    }

    public static Props Props(MamoSettings settings, Device device, string? init = null) =>
        Akka.Actor.Props.Create(() => new StepCoordinator(settings, device, init)).WithDispatcher(Dispatchers.Model);

    void TryStart()
    {
        if (current is not null || trainer.Step >= steps || replicas.Count < cluster.MinReplicas) return;
        var step = trainer.Step;
        var assigned = replicas.OrderBy(r => r.Value.Node, StringComparer.Ordinal)
            .Select((r, i) => new Participant(r.Value.Node, r.Key, r.Value.Receiver, cursor + (long)i * settings.BatchSize)).ToList();
        current = new Attempt(++attempts, assigned);
        using var scope = NewDisposeScope();
        var student = Checkpoint.Named(trainer.Student).Select(p => (StudentPrefix + p.Name, p.Value)).ToList();
        var withTeacher = student.Concat(Checkpoint.Named(trainer.Teacher).Select(p => (TeacherPrefix + p.Name, p.Value))).ToList();
        for (int i = 0; i < assigned.Count; i++)
        {
            var p = assigned[i];
            // A replica that took the last step (or was given this one) holds the teacher this step starts from.
            var sendTeacher = !holds.TryGetValue(p.Replica, out var held) || held < step - 1;
            p.Replica.Tell(new StepStart(current.Number, step, p.Cursor, settings.BatchSize, i, (long)i * settings.BatchSize, sendTeacher, receiver));
            Context.ActorOf(WeightTransfer.Sender.Props(p.Receiver, Self, $"{WeightsTag}/{current.Number}", sendTeacher ? withTeacher : student, "float32",
                cluster.ChunkSize, cluster.Window));
        }
        Timers.StartSingleTimer("deadline", new Deadline(current.Number), cluster.RoundTimeout);
        if (step % settings.MetricsEverySteps == 0) Log.Information("step {Step}: {Count} replicas from cursor {Cursor}", step, assigned.Count, cursor);
    }

    /// <summary>Once every replica's features are in: each tensor concatenated in replica order, to every replica.</summary>
    void TryGather()
    {
        var a = current!;
        if (a.Gathered || a.Assigned.Any(p => !a.Features.ContainsKey(p.Node))) return;
        a.Gathered = true;
        using var scope = NewDisposeScope();
        var first = a.Features[a.Assigned[0].Node].Tensors;
        var gathered = first.Select((t, i) => (t.Name, cat(a.Assigned.Select(p => a.Features[p.Node].Tensors[i].Value).ToArray(), 0))).ToList();
        foreach (var p in a.Assigned)
            Context.ActorOf(WeightTransfer.Sender.Props(p.Receiver, Self, $"{GatheredTag}/{a.Number}", gathered, "float32", cluster.ChunkSize, cluster.Window));
    }

    /// <summary>Once every replica's gradient is in: their sum is the global batch's gradient; the update is single-node's.</summary>
    void TryApply()
    {
        var a = current!;
        if (a.Assigned.Any(p => !a.Gradients.ContainsKey(p.Node) || !a.Done.ContainsKey(p.Node))) return;
        using (var scope = NewDisposeScope())
        {
            var sums = new Dictionary<string, Tensor>();
            foreach (var p in a.Assigned)
                foreach (var (name, g) in a.Gradients[p.Node].Tensors)
                    sums[name] = sums.TryGetValue(name, out var s) ? s + g : g;
            using (no_grad())
                foreach (var (name, parameter) in trainer.Objective.TrainedParameters(trainer.Student))
                    parameter.grad = sums.TryGetValue(name, out var g) ? g.to(parameter.device) : null;
            var done = a.Assigned.Select(p => a.Done[p.Node]).ToList();
            var terms = done.SelectMany(d => d.Terms).GroupBy(t => t.Key).ToDictionary(g => g.Key, g => g.Sum(t => t.Value));
            var result = trainer.Update(done.Sum(d => d.Loss), terms);
            trainer.FollowStudent();
            curve.Trained(done.Sum(d => d.Samples));
            if (result.Skipped) Log.Warning("step {Step} skipped: loss {Loss}, gradient norm {Norm}", result.Step, result.Loss, result.GradNorm);
            else if ((result.Step + 1) % settings.MetricsEverySteps == 0)
            {
                Log.Information("step {Step} loss {Loss:F4} over {Pairs} pairs from {Count} replicas", result.Step + 1, result.Loss, done.Sum(d => d.Samples), done.Count);
                curve.Write(result.Step + 1, result.Loss, result.Terms, new()
                {
                    ["lr"] = result.LearningRate, ["grad_norm"] = Metrics.Finite(result.GradNorm), ["replicas"] = done.Count,
                });
            }
        }
        foreach (var p in a.Assigned) holds[p.Replica] = trainer.Step - 1;
        history.Committed(trainer.Step - 1, a.Assigned.Select(p => p.Node), a.Clock.Elapsed, ClusterStatus.MembersOf(Akka.Cluster.Cluster.Get(Context.System)));
        cursor += (long)a.Assigned.Count * settings.BatchSize;
        a.Dispose();
        current = null;
        var every = settings.CheckpointEverySteps;
        var byTime = settings.CheckpointEvery > TimeSpan.Zero && sinceCheckpoint.Elapsed >= settings.CheckpointEvery;
        if (trainer.Step >= steps || every > 0 && trainer.Step % every == 0 || byTime)
            Log.Information("step {Step}: checkpoint {Path}", trainer.Step, WriteCheckpoint());
        if (trainer.Step >= steps)
            foreach (var replica in replicas.Keys) replica.Tell(new RoundCoordinator.Finish(trainer.Step));
        else TryStart();
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

    string WriteCheckpoint()
    {
        var extra = new Dictionary<string, string>(StreamPosition.None.Advance(TrainingSamples.CursorPartition, cursor - 1).ToExtra())
        {
            [Checkpointer.SeedKey] = settings.Seed.ToString(CultureInfo.InvariantCulture),
        };
        sinceCheckpoint.Restart();
        return Checkpoint.Commit(settings.RunDir, settings.Model, trainer.Parts(),
            new Checkpoint.State(trainer.Step, trainer.Optimizer.Step, trainer.Step, extra), settings.KeepLast);
    }

    protected override void PreStart() =>
        Akka.Cluster.Cluster.Get(Context.System).Subscribe(Self, Akka.Cluster.ClusterEvent.SubscriptionInitialStateMode.InitialStateAsEvents,
            typeof(Akka.Cluster.ClusterEvent.UnreachableMember));

    protected override void PostStop()
    {
        Akka.Cluster.Cluster.Get(Context.System).Unsubscribe(Self);
        current?.Dispose();
        trainer.Dispose();
        base.PostStop();
    }
}
