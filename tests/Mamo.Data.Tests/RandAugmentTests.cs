using SkiaSharp;
using Xunit;
using static Mamo.Data.RandAugment;

namespace Mamo.Data.Tests;

public class RandAugmentTests
{
    private const int Size = 32;

    private static byte[] Pixels(Func<int, int, SKColor> colour)
    {
        var rgba = new byte[Size * Size * 4];
        for (var y = 0; y < Size; y++)
            for (var x = 0; x < Size; x++)
            {
                var c = colour(x, y);
                var i = (y * Size + x) * 4;
                (rgba[i], rgba[i + 1], rgba[i + 2], rgba[i + 3]) = (c.Red, c.Green, c.Blue, 255);
            }
        return rgba;
    }

    private static byte[] Recoloured(byte[] rgba, Op op, double level)
    {
        var copy = (byte[])rgba.Clone();
        Recolour(copy, new Draw([(op, level)]), Size);
        return copy;
    }

    private static IEnumerable<byte> Channel(byte[] rgba, int c) => rgba.Where((_, i) => i % 4 == c);

    private static readonly byte[] Gradient = Pixels((x, y) => new SKColor((byte)(60 + 4 * x), (byte)(80 + 3 * y), 120));

    [Fact]
    public void Posterize_at_full_level_keeps_four_bits()
    {
        var posterized = Recoloured(Gradient, Op.Posterize, 1);
        Assert.All(Enumerable.Range(0, 3).SelectMany(c => Channel(posterized, c)), v => Assert.Equal(0, v % 16));
        Assert.Equal(Gradient, Recoloured(Gradient, Op.Posterize, 0));
    }

    [Fact]
    public void Colour_at_the_low_end_is_nearly_grey_and_alpha_is_untouched()
    {
        var faded = Recoloured(Pixels((_, _) => new SKColor(255, 0, 0)), Op.Color, -1);
        // Luma of pure red is 76; a factor of 0.1 keeps a tenth of each channel's distance from it.
        Assert.All(Channel(faded, 0), v => Assert.Equal(94, v));
        Assert.All(Channel(faded, 1), v => Assert.Equal(69, v));
        Assert.All(Channel(faded, 3), v => Assert.Equal(255, v));
    }

    [Fact]
    public void Brightness_scales_towards_black_or_away_from_it()
    {
        var grey = Pixels((_, _) => new SKColor(100, 100, 100));
        Assert.All(Channel(Recoloured(grey, Op.Brightness, -1), 0), v => Assert.Equal(10, v));
        Assert.All(Channel(Recoloured(grey, Op.Brightness, 0.5), 0), v => Assert.Equal(145, v));
    }

    [Fact]
    public void Autocontrast_and_equalize_stretch_each_channel_to_the_full_range()
    {
        foreach (var op in new[] { Op.AutoContrast, Op.Equalize })
        {
            var stretched = Recoloured(Gradient, op, 1);
            foreach (var c in new[] { 0, 1 })
            {
                Assert.Equal(0, Channel(stretched, c).Min());
                Assert.InRange(Channel(stretched, c).Max(), 230, 255);
            }
            Assert.All(Channel(stretched, 2), v => Assert.Equal(120, v));   // a flat channel stays as it is
        }
    }

    [Fact]
    public void Sharpness_low_blurs_an_edge_and_high_exaggerates_it()
    {
        var edge = Pixels((x, _) => x < Size / 2 ? SKColors.Black : SKColors.White);
        var at = (Size / 2 * Size + Size / 2 - 1) * 4;   // the last black pixel before the edge
        Assert.InRange(Recoloured(edge, Op.Sharpness, -1)[at], 40, 80);
        Assert.Equal(0, Recoloured(edge, Op.Sharpness, 1)[at]);
        Assert.Equal(255, Recoloured(edge, Op.Sharpness, 1)[at + 4]);
    }

    [Fact]
    public void Rotation_turns_about_the_centre_and_leaves_white_behind()
    {
        using var bitmap = new SKBitmap(new SKImageInfo(Size, Size, SKColorType.Rgba8888, SKAlphaType.Opaque));
        using (var canvas = new SKCanvas(bitmap))
        {
            canvas.Clear(SKColors.White);
            Transform(canvas, new Draw([(Op.Rotate, 1.5)]), Size);   // 45 degrees
            using var paint = new SKPaint { Color = SKColors.Red };
            canvas.DrawRect(0, 0, Size, Size, paint);
        }
        Assert.Equal(SKColors.Red, bitmap.GetPixel(Size / 2, Size / 2));
        Assert.Equal(SKColors.White, bitmap.GetPixel(0, 0));
        Assert.Equal(SKColors.White, bitmap.GetPixel(Size - 1, Size - 1));
    }

    [Fact]
    public void Sampling_is_seeded_draws_up_to_n_ops_and_respects_the_magnitude()
    {
        var augment = new RandAugment(2, 7);
        var draws = Enumerable.Range(0, 200).Select(seed => augment.Sample(new Random(seed))).ToList();
        Assert.Equal(draws[3].Ops, augment.Sample(new Random(3)).Ops);
        Assert.All(draws, d => Assert.InRange(d.Ops.Count, 0, 2));
        Assert.All(draws.SelectMany(d => d.Ops), o => Assert.Equal(0.7, Math.Abs(o.Level), 1e-9));
        // Each of two ops is applied with probability 1/2 (and 1 in 13 is identity): all counts occur.
        Assert.Equal(new[] { 0, 1, 2 }, draws.Select(d => d.Ops.Count).Distinct().Order());
        Assert.Equal(12, draws.SelectMany(d => d.Ops).Select(o => o.Op).Distinct().Count());
    }

    [Fact]
    public void Train_images_are_augmented_under_the_seed_and_eval_images_never()
    {
        using var rgb = ImageTransformTests.Decode(TestImages.PatternPng(64));
        var plain = new ImageTransform(new ImageTransformOptions(ImageSize: 32));
        var augmented = new ImageTransform(new ImageTransformOptions(ImageSize: 32, AugmentOps: 2, AugmentMagnitude: 9));
        Assert.Equal(plain.Apply(rgb, TransformMode.Eval), augmented.Apply(rgb, TransformMode.Eval));
        Assert.Equal(augmented.Apply(rgb, TransformMode.Train, new Random(5)), augmented.Apply(rgb, TransformMode.Train, new Random(5)));
        var differing = Enumerable.Range(0, 20).Count(seed =>
            !plain.Apply(rgb, TransformMode.Train, new Random(seed)).SequenceEqual(augmented.Apply(rgb, TransformMode.Train, new Random(seed))));
        Assert.InRange(differing, 1, 20);
    }
}
