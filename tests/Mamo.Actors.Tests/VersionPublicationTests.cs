using System.Text.Json;
using Akka.Actor;
using Akka.TestKit.Xunit2;
using Mamo.Actors.Pipeline;
using Mamo.Actors.Run;
using Mamo.Data.Kafka;
using Mamo.Model;
using Xunit;
using static TorchSharp.torch;

namespace Mamo.Actors.Tests;

/// <summary>The versions protocol (docs/KAFKA.md, "Versions") on a JSONL output: each version's events in order, with
/// the count and checksum of the vectors it wrote; what a publisher does with a version left unfinished.</summary>
public sealed class VersionPublicationTests() : TestKit(MamoSettings.Defaults())
{
    const int Items = 5;
    readonly string run = Directory.CreateTempSubdirectory("mamo-versions-").FullName;
    string OutputFile => Path.Combine(run, "out", "embeddings.jsonl");
    string Events => Path.Combine(run, "out", "embeddings.versions.jsonl");

    /// <summary>A tiny model saved as the run's checkpoint of <paramref name="step"/>.</summary>
    string SaveCheckpoint(long step, int seed)
    {
        var dir = Path.Combine(run, Checkpoint.RunFolder, Checkpoint.StepFolderName(step));
        using var trainer = new MamoTrainer(MamoConfig.Tiny, new OptimizerConfig(), CPU, seed);
        Checkpoint.Save(dir, trainer.Config, trainer.Parts(), new Checkpoint.State(step, 0, step, []));
        return dir;
    }

    static List<EmbeddingItem> MakeItems()
    {
        var config = MamoConfig.Tiny;
        var generator = new Generator().manual_seed(3);
        return Enumerable.Range(0, Items).Select(i =>
        {
            var pixels = rand([3, config.ImageSize, config.ImageSize], generator: generator).data<float>().ToArray();
            var ids = Enumerable.Range(0, config.MaxTextLength).Select(t => t < 4 ? 1000L + 10 * i + t : 0L).ToArray();
            return new EmbeddingItem($"item-{i}", pixels, ids, ids.Select(t => t == 0 ? 0L : 1L).ToArray());
        }).ToList();
    }

    List<VersionRecord> ReadEvents() => File.ReadLines(Events).Select(l => VersionRecord.Parse(System.Text.Encoding.UTF8.GetBytes(l))).ToList();

    /// <summary>The (id, modality) of each vector of the version in the output.</summary>
    List<(string Id, string Modality)> Vectors(string version) => File.ReadLines(OutputFile).Select(l => JsonDocument.Parse(l).RootElement)
        .Where(e => e.GetProperty("model_version").GetString() == version)
        .Select(e => (e.GetProperty("id").GetString()!, e.GetProperty("modality").GetString()!)).ToList();

    [Fact]
    public void Each_version_is_started_then_complete_with_the_count_and_checksum_of_its_vectors()
    {
        var items = MakeItems();
        using var sink = EmbeddingSinks.Open("jsonl:" + OutputFile);
        var versions = new VersionPublication(run);
        foreach (var (step, seed) in new[] { (2L, 1), (4L, 2) })
        {
            using var embedder = Embedder.Load(SaveCheckpoint(step, seed), CPU);
            Assert.Equal((2 * Items, 0), versions.Publish(embedder, items, Embedder.Both, batchSize: 2, sink, null, CPU));
        }
        Assert.Null(versions.Unfinished(sink));   // nothing in progress

        var events = ReadEvents();
        Assert.Equal([("step-2", "started"), ("step-2", "complete"), ("step-4", "started"), ("step-4", "complete")], events.Select(e => (e.Version, e.State)));
        foreach (var complete in events.Where(e => e.State == VersionRecord.Complete))
        {
            var vectors = Vectors(complete.Version);
            Assert.Equal(complete.Records, vectors.Count);
            Assert.Equal(2 * Items, vectors.Distinct().Count());
            Assert.Equal(VersionRecord.IdsChecksum(vectors), complete.IdsSha256);
        }
        // The checksum is the documented one: SHA-256 of the sorted "ID\tMODALITY\n" lines.
        var text = string.Concat(items.SelectMany(i => new[] { $"{i.Id}\timage\n", $"{i.Id}\ttext\n" }).Order(StringComparer.Ordinal));
        Assert.Equal(Convert.ToHexStringLower(System.Security.Cryptography.SHA256.HashData(System.Text.Encoding.UTF8.GetBytes(text))), events[1].IdsSha256);
    }

