using Akka.Actor;
using Mamo.Data.Kafka;
using Serilog;
using static TorchSharp.torch;

namespace Mamo.Actors.Pipeline;

/// <summary>Streams fresh embeddings out: after each durable checkpoint, embeds the publish set with that model
/// version and writes every vector to the output (a compacted topic then keeps the newest per id), and whatever the
/// run's task sends beside them (a fine-tuned classifier's prediction of each item). It reads the
/// weights from the checkpoint on disk, on its own thread, so training never waits for it; if checkpoints come
/// faster than it publishes, it skips to the newest. A run that stops asks it to Drain: the final checkpoint's
/// embeddings go out before the process exits.</summary>
public sealed class EmbeddingPublisher : ReceiveActor
{
    readonly IReadOnlyList<EmbeddingItem> items;
    readonly IEmbeddingSink sink;
    readonly string modality;
    readonly int batchSize;
    readonly Device device;
    readonly IPredictionPublisher? predictions;
    Checkpointer.CheckpointDurable? newest;
    long published;   // every checkpoint up to this step is published (or was tried)
    (long Step, IActorRef ReplyTo)? drain;

    /// <summary>Publish every checkpoint up to Step now, then reply Drained.</summary>
    public sealed record Drain(long Step);
    public sealed record Drained(long Step);
    /// <summary>On the event stream once a model's embeddings are out.</summary>
    public sealed record Published(string Version, long Step, int Records, int Predictions, string Output);

    /// <param name="from">the step the run starts at, whose embeddings went out before</param>
    /// <param name="predictions">what goes out beside the embeddings (the task's); null: nothing</param>
    public EmbeddingPublisher(IReadOnlyList<EmbeddingItem> items, IEmbeddingSink sink, string modality, int batchSize, Device device, long from,
        IPredictionPublisher? predictions)
    {
        this.predictions = predictions;
        this.items = items;
        this.sink = sink;
        this.modality = modality;
        this.batchSize = batchSize;
        this.device = device;
        published = from;
        Receive<Checkpointer.CheckpointDurable>(d =>
        {
            var first = newest is null;
            if (newest is null || d.Step > newest.Step) newest = d;
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
        IPredictionPublisher? predictions) =>
        Akka.Actor.Props.Create(() => new EmbeddingPublisher(items, sink, modality, batchSize, device, from, predictions)).WithDispatcher(Dispatchers.Model);

    void Publish()
    {
        var checkpoint = newest!;
        newest = null;
        published = Math.Max(published, checkpoint.Step);
        var clock = System.Diagnostics.Stopwatch.StartNew();
        try
        {
            using var embedder = Embedder.Load(checkpoint.Path, device);
            var count = embedder.Embed(items, modality, batchSize, sink);
            var predicted = predictions?.Publish(checkpoint.Path, items, batchSize, sink, device) ?? 0;
            sink.Flush();
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
