using TorchSharp;
using static TorchSharp.torch;

namespace Mamo.Data;

/// <summary>A sample ready for batching: normalised CHW pixels and one encoded caption.</summary>
public sealed record PreparedSample(string Id, float[] Pixels, long[] TokenIds, long[] AttentionMask, SourcePosition Position, string? Label = null);

/// <summary>
/// A training or evaluation batch. The tensors belong to the batch: dispose it (or take ownership) when done.
/// Nothing is masked here; MAMO's joint masking happens in the model, in one place.
/// </summary>
public sealed class Batch(Tensor images, Tensor tokenIds, Tensor attentionMask, string[] ids, IReadOnlyList<SourcePosition> positions,
    IReadOnlyList<string?>? labels = null) : IDisposable
{
    /// <summary>[B, 3, S, S] float32.</summary>
    public Tensor Images { get; } = images;

    /// <summary>[B, L] int64.</summary>
    public Tensor TokenIds { get; } = tokenIds;

    /// <summary>[B, L] int64, 1 on real tokens and 0 on padding.</summary>
    public Tensor AttentionMask { get; } = attentionMask;

    public string[] Ids { get; } = ids;

    public IReadOnlyList<SourcePosition> Positions { get; } = positions;

    /// <summary>Each pair's label, null where its source has none.</summary>
    public IReadOnlyList<string?> Labels { get; } = labels ?? new string?[ids.Length];

    public int Size => Ids.Length;

    public void Dispose()
    {
        Images.Dispose();
        TokenIds.Dispose();
        AttentionMask.Dispose();
    }
}

public static class Collator
{
    private const int Channels = 3;

    public static Batch Collate(IReadOnlyList<PreparedSample> samples, int imageSize)
    {
        if (samples.Count == 0) throw new ArgumentException("cannot collate an empty batch", nameof(samples));
        var plane = Channels * imageSize * imageSize;
        var textLength = samples[0].TokenIds.Length;
        var pixels = new float[samples.Count * plane];
        var tokenIds = new long[samples.Count * textLength];
        var attentionMask = new long[samples.Count * textLength];
        for (var i = 0; i < samples.Count; i++)
        {
            var s = samples[i];
            if (s.Pixels.Length != plane)
                throw new ArgumentException($"sample {s.Id} has {s.Pixels.Length} pixel values, expected {plane}", nameof(samples));
            if (s.TokenIds.Length != textLength || s.AttentionMask.Length != textLength)
                throw new ArgumentException($"sample {s.Id} has text length {s.TokenIds.Length}, expected {textLength}", nameof(samples));
            s.Pixels.CopyTo(pixels, i * plane);
            s.TokenIds.CopyTo(tokenIds, i * textLength);
            s.AttentionMask.CopyTo(attentionMask, i * textLength);
        }
        long batch = samples.Count;
        return new Batch(
            tensor(pixels, [batch, Channels, imageSize, imageSize], ScalarType.Float32),
            tensor(tokenIds, [batch, textLength], ScalarType.Int64),
            tensor(attentionMask, [batch, textLength], ScalarType.Int64),
            samples.Select(s => s.Id).ToArray(),
            samples.Select(s => s.Position).ToArray(),
            samples.Select(s => s.Label).ToArray());
    }
}
