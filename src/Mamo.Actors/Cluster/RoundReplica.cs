using System.Collections.Immutable;
using System.Text.Json.Nodes;
using Akka.Actor;
using Mamo.Data;
using Mamo.Model;
using Serilog;
using static TorchSharp.torch;
using Mamo.Actors.Sources;
using Mamo.Actors.Run;
using Mamo.Actors.Pipeline;

namespace Mamo.Actors.Cluster;

/// <summary>A DiLoCo trainer replica: its own student, teacher and AdamW state (which stays here, never sent). Each round
/// it takes θ and the teacher from the coordinator, runs the inner steps of the ordinary MAMO step on the cursor range
/// it was given, and sends back its deltas (θ − θᵢ, for the student and the teacher) with the samples it trained on.</summary>
public sealed class RoundReplica : ReceiveActor, IWithTimers
{
    public ITimerScheduler Timers { get; set; } = null!;
    /// <summary>How often a replica offers itself again: a coordinator that moved to another node learns of it so.</summary>
    internal static readonly TimeSpan RegisterEvery = TimeSpan.FromSeconds(3);
    internal sealed record RegisterAgain;

    /// <summary>Told to the node's owner when the coordinator says the run is over.</summary>
    public sealed record Finished(long Round);

    readonly MamoSettings settings;
    readonly ReplicaData data;
    readonly IActorRef coordinator, owner, receiver;
    readonly string node;
    readonly MamoTrainer trainer;
    RoundCoordinator.RoundStart? start;
    /// <summary>What the last cluster checkpoint covers of the stream: where a rewind starts.</summary>
    StreamPosition durable = StreamPosition.None;
    WeightTransfer.Received? weights;

    public RoundReplica(MamoSettings settings, ReplicaData data, IActorRef coordinator, IActorRef owner, string node, Device device)
    {
        this.settings = settings;
        this.data = data;
        this.coordinator = coordinator;
        this.owner = owner;
        this.node = node;
        // Masks and negatives differ between replicas: the seed mixes in the node.
        trainer = new MamoTrainer(settings.Model, settings.Optimizer, device, Seeds.Mix(settings.Seed, Seeds.StableHash(node)), withTeacher: true,
            MamoPretraining.With(settings.Pretraining));
        receiver = Context.ActorOf(WeightTransfer.Receiver.Props(Self, maxBytes: 16L << 30), "weights");

        Receive<RoundCoordinator.RoundStart>(s => { start = s; TryTrain(); });
        Receive<WeightTransfer.Received>(w =>
        {
            if (weights is not null) foreach (var (_, t) in weights.Tensors) t.Dispose();
            weights = w;
            TryTrain();
        });
        Receive<RoundCoordinator.Finish>(f => owner.Tell(new Finished(f.Round)));
        Receive<RoundCoordinator.Commit>(c =>
        {
            durable = new StreamPosition(c.Positions.ToImmutableSortedDictionary());
            data.Commit(durable);
        });
        Receive<RegisterAgain>(_ => coordinator.Tell(new RoundCoordinator.Register(node, receiver)));
        Receive<WeightTransfer.Sent>(_ => { });
    }

    public static Props Props(MamoSettings settings, ReplicaData data, IActorRef coordinator, IActorRef owner, string node, Device device) =>
        Akka.Actor.Props.Create(() => new RoundReplica(settings, data, coordinator, owner, node, device)).WithDispatcher(Dispatchers.Model);

    protected override void PreStart()
    {
        coordinator.Tell(new RoundCoordinator.Register(node, receiver));
        Timers.StartPeriodicTimer("register", new RegisterAgain(), RegisterEvery);
    }

