using System.Text.Json;
using Mamo.Data;
using Mamo.Data.Datasets;
using Mamo.Model;
using SkiaSharp;
using static TorchSharp.torch;
using Xunit;

namespace Mamo.Cli.Tests;

/// <summary>`mamo ground` and `mamo eval --task grounding` on the two-step checkpoint of <see cref="EvalRunFixture"/>,
/// against Grad-CAM computed here from the same checkpoint's teacher.</summary>
public class GroundCommandTests(EvalRunFixture run) : IClassFixture<EvalRunFixture>
{
    const int Size = 96;   // not the tiny preset's 64: the position embeddings are resized
    static readonly GroundingBox[][] Boxes =
    [
        [new(4, 4, 40, 40, true), new(52, 50, 40, 40, false)],
        [new(30, 30, 36, 36, false), new(0, 60, 30, 30, true), new(70, 0, 26, 26, false)],
        [new(20, 20, 56, 56, true), new(0, 0, 16, 16, false)],
    ];

    string Canvases()
    {
        var folder = Path.Combine(run.RunDir, "grounding");
        Directory.CreateDirectory(folder);
        var lines = Boxes.Select((boxes, i) =>
        {
            using var bitmap = new SKBitmap(Size, Size);
            bitmap.Erase(SKColors.White);
            using (var canvas = new SKCanvas(bitmap))
                foreach (var (b, j) in boxes.Select((b, j) => (b, j)))
                    canvas.DrawRect(b.X, b.Y, b.W, b.H, new SKPaint { Color = j == 0 ? SKColors.Red : SKColors.Blue });
            var path = Path.Combine(folder, $"{i}.png");
            using (var png = bitmap.Encode(SKEncodedImageFormat.Png, 100)) File.WriteAllBytes(path, png.ToArray());
            return GroundingSet.Line(new GroundingCanvas($"c{i}", path, "a red square", boxes, Size, Size), folder);
        });
        var manifest = Path.Combine(folder, "canvases.jsonl");
        File.WriteAllLines(manifest, lines);
        return manifest;
    }

    /// <summary>[G, G] the heat computed here: the checkpoint's teacher, the image read at its own size.</summary>
    static Tensor Heat(string checkpoint, string image, string text, int layer)
    {
        var config = Checkpoint.ReadConfig(checkpoint);
        var model = new MamoModel(config);
        Checkpoint.LoadModel(checkpoint, Checkpoint.TeacherFile, model);
        using var bytes = SKBitmap.Decode(image);
        var pixels = new ImageTransform(new ImageTransformOptions(ImageSize: Size)).Apply(bytes, TransformMode.Eval);
        var (ids, mask) = new TextTokenizer(BuiltinDatasets.EnsureVocab()).Encode(text, config.MaxTextLength);
        return Grounding.GradCam(model, tensor(pixels, [1, 3, Size, Size]), tensor(ids, [1, ids.Length]), tensor(mask, [1, mask.Length]), layer)[0];
    }

    [Fact]
    public void Ground_prints_the_grad_cam_grid_and_peak_of_the_checkpoint_and_draws_the_heatmap()
    {
        using var scope = NewDisposeScope();
        var manifest = Canvases();
        var image = Path.Combine(Path.GetDirectoryName(manifest)!, "1.png");
        var png = Path.Combine(run.RunDir, "heat.png");
        var (code, stdout, stderr) = Cli.Run("ground", "--checkpoint", run.RunDir, "--image", image, "--text", "a red square", "--json", "--out", png);
        Assert.True(code == 0, stderr);
        var json = JsonDocument.Parse(stdout).RootElement;
        var grid = json.GetProperty("grid").EnumerateArray().Select(r => r.EnumerateArray().Select(v => v.GetSingle()).ToArray()).ToArray();
        var expected = Heat(run.CheckpointDir, image, "a red square", layer: 0);
        Assert.Equal(Size / MamoConfig.Tiny.PatchSize, grid.Length);
        Assert.True(expected.allclose(tensor(grid.SelectMany(r => r).ToArray(), expected.shape), rtol: 1e-4, atol: 1e-9));
        var (x, y) = Grounding.Peak(Grounding.Upsample(expected.unsqueeze(0), Size, Size)[0]);
        Assert.Equal((x, y), (json.GetProperty("peak").GetProperty("x").GetInt32(), json.GetProperty("peak").GetProperty("y").GetInt32()));
        using var drawn = SKBitmap.Decode(png);
        Assert.Equal((Size, Size), (drawn.Width, drawn.Height));
    }

    [Fact]
    public void Eval_grounding_scores_every_canvas_with_the_baselines_from_its_boxes()
    {
        using var scope = NewDisposeScope();
        var manifest = Canvases();
        var (code, stdout, stderr) = Cli.Run("eval", "--task", "grounding", "--checkpoint", run.RunDir, "--manifest", manifest, "--json");
        Assert.True(code == 0, stderr);
        var json = JsonDocument.Parse(stdout).RootElement;
        Assert.Equal((3, 0), (json.GetProperty("canvases").GetInt32(), json.GetProperty("layer").GetInt32()));
        // Each target's share of the canvas, and whether it holds the centre (48, 48): only the third does.
        Assert.Equal((40.0 * 40 + 30 * 30 + 56 * 56) / (3.0 * Size * Size), json.GetProperty("random_point").GetDouble(), 12);
        Assert.Equal(1 / 3.0, json.GetProperty("centre_point").GetDouble(), 12);
        var canvases = GroundingSet.Read(manifest);
        var (pointed, ranked) = (0, 0);
        foreach (var c in canvases)
        {
            var heat = Grounding.Upsample(Heat(run.CheckpointDir, c.Image, c.Caption, 0).unsqueeze(0), Size, Size)[0];
            var boxes = c.Boxes.Select(b => new Box(b.X, b.Y, b.W, b.H)).ToList();
            var target = c.Boxes.ToList().IndexOf(c.Target);
            var (x, y) = Grounding.Peak(heat);
            if (Grounding.HasPeak(heat) && boxes[target].Contains(x, y)) pointed++;
            if (Grounding.BestBox(heat, boxes) == target) ranked++;
        }
        Assert.Equal(pointed / 3.0, json.GetProperty("pointing_accuracy").GetDouble(), 12);
        Assert.Equal(ranked / 3.0, json.GetProperty("box_accuracy").GetDouble(), 12);
    }

    [Fact]
    public void A_bad_layer_or_a_bad_box_is_a_usage_error_that_says_why()
    {
        var manifest = Canvases();
        var (code, _, stderr) = Cli.Run("eval", "--task", "grounding", "--checkpoint", run.RunDir, "--manifest", manifest, "--layer", "1");
        Assert.Equal((2, true), (code, stderr.Contains("does not reach the ITM score")));
        File.AppendAllText(manifest, """{"image": "0.png", "caption": "x", "boxes": [{"x": 90, "y": 0, "w": 20, "h": 5, "target": true}]}""" + "\n");
        (code, _, stderr) = Cli.Run("eval", "--task", "grounding", "--checkpoint", run.RunDir, "--manifest", manifest);
        Assert.Equal((2, true), (code, stderr.Contains("canvases.jsonl:4") && stderr.Contains("leaves the 96x96 image")));
    }
}
