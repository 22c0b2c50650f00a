using System.Globalization;
using Akka.Actor;
using Mamo.Model;
using Serilog;
using static TorchSharp.torch;
using Mamo.Actors.Sources;
using Mamo.Actors.Run;
using Mamo.Actors.Pipeline;

namespace Mamo.Actors.Cluster;

/// <summary>An every-step trainer replica. Each step it takes θ from the coordinator, encodes its share of the global
/// batch, waits for every replica's features (the all-gather), and sends back the gradient of its share of the loss;
/// the coordinator makes the one update. Its teacher follows θ by the same EMA as the coordinator's, so only a new
/// replica is sent one. The step runs on a thread of its own, because it blocks in the all-gather while this actor
/// stays free to receive the gathered features or an abort.</summary>
public sealed class StepReplica : ReceiveActor, IWithTimers
{
    public ITimerScheduler Timers { get; set; } = null!;
    /// <summary>From the step's thread: send these features (this actor alone may create the transfer).</summary>
    sealed record SendFeatures(long Attempt, List<(string Name, Tensor Value)> Tensors);
    sealed record Computed(StepCoordinator.StepStart Start, double Loss, IReadOnlyDictionary<string, double> Terms, List<(string Name, Tensor Value)> Gradient,
        long Samples, StreamPosition Position, IReadOnlyList<string> Ids);

    readonly MamoSettings settings;
    readonly ReplicaData data;
    readonly IActorRef coordinator, owner, receiver;
    readonly string node;
    readonly MamoTrainer trainer;
    /// <summary>The step whose teacher this replica holds (-1: none yet); touched only by the step's thread.</summary>
    long teacherStep = -1;
    StepCoordinator.StepStart? start;
    WeightTransfer.Received? weights;
    /// <summary>The step that is running, and where its gathered features go.</summary>
    (StepCoordinator.StepStart Start, TaskCompletionSource<IReadOnlyList<Tensor>> Gathered, Task Task)? running;

    public StepReplica(MamoSettings settings, ReplicaData data, IActorRef coordinator, IActorRef owner, string node, Device device)
    {
        this.settings = settings;
        this.data = data;
        this.coordinator = coordinator;
        this.owner = owner;
        this.node = node;
        // One seed for every replica: a row's masks and negatives depend on its step and its row in the global batch only.
        trainer = new MamoTrainer(settings.Model, settings.Optimizer, device, settings.Seed, withTeacher: true, MamoPretraining.With(settings.Pretraining));
        receiver = Context.ActorOf(WeightTransfer.Receiver.Props(Self, maxBytes: 16L << 30), "data");

        Receive<StepCoordinator.StepStart>(s =>
        {
            if (running is { } r && r.Start.Attempt != s.Attempt) r.Gathered.TrySetCanceled();   // a new coordinator gives the step again
            start = s;
            TryStep();
        });
        Receive<WeightTransfer.Received>(r =>
        {
            if (running is { } step && r.Tag == $"{StepCoordinator.GatheredTag}/{step.Start.Attempt}")
            {
                if (!step.Gathered.TrySetResult(r.Tensors.Select(t => t.Value).ToList())) Dispose(r);
            }
            else if (r.Tag.StartsWith(StepCoordinator.WeightsTag + "/", StringComparison.Ordinal))
            {
                Dispose(weights);
                weights = r;
                TryStep();
            }
            else Dispose(r);
        });
        Receive<StepCoordinator.Abort>(a =>
        {
            if (running is { } r && r.Start.Attempt == a.Attempt) r.Gathered.TrySetCanceled();
            if (start?.Attempt == a.Attempt) start = null;
        });
        Receive<SendFeatures>(f =>
        {
            if (running is { } r && r.Start.Attempt == f.Attempt)
                Context.ActorOf(WeightTransfer.Sender.Props(r.Start.Receiver, Self, $"{StepCoordinator.FeaturesTag}/{f.Attempt}/{node}", f.Tensors, "float32",
                    settings.Cluster.ChunkSize, settings.Cluster.Window));
            foreach (var (_, t) in f.Tensors) t.Dispose();
        });
        Receive<Computed>(c =>
        {
            running = null;
            data.Record(c.Start.Step, c.Start.Step, c.Position, c.Loss, !double.IsFinite(c.Loss), c.Ids);
            coordinator.Tell(new StepCoordinator.StepDone(c.Start.Attempt, node, c.Samples, c.Loss, c.Terms));
            Context.ActorOf(WeightTransfer.Sender.Props(c.Start.Receiver, Self, $"{StepCoordinator.GradientTag}/{c.Start.Attempt}/{node}", c.Gradient, "float32",
                settings.Cluster.ChunkSize, settings.Cluster.Window));
            foreach (var (_, t) in c.Gradient) t.Dispose();
            TryStep();
        });
        Receive<Status.Failure>(f =>
        {
            var attempt = running?.Start.Attempt;
            running = null;
            if (Cancelled(f.Cause)) Log.Information("{Node} dropped attempt {Attempt}", node, attempt);
            else throw new InvalidOperationException($"{node}: the step of attempt {attempt} failed", f.Cause);
            TryStep();
        });
        Receive<RoundCoordinator.Finish>(f => owner.Tell(new RoundReplica.Finished(f.Round)));
        Receive<RoundReplica.RegisterAgain>(_ => coordinator.Tell(new RoundCoordinator.Register(node, receiver)));
        Receive<WeightTransfer.Sent>(_ => { });
    }

