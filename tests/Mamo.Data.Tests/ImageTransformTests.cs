using SkiaSharp;
using Xunit;

namespace Mamo.Data.Tests;

public class ImageTransformTests
{
    private const int Size = 32;

    [Theory]
    [InlineData(TransformMode.Train)]
    [InlineData(TransformMode.Eval)]
    public void Output_is_channel_first_at_the_configured_size(TransformMode mode)
    {
        using var rgb = Decode(TestImages.PatternPng(50));
        var pixels = new ImageTransform(new ImageTransformOptions(ImageSize: Size)).Apply(rgb, mode, new Random(1));
        Assert.Equal(3 * Size * Size, pixels.Length);
        Assert.All(pixels, v => Assert.True(float.IsFinite(v)));
    }

    [Fact]
    public void Solid_colour_normalises_to_the_expected_value_per_channel()
    {
        using var rgb = Decode(TestImages.SolidPng(40, 30, new SKColor(255, 0, 128)));
        var options = new ImageTransformOptions(ImageSize: Size);
        var pixels = new ImageTransform(options).Apply(rgb, TransformMode.Eval);

        float[] channelValue = [1f, 0f, 128 / 255f];
        for (var c = 0; c < 3; c++)
        {
            var expected = (channelValue[c] - options.ChannelMean[c]) / options.ChannelStd[c];
            var plane = pixels.AsSpan(c * Size * Size, Size * Size).ToArray();
            Assert.All(plane, v => Assert.Equal(expected, v, 1e-4f));
        }
    }

    [Fact]
    public void Custom_mean_and_std_map_white_and_black_to_plus_and_minus_one()
    {
        var options = new ImageTransformOptions(ImageSize: 8, Mean: [0.5f, 0.5f, 0.5f], Std: [0.5f, 0.5f, 0.5f]);
        using var white = Decode(TestImages.SolidPng(8, 8, SKColors.White));
        using var black = Decode(TestImages.SolidPng(8, 8, SKColors.Black));
        Assert.All(new ImageTransform(options).Apply(white, TransformMode.Eval), v => Assert.Equal(1f, v, 1e-5f));
        Assert.All(new ImageTransform(options).Apply(black, TransformMode.Eval), v => Assert.Equal(-1f, v, 1e-5f));
    }

    [Fact]
    public void Eval_is_deterministic_and_takes_the_centre_square()
    {
        // A wide image: red left third, green centre square, blue right third. Eval keeps only the green.
        using var wide = new SKBitmap(new SKImageInfo(90, 30, SKColorType.Rgba8888, SKAlphaType.Opaque));
        using (var canvas = new SKCanvas(wide))
        {
            using var paint = new SKPaint();
            paint.Color = SKColors.Red; canvas.DrawRect(0, 0, 30, 30, paint);
            paint.Color = SKColors.Lime; canvas.DrawRect(30, 0, 30, 30, paint);
            paint.Color = SKColors.Blue; canvas.DrawRect(60, 0, 30, 30, paint);
        }
        var options = new ImageTransformOptions(ImageSize: 16, Mean: [0f, 0f, 0f], Std: [1f, 1f, 1f]);
        var transform = new ImageTransform(options);
        var first = transform.Apply(wide, TransformMode.Eval);
        Assert.Equal(first, transform.Apply(wide, TransformMode.Eval));

        var plane = 16 * 16;
        var centre = 8 * 16 + 8;
        Assert.Equal(0f, first[centre], 1e-3f);           // red
        Assert.Equal(1f, first[plane + centre], 1e-3f);   // green
        Assert.Equal(0f, first[2 * plane + centre], 1e-3f);   // blue
        Assert.InRange(first.AsSpan(plane, plane).ToArray().Min(), 0.9f, 1f);   // no red or blue border leaked in
    }

    [Fact]
    public void Train_crops_repeat_under_a_seed_and_vary_across_seeds()
    {
        using var rgb = Decode(TestImages.PatternPng(64));
        var transform = new ImageTransform(new ImageTransformOptions(ImageSize: Size));
        var a = transform.Apply(rgb, TransformMode.Train, new Random(7));
        var b = transform.Apply(rgb, TransformMode.Train, new Random(7));
        var c = transform.Apply(rgb, TransformMode.Train, new Random(8));
        Assert.Equal(a, b);
        Assert.NotEqual(a, c);
    }

    [Fact]
    public void Flip_is_off_by_default_and_mirrors_when_enabled()
    {
        // Left half black, right half white; full-image crops so only the flip can move them.
        using var halves = new SKBitmap(new SKImageInfo(16, 16, SKColorType.Rgba8888, SKAlphaType.Opaque));
        using (var canvas = new SKCanvas(halves))
        {
            canvas.Clear(SKColors.White);
            using var paint = new SKPaint { Color = SKColors.Black };
            canvas.DrawRect(0, 0, 8, 16, paint);
        }
        var fullCrop = new ImageTransformOptions(ImageSize: 16, MinCropScale: 1, MinCropRatio: 1, MaxCropRatio: 1, Mean: [0f, 0f, 0f], Std: [1f, 1f, 1f]);
        var leftIsBlack = Enumerable.Range(0, 20)
            .Select(seed => new ImageTransform(fullCrop).Apply(halves, TransformMode.Train, new Random(seed))[8 * 16 + 1] < 0.5f);
        Assert.All(leftIsBlack, Assert.True);

        var flipping = new ImageTransform(fullCrop with { HorizontalFlip = true });
        var flipped = Enumerable.Range(0, 20).Count(seed => flipping.Apply(halves, TransformMode.Train, new Random(seed))[8 * 16 + 1] > 0.5f);
        Assert.InRange(flipped, 1, 19);
    }

    internal static SKBitmap Decode(byte[] bytes)
    {
        Assert.True(ImageDecoder.TryDecode(bytes, DecodeLimits.Default, out var rgb, out var error), error?.Reason);
        return rgb;
    }
}