    void TryTrain()
    {
        if (start is not { } s || weights is not { } w || w.Tag != $"weights/{s.Round}") return;
        (start, weights) = (null, null);
        var given = w.Tensors.ToDictionary(t => t.Name, t => t.Value);
        try
        {
            Load(trainer.Student, "student.", given);
            Load(trainer.Teacher, "teacher.", given);
            trainer.ContinueAt(s.Round * s.Steps);   // after a restart, the schedule goes on (AdamW's moments start afresh)
            Log.Information("{Node} round {Round} starts from θ {Hash}", node, s.Round, Checkpoint.WeightHash(Checkpoint.Named(trainer.Student)));
            var (trained, reached, loss, terms) = Train(s);
            var deltas = Delta(trainer.Student, "student.", given).Concat(Delta(trainer.Teacher, "teacher.", given)).ToList();
            coordinator.Tell(new RoundCoordinator.RoundDone(s.Round, node, trained, reached.Offsets, loss, terms));
            Context.ActorOf(WeightTransfer.Sender.Props(s.DeltaReceiver, Self, $"delta/{s.Round}/{node}", deltas, settings.Cluster.DeltaDType,
                settings.Cluster.ChunkSize, settings.Cluster.Window));
            foreach (var (_, t) in deltas) t.Dispose();
        }
        finally
        {
            foreach (var t in given.Values) t.Dispose();
        }
    }

    /// <summary>The inner steps: on cursors [Cursor, Cursor + Steps · BatchSize) of a file source, or on the next
    /// records of this node's Kafka partitions (from the last cluster checkpoint when told to rewind). Returns the
    /// samples trained on, the stream position they reach, and the mean loss and terms of the steps not skipped.</summary>
    (long Samples, StreamPosition Position, double Loss, IReadOnlyDictionary<string, double> Terms) Train(RoundCoordinator.RoundStart s)
    {
        long trained = 0;
        var reached = StreamPosition.None;
        var (losses, terms) = (new List<double>(), new Dictionary<string, List<double>>());
        var from = data.Ranges ? ReplicaData.BeforeCursor(s.Cursor) : s.Rewind ? durable : null;
        foreach (var prepared in data.Batches(from, s.Steps, s.BatchSize, atLeast: 2))
        {
            using var _ = prepared;
            var batch = prepared.Batch;
            var result = trainer.TrainStep(batch.Images, batch.TokenIds, batch.AttentionMask, prepared.ImageKeys);
            trained += batch.Size;
            reached = reached.Merge(prepared.Position);
            data.Record(result.Step, s.Round, prepared.Position, result.Loss, result.Skipped, batch.Ids);
            if (!result.Skipped)
            {
                losses.Add(result.Loss);
                foreach (var (name, value) in result.Terms) (terms.TryGetValue(name, out var l) ? l : terms[name] = []).Add(value);
            }
            if ((result.Step + 1) % settings.MetricsEverySteps == 0)
                Log.Information("{Node} round {Round} step {Step} loss {Loss:F4}", node, s.Round, result.Step + 1, result.Loss);
        }
        return (trained, reached, losses.Count == 0 ? double.NaN : losses.Average(), terms.ToDictionary(t => t.Key, t => t.Value.Average()));
    }

    /// <summary>Copies the given weights (named with <paramref name="prefix"/>) into a model: every parameter must be there.</summary>
    internal static void Load(MamoModel model, string prefix, IReadOnlyDictionary<string, Tensor> given)
    {
        using var noGrad = no_grad();
        foreach (var (name, p) in model.named_parameters())
            p.copy_(given.TryGetValue(prefix + name, out var t) ? t : throw new InvalidDataException($"the round's weights lack '{prefix + name}'"));
    }

    /// <summary>θ − θᵢ for each parameter, under the same names.</summary>
    static IEnumerable<(string, Tensor)> Delta(MamoModel model, string prefix, IReadOnlyDictionary<string, Tensor> given)
    {
        using var noGrad = no_grad();
        foreach (var (name, p) in model.named_parameters())
        {
            using var scope = NewDisposeScope();
            yield return (prefix + name, (given[prefix + name] - p.cpu()).MoveToOuterDisposeScope());
        }
    }

    protected override void PostStop()
    {
        trainer.Dispose();
        base.PostStop();
    }
}
