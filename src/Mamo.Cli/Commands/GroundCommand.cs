using System.CommandLine;
using System.Text.Json;
using Mamo.Actors;
using Mamo.Actors.Run;
using Mamo.Data;
using Mamo.Data.Datasets;
using Mamo.Model;
using SkiaSharp;
using TorchSharp;
using static TorchSharp.torch;

namespace Mamo.Cli.Commands;

/// <summary>`mamo ground --checkpoint C --image PATH --text "…" [--out heat.png] [--layer N] [--json]`: where the model
/// looks for a phrase, as ALBEF's Grad-CAM of ITM (Model/Grounding.cs); and the pointing benchmark behind
/// `mamo eval --task grounding` (docs/GROUNDING.md).</summary>
public static class GroundCommand
{
    public static Command Create()
    {
        var checkpoint = new Option<string>("--checkpoint") { Description = "A checkpoint folder, or a run folder (its newest checkpoint)", Required = true };
        var image = new Option<string>("--image") { Description = "The image (PNG, JPEG, WebP or GIF); a non-square one is centre-cropped", Required = true };
        var text = new Option<string>("--text") { Description = "The phrase to find", Required = true };
        var output = new Option<string?>("--out") { Description = "Write the image with the heatmap over it (PNG)" };
        var layer = LayerOption();
        var json = new Option<bool>("--json") { Description = "Print the heat grid and the peak's pixel as one JSON object" };
        var settingsOptions = new SettingsOptions();
        var command = new Command("ground", "Grad-CAM of the ITM score: where in an image the model finds a phrase")
        {
            checkpoint, image, text, output, layer, json, settingsOptions.Config, settingsOptions.Set,
        };
        command.SetAction(parse =>
        {
            var (stdout, error) = (parse.InvocationConfiguration.Output, parse.InvocationConfiguration.Error);
            try
            {
                var (_, limits) = settingsOptions.LoadInference(parse, "cpu");
                using var grounder = Grounder.Open(parse.GetValue(checkpoint)!, error, limits);
                var l = grounder.Layer(parse.GetValue(layer));
                var (rgb, size) = grounder.Decode(parse.GetValue(image)!);
                using (rgb)
                using (var scope = NewDisposeScope())
                {
                    var grid = grounder.Heat(rgb, size, parse.GetValue(text)!, l);
                    var heat = Grounding.Upsample(grid.unsqueeze(0), size, size)[0];
                    var (x, y) = Grounding.Peak(heat);
                    if (parse.GetValue(output) is { } path) Overlay(rgb, heat, size, path);
                    var rows = Enumerable.Range(0, (int)grid.shape[0]).Select(r => grid[r].data<float>().ToArray()).ToArray();
                    if (parse.GetValue(json))
                        stdout.WriteLine(JsonSerializer.Serialize(new { layer = l, size, grid = rows, peak = new { x, y } }));
                    else
                        stdout.WriteLine($"peak at ({x}, {y}) of the {size}x{size} image, fusion layer {l}" + (parse.GetValue(output) is { } p ? $"; heatmap in {p}" : ""));
                }
                return 0;
            }
            catch (Exception e) when (e is UsageException or SettingsException) { error.WriteLine($"mamo ground: {e.Message}"); return ExitCodes.Usage; }
            catch (Exception e) when (e is InvalidDataException or JsonException or IOException) { error.WriteLine($"mamo ground: {e.Message}"); return ExitCodes.Usage; }
        });
        return command;
    }

    public static Option<int?> LayerOption() => new("--layer") { Description = $"The fusion layer whose attention is read (0 is the first; default: {Grounder.DefaultLayerText})" };

    /// <summary>Pointing-game and box-ranking accuracy on a grounding manifest, with the random- and centre-point
    /// baselines; each a fraction of the canvases.</summary>
    public sealed record Result(double PointingAccuracy, double BoxAccuracy, double RandomPoint, double CentrePoint, int Canvases, int Layer);

    public static Result Benchmark(Grounder grounder, IReadOnlyList<GroundingCanvas> canvases, int layer, Action<int>? progress = null)
    {
        int pointed = 0, ranked = 0, centred = 0;
        double random = 0;
        foreach (var (canvas, i) in canvases.Select((c, i) => (c, i)))
        {
            if (canvas.Width != canvas.Height) throw new InvalidDataException($"{canvas.Id}: grounding canvases must be square, got {canvas.Width}x{canvas.Height}");
            var (rgb, size) = grounder.Decode(canvas.Image);
            using (rgb)
            using (var scope = NewDisposeScope())
            {
                var heat = Grounding.Upsample(grounder.Heat(rgb, size, canvas.Caption, layer).unsqueeze(0), canvas.Height, canvas.Width)[0];
                var boxes = canvas.Boxes.Select(b => new Box(b.X, b.Y, b.W, b.H)).ToList();
                var target = canvas.Boxes.ToList().IndexOf(canvas.Target);
                var (x, y) = Grounding.Peak(heat);
                // A map without a peak (all equal, e.g. all 0) points nowhere: no hit, whatever the first pixel holds.
                if (Grounding.HasPeak(heat) && boxes[target].Contains(x, y)) pointed++;
                if (Grounding.BestBox(heat, boxes) == target) ranked++;
                if (boxes[target].Contains(canvas.Width / 2, canvas.Height / 2)) centred++;
                random += (double)canvas.Target.W * canvas.Target.H / (canvas.Width * canvas.Height);   // a uniform point's chance of a hit
            }
            progress?.Invoke(i + 1);
        }
        double n = canvases.Count;
        return new Result(pointed / n, ranked / n, random / n, centred / n, canvases.Count, layer);
    }

