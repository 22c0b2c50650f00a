using static TorchSharp.torch;

namespace Mamo.Data;

/// <summary>
/// A held-out classification set in memory: each image (centre crop) with one text, the fixed prompt or the record's
/// first caption, and its label. A record without a label, or one that cannot be used, is skipped and listed in
/// <see cref="Bad"/>. The tensors belong to the set.
/// </summary>
public sealed class LabelledSet : IDisposable
{
    /// <summary>[N, 3, S, S] float32.</summary>
    public Tensor Images { get; }
    /// <summary>[N, L] int64.</summary>
    public Tensor TokenIds { get; }
    /// <summary>[N, L] int64.</summary>
    public Tensor AttentionMask { get; }
    public string[] Labels { get; }
    public string[] Ids { get; }
    public IReadOnlyList<BadInput> Bad { get; }
    public int Count => Labels.Length;

    LabelledSet(Tensor images, Tensor tokenIds, Tensor attentionMask, string[] labels, string[] ids, IReadOnlyList<BadInput> bad)
    {
        (Images, TokenIds, AttentionMask, Labels, Ids, Bad) = (images, tokenIds, attentionMask, labels, ids, bad);
    }

    /// <param name="prompt">the text every image is paired with; null: each record's first caption</param>
    /// <exception cref="FileNotFoundException">the manifest does not exist</exception>
    /// <exception cref="InvalidDataException">no record is usable</exception>
    public static LabelledSet Load(string manifestPath, ImageTransform transform, TextTokenizer tokenizer, int maxTextLength, string? prompt,
        string labelField = ManifestSource.LabelField, DecodeLimits? limits = null)
    {
        if (!File.Exists(manifestPath)) throw new FileNotFoundException($"no manifest at {manifestPath}", manifestPath);
        var (samples, bad) = ManifestSource.ReadAll(manifestPath, labelField: labelField);
        var preparer = new SamplePreparer(transform, tokenizer, maxTextLength, limits);
        var pixels = new List<float[]>();
        var texts = new List<(long[] Ids, long[] AttentionMask)>();
        var labels = new List<string>();
        var ids = new List<string>();
        var fixedText = prompt is null ? default : tokenizer.Encode(prompt, maxTextLength);
        foreach (var sample in samples)
        {
            if (sample.Label is null)
            {
                bad.Add(new BadInput($"no label (field '{labelField}')", sample.Location, sample.Position));
                continue;
            }
            if (!preparer.TryPrepareForEvaluation(sample, out var image, out var captions, out var error))
            {
                bad.Add(error!);
                continue;
            }
            pixels.Add(image);
            texts.Add(prompt is null ? captions[0] : fixedText);
            labels.Add(sample.Label);
            ids.Add(sample.Id);
        }
        if (pixels.Count == 0)
        {
            var reasons = bad.Count == 0 ? "it has no records" : $"all {bad.Count} records are unusable, e.g. {bad[0].Location}: {bad[0].Reason}";
            throw new InvalidDataException($"{manifestPath}: no labelled image ({reasons})");
        }
        var size = transform.Options.ImageSize;
        long n = pixels.Count;
        var images = tensor(pixels.SelectMany(p => p).ToArray(), [n, 3, size, size], ScalarType.Float32);
        var tokenIds = tensor(texts.SelectMany(t => t.Ids).ToArray(), [n, maxTextLength], ScalarType.Int64);
        var mask = tensor(texts.SelectMany(t => t.AttentionMask).ToArray(), [n, maxTextLength], ScalarType.Int64);
        return new LabelledSet(images.DetachFromDisposeScope(), tokenIds.DetachFromDisposeScope(), mask.DetachFromDisposeScope(),
            labels.ToArray(), ids.ToArray(), bad);
    }

    public void Dispose()
    {
        Images.Dispose();
        TokenIds.Dispose();
        AttentionMask.Dispose();
    }
}
