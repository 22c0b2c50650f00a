using SkiaSharp;
using static TorchSharp.torch;

namespace Mamo.Data;

/// <summary>
/// A held-out retrieval set in memory: every image (centre crop) and every caption, with the image of each caption.
/// Lines or images that cannot be used are skipped and listed in <see cref="Bad"/>. The tensors belong to the set.
/// </summary>
public sealed class EvalSet : IDisposable
{
    private const int Channels = 3;
    /// <summary>Side of <see cref="Thumbnails"/>, in pixels.</summary>
    public const int ThumbnailSize = 48;

    /// <summary>[Ni, 3, S, S] float32.</summary>
    public Tensor Images { get; }

    /// <summary>[Nt, L] int64.</summary>
    public Tensor TokenIds { get; }

    /// <summary>[Nt, L] int64, 1 on real tokens.</summary>
    public Tensor AttentionMask { get; }

    /// <summary>[Nt] the index in <see cref="Images"/> of each caption's image.</summary>
    public int[] TextToImage { get; }

    /// <summary>[Ni] the manifest id of each image.</summary>
    public string[] ImageIds { get; }

    /// <summary>[Nt] each caption's text.</summary>
    public string[] Captions { get; }

    /// <summary>[Ni] each image as a small PNG, for showing retrieval results.</summary>
    public byte[][] Thumbnails { get; }

    public IReadOnlyList<BadInput> Bad { get; }

    public int ImageCount => ImageIds.Length;
    public int TextCount => TextToImage.Length;

    private EvalSet(Tensor images, Tensor tokenIds, Tensor attentionMask, int[] textToImage, string[] imageIds, string[] captions, byte[][] thumbnails,
        IReadOnlyList<BadInput> bad)
    {
        Captions = captions;
        Thumbnails = thumbnails;
        Images = images;
        TokenIds = tokenIds;
        AttentionMask = attentionMask;
        TextToImage = textToImage;
        ImageIds = imageIds;
        Bad = bad;
    }

    /// <exception cref="FileNotFoundException">the manifest does not exist</exception>
    /// <exception cref="InvalidDataException">no line of the manifest gives a usable image with a caption</exception>
    public static EvalSet Load(string manifestPath, ImageTransform transform, TextTokenizer tokenizer, int maxTextLength, DecodeLimits? limits = null)
    {
        if (!File.Exists(manifestPath)) throw new FileNotFoundException($"no manifest at {manifestPath}", manifestPath);
        var (samples, bad) = ManifestSource.ReadAll(manifestPath);
        var preparer = new SamplePreparer(transform, tokenizer, maxTextLength, limits);
        var pixels = new List<float[]>();
        var captions = new List<(long[] Ids, long[] AttentionMask)>();
        var textToImage = new List<int>();
        var imageIds = new List<string>();
        var texts = new List<string>();
        var thumbnails = new List<byte[]>();
        foreach (var sample in samples)
        {
            byte[] thumbnail = [];
            if (!preparer.TryPrepareForEvaluation(sample, out var image, out var encoded, out var error, decoded: rgb => thumbnail = Thumbnail(rgb)))
            {
                bad.Add(error!);
                continue;
            }
            textToImage.AddRange(Enumerable.Repeat(pixels.Count, encoded.Count));
            pixels.Add(image);
            captions.AddRange(encoded);
            texts.AddRange(sample.Captions);
            imageIds.Add(sample.Id);
            thumbnails.Add(thumbnail);
        }
        if (pixels.Count == 0)
        {
            var reasons = bad.Count == 0 ? "it has no records" : $"all {bad.Count} records are bad, e.g. {bad[0].Location}: {bad[0].Reason}";
            throw new InvalidDataException($"{manifestPath}: no usable image-text pair ({reasons})");
        }

        var size = transform.Options.ImageSize;
        long ni = pixels.Count, nt = captions.Count;
        var images = tensor(pixels.SelectMany(p => p).ToArray(), [ni, Channels, size, size], ScalarType.Float32);
        var tokenIds = tensor(captions.SelectMany(c => c.Ids).ToArray(), [nt, maxTextLength], ScalarType.Int64);
        var attentionMask = tensor(captions.SelectMany(c => c.AttentionMask).ToArray(), [nt, maxTextLength], ScalarType.Int64);
        // The set outlives any dispose scope it is loaded in.
        return new EvalSet(images.DetachFromDisposeScope(), tokenIds.DetachFromDisposeScope(), attentionMask.DetachFromDisposeScope(),
            textToImage.ToArray(), imageIds.ToArray(), texts.ToArray(), thumbnails.ToArray(), bad);
    }

    /// <summary>The decoded image scaled to fit <see cref="ThumbnailSize"/>, as PNG.</summary>
    private static byte[] Thumbnail(SKBitmap rgb)
    {
        var scale = (float)ThumbnailSize / Math.Max(rgb.Width, rgb.Height);
        var info = new SKImageInfo(Math.Max(1, (int)(rgb.Width * scale)), Math.Max(1, (int)(rgb.Height * scale)));
        using var small = rgb.Resize(info, new SKSamplingOptions(SKFilterMode.Linear, SKMipmapMode.Linear));
        using var image = SKImage.FromBitmap(small);
        using var png = image.Encode(SKEncodedImageFormat.Png, 100);
        return png.ToArray();
    }

    public void Dispose()
    {
        Images.Dispose();
        TokenIds.Dispose();
        AttentionMask.Dispose();
    }
}
