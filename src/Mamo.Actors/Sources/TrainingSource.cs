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
    public StreamPosition Advance(string partition, long offset) =>
        this[partition] is { } known && known >= offset ? this : new(Offsets.SetItem(partition, offset));

    public StreamPosition Merge(StreamPosition other) => other.Offsets.Aggregate(this, (p, kv) => p.Advance(kv.Key, kv.Value));

    /// <summary>As checkpoint state entries ("position:PARTITION" = offset).</summary>
    public IEnumerable<KeyValuePair<string, string>> ToExtra() =>
        Offsets.Select(kv => KeyValuePair.Create(ExtraPrefix + kv.Key, kv.Value.ToString(CultureInfo.InvariantCulture)));

    public static StreamPosition FromExtra(IReadOnlyDictionary<string, string> extra) =>
        new(extra.Where(kv => kv.Key.StartsWith(ExtraPrefix))
            .ToImmutableSortedDictionary(kv => kv.Key[ExtraPrefix.Length..], kv => long.Parse(kv.Value, CultureInfo.InvariantCulture)));

    public override string ToString() => Offsets.Count == 0 ? "start" : string.Join(", ", Offsets.Select(kv => $"{kv.Key}@{kv.Value}"));
}

/// <summary>A record of a training stream and its place there.</summary>
public sealed record Positioned(string Partition, long Offset, SourceItem Item);

/// <summary>Where a consumer stands in one partition of a stream ("TOPIC/N"): its position (the next offset it reads),
/// the partition's end, the records between them, and the group's last commit; null where not known yet.</summary>
public sealed record PartitionStatus(string Partition, long? Position, long? End, long? Lag, long? Committed);

/// <summary>A stream of training samples with no end, positioned so that a checkpoint can resume it.</summary>
public interface ITrainingSource : IDisposable
{
    string Name { get; }

    /// <summary>Every record after <paramref name="resume"/>, for as long as the stream runs.</summary>
    Source<Positioned, NotUsed> Open(StreamPosition resume);

    /// <summary>A record that cannot be trained on; the source may keep a copy where its producer will find it.</summary>
    void DeadLetter(Positioned record, BadInput bad);

    /// <summary>Everything up to <paramref name="durable"/> is in a checkpoint on disk: acknowledge it.</summary>
    void Commit(StreamPosition durable);

    /// <summary>Why the stream delivers nothing now (e.g. its broker is unreachable); null while it can deliver.</summary>
    string? PausedBecause => null;

    /// <summary>The partitions this source reads now, where it has any.</summary>
    IReadOnlyList<PartitionStatus> Partitions => [];
}
