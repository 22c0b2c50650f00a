using SkiaSharp;

namespace Mamo.Data;

public enum TransformMode
{
    /// <summary>Resize, then a random resized crop.</summary>
    Train,

    /// <summary>Resize the shorter side, then a centre crop: deterministic.</summary>
    Eval,
}

/// <summary>
/// Image preprocessing settings. Mean and std default to CLIP's (also ALBEF's). Horizontal flip is off by default
/// because captions say "left" and "right". <see cref="AugmentOps"/> &gt; 0 adds <see cref="RandAugment"/> in Train.
/// </summary>
public sealed record ImageTransformOptions(
    int ImageSize = 64,
    double MinCropScale = 0.5,
    double MaxCropScale = 1.0,
    double MinCropRatio = 3.0 / 4.0,
    double MaxCropRatio = 4.0 / 3.0,
    int CropAttempts = 10,
    bool HorizontalFlip = false,
    int AugmentOps = 0,
    int AugmentMagnitude = 7,
    IReadOnlyList<float>? Mean = null,
    IReadOnlyList<float>? Std = null)
{
    public static readonly IReadOnlyList<float> ClipMean = [0.48145466f, 0.4578275f, 0.40821073f];
    public static readonly IReadOnlyList<float> ClipStd = [0.26862954f, 0.26130258f, 0.27577711f];

    public IReadOnlyList<float> ChannelMean => Mean ?? ClipMean;
    public IReadOnlyList<float> ChannelStd => Std ?? ClipStd;
}

/// <summary>
/// Turns a decoded RGB bitmap into normalised float32 pixels, channel-first [3, S, S], as a plain array so the
/// parallel decode stage never touches tensors (the <see cref="Collator"/> builds them).
/// "Resize then crop" is done as one resampling of the crop's rectangle in source coordinates.
/// </summary>
public sealed class ImageTransform(ImageTransformOptions options)
{
    private const int Channels = 3;
    private const int BytesPerPixel = 4;
    private const float MaxByte = 255f;
    // Mipmaps only pay off when shrinking by more than 2x (large photos); emoji-sized crops are upsampled.
    private const float MipmapBelowScale = 0.5f;
    private static readonly SKSamplingOptions Bilinear = new(SKFilterMode.Linear, SKMipmapMode.None);
    private static readonly SKSamplingOptions BilinearMipmapped = new(SKFilterMode.Linear, SKMipmapMode.Linear);

    public ImageTransformOptions Options { get; } = options;
    private readonly RandAugment? _augment = options.AugmentOps > 0 ? new RandAugment(options.AugmentOps, options.AugmentMagnitude) : null;

    /// <param name="random">Draws the crop, flip and augmentation in <see cref="TransformMode.Train"/>; unused in Eval.</param>
    public float[] Apply(SKBitmap rgb, TransformMode mode, Random? random = null)
    {
        var size = Options.ImageSize;
        var crop = mode == TransformMode.Train
            ? RandomResizedCrop(rgb.Width, rgb.Height, random ?? throw new ArgumentNullException(nameof(random)))
            : CentreCrop(rgb.Width, rgb.Height);
        var flip = mode == TransformMode.Train && Options.HorizontalFlip && random!.NextDouble() < 0.5;
        var augment = mode == TransformMode.Train ? _augment?.Sample(random!) : null;

        using var output = new SKBitmap(new SKImageInfo(size, size, SKColorType.Rgba8888, SKAlphaType.Opaque));
        using (var canvas = new SKCanvas(output))
        using (var image = SKImage.FromBitmap(rgb))
        {
            canvas.Clear(SKColors.White);
            if (flip) canvas.Scale(-1, 1, size / 2f, 0);
            if (augment != null) RandAugment.Transform(canvas, augment, size);
            var sampling = size / Math.Min(crop.Width, crop.Height) < MipmapBelowScale ? BilinearMipmapped : Bilinear;
            canvas.DrawImage(image, crop, new SKRect(0, 0, size, size), sampling);
        }
        if (augment is not { Recolours: true }) return Normalise(output.GetPixelSpan(), size);
        var pixels = output.GetPixelSpan().ToArray();
        RandAugment.Recolour(pixels, augment, size);
        return Normalise(pixels, size);
    }

    private float[] Normalise(ReadOnlySpan<byte> rgba, int size)
    {
        var plane = size * size;
        var pixels = new float[Channels * plane];
        Span<float> scale = stackalloc float[Channels];
        Span<float> shift = stackalloc float[Channels];
        for (var c = 0; c < Channels; c++)
        {
            // (v / 255 - mean) / std as one multiply-add.
            scale[c] = 1f / (MaxByte * Options.ChannelStd[c]);
            shift[c] = -Options.ChannelMean[c] / Options.ChannelStd[c];
        }
        for (var i = 0; i < plane; i++)
            for (var c = 0; c < Channels; c++)
                pixels[c * plane + i] = rgba[i * BytesPerPixel + c] * scale[c] + shift[c];
        return pixels;
    }

    private static SKRect CentreCrop(int width, int height)
    {
        var side = Math.Min(width, height);
        var left = (width - side) / 2f;
        var top = (height - side) / 2f;
        return new SKRect(left, top, left + side, top + side);
    }

    /// <summary>torchvision's RandomResizedCrop on the image resized so its shorter side is the output size.</summary>
    private SKRect RandomResizedCrop(int width, int height, Random random)
    {
        var resize = (double)Options.ImageSize / Math.Min(width, height);
        var (resizedWidth, resizedHeight) = (width * resize, height * resize);
        var area = resizedWidth * resizedHeight;
        var (logMin, logMax) = (Math.Log(Options.MinCropRatio), Math.Log(Options.MaxCropRatio));
        for (var attempt = 0; attempt < Options.CropAttempts; attempt++)
        {
            var targetArea = area * (Options.MinCropScale + random.NextDouble() * (Options.MaxCropScale - Options.MinCropScale));
            var ratio = Math.Exp(logMin + random.NextDouble() * (logMax - logMin));
            var w = Math.Sqrt(targetArea * ratio);
            var h = Math.Sqrt(targetArea / ratio);
            if (w > resizedWidth || h > resizedHeight) continue;
            var x = random.NextDouble() * (resizedWidth - w);
            var y = random.NextDouble() * (resizedHeight - h);
            return new SKRect((float)(x / resize), (float)(y / resize), (float)((x + w) / resize), (float)((y + h) / resize));
        }
        return CentreCrop(width, height);
    }
}
