using System.Diagnostics;
using System.Text;
using Akka.Streams;
using Akka.Streams.Dsl;
using Akka.TestKit.Xunit2;
using Confluent.Kafka;
using Mamo.Data;
using Mamo.Data.Kafka;
using Xunit;
using Mamo.Actors.Sources;

namespace Mamo.Actors.Tests;

/// <summary>The Kafka training source against librdkafka's mock cluster, in real Akka streams.</summary>
public class KafkaSourceTests : TestKit
{
    const int Partitions = 4, Records = 200;
    // KIP-848 rebalancing: a member that leaves hands its partitions over in milliseconds, not a session timeout.
    static readonly Dictionary<string, string> FastRebalance = new() { ["group.protocol"] = "consumer" };

    [Fact]
    public void Two_consumers_split_the_partitions_and_one_takes_over_from_the_committed_offsets_when_the_other_leaves()
    {
        using var cluster = new KafkaMockCluster();
        cluster.CreateTopic("pairs", Partitions);
        var spec = KafkaSpec.Parse($"kafka://{cluster.BootstrapServers}/pairs?group=replicas");
        var materializer = Sys.Materializer();
        var a = new KafkaTrainingSource(spec, FastRebalance, new Dictionary<string, string>(), null, SourceLimits.Default);
        using var b = new KafkaTrainingSource(spec, FastRebalance, new Dictionary<string, string>(), null, SourceLimits.Default);
        var fromA = new Puller(a.Open(StreamPosition.None).RunWith(Sink.Queue<Positioned>(), materializer));
        var fromB = new Puller(b.Open(StreamPosition.None).RunWith(Sink.Queue<Positioned>(), materializer));
        WaitUntil(() => a.Assigned.Count > 0 && b.Assigned.Count > 0 && a.Assigned.Count + b.Assigned.Count == Partitions, "the group to split the partitions");
        Assert.Empty(a.Assigned.Intersect(b.Assigned));
        Produce(cluster, Records);

        // Each reads exactly the records of its own partitions.
        var seenA = new List<Positioned>();
        var seenB = new List<Positioned>();
        var clock = Stopwatch.StartNew();
        while (seenA.Count + seenB.Count < Records)
        {
            Assert.True(clock.Elapsed < TimeSpan.FromSeconds(60), $"read {seenA.Count} + {seenB.Count} of {Records}");
            if (fromA.Next() is { } x) seenA.Add(x);
            if (fromB.Next() is { } y) seenB.Add(y);
        }
        Assert.Equal(a.Assigned.Order(), seenA.Select(r => r.At.Source).Distinct().Order());
        Assert.Equal(b.Assigned.Order(), seenB.Select(r => r.At.Source).Distinct().Order());

        // A checkpoints the first half of what it read, the commit lands, then A leaves the group.
        var position = seenA.Where(r => r.At.Offset < Records / Partitions / 2).Aggregate(StreamPosition.None, (p, r) => p.Advance(r.At));
        var ofA = a.Assigned.ToHashSet();
        a.Commit(position);
        WaitUntil(() => Committed(cluster, "replicas").Count == ofA.Count, "A's commit");
        a.Dispose();

        // B takes A's partitions over and starts each right after A's committed position.
        var firstFromA = new Dictionary<string, long>();
        clock.Restart();
        while (firstFromA.Count < ofA.Count)
        {
            Assert.True(clock.Elapsed < TimeSpan.FromSeconds(60), $"B did not take over {string.Join(",", ofA.Except(firstFromA.Keys))}");
            if (fromB.Next() is { } r && ofA.Contains(r.At.Source)) firstFromA.TryAdd(r.At.Source, r.At.Offset);
        }
        foreach (var (partition, offset) in firstFromA) Assert.Equal(position[partition]! + 1, offset);
        Assert.Equal(Partitions, b.Assigned.Count);
    }

