using CsCheck;
using SkiaSharp;
using Xunit;

namespace Mamo.Data.Tests;

public class ImageDecoderTests
{
    private static readonly TimeSpan FuzzDeadline = TimeSpan.FromSeconds(60);

    [Fact]
    public void Huge_png_header_is_rejected_by_pixel_count_before_decoding()
    {
        var header = TestImages.PngHeader(20_000, 20_000);
        var allocatedBefore = GC.GetAllocatedBytesForCurrentThread();

        var ok = ImageDecoder.TryDecode(header, DecodeLimits.Default, out var rgb, out var error);

        var allocated = GC.GetAllocatedBytesForCurrentThread() - allocatedBefore;
        Assert.False(ok);
        Assert.Null(rgb);
        Assert.Equal(DecodeErrorKind.TooManyPixels, error!.Kind);
        Assert.Contains("20000x20000", error.Reason);
        Assert.Contains($"{DecodeLimits.Default.MaxPixels}-pixel limit", error.Reason);
        Assert.True(allocated < 1 << 20, $"allocated {allocated} bytes for a rejected header");
    }

    [Fact]
    public void Image_over_the_byte_limit_is_rejected_before_parsing()
    {
        var png = TestImages.SolidPng(8, 8, SKColors.Red);
        var ok = ImageDecoder.TryDecode(png, new DecodeLimits(MaxBytes: png.Length - 1), out _, out var error);
        Assert.False(ok);
        Assert.Equal(DecodeErrorKind.TooManyBytes, error!.Kind);
    }

    [Fact]
    public void Empty_and_unknown_bytes_are_typed_errors()
    {
        Assert.False(ImageDecoder.TryDecode([], DecodeLimits.Default, out _, out var empty));
        Assert.Equal(DecodeErrorKind.Empty, empty!.Kind);
        Assert.False(ImageDecoder.TryDecode("hello, not an image"u8.ToArray(), DecodeLimits.Default, out _, out var text));
        Assert.Equal(DecodeErrorKind.UnrecognisedFormat, text!.Kind);
    }

    [Fact]
    public void Transparent_pixels_composite_onto_white_and_colours_keep_their_channel_order()
    {
        var transparent = TestImages.SolidPng(4, 4, new SKColor(0, 0, 0, 0));
        var halfRed = TestImages.SolidPng(4, 4, new SKColor(255, 0, 0, 128));
        var blue = TestImages.SolidPng(4, 4, new SKColor(0, 0, 255));

        Assert.Equal((255, 255, 255), Pixel(transparent));
        var (r, g, b) = Pixel(halfRed);
        Assert.Equal(255, r);
        Assert.InRange(g, 125, 129);
        Assert.InRange(b, 125, 129);
        Assert.Equal((0, 0, 255), Pixel(blue));
    }

    [Theory]
    [InlineData(SKEncodedImageFormat.Jpeg)]
    [InlineData(SKEncodedImageFormat.Webp)]
    [InlineData(SKEncodedImageFormat.Png)]
    public void Encoded_formats_decode_to_their_colour(SKEncodedImageFormat format)
    {
        using var bitmap = TestImages.Solid(16, 8, new SKColor(20, 200, 60));
        var bytes = TestImages.Encode(bitmap, format, quality: 95);
        Assert.True(ImageDecoder.TryDecode(bytes, DecodeLimits.Default, out var rgb, out var error), error?.Reason);
        using (rgb)
        {
            Assert.Equal((16, 8), (rgb.Width, rgb.Height));
            var c = rgb.GetPixel(8, 4);
            Assert.InRange(c.Red, 10, 30);
            Assert.InRange(c.Green, 190, 210);
            Assert.InRange(c.Blue, 50, 70);
        }
    }

    [Fact]
    public void Gif_first_frame_decodes()
    {
        Assert.Equal((255, 0, 0), Pixel(TestImages.RedPixelGif));
    }

    [Fact]
    public void Random_bytes_give_only_typed_errors()
    {
        // Most inputs start with a real signature, so the format parsers (not only sniffing) see garbage; some are a
        // whole image with junk after it, which decodes.
        var signatures = new[]
        {
            new byte[] { 0x89, (byte)'P', (byte)'N', (byte)'G', 0x0D, 0x0A, 0x1A, 0x0A },
            [0xFF, 0xD8, 0xFF], "GIF89a"u8.ToArray(), "RIFF\0\0\0\0WEBPVP8 "u8.ToArray(), TestImages.PatternPng(24),
        };
        var gen = Gen.Select(Gen.Int[-1, signatures.Length - 1], Gen.Byte.Array[0, 2048],
            (s, tail) => s < 0 ? tail : [.. signatures[s], .. tail]);
        var outcomes = new Outcomes();
        RunWithDeadline(() => gen.Sample(outcomes.DecodesOrFailsTyped, iter: 10_000));
        outcomes.AssertBoth();
    }

    [Fact]
    public void Mutated_real_pngs_give_only_typed_errors()
    {
        var png = TestImages.PatternPng(24);
        var mutation = Gen.Select(Gen.Int[0, png.Length - 1], Gen.Byte).Array[1, 8];
        // About one input in six is whole, so that flips the decoder tolerates are read back.
        var gen = Gen.Select(mutation, Gen.Int[1, png.Length * 6 / 5], (flips, keep) =>
        {
            var bytes = png[..Math.Min(keep, png.Length)];
            foreach (var (at, value) in flips)
                if (at < bytes.Length) bytes[at] = value;
            return bytes;
        });
        var outcomes = new Outcomes();
        RunWithDeadline(() => gen.Sample(outcomes.DecodesOrFailsTyped, iter: 10_000));
        outcomes.AssertBoth();
    }

    /// <summary>Counts what a fuzz run gave (CsCheck samples in parallel): a test that passes only because every input
    /// was refused, or every one decoded, tests less than it says.</summary>
    private sealed class Outcomes
    {
        int decoded, refused;

        public void DecodesOrFailsTyped(byte[] bytes)
        {
            var limits = new DecodeLimits(MaxPixels: 1 << 20);
            if (ImageDecoder.TryDecode(bytes, limits, out var rgb, out var error))
            {
                using (rgb) Assert.True(rgb.Width > 0 && (long)rgb.Width * rgb.Height <= limits.MaxPixels);
                Interlocked.Increment(ref decoded);
            }
            else
            {
                Assert.False(string.IsNullOrWhiteSpace(error.Reason));
                Interlocked.Increment(ref refused);
            }
        }

        public void AssertBoth() => Assert.True(decoded > 0 && refused > 0, $"{decoded} decoded, {refused} refused");
    }

    /// <summary>A decoder that hangs fails the test instead of stalling the run.</summary>
    private static void RunWithDeadline(Action fuzz)
    {
        var task = Task.Run(fuzz);
        Assert.True(task.Wait(FuzzDeadline), $"fuzzing did not finish within {FuzzDeadline}");
    }

    private static (int R, int G, int B) Pixel(byte[] bytes)
    {
        Assert.True(ImageDecoder.TryDecode(bytes, DecodeLimits.Default, out var rgb, out var error), error?.Reason);
        using (rgb)
        {
            var c = rgb.GetPixel(0, 0);
            return (c.Red, c.Green, c.Blue);
        }
    }
}
