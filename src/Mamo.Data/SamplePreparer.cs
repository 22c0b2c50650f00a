using System.Diagnostics.CodeAnalysis;
using SkiaSharp;

namespace Mamo.Data;

/// <summary>
/// Decode, transform and tokenise one sample: the work of the parallel preprocess stage. Thread-safe as long as
/// each thread passes its own <see cref="Random"/>. A sample that cannot be prepared comes back as a dead letter.
/// </summary>
public sealed class SamplePreparer(ImageTransform transform, TextTokenizer tokenizer, int maxTextLength, DecodeLimits? decodeLimits = null)
{
    private readonly DecodeLimits _decodeLimits = decodeLimits ?? DecodeLimits.Default;

    /// <summary>How evaluation, `mamo embed`, `mamo serve` and the ONNX export's preprocessing.json prepare a sample: the
    /// image's shorter side resized and centre-cropped to the model's size, texts tokenised to its length.</summary>
    public static SamplePreparer ForEvaluation(int imageSize, int maxTextLength, TextTokenizer tokenizer, DecodeLimits? limits = null) =>
        new(new ImageTransform(new ImageTransformOptions(ImageSize: imageSize)), tokenizer, maxTextLength, limits);

    /// <summary>Training: a random crop and one caption drawn at random.</summary>
    public bool TryPrepareForTraining(ImageTextSample sample, Random random, out PreparedSample? prepared, out BadInput? bad)
    {
        prepared = null;
        if (!TryPixels(sample, TransformMode.Train, random, out var pixels, out bad)) return false;
        var (ids, mask) = tokenizer.Encode(Captions.PickForTraining(sample.Captions, random), maxTextLength);
        prepared = new PreparedSample(sample.Id, pixels, ids, mask, sample.Position, sample.Label);
        return true;
    }

    /// <summary>Evaluation: the centre crop, and every caption encoded.</summary>
    /// <param name="decoded">sees the decoded image before it is transformed (an evaluation set's thumbnail)</param>
    public bool TryPrepareForEvaluation(ImageTextSample sample, out float[] pixels, out IReadOnlyList<(long[] Ids, long[] AttentionMask)> captions, out BadInput? bad,
        Action<SKBitmap>? decoded = null)
    {
        captions = [];
        if (!TryPixels(sample, TransformMode.Eval, null, out pixels, out bad, decoded)) return false;
        captions = sample.Captions.Select(c => tokenizer.Encode(c, maxTextLength)).ToList();
        return true;
    }

    /// <summary>A query's text: tokenised as evaluation's captions are.</summary>
    public (long[] Ids, long[] AttentionMask) PrepareText(string text) => tokenizer.Encode(text, maxTextLength);

    /// <summary>A query's image, as evaluation prepares one (the centre crop), or why it cannot be decoded.</summary>
    public bool TryPrepareImage(byte[] image, out float[] pixels, [NotNullWhen(false)] out DecodeError? error) =>
        TryPixels(image, TransformMode.Eval, null, out pixels, out error);

    private bool TryPixels(ImageTextSample sample, TransformMode mode, Random? random, out float[] pixels, out BadInput? bad, Action<SKBitmap>? decoded = null)
    {
        var ok = TryPixels(sample.Image, mode, random, out pixels, out var error, decoded);
        bad = ok ? null : new BadInput($"{error!.Kind}: {error.Reason}", sample.Location, sample.Position);
        return ok;
    }

    private bool TryPixels(byte[] image, TransformMode mode, Random? random, out float[] pixels, [NotNullWhen(false)] out DecodeError? error,
        Action<SKBitmap>? decoded = null)
    {
        pixels = [];
        if (!ImageDecoder.TryDecode(image, _decodeLimits, out SKBitmap? rgb, out error)) return false;
        using (rgb)
        {
            decoded?.Invoke(rgb);
            pixels = transform.Apply(rgb, mode, random);
        }
        return true;
    }
}