    [Fact]
    public void A_partition_assigned_again_starts_at_the_newer_of_its_checkpoint_and_the_group_offset_and_commits_never_go_back()
    {
        using var cluster = new KafkaMockCluster();
        cluster.CreateTopic("pairs", Partitions);
        var spec = KafkaSpec.Parse($"kafka://{cluster.BootstrapServers}/pairs?group=replicas");
        var materializer = Sys.Materializer();
        Produce(cluster, 10 * Partitions);   // offsets 0..9 of each partition

        // A resumes from a checkpoint that covers offsets 0..9 of every partition (its commit never landed).
        var checkpoint = Enumerable.Range(0, Partitions).Aggregate(StreamPosition.None, (p, i) => p.Advance(new($"pairs/{i}", 9)));
        using var a = new KafkaTrainingSource(spec, FastRebalance, new Dictionary<string, string>(), null, SourceLimits.Default);
        var fromA = new Puller(a.Open(checkpoint).RunWith(Sink.Queue<Positioned>(), materializer));
        WaitUntil(() => a.Assigned.Count == Partitions, "A to own every partition");

        // B joins, takes some partitions, trains them further than A's checkpoint, commits and leaves.
        var b = new KafkaTrainingSource(spec, FastRebalance, new Dictionary<string, string>(), null, SourceLimits.Default);
        var fromB = new Puller(b.Open(StreamPosition.None).RunWith(Sink.Queue<Positioned>(), materializer));
        WaitUntil(() => a.Assigned.Count > 0 && b.Assigned.Count > 0 && a.Assigned.Count + b.Assigned.Count == Partitions, "the group to split the partitions");
        var ofB = b.Assigned.ToHashSet();
        Produce(cluster, 30 * Partitions, first: 10 * Partitions);   // offsets 10..39
        var readByB = StreamPosition.None;
        var clock = Stopwatch.StartNew();
        while (ofB.Any(p => (readByB[p] ?? -1) < 29))
        {
            Assert.True(clock.Elapsed < TimeSpan.FromSeconds(60), $"B read only {readByB}");
            fromA.Next();
            if (fromB.Next() is { } r && r.At.Offset <= 29) readByB = readByB.Advance(r.At);
        }
        b.Commit(readByB);
        WaitUntil(() => ofB.All(p => Committed(cluster, "replicas").GetValueOrDefault(p) == 30), "B's commit");
        b.Dispose();

        // A takes B's partitions back at the group's offset, not after its own older checkpoint.
        var firstBack = new Dictionary<string, long>();
        clock.Restart();
        while (firstBack.Count < ofB.Count)
        {
            Assert.True(clock.Elapsed < TimeSpan.FromSeconds(60), $"A did not take back {string.Join(",", ofB.Except(firstBack.Keys))}");
            if (fromA.Next() is { } r && ofB.Contains(r.At.Source)) firstBack.TryAdd(r.At.Source, r.At.Offset);
        }
        Assert.All(firstBack, kv => Assert.Equal(30, kv.Value));

        // A commits a checkpoint older than B's for those partitions: theirs stay where B left them.
        var ofA = Enumerable.Range(0, Partitions).Select(i => $"pairs/{i}").Except(ofB).ToList();
        var stale = ofB.Aggregate(ofA.Aggregate(StreamPosition.None, (p, x) => p.Advance(new(x, 14))), (p, x) => p.Advance(new(x, 19)));
        a.Commit(stale);
        WaitUntil(() => ofA.All(p => Committed(cluster, "replicas").GetValueOrDefault(p) == 15), "A's commit");
        Assert.All(ofB, p => Assert.Equal(30, Committed(cluster, "replicas")[p]));
    }

