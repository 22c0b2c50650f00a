using System.Collections.Immutable;
using System.Globalization;
using Akka;
using Akka.Streams.Dsl;
using Mamo.Data;

namespace Mamo.Actors.Sources;

/// <summary>Where a training stream stands: for each of its partitions (a file source has one, "cursor"; a Kafka
/// source one per topic partition, "TOPIC/N") the offset of the last record consumed. A checkpoint stores it,
/// a resumed run continues after it, and a source commits it once the checkpoint is durable.</summary>
public sealed record StreamPosition(ImmutableSortedDictionary<string, long> Offsets)
{
    public static readonly StreamPosition None = new(ImmutableSortedDictionary<string, long>.Empty);
    const string ExtraPrefix = "position:";

    public long? this[string partition] => Offsets.TryGetValue(partition, out var o) ? o : null;

    /// <summary>The furthest of the two for each partition: records arrive in order within a partition.</summary>
    public StreamPosition Advance(SourcePosition at) =>
        this[at.Source] is { } known && known >= at.Offset ? this : new(Offsets.SetItem(at.Source, at.Offset));

    public StreamPosition Merge(StreamPosition other) => other.Offsets.Aggregate(this, (p, kv) => p.Advance(new SourcePosition(kv.Key, kv.Value)));

    /// <summary>As checkpoint state entries ("position:PARTITION" = offset).</summary>
    public IEnumerable<KeyValuePair<string, string>> ToExtra() =>
        Offsets.Select(kv => KeyValuePair.Create(ExtraPrefix + kv.Key, kv.Value.ToString(CultureInfo.InvariantCulture)));

    public static StreamPosition FromExtra(IReadOnlyDictionary<string, string> extra) =>
        new(extra.Where(kv => kv.Key.StartsWith(ExtraPrefix))
            .ToImmutableSortedDictionary(kv => kv.Key[ExtraPrefix.Length..], kv => long.Parse(kv.Value, CultureInfo.InvariantCulture)));

    public override string ToString() => Offsets.Count == 0 ? "start" : string.Join(", ", Offsets.Select(kv => $"{kv.Key}@{kv.Value}"));
}

/// <summary>A share of training that starts from weights of its own: a cluster round (DiLoCo's inner steps, or one
/// every-step step), which a replica's source assigns to its records. A single node's records belong to no round: its
/// run is one share with no end.</summary>
/// <param name="Attempt">unique among the run's rounds, a round given again included: its weights and its hand-in
/// match on it</param>
/// <param name="Number">the coordinator's round (DiLoCo) or step (every-step)</param>
/// <param name="FirstStep">the global step of its first batch</param>
/// <param name="ResetsTeacher">its weights bring the teacher (every DiLoCo round, an every-step step given with the
/// state): targets of its steps wait for them</param>
/// <param name="Replicas">replicas that train the round side by side (DiLoCo), each on its own batches: one of its steps
/// stands for this many steps of one node, in the learning-rate schedule and in the teacher's EMA (docs/CLUSTER.md,
/// "A recipe counted in samples")</param>
/// <param name="Schedule">where the learning-rate schedule stands at its first step: the steps of one node's batch the
/// cluster trained before it</param>
public sealed record Round(long Attempt, long Number, long FirstStep, bool ResetsTeacher, int Replicas = 1, long Schedule = 0);

/// <summary>A record of a training stream and its place there (At: its partition and offset). A replica's source
/// marks the round it belongs to, and the round's last record; a mix, how many it drew from the record's source (Mix:
/// a position the checkpoint keeps beside At).</summary>
public sealed record Positioned(SourcePosition At, SourceItem Item, Round? Round = null, bool EndsRound = false, SourcePosition? Mix = null);

/// <summary>Where a consumer stands in one partition of a stream ("TOPIC/N"): its position (the next offset it reads),
/// the partition's end, the records between them, and the group's last commit; null where not known yet. Expired:
/// records the broker's retention deleted before this consumer read them, since its process started.</summary>
public sealed record PartitionStatus(string Partition, long? Position, long? End, long? Lag, long? Committed, long Expired = 0);

/// <summary>A stream of training samples with no end, positioned so that a checkpoint can resume it.</summary>
public interface ITrainingSource : IDisposable
{
    /// <summary>Whether the source a spec names is read whole by every reader (a file source), as ReadWhole says,
    /// before anything is opened: a coordinator splits it into cursor ranges.</summary>
    static bool ReadWholeSpec(string spec) => !Mamo.Data.Kafka.KafkaSpec.IsKafka(spec);

    string Name { get; }

    /// <summary>Whether every reader reads all of it (a file source, held whole on each node), so that a cluster splits
    /// it into cursor ranges; false where it splits itself between its readers (a Kafka consumer group).</summary>
    bool ReadWhole { get; }

    /// <summary>Called once for each record the stream delivered, when the pipeline decides whether to train it: false
    /// once its partition moved to another member of the group (which reads it again from the committed offset), or
    /// away and back (this reader reads it again). A partition that comes back resumes after the last record taken.</summary>
    bool Take(Positioned record) => true;

    /// <summary>Every record after <paramref name="resume"/>, for as long as the stream runs.</summary>
    Source<Positioned, NotUsed> Open(StreamPosition resume);

    /// <summary>A record that cannot be trained on; the source may keep a copy where its producer will find it. Returns
    /// whether it is news: a file source's sample comes round again each epoch, and is reported once.</summary>
    bool DeadLetter(Positioned record, BadInput bad);

    /// <summary>Everything up to <paramref name="durable"/> is in a checkpoint on disk: acknowledge it.</summary>
    void Commit(StreamPosition durable);

    /// <summary>Why the stream delivers nothing now (e.g. its broker is unreachable); null while it can deliver.</summary>
    string? PausedBecause => null;

    /// <summary>The partitions this source reads now, where it has any.</summary>
    IReadOnlyList<PartitionStatus> Partitions => [];
}
