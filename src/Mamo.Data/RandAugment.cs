using SkiaSharp;

namespace Mamo.Data;

/// <summary>
/// RandAugment (Cubuk et al. 2020) as ALBEF pre-trains with it: draw <c>ops</c> operations, apply each with
/// probability 1/2 at one global magnitude M in [0, 10]. Geometric operations become part of the canvas matrix, so
/// the crop is still resampled once; uncovered pixels stay white, the background of the built-in data. The
/// photometric set is RandAugment's (autocontrast, equalize, brightness, contrast, colour, sharpness, posterize):
/// they vary what separates one emoji art style from another (gradients, palette, outlines), though on the built-in
/// data that did not pay within a 30-minute run (docs/LEARNING.md), so it is off by default.
/// </summary>
public sealed class RandAugment(int ops, int magnitude)
{
    public const int MaxMagnitude = 10;

    public enum Op { Identity, Rotate, ShearX, ShearY, TranslateX, TranslateY, AutoContrast, Equalize, Brightness, Contrast, Color, Sharpness, Posterize }

    private static readonly Op[] All = Enum.GetValues<Op>();

    /// <summary>
    /// The operations drawn for one image, each with its signed level in [-1, 1] (the sign picks the direction:
    /// rotate left or right, brighten or darken).
    /// </summary>
    public sealed record Draw(IReadOnlyList<(Op Op, double Level)> Ops)
    {
        public bool Recolours => Ops.Any(o => !IsGeometric(o.Op));
    }

    private readonly double _level = Math.Clamp(magnitude, 0, MaxMagnitude) / (double)MaxMagnitude;

    public int OpsPerImage { get; } = ops >= 0 ? ops : throw new ArgumentOutOfRangeException(nameof(ops), "must be >= 0");

    private static bool IsGeometric(Op op) => op is >= Op.Rotate and <= Op.TranslateY;

    public Draw Sample(Random random)
    {
        var drawn = new List<(Op, double)>();
        for (var i = 0; i < OpsPerImage; i++)
        {
            var op = All[random.Next(All.Length)];
            var applied = random.NextDouble() < 0.5;
            var level = random.NextDouble() < 0.5 ? -_level : _level;
            if (applied && op != Op.Identity) drawn.Add((op, level));
        }
        return new Draw(drawn);
    }

    /// <summary>Applies the geometric operations about the centre of a size x size canvas (before the image is drawn).</summary>
    public static void Transform(SKCanvas canvas, Draw draw, int size)
    {
        var centre = size / 2f;
        foreach (var (op, level) in draw.Ops)
        {
            var s = (float)level;
            switch (op)
            {
                case Op.Rotate: canvas.RotateDegrees(30f * s, centre, centre); break;
                case Op.ShearX: canvas.Translate(centre, centre); canvas.Skew(0.3f * s, 0); canvas.Translate(-centre, -centre); break;
                case Op.ShearY: canvas.Translate(centre, centre); canvas.Skew(0, 0.3f * s); canvas.Translate(-centre, -centre); break;
                case Op.TranslateX: canvas.Translate(0.15f * s * size, 0); break;
                case Op.TranslateY: canvas.Translate(0, 0.15f * s * size); break;
            }
        }
    }

    /// <summary>Applies the photometric operations in place to opaque RGBA pixels (alpha untouched).</summary>
    public static void Recolour(Span<byte> rgba, Draw draw, int size)
    {
        foreach (var (op, level) in draw.Ops)
        {
            // PIL's enhancement factors: 0 is the degenerate image, 1 the original; M = 10 reaches 0.1 or 1.9.
            var factor = 1 + 0.9 * level;
            switch (op)
            {
                case Op.AutoContrast: AutoContrast(rgba); break;
                case Op.Equalize: Equalize(rgba); break;
                case Op.Brightness: Blend(rgba, _ => 0, factor); break;
                case Op.Contrast:
                    var mean = MeanLuma(rgba);
                    Blend(rgba, _ => mean, factor);
                    break;
                case Op.Color:
                    var grey = Greyscale(rgba);
                    Blend(rgba, i => grey[i / 4], factor);
                    break;
                case Op.Sharpness:
                    var smooth = Smooth(rgba, size);
                    Blend(rgba, i => smooth[i], factor);
                    break;
                case Op.Posterize: Posterize(rgba, 8 - (int)Math.Round(4 * Math.Abs(level))); break;
            }
        }
    }

