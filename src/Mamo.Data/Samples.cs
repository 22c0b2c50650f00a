namespace Mamo.Data;

/// <summary>
/// Where a record came from. <see cref="Source"/> names the stream (a manifest path, a tar shard path, later a
/// Kafka topic-partition); <see cref="Offset"/> is the record's 0-based index within it (manifest: line number;
/// WebDataset shard: ordinal of the sample, i.e. of the group of entries sharing a key). Resuming from a position
/// continues with the first record after it.
/// </summary>
public sealed record SourcePosition(string Source, long Offset);

/// <summary>One image (still encoded) with its captions, as read from a source. Label: the class of a labelled
/// stream (fine-tuning), null where the source has none.</summary>
public sealed record ImageTextSample(string Id, byte[] Image, IReadOnlyList<string> Captions, SourcePosition Position, string? Label = null)
{
    /// <summary>Where it came from, as a dead letter names it: its stream, offset and id.</summary>
    public string Location => $"{Position.Source}@{Position.Offset} (id {Id})";
}

/// <summary>A dead letter: input that was skipped, why, and where it was.</summary>
public sealed record BadInput(string Reason, string Location, SourcePosition? Position);

/// <summary>What a source yields: a sample or a dead letter, in source order.</summary>
public abstract record SourceItem;

public sealed record SampleItem(ImageTextSample Sample) : SourceItem;

public sealed record BadItem(BadInput Bad) : SourceItem;

/// <summary>A resumable, single-pass stream of image-text pairs. Epochs and shuffling belong to the caller.</summary>
public interface IImageTextSource
{
    string Name { get; }

    /// <summary>
    /// Reads once through the data. <paramref name="resumeAfter"/> maps <see cref="SourcePosition.Source"/> to the
    /// last consumed <see cref="SourcePosition.Offset"/>; records at or before it are skipped.
    /// </summary>
    IEnumerable<SourceItem> Read(IReadOnlyDictionary<string, long>? resumeAfter, CancellationToken ct);
}

/// <summary>Limits a source applies while reading, before anything is decoded.</summary>
public sealed record SourceLimits(
    long MaxImageBytes = 32L * 1024 * 1024,
    int MaxCaptionChars = 2_000,
    int MaxCaptions = 64,
    int MaxLineBytes = 1024 * 1024,
    long MaxTextEntryBytes = 1024 * 1024)
{
    public static readonly SourceLimits Default = new();
}
