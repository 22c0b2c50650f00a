using Mamo.Actors.Pipeline;
using Mamo.Actors.Run;
using Mamo.Data;
using Mamo.Model;
using Xunit;

namespace Mamo.Actors.Tests;

public class ReplayBufferTests
{
    static ImageTextSample Record(long i, int bytes = 10) =>
        new($"r{i}", Enumerable.Repeat((byte)(i % 251), bytes).ToArray(), [$"caption {i}", "another"], new SourcePosition("topic/0", i), i % 3 == 0 ? null : $"label{i % 3}");

    static readonly ReplaySettings Settings = new(0.25, Capacity: 100, MaxBytes: 1 << 20);

    [Fact]
    public void Every_record_of_the_stream_is_equally_likely_to_be_held()
    {
        // 200 streams of 1,000 records into reservoirs of 100: 20,000 records held. Were they uniform over the stream,
        // the number from its first half is Binomial(20,000, 1/2): 10,000 ± 71 (one standard deviation). A buffer of
        // the newest records would hold none of them; one that keeps its first fill would hold only them.
        const int streams = 200, length = 1_000;
        var stream = Enumerable.Range(0, length).Select(i => Record(i)).ToList();
        var firstHalf = 0;
        for (int seed = 0; seed < streams; seed++)
        {
            var buffer = ReplayBuffer.Empty(Settings, seed);
            foreach (var batch in stream.Chunk(7)) buffer = buffer.Offer(batch);
            Assert.Equal((100, length), (buffer.Records.Count, buffer.Seen));
            Assert.Equal(buffer.Records.Count, buffer.Records.Select(r => r.Id).Distinct().Count());
            firstHalf += buffer.Records.Count(r => r.Position.Offset < length / 2);
        }
        var sd = Math.Sqrt(streams * 100 * 0.25);
        Assert.InRange(firstHalf, streams * 50 - 3 * sd, streams * 50 + 3 * sd);
    }

    [Fact]
    public void The_byte_bound_holds_and_a_record_larger_than_it_never_enters()
    {
        var settings = new ReplaySettings(0.5, Capacity: 50, MaxBytes: 1_000);
        var buffer = ReplayBuffer.Empty(settings, 7);
        foreach (var i in Enumerable.Range(0, 300)) buffer = buffer.Offer([Record(i, bytes: i == 150 ? 1_001 : 10 + i % 90)]);
        // The byte bound is the one that binds: 50 records of 10-99 bytes would hold far more than 1,000.
        Assert.True(buffer.Bytes <= 1_000, $"{buffer.Bytes} bytes held");
        Assert.True(buffer.Records.Count < settings.Capacity, $"{buffer.Records.Count} records held");
        Assert.Equal(buffer.Records.Sum(r => (long)r.Image.Length), buffer.Bytes);
        Assert.DoesNotContain(buffer.Records, r => r.Id == "r150");
        Assert.Equal(300, buffer.Seen);
    }

    [Fact]
    public void A_batch_draws_the_same_records_for_the_same_step_and_none_it_already_holds()
    {
        // Two epochs of 20 records: each id is offered twice, and a draw never holds it twice.
        var buffer = ReplayBuffer.Empty(Settings, 3).Offer(Enumerable.Range(0, 40).Select(i => Record(i) with { Id = $"r{i % 20}" }));
        var inBatch = new HashSet<string> { "r1", "r2", "r3" };
        var drawn = buffer.Draw(17, 8, inBatch);
        Assert.Equal(8, drawn.Count);
        Assert.Equal(8, drawn.Select(r => r.Id).Distinct().Count());
        Assert.Equal(17, buffer.Draw(17, 40, inBatch).Count);   // the 20 ids less the batch's 3
        Assert.Empty(drawn.Select(r => r.Id).Intersect(inBatch));
        Assert.Equal(drawn.Select(r => r.Id), buffer.Draw(17, 8, inBatch).Select(r => r.Id));
        Assert.NotEqual(drawn.Select(r => r.Id), buffer.Draw(18, 8, inBatch).Select(r => r.Id));
        Assert.Equal(8, buffer.ToReplay(32));
        Assert.Equal(0, ReplayBuffer.Empty(Settings, 3).ToReplay(32));
    }

    [Theory]
    [InlineData(0)]
    [InlineData(130)]
    public void A_checkpoint_part_gives_back_the_same_reservoir(int offered)
    {
        var buffer = ReplayBuffer.Empty(Settings, 5).Offer(Enumerable.Range(0, offered).Select(i => Record(i, 5 + i % 13)));
        using var folder = new TempDir();
        var file = Path.Combine(folder.Path, "replay.safetensors");
        var part = buffer.ToPart();
        SafeTensors.Save(file, part.Tensors);
        foreach (var (_, t) in part.Tensors) t.Dispose();
        var loaded = SafeTensors.Load(file);
        var back = ReplayBuffer.FromPart(loaded, Settings, 5);
        foreach (var t in loaded.Values) t.Dispose();

        Assert.Equal((buffer.Seen, buffer.Bytes, buffer.Records.Count), (back.Seen, back.Bytes, back.Records.Count));
        foreach (var (a, b) in buffer.Records.Zip(back.Records))
        {
            Assert.Equal((a.Id, a.Position, a.Label), (b.Id, b.Position, b.Label));
            Assert.Equal(a.Captions, b.Captions);
            Assert.Equal(a.Image, b.Image);
        }
        // It goes on as the one it was saved from would.
        var next = Enumerable.Range(offered, 50).Select(i => Record(i)).ToList();
        Assert.Equal(buffer.Offer(next).Records.Select(r => r.Id), back.Offer(next).Records.Select(r => r.Id));
        // A capacity lowered since leaves it at the new bound.
        loaded = SafeTensors.Load(file);
        Assert.Equal(Math.Min(offered, 40), ReplayBuffer.FromPart(loaded, Settings with { Capacity = 40 }, 5).Records.Count);
        foreach (var t in loaded.Values) t.Dispose();
    }

    sealed class TempDir : IDisposable
    {
        public string Path { get; } = Directory.CreateTempSubdirectory("mamo-replay-").FullName;
        public void Dispose() => Directory.Delete(Path, recursive: true);
    }
}