    [Fact]
    public void A_publisher_publishes_the_version_its_predecessor_left_unfinished_again_or_marks_it_abandoned_where_its_checkpoint_is_gone()
    {
        var items = MakeItems();
        SaveCheckpoint(2, seed: 1);
        // A publisher killed in the middle of step-2 left its note and its "started" event.
        using (var sink = EmbeddingSinks.Open("jsonl:" + OutputFile))
        {
            sink.Write(new VersionRecord("step-2", VersionRecord.Started, 2, DateTime.UtcNow));
            sink.Flush();
        }
        File.WriteAllText(Path.Combine(run, VersionPublication.StateFile),
            JsonSerializer.Serialize(new VersionPublication.InProgress("step-2", 2, "jsonl:" + OutputFile)));

        var publisher = Sys.ActorOf(EmbeddingPublisher.Props(items, EmbeddingSinks.Open("jsonl:" + OutputFile), Embedder.Image, 4, CPU, from: 2, null, run));
        publisher.Tell(new EmbeddingPublisher.Drain(2), TestActor);
        ExpectMsg<EmbeddingPublisher.Drained>(TimeSpan.FromMinutes(1));
        Assert.Equal([("step-2", "started"), ("step-2", "started"), ("step-2", "complete")], ReadEvents().Select(e => (e.Version, e.State)));
        Assert.Equal(Items, ReadEvents()[^1].Records);
        Assert.False(File.Exists(Path.Combine(run, VersionPublication.StateFile)));
        Watch(publisher);
        Sys.Stop(publisher);
        ExpectTerminated(publisher);   // its sink closed: the next one appends to the same files

        // Its checkpoint pruned before the next start: the version is abandoned, and the next one goes out whole.
        File.WriteAllText(Path.Combine(run, VersionPublication.StateFile),
            JsonSerializer.Serialize(new VersionPublication.InProgress("step-3", 3, "jsonl:" + OutputFile)));
        var durable = SaveCheckpoint(4, seed: 2);
        publisher = Sys.ActorOf(EmbeddingPublisher.Props(items, EmbeddingSinks.Open("jsonl:" + OutputFile), Embedder.Image, 4, CPU, from: 2, null, run));
        publisher.Tell(new Checkpointer.CheckpointDurable(4, Mamo.Actors.Sources.StreamPosition.FromExtra(new Dictionary<string, string>()), durable));
        publisher.Tell(new EmbeddingPublisher.Drain(4), TestActor);
        ExpectMsg<EmbeddingPublisher.Drained>(TimeSpan.FromMinutes(1));
        var events = ReadEvents().Skip(3).ToList();
        Assert.Equal([("step-3", "abandoned"), ("step-4", "started"), ("step-4", "complete")], events.Select(e => (e.Version, e.State)));
        Assert.Contains("checkpoint is gone", events[0].Reason);
    }

    [Fact]
    public void A_version_left_unfinished_is_abandoned_when_a_newer_one_starts()
    {
        var items = MakeItems();
        using var sink = EmbeddingSinks.Open("jsonl:" + OutputFile);
        File.WriteAllText(Path.Combine(run, VersionPublication.StateFile), JsonSerializer.Serialize(new VersionPublication.InProgress("step-1", 1, sink.Name)));
        using var embedder = Embedder.Load(SaveCheckpoint(2, seed: 1), CPU);
        new VersionPublication(run).Publish(embedder, items, Embedder.Text, 8, sink, null, CPU);
        var events = ReadEvents();
        Assert.Equal([("step-1", "abandoned"), ("step-2", "started"), ("step-2", "complete")], events.Select(e => (e.Version, e.State)));
        Assert.Equal("superseded by step-2 before it was complete", events[0].Reason);
    }

    [Fact]
    public void Version_records_round_trip_and_anything_else_is_a_format_error()
    {
        var complete = new VersionRecord("step-7", VersionRecord.Complete, 7, new DateTime(2026, 12, 6, 0, 0, 0, DateTimeKind.Utc), 10, 2, "ab");
        Assert.Equal(complete, VersionRecord.Parse(complete.ToJson()));
        Assert.DoesNotContain("reason", System.Text.Encoding.UTF8.GetString(complete.ToJson()));
        foreach (var bad in new[] { "", "[]", "{\"version\":\"v\",\"state\":\"done\",\"step\":1}", "{\"state\":\"started\",\"step\":1}", "{\"version\":\"v\",\"state\":\"started\"}" })
            Assert.Throws<FormatException>(() => VersionRecord.Parse(System.Text.Encoding.UTF8.GetBytes(bad)));
    }

    protected override void Dispose(bool disposing)
    {
        base.Dispose(disposing);
        if (disposing) Directory.Delete(run, recursive: true);
    }
}
