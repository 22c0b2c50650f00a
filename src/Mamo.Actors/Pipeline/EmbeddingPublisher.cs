using Akka.Actor;
using Mamo.Data.Kafka;
using Serilog;
using static TorchSharp.torch;

namespace Mamo.Actors.Pipeline;

/// <summary>Streams fresh embeddings out: after each durable checkpoint, embeds the publish set with that model
/// version and writes every vector to the output (a compacted topic then keeps the newest per id), and whatever the
/// run's task sends beside them (a fine-tuned classifier's prediction of each item), each version between its
/// "started" and "complete" events (VersionPublication). It reads the weights from the checkpoint on disk, on its own
/// thread, so training never waits for it; if checkpoints come faster than it publishes, it skips to the newest. A run
/// that stops asks it to Drain: the final checkpoint's embeddings go out before the process exits. One that starts
/// finishes the version a publisher before it was killed in the middle of.</summary>
public sealed class EmbeddingPublisher : ReceiveActor
{
    readonly IReadOnlyList<EmbeddingItem> items;
    readonly IEmbeddingSink sink;
    readonly string modality;
    readonly int batchSize;
    readonly Device device;
    readonly IPredictionPublisher? predictions;
    readonly VersionPublication versions;
    readonly string? runDir;
    (long Step, string Path)? newest;
    long published;   // every checkpoint up to this step is published (or was tried)
    (long Step, IActorRef ReplyTo)? drain;

    /// <summary>Publish every checkpoint up to Step now, then reply Drained.</summary>
    public sealed record Drain(long Step);
    public sealed record Drained(long Step);
    /// <summary>On the event stream once a model's embeddings are out.</summary>
    public sealed record Published(string Version, long Step, int Records, int Predictions, string Output);

    /// <param name="from">the step the run starts at, whose embeddings went out before</param>
    /// <param name="predictions">what goes out beside the embeddings (the task's); null: nothing</param>
    /// <param name="runDir">the run folder: its checkpoints, and the note of a version in progress</param>
    public EmbeddingPublisher(IReadOnlyList<EmbeddingItem> items, IEmbeddingSink sink, string modality, int batchSize, Device device, long from,
        IPredictionPublisher? predictions, string? runDir)
    {
        this.predictions = predictions;
        this.runDir = runDir;
        versions = new VersionPublication(runDir);
        this.items = items;
        this.sink = sink;
        this.modality = modality;
        this.batchSize = batchSize;
        this.device = device;
        published = from;
        Receive<Checkpointer.CheckpointDurable>(d =>
        {
            var first = newest is null;
            if (newest is not { } n || d.Step > n.Step) newest = (d.Step, d.Path);
            if (drain is not null) Publish();
            else if (first) Self.Tell(PublishNewest.Instance);   // after the mailbox: newer checkpoints queued behind win
        });
        Receive<PublishNewest>(_ => { if (newest is not null) Publish(); });
        Receive<Drain>(d =>
        {
            drain = (d.Step, Sender);
            if (newest is not null) Publish();
            else AnswerDrain();
        });
    }

    sealed class PublishNewest
    {
        public static readonly PublishNewest Instance = new();
    }

    public static Props Props(IReadOnlyList<EmbeddingItem> items, IEmbeddingSink sink, string modality, int batchSize, Device device, long from,
        IPredictionPublisher? predictions, string? runDir) =>
        Akka.Actor.Props.Create(() => new EmbeddingPublisher(items, sink, modality, batchSize, device, from, predictions, runDir))
            .WithDispatcher(Dispatchers.Model);

    /// <summary>A version a publisher before this one stopped in the middle of is published again from its checkpoint
    /// or, where that is gone, marked abandoned; a newer checkpoint queued behind it wins, as always.</summary>
    protected override void PreStart()
    {
        if (versions.Unfinished(sink) is not { } unfinished) return;
        var dir = runDir is null ? null : Path.Combine(runDir, Mamo.Model.Checkpoint.RunFolder, Mamo.Model.Checkpoint.StepFolderName(unfinished.Step));
        if (dir is not null && Mamo.Model.Checkpoint.Complete(runDir!).Contains(Path.GetFullPath(dir)))
        {
            Log.Information("publishing model {Version} again: the publisher before stopped in the middle of it", unfinished.Version);
            newest = (unfinished.Step, dir);
            Self.Tell(PublishNewest.Instance);
            return;
        }
        try { versions.Abandon(sink, unfinished.Version, unfinished.Step, "the publisher stopped in the middle of it, and its checkpoint is gone"); }
        catch (Exception e) when (e is IOException or Confluent.Kafka.KafkaException) { Log.Warning("model {Version} not marked abandoned: {Error}", unfinished.Version, e.Message); }
    }

    void Publish()
    {
        var checkpoint = newest!.Value;
        newest = null;
        published = Math.Max(published, checkpoint.Step);
        var clock = System.Diagnostics.Stopwatch.StartNew();
        try
        {
            using var embedder = Embedder.Load(checkpoint.Path, device);
            var (count, predicted) = versions.Publish(embedder, items, modality, batchSize, sink, predictions, device);
            Context.System.EventStream.Publish(new Published(embedder.Version, checkpoint.Step, count, predicted, sink.Name));
            Log.Information("published {Count} embeddings and {Predictions} predictions of model {Version} to {Output} in {Took:F1}s", count, predicted,
                embedder.Version, sink.Name, clock.Elapsed.TotalSeconds);
        }
        catch (Exception e) when (e is IOException or InvalidDataException or Confluent.Kafka.KafkaException)
        {
            // The checkpoint may already be pruned, or the broker away: the next checkpoint publishes again.
            Log.Warning("embeddings of step {Step} not published: {Error}", checkpoint.Step, e.Message);
        }
        AnswerDrain();
    }

    void AnswerDrain()
    {
        if (drain is not { } d || published < d.Step) return;
        d.ReplyTo.Tell(new Drained(published));
        drain = null;
    }

    protected override void PostStop() => sink.Dispose();
}
