using System.Diagnostics.CodeAnalysis;
using SkiaSharp;

namespace Mamo.Data;

/// <summary>Limits checked from the bytes and the header, before any pixel memory is allocated.</summary>
public sealed record DecodeLimits(long MaxBytes = 32L * 1024 * 1024, long MaxPixels = 40_000_000)
{
    public static readonly DecodeLimits Default = new();
}

public enum DecodeErrorKind
{
    Empty,
    TooManyBytes,
    UnrecognisedFormat,
    InvalidDimensions,
    TooManyPixels,
    Undecodable,
}

/// <summary>Why an image could not be decoded; <see cref="Reason"/> is for people, <see cref="Kind"/> for counters.</summary>
public sealed record DecodeError(DecodeErrorKind Kind, string Reason);

/// <summary>
/// Decodes PNG, JPEG, WebP and the first frame of a GIF with SkiaSharp into an opaque RGBA bitmap, transparent
/// pixels composited onto white. Bad input comes back as a <see cref="DecodeError"/>, never as an exception.
/// </summary>
public static class ImageDecoder
{
    public static bool TryDecode(
        byte[] bytes,
        DecodeLimits limits,
        [NotNullWhen(true)] out SKBitmap? rgb,
        [NotNullWhen(false)] out DecodeError? error)
    {
        rgb = null;
        if (bytes.Length == 0)
        {
            error = new DecodeError(DecodeErrorKind.Empty, "image has no bytes");
            return false;
        }
        if (bytes.Length > limits.MaxBytes)
        {
            error = new DecodeError(DecodeErrorKind.TooManyBytes,
                $"image of {bytes.Length} bytes exceeds the {limits.MaxBytes}-byte limit");
            return false;
        }

        using var data = SKData.CreateCopy(bytes);
        using var codec = SKCodec.Create(data);
        if (codec is null)
        {
            error = new DecodeError(DecodeErrorKind.UnrecognisedFormat, "not a PNG, JPEG, WebP or GIF image");
            return false;
        }
        var (width, height) = (codec.Info.Width, codec.Info.Height);
        if (width <= 0 || height <= 0)
        {
            error = new DecodeError(DecodeErrorKind.InvalidDimensions, $"invalid image size {width}x{height}");
            return false;
        }
        if ((long)width * height > limits.MaxPixels)
        {
            error = new DecodeError(DecodeErrorKind.TooManyPixels,
                $"image of {width}x{height} = {(long)width * height} pixels exceeds the {limits.MaxPixels}-pixel limit");
            return false;
        }

        // Premultiplied, so that drawing onto white below is plain source-over compositing.
        var decodeInfo = new SKImageInfo(width, height, SKColorType.Rgba8888, SKAlphaType.Premul);
        using var decoded = new SKBitmap(decodeInfo);
        var result = codec.GetPixels(decodeInfo, decoded.GetPixels());
        if (result != SKCodecResult.Success)
        {
            error = new DecodeError(DecodeErrorKind.Undecodable, $"image data could not be decoded ({result})");
            return false;
        }

        rgb = new SKBitmap(new SKImageInfo(width, height, SKColorType.Rgba8888, SKAlphaType.Opaque));
        using (var canvas = new SKCanvas(rgb))
        using (var image = SKImage.FromBitmap(decoded))
        {
            canvas.Clear(SKColors.White);
            canvas.DrawImage(image, 0, 0, SKSamplingOptions.Default);
        }
        error = null;
        return true;
    }
}