    static readonly SKSamplingOptions Linear = new(SKFilterMode.Linear, SKMipmapMode.None);

    /// <summary>The image with the heat over it: jet-like colours, half transparent.</summary>
    static void Overlay(SKBitmap rgb, Tensor heat, int size, string path)
    {
        var values = heat.contiguous().data<float>().ToArray();
        var max = Math.Max(values.Max(), 1e-12f);
        using var bitmap = new SKBitmap(new SKImageInfo(size, size, SKColorType.Rgba8888, SKAlphaType.Premul));
        using (var canvas = new SKCanvas(bitmap))
        {
            // The centre square, as the model read it.
            var side = Math.Min(rgb.Width, rgb.Height);
            var crop = SKRect.Create((rgb.Width - side) / 2f, (rgb.Height - side) / 2f, side, side);
            using (var image = SKImage.FromBitmap(rgb)) canvas.DrawImage(image, crop, new SKRect(0, 0, size, size), Linear);
            using var overlay = new SKBitmap(new SKImageInfo(size, size, SKColorType.Rgba8888, SKAlphaType.Unpremul));
            for (var y = 0; y < size; y++)
                for (var x = 0; x < size; x++)
                {
                    var v = values[y * size + x] / max;
                    overlay.SetPixel(x, y, new SKColor((byte)(255 * Math.Clamp(1.5 - Math.Abs(4 * v - 3), 0, 1)),
                        (byte)(255 * Math.Clamp(1.5 - Math.Abs(4 * v - 2), 0, 1)), (byte)(255 * Math.Clamp(1.5 - Math.Abs(4 * v - 1), 0, 1)), 128));
                }
            using var heatImage = SKImage.FromBitmap(overlay);
            canvas.DrawImage(heatImage, 0, 0, Linear);
        }
        using var png = bitmap.Encode(SKEncodedImageFormat.Png, 100);
        using var file = File.Create(path);
        png.SaveTo(file);
    }
}

/// <summary>A usage error of the grounding commands: a missing checkpoint or an unusable option.</summary>
public sealed class UsageException(string message) : Exception(message);

/// <summary>A checkpoint's model (its teacher where it keeps one, as `mamo eval` ranks with), ready for Grad-CAM.</summary>
public sealed class Grounder : IDisposable
{
    public const string DefaultLayerText = "the middle of the layers before the last";
    readonly MamoModel model;
    readonly TextTokenizer tokenizer;
    public MamoConfig Config { get; }

    readonly DecodeLimits limits;

    Grounder(MamoModel model, TextTokenizer tokenizer, MamoConfig config, DecodeLimits limits) =>
        (this.model, this.tokenizer, Config, this.limits) = (model, tokenizer, config, limits);

    /// <param name="limits">the decode limits of the images it reads</param>
    public static Grounder Open(string checkpoint, TextWriter log, DecodeLimits limits)
    {
        var dir = Checkpoint.Latest(checkpoint) ?? throw new UsageException($"no checkpoint at {checkpoint}");
        var config = Checkpoint.ReadConfig(dir);
        var tokenizer = new TextTokenizer(BuiltinDatasets.EnsureVocab(log: log.WriteLine));
        return new Grounder(Checkpoint.LoadInference(dir, torch.CPU), tokenizer, config, limits);
    }

    /// <summary>The layer asked for, checked, or the default. The last fusion layer is refused: the ITM head reads the
    /// fused [CLS] alone, so after the last layer no text query's attention reaches the score and its Grad-CAM is 0.</summary>
    public int Layer(int? asked)
    {
        var last = Config.FusionLayers - 2;
        if (last < 0) throw new UsageException("the model has one fusion layer, whose text queries do not reach the ITM score: Grad-CAM needs two or more");
        var layer = asked ?? last / 2;
        if (layer < 0 || layer > last)
            throw new UsageException($"--layer {layer}: Grad-CAM reads fusion layers 0 to {last} (the last, {last + 1}, does not reach the ITM score)");
        return layer;
    }

    /// <summary>The image, decoded, and the side it is read at: its own, to the nearest multiple of the patch size.</summary>
    public (SKBitmap Rgb, int Size) Decode(string path)
    {
        if (!File.Exists(path)) throw new UsageException($"no image at {path}");
        if (!ImageDecoder.TryDecode(File.ReadAllBytes(path), limits, out var rgb, out var error))
            throw new InvalidDataException($"{path}: {error.Reason}");
        var patch = Config.PatchSize;
        var size = Math.Max(patch, (int)Math.Round(Math.Min(rgb.Width, rgb.Height) / (double)patch) * patch);
        return (rgb, size);
    }

    /// <summary>[G, G] the Grad-CAM heat of the text on the image read at size × size.</summary>
    public Tensor Heat(SKBitmap rgb, int size, string text, int layer)
    {
        using var scope = NewDisposeScope();
        var pixels = new ImageTransform(new ImageTransformOptions(ImageSize: size)).Apply(rgb, TransformMode.Eval);
        var (ids, mask) = tokenizer.Encode(text, Config.MaxTextLength);
        var heat = Grounding.GradCam(model, tensor(pixels, [1, 3, size, size]), tensor(ids, [1, ids.Length]), tensor(mask, [1, mask.Length]), layer);
        return heat[0].MoveToOuterDisposeScope();
    }

    public void Dispose() => model.Dispose();
}