    static bool Cancelled(Exception e) =>
        e is OperationCanceledException || e is AggregateException a && a.Flatten().InnerExceptions.All(x => x is OperationCanceledException);

    public static Props Props(MamoSettings settings, ReplicaData data, IActorRef coordinator, IActorRef owner, string node, Device device) =>
        Akka.Actor.Props.Create(() => new StepReplica(settings, data, coordinator, owner, node, device)).WithDispatcher(Dispatchers.Model);

    protected override void PreStart()
    {
        coordinator.Tell(new RoundCoordinator.Register(node, receiver));
        Timers.StartPeriodicTimer("register", new RoundReplica.RegisterAgain(), RoundReplica.RegisterEvery);
    }

    void TryStep()
    {
        if (running is not null || start is not { } s || weights is not { } w || w.Tag != $"{StepCoordinator.WeightsTag}/{s.Attempt}") return;
        (start, weights) = (null, null);
        var gathered = new TaskCompletionSource<IReadOnlyList<Tensor>>(TaskCreationOptions.RunContinuationsAsynchronously);
        var self = Self;
        var task = Task.Factory.StartNew(() => Compute(s, w, new Shard(s, gathered, self, settings.Cluster.RoundTimeout)), CancellationToken.None,
            TaskCreationOptions.LongRunning, TaskScheduler.Default);
        running = (s, gathered, task);
        task.PipeTo(Self);
    }

    /// <summary>The step itself, on its own thread: θ (and the teacher), the batch, the teacher's targets, then the
    /// forward and backward of this replica's share, which all-gathers the features halfway.</summary>
    Computed Compute(StepCoordinator.StepStart s, WeightTransfer.Received w, Shard shard)
    {
        using var scope = NewDisposeScope();
        try
        {
            var given = w.Tensors.ToDictionary(t => t.Name, t => t.Value);
            RoundReplica.Load(trainer.Student, "student.", given);
            if (s.WithTeacher) RoundReplica.Load(trainer.Teacher, "teacher.", given);
            else if (teacherStep == s.Step - 1) trainer.FollowStudent();
            else if (teacherStep != s.Step)
                throw new InvalidOperationException($"the teacher here is of step {teacherStep} and step {s.Step} came without one");
            teacherStep = s.Step;
            trainer.ContinueAt(s.Step);
            using var prepared = data.Batches(ReplicaData.BeforeCursor(s.Cursor), 1, s.BatchSize, atLeast: 1).FirstOrDefault()
                ?? throw new InvalidDataException($"no usable sample in cursors [{s.Cursor}, {s.Cursor + s.BatchSize})");
            var b = prepared.Batch;
            var input = new StepInput(b.Images, b.TokenIds, b.AttentionMask, prepared.ImageKeys, Shard: shard);
            using var targets = trainer.Objective.NeedsTargets ? trainer.Objective.Targets(trainer.Teacher, input) : null;
            var (loss, terms) = trainer.Backward(input, targets);
            var gradient = trainer.Objective.TrainedParameters(trainer.Student).Where(p => p.Parameter.grad is not null)
                .Select(p => (p.Name, p.Parameter.grad!.cpu().clone().DetachFromDisposeScope())).ToList();
            return new Computed(s, loss, terms, gradient, b.Size, prepared.Position, b.Ids);
        }
        finally
        {
            Dispose(w);
        }
    }

    /// <summary>This replica's place in the step's global batch; its all-gather goes through the coordinator. Integer
    /// tensors (the image keys) travel as three exact float32 parts of 22, 21 and 21 bits.</summary>
    sealed class Shard(StepCoordinator.StepStart s, TaskCompletionSource<IReadOnlyList<Tensor>> gathered, IActorRef replica, TimeSpan timeout) : IBatchShard
    {
        public long FirstRow => s.FirstRow;
        public int Index => s.Index;

        public IReadOnlyList<Tensor> AllGather(IReadOnlyList<Tensor> local)
        {
            var wire = local.Select((t, i) => ($"{i}", t.dtype == ScalarType.Int64 ? Split(t) : t.detach().cpu().clone().DetachFromDisposeScope())).ToList();
            replica.Tell(new SendFeatures(s.Attempt, wire));
            if (!gathered.Task.Wait(timeout)) throw new OperationCanceledException($"no gathered features within {timeout}");
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

    static void Dispose(WeightTransfer.Received? r)
    {
        if (r is not null) foreach (var (_, t) in r.Tensors) t.Dispose();
    }

    protected override void PostStop()
    {
        if (running is { } r)
        {
            r.Gathered.TrySetCanceled();
            r.Task.Wait(TimeSpan.FromSeconds(30));   // the step's thread uses the trainer: let it end first
        }
        trainer.Dispose();
        base.PostStop();
    }
}