    [Fact]
    public void A_partition_taken_away_and_given_back_is_read_again_after_the_last_record_taken_so_nothing_is_lost_or_trained_twice()
    {
        using var cluster = new KafkaMockCluster();
        cluster.CreateTopic("pairs", Partitions);
        var spec = KafkaSpec.Parse($"kafka://{cluster.BootstrapServers}/pairs?group=back");
        var materializer = Sys.Materializer();
        Produce(cluster, 10 * Partitions);
        using var a = new KafkaTrainingSource(spec, FastRebalance, new Dictionary<string, string>(), null, SourceLimits.Default);
        var fromA = new Puller(a.Open(StreamPosition.None).RunWith(Sink.Queue<Positioned>(), materializer));
        WaitUntil(() => a.Assigned.Count == Partitions, "A to own every partition");
        // A's stream reads every record (into the pipeline's buffers, as far as the batcher is concerned) ...
        var early = new List<Positioned>();
        var clock = Stopwatch.StartNew();
        while (early.Count < 10 * Partitions)
        {
            Assert.True(clock.Elapsed < TimeSpan.FromSeconds(60), $"A read {early.Count}");
            if (fromA.Next() is { } r) early.Add(r);
        }
        // ... and its batcher takes the first half of every partition (trained, not yet checkpointed) ...
        Assert.All(early.Where(r => r.At.Offset < 5), r => Assert.True(a.Take(r)));
        // ... then B joins and takes some partitions, so the batcher drops the rest of their records as no longer A's ...
        var b = new KafkaTrainingSource(spec, FastRebalance, new Dictionary<string, string>(), null, SourceLimits.Default);
        var fromB = new Puller(b.Open(StreamPosition.None).RunWith(Sink.Queue<Positioned>(), materializer));
        WaitUntil(() => a.Assigned.Count > 0 && b.Assigned.Count > 0 && a.Assigned.Count + b.Assigned.Count == Partitions, "the group to split the partitions");
        var dropped = early.Where(r => r.At.Offset >= 5 && !a.Take(r)).Select(r => r.At).ToHashSet();
        Assert.NotEmpty(dropped);
        // ... and leaves before it commits anything: the partitions come back to A, which reads again what it dropped,
        // after the last record it took: none it took is delivered twice.
        b.Dispose();
        WaitUntil(() => a.Assigned.Count == Partitions, "A to own every partition again");
        var again = new List<SourcePosition>();
        clock.Restart();
        while (dropped.Count > 0)
        {
            Assert.True(clock.Elapsed < TimeSpan.FromSeconds(60), $"A never read again {string.Join(", ", dropped.Select(p => $"{p.Source}@{p.Offset}"))}");
            if (fromA.Next() is not { } r) continue;
            again.Add(r.At);
            Assert.True(a.Take(r));
            dropped.Remove(r.At);
        }
        Assert.All(again, p => Assert.True(p.Offset >= 5, $"{p.Source}@{p.Offset} was taken before its partition went away, and delivered again"));
    }

    [Fact]
    public void A_partition_taken_away_and_given_back_while_an_offer_waits_on_a_full_stream_loses_none_of_its_records()
    {
        // The chaos soak of 2026-12-08 lost 32 records this way: the rebalance ran inside the polls of an offer waiting on
        // a full stream, and the offer, once taken, marked its partition offered up to it after the partition had gone and
        // come back, so the records read again below it were skipped as delivered already.
        using var cluster = new KafkaMockCluster();
        cluster.CreateTopic("pairs", Partitions);
        var spec = KafkaSpec.Parse($"kafka://{cluster.BootstrapServers}/pairs?group=full");
        var materializer = Sys.Materializer();
        using var a = new KafkaTrainingSource(spec, FastRebalance, new Dictionary<string, string>(), null, SourceLimits.Default);
        var fromA = new Puller(a.Open(StreamPosition.None).RunWith(Sink.Queue<Positioned>(), materializer));
        WaitUntil(() => a.Assigned.Count == Partitions, "A to own every partition");
        // B joins and leaves: the partitions it takes while it is in the group go away from A and come back.
        IReadOnlyCollection<string> TakeAwayAndGiveBack()
        {
            IReadOnlyCollection<string> moved;
            using (var b = new KafkaTrainingSource(spec, FastRebalance, new Dictionary<string, string>(), null, SourceLimits.Default))
            {
                b.Open(StreamPosition.None).RunWith(Sink.Ignore<Positioned>(), materializer);
                WaitUntil(() => b.Assigned.Count > 0 && a.Assigned.Count + b.Assigned.Count == Partitions, "the group to split the partitions");
                moved = b.Assigned;
            }
            WaitUntil(() => a.Assigned.Count == Partitions, "A to own every partition again");
            return moved;
        }
        // Records in one of the partitions that move, more than A's stream holds: A's consumer waits in an offer of one
        // of them while that partition goes away and comes back.
        var partition = TakeAwayAndGiveBack().First();
        const int records = 300;
        Produce(cluster, records, partition: int.Parse(partition[(partition.IndexOf('/') + 1)..]));
        var round = 0;
        while (!TakeAwayAndGiveBack().Contains(partition))
            Assert.True(++round < 5, $"{partition} did not go away from A again in 5 rounds");
        // A's batcher takes what comes: every record, once.
        var taken = new List<long>();
        var clock = Stopwatch.StartNew();
        while (taken.Count < records)
        {
            Assert.True(clock.Elapsed < TimeSpan.FromSeconds(60), $"A took {taken.Count} of the {records} records of {partition}");
            if (fromA.Next() is { } r && a.Take(r)) taken.Add(r.At.Offset);
        }
        Assert.Equal(Enumerable.Range(0, records).Select(i => (long)i), taken.Order());
    }