    private static void Blend(Span<byte> rgba, Func<int, double> degenerate, double factor)
    {
        for (var i = 0; i < rgba.Length; i++)
        {
            if (i % 4 == 3) continue;
            var d = degenerate(i);
            rgba[i] = ClampByte(d + factor * (rgba[i] - d));
        }
    }

    private static byte ClampByte(double v) => (byte)Math.Clamp(Math.Round(v), 0, 255);

    private static double Luma(ReadOnlySpan<byte> rgba, int pixel) =>
        0.299 * rgba[pixel] + 0.587 * rgba[pixel + 1] + 0.114 * rgba[pixel + 2];

    private static double[] Greyscale(ReadOnlySpan<byte> rgba)
    {
        var grey = new double[rgba.Length / 4];
        for (var p = 0; p < grey.Length; p++) grey[p] = Luma(rgba, 4 * p);
        return grey;
    }

    private static double MeanLuma(ReadOnlySpan<byte> rgba) => Greyscale(rgba).Average();

    /// <summary>PIL's SMOOTH kernel (centre 5, neighbours 1, /13); the border keeps its pixels.</summary>
    private static byte[] Smooth(ReadOnlySpan<byte> rgba, int size)
    {
        var smooth = rgba.ToArray();
        for (var y = 1; y < size - 1; y++)
            for (var x = 1; x < size - 1; x++)
                for (var c = 0; c < 3; c++)
                {
                    var sum = 4 * rgba[(y * size + x) * 4 + c];
                    for (var dy = -1; dy <= 1; dy++)
                        for (var dx = -1; dx <= 1; dx++)
                            sum += rgba[((y + dy) * size + x + dx) * 4 + c];
                    smooth[(y * size + x) * 4 + c] = ClampByte(sum / 13.0);
                }
        return smooth;
    }

    private static void AutoContrast(Span<byte> rgba)
    {
        for (var c = 0; c < 3; c++)
        {
            byte lo = 255, hi = 0;
            for (var i = c; i < rgba.Length; i += 4) { lo = Math.Min(lo, rgba[i]); hi = Math.Max(hi, rgba[i]); }
            if (hi <= lo) continue;
            var scale = 255.0 / (hi - lo);
            for (var i = c; i < rgba.Length; i += 4) rgba[i] = ClampByte((rgba[i] - lo) * scale);
        }
    }

    /// <summary>Per-channel histogram equalisation, as PIL's ImageOps.equalize.</summary>
    private static void Equalize(Span<byte> rgba)
    {
        Span<int> histogram = stackalloc int[256];
        Span<byte> lut = stackalloc byte[256];
        for (var c = 0; c < 3; c++)
        {
            histogram.Clear();
            for (var i = c; i < rgba.Length; i += 4) histogram[rgba[i]]++;
            var last = 255;
            while (last > 0 && histogram[last] == 0) last--;
            var step = (rgba.Length / 4 - histogram[last]) / 255;
            if (step == 0) continue;
            var n = step / 2;
            for (var v = 0; v < 256; v++)
            {
                lut[v] = (byte)Math.Min(255, n / step);
                n += histogram[v];
            }
            for (var i = c; i < rgba.Length; i += 4) rgba[i] = lut[rgba[i]];
        }
    }

    private static void Posterize(Span<byte> rgba, int bits)
    {
        var mask = (byte)(0xFF << (8 - bits));
        for (var i = 0; i < rgba.Length; i++)
            if (i % 4 != 3) rgba[i] &= mask;
    }
}
