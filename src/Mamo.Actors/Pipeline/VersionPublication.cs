using System.Text.Json;
using Mamo.Data.Kafka;
using static TorchSharp.torch;

namespace Mamo.Actors.Pipeline;

/// <summary>
/// Publishes a model version with the versions protocol (docs/KAFKA.md, "Versions"): a "started" event, every vector,
/// and, only once every vector is acknowledged, a "complete" event with the count and a checksum of the ids, so a
/// consumer can tell when a version covers the whole set and never mixes two. A version that fails on the way is marked
/// "abandoned". With a run folder, the version in progress is noted there (publishing.json, written before its first
/// vector): a publisher killed mid-version publishes it again when it starts, or, where its checkpoint is gone, marks it
/// abandoned. So no version stays "started" for ever, and none is called complete with items missing.
/// </summary>
public sealed class VersionPublication(string? runDir)
{
    public const string StateFile = "publishing.json";

    /// <summary>A version in progress, as publishing.json notes it.</summary>
    public sealed record InProgress(string Version, long Step, string Output);

    string? State => runDir is null ? null : Path.Combine(runDir, StateFile);

    /// <summary>The version a publisher to <paramref name="sink"/> stopped in the middle of; null: none.</summary>
    public InProgress? Unfinished(IEmbeddingSink sink)
    {
        if (State is not { } path || !File.Exists(path)) return null;
        try { return JsonSerializer.Deserialize<InProgress>(File.ReadAllText(path)) is { } p && p.Output == sink.Name ? p : null; }
        catch (JsonException) { return null; }   // a note cut short by a crash: it was written before any vector of its version
    }

    /// <summary>Embeds the items with the model and writes each vector, then the task's predictions, between the
    /// version's "started" and "complete" events. On a failure it marks the version abandoned (if the sink still
    /// takes it; if not, the note stays for the next start) and throws.</summary>
    public (int Records, int Predictions) Publish(Embedder embedder, IReadOnlyList<EmbeddingItem> items, string modality, int batchSize,
        IEmbeddingSink sink, IPredictionPublisher? predictions, Device device)
    {
        var (version, step) = (embedder.Version, embedder.Step);
        // One left unfinished (its publisher was killed, or the sink was away when it failed) ends before this starts.
        if (Unfinished(sink) is { } left && left.Version != version)
            Abandon(sink, left.Version, left.Step, $"superseded by {version} before it was complete");
        // The note before the event: killed between the two, the next start publishes the version again.
        Note(new InProgress(version, step, sink.Name));
        sink.Write(new VersionRecord(version, VersionRecord.Started, step, DateTime.UtcNow));
        sink.Flush();
        try
        {
            var records = embedder.Embed(items, modality, batchSize, sink);
            var predicted = predictions?.Publish(embedder.Checkpoint, items, batchSize, sink, device) ?? 0;
            sink.Flush();   // every vector acknowledged before the version is called complete
            var ids = VersionRecord.IdsChecksum(Modalities(modality).SelectMany(m => items.Select(i => (i.Id, m))));
            sink.Write(new VersionRecord(version, VersionRecord.Complete, step, DateTime.UtcNow, records, predicted, ids));
            sink.Flush();
            Note(null);
            return (records, predicted);
        }
        catch (Exception e) when (e is IOException or InvalidDataException or Confluent.Kafka.KafkaException)
        {
            try { Abandon(sink, version, step, e.Message); }
            catch (Exception again) when (again is IOException or Confluent.Kafka.KafkaException) { }   // the note stays: the next start marks it
            throw;
        }
    }

    /// <summary>Marks the version abandoned, once the sink has acknowledged that, and forgets it.</summary>
    public void Abandon(IEmbeddingSink sink, string version, long step, string reason)
    {
        sink.Write(new VersionRecord(version, VersionRecord.Abandoned, step, DateTime.UtcNow, Reason: reason));
        sink.Flush();
        Note(null);
    }

    static IEnumerable<string> Modalities(string modality) => modality == Embedder.Both ? [Embedder.Image, Embedder.Text] : [modality];

    /// <summary>Notes the version in progress (null: none), whole or not at all.</summary>
    void Note(InProgress? inProgress)
    {
        if (State is not { } path) return;
        if (inProgress is null)
        {
            File.Delete(path);
            return;
        }
        File.WriteAllText(path + ".tmp", JsonSerializer.Serialize(inProgress));
        File.Move(path + ".tmp", path, overwrite: true);
    }
}