    [Fact]
    public void A_stream_that_stalls_gets_every_record_of_every_partition_once_and_in_order()
    {
        using var cluster = new KafkaMockCluster();
        cluster.CreateTopic("pairs", Partitions);
        var spec = KafkaSpec.Parse($"kafka://{cluster.BootstrapServers}/pairs?group=slow");
        const int backlog = 150 * Partitions;
        Produce(cluster, backlog);
        using var source = new KafkaTrainingSource(spec, FastRebalance, new Dictionary<string, string>(), null, SourceLimits.Default);
        var from = new Puller(source.Open(StreamPosition.None).RunWith(Sink.Queue<Positioned>(), Sys.Materializer()));

        // The reader stalls longer than an offer waits, again and again: the consumer pauses, polls and resumes meanwhile.
        var read = new List<SourcePosition>();
        var clock = Stopwatch.StartNew();
        while (read.Count < backlog)
        {
            Assert.True(clock.Elapsed < TimeSpan.FromSeconds(120), $"read {read.Count} of {backlog}");
            if (from.Next() is { } r) read.Add(r.At);
            if (read.Count % 50 == 49) Thread.Sleep(300);
        }
        foreach (var partition in read.GroupBy(p => p.Source))
            Assert.Equal(Enumerable.Range(0, backlog / Partitions).Select(i => (long)i), partition.Select(p => p.Offset));
    }

    [Fact]
    public void Records_the_broker_deleted_before_the_group_read_them_are_counted_and_reading_goes_on_from_the_oldest_held()
    {
        // The mock broker keeps about 5 MB of each partition's log: 200 records of 64 KB leave the oldest deleted.
        using var cluster = new KafkaMockCluster();
        cluster.CreateTopic("pairs", Partitions);
        var image = new byte[64 * 1024];
        using (var producer = new ProducerBuilder<byte[]?, byte[]?>(new ProducerConfig { BootstrapServers = cluster.BootstrapServers }).Build())
        {
            for (var i = 0; i < 200; i++)
                producer.Produce(new TopicPartition("pairs", 0), KafkaRecords.ToMessage(new ImageTextSample($"r{i}", image, ["caption"], new SourcePosition("", 0))));
            producer.Flush(TimeSpan.FromSeconds(30));
        }
        long oldestHeld;
        using (var probe = new ConsumerBuilder<byte[], byte[]>(new ConsumerConfig { BootstrapServers = cluster.BootstrapServers, GroupId = "probe" }).Build())
            oldestHeld = probe.QueryWatermarkOffsets(new TopicPartition("pairs", 0), TimeSpan.FromSeconds(10)).Low.Value;
        Assert.InRange(oldestHeld, 11, 199);   // the premise: some records, though not all, are gone

        // A checkpoint that trained offsets 0..9: the stream should start at 10, which the broker no longer has.
        var spec = KafkaSpec.Parse($"kafka://{cluster.BootstrapServers}/pairs?group=behind");
        using var source = new KafkaTrainingSource(spec, FastRebalance, new Dictionary<string, string>(), null, SourceLimits.Default);
        var from = new Puller(source.Open(StreamPosition.None.Advance(new("pairs/0", 9))).RunWith(Sink.Queue<Positioned>(), Sys.Materializer()));
        Positioned? first = null;
        var clock = Stopwatch.StartNew();
        while (first is null)
        {
            Assert.True(clock.Elapsed < TimeSpan.FromSeconds(60), "no record read");
            first = from.Next();
        }
        Assert.Equal(new SourcePosition("pairs/0", oldestHeld), first.At);
        WaitUntil(() => source.Partitions.Any(p => p.Partition == "pairs/0" && p.Expired == oldestHeld - 10), "the expired count in the partition's status");
    }

    /// <summary>Records r{first}.. r{first + records - 1}, spread round-robin over the partitions.</summary>
    [Fact]
    public void A_replicas_stream_skips_what_applied_rounds_trained_judged_when_each_record_takes_its_place()
    {
        using var cluster = new KafkaMockCluster();
        cluster.CreateTopic("pairs", Partitions);
        Produce(cluster, Records);
        var spec = KafkaSpec.Parse($"kafka://{cluster.BootstrapServers}/pairs?group=replica");
        using var kafka = new KafkaTrainingSource(spec, FastRebalance, new Dictionary<string, string>(), null, SourceLimits.Default);
        var source = new Cluster.AssignedSource(kafka);
        var placed = new Puller(source.Open(StreamPosition.None).RunWith(Sink.Queue<Positioned>(), Sys.Materializer()));
        List<Positioned> Round(long number, int records)
        {
            source.Assign(new(new Sources.Round(number, number, number * 10, ResetsTeacher: true), -1, records));
            var got = new List<Positioned>();
            var clock = Stopwatch.StartNew();
            while (got.Count < records)
            {
                Assert.True(clock.Elapsed < TimeSpan.FromSeconds(60), $"round {number}: {got.Count} of {records} records");
                if (placed.Next() is { } r) got.Add(r);
            }
            return got;
        }

        var first = Round(0, 8);
        Assert.All(first, r => Assert.Equal(0, r.Round!.Number));
        Assert.True(first[^1].EndsRound);
        // Another replica's applied round trained the next 5 records of every partition (the group had moved them there
        // and back): the cluster checkpoint's positions say so before the next round is given.
        var reached = first.GroupBy(r => r.At.Source).ToDictionary(g => g.Key, g => g.Max(r => r.At.Offset));
        var applied = Enumerable.Range(0, Partitions).Select(p => $"pairs/{p}")
            .Aggregate(StreamPosition.None, (at, p) => at.Advance(new SourcePosition(p, reached.GetValueOrDefault(p, -1) + 5)));
        source.Commit(applied);
        var second = Round(1, 8);
        // Every record of the round is past what was applied, the one the stream had ready when the first round ended too.
        Assert.All(second, r => Assert.True(r.At.Offset > applied[r.At.Source], $"{r.At} was trained by an applied round ({applied})"));
        Assert.All(second, r => Assert.Equal(1, r.Round!.Number));
        Assert.Equal([.. Enumerable.Repeat(false, 7), true], second.Select(r => r.EndsRound));
    }

    /// <param name="partition">every record to this one; null: spread over the topic's partitions</param>
    static void Produce(KafkaMockCluster cluster, int records, int first = 0, int? partition = null)
    {
        using var producer = new ProducerBuilder<byte[]?, byte[]?>(new ProducerConfig { BootstrapServers = cluster.BootstrapServers }).Build();
        for (var i = first; i < first + records; i++)
            producer.Produce(new TopicPartition("pairs", partition ?? i % Partitions), KafkaRecords.ToMessage(
                new ImageTextSample($"r{i}", [0x89, (byte)'P', (byte)'N', (byte)'G'], ["caption"], new SourcePosition("", 0))));
        producer.Flush(TimeSpan.FromSeconds(30));
    }

    /// <summary>Pulls from a stream without blocking long; a pull not yet answered is kept for the next call.</summary>
    sealed class Puller(ISinkQueue<Positioned> queue)
    {
        Task<Akka.Util.Option<Positioned>>? pending;

        public Positioned? Next()
        {
            pending ??= queue.PullAsync();
            if (!pending.Wait(TimeSpan.FromMilliseconds(50))) return null;
            var result = pending.Result;
            pending = null;
            return result.HasValue ? result.Value : null;
        }
    }

    static Dictionary<string, long> Committed(KafkaMockCluster cluster, string group)
    {
        using var consumer = new ConsumerBuilder<byte[], byte[]>(new ConsumerConfig { BootstrapServers = cluster.BootstrapServers, GroupId = group }).Build();
        return consumer.Committed(Enumerable.Range(0, Partitions).Select(p => new TopicPartition("pairs", p)), TimeSpan.FromSeconds(10))
            .Where(c => c.Offset != Offset.Unset).ToDictionary(c => KafkaRecords.PartitionKey(c.Topic, c.Partition.Value), c => c.Offset.Value);
    }

    static void WaitUntil(Func<bool> condition, string what)
    {
        var clock = Stopwatch.StartNew();
        while (!condition())
        {
            Assert.True(clock.Elapsed < TimeSpan.FromSeconds(30), $"timed out waiting for {what}");
            Thread.Sleep(100);
        }
    }
}
