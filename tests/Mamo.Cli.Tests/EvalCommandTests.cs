using System.Text.Json;
using Mamo.Data;
using Mamo.Data.Datasets;
using Mamo.Model;
using SkiaSharp;
using TorchSharp;
using static TorchSharp.torch;
using Xunit;
using Xunit.Abstractions;

namespace Mamo.Cli.Tests;

/// <summary>
/// A run folder with one real checkpoint (the tiny preset after two training steps) and a manifest of PNGs made here,
/// plus the metrics the library computes for it directly, to compare the command against.
/// </summary>
public sealed class EvalRunFixture : IDisposable
{
    public const int K = 4, Steps = 2;
    // Large enough that two steps move the student away from the teacher, so the two give different metrics.
    const double StudentLearningRate = 1e-2;
    static readonly SKColor[] Colours = [SKColors.Red, SKColors.Green, SKColors.Blue, SKColors.Yellow, SKColors.Black, SKColors.Orange];
    static readonly string[][] Captions =
    [
        ["a red square", "red"], ["a green square"], ["a blue square", "blue"], ["a yellow square"], ["a black square"], ["an orange square"],
    ];

    readonly TempFolder temp = new();
    public string RunDir => temp.Path;
    public string Manifest => temp.File("data/manifest.jsonl");
    public string CheckpointDir { get; }
    public int Images => Colours.Length;
    public int Texts => Captions.Sum(c => c.Length);
    public RetrievalMetrics Teacher { get; }
    public RetrievalMetrics Student { get; }

    public EvalRunFixture()
    {
        Directory.CreateDirectory(temp.File("data"));
        var lines = Colours.Select((colour, i) =>
        {
            using var bitmap = new SKBitmap(48, 40);
            bitmap.Erase(colour);
            using (var canvas = new SKCanvas(bitmap)) canvas.DrawCircle(24, 20, 8 + 2 * i, new SKPaint { Color = SKColors.White });
            using (var png = bitmap.Encode(SKEncodedImageFormat.Png, 100)) File.WriteAllBytes(temp.File($"data/{i}.png"), png.ToArray());
            return JsonSerializer.Serialize(new { id = $"img{i}", image = $"{i}.png", captions = Captions[i] });
        });
        File.WriteAllLines(Manifest, lines);

        using var scope = NewDisposeScope();
        var config = MamoConfig.Tiny;
        var tokenizer = new TextTokenizer(BuiltinDatasets.EnsureVocab());
        using var set = EvalSet.Load(Manifest, new ImageTransform(new ImageTransformOptions(ImageSize: config.ImageSize)), tokenizer, config.MaxTextLength);
        using var trainer = new MamoTrainer(config, new OptimizerConfig { LearningRate = StudentLearningRate, WarmupSteps = 1 }, CPU, seed: 1);
        var firstCaption = tensor(Enumerable.Range(0, set.TextCount).Where(t => t == 0 || set.TextToImage[t] != set.TextToImage[t - 1]).Select(t => (long)t).ToArray());
        for (int s = 0; s < Steps; s++)
            trainer.TrainStep(set.Images, set.TokenIds.index_select(0, firstCaption), set.AttentionMask.index_select(0, firstCaption));
        CheckpointDir = Path.Combine(RunDir, Checkpoint.RunFolder, Checkpoint.StepFolderName(Steps));
        trainer.Save(CheckpointDir);
        Teacher = Retrieval.Evaluate(trainer.Teacher, set.Images, set.TokenIds, set.AttentionMask, set.TextToImage, K, batchSize: 64);
        Student = Retrieval.Evaluate(trainer.Student, set.Images, set.TokenIds, set.AttentionMask, set.TextToImage, K, batchSize: 64);
    }

    public void Dispose() => temp.Dispose();
}

public class EvalCommandTests(EvalRunFixture run, ITestOutputHelper log) : IClassFixture<EvalRunFixture>
{
    static readonly string[] MetricKeys = ["tr1", "tr5", "tr10", "ir1", "ir5", "ir10", "r_mean"];

    static Dictionary<string, double> ParseJson(string stdout)
    {
        // Exactly one JSON object on stdout, nothing else.
        using var doc = JsonDocument.Parse(stdout);
        Assert.Single(stdout.Trim().Split('\n'));
        return doc.RootElement.EnumerateObject().ToDictionary(p => p.Name, p => p.Value.GetDouble());
    }

    [Fact]
    public void Json_output_has_every_metric_and_matches_the_library_on_the_teacher()
    {
        var (code, stdout, stderr) = Cli.Run("eval", "--checkpoint", run.RunDir, "--manifest", run.Manifest, "--k", $"{EvalRunFixture.K}", "--json", "--batch-size", "4");
        Assert.True(code == 0, stderr);
        var json = ParseJson(stdout);
        Assert.Superset(MetricKeys.ToHashSet(), json.Keys.ToHashSet());
        Assert.All(MetricKeys, key => Assert.InRange(json[key], 0, 100));
        Assert.Equal((run.Images, run.Texts, EvalRunFixture.Steps), ((int)json["images"], (int)json["texts"], (int)json["step"]));
        Assert.Equal(100.0 / run.Images, json["chance"], 9);
        // Fewer than 10 candidates either way: R@10 is certain.
        Assert.Equal(100, json["tr10"]);
        Assert.Equal(100, json["ir10"]);
        Assert.Equal(MetricKeys.SkipLast(1).Average(key => json[key]), json["r_mean"], 9);
        var t = run.Teacher;
        Assert.Equal([t.Tr1, t.Tr5, t.Tr10, t.Ir1, t.Ir5, t.Ir10, t.RMean], MetricKeys.Select(key => json[key]));
    }

    [Fact]
    public void The_student_weights_can_be_chosen_and_a_checkpoint_folder_given_directly()
    {
        var (code, stdout, stderr) = Cli.Run("eval", "--checkpoint", run.CheckpointDir, "--manifest", run.Manifest, "--k", $"{EvalRunFixture.K}", "--json", "--weights", "student");
        Assert.True(code == 0, stderr);
        var json = ParseJson(stdout);
        Assert.NotEqual(run.Teacher, run.Student);
        var s = run.Student;
        Assert.Equal([s.Tr1, s.Tr5, s.Tr10, s.Ir1, s.Ir5, s.Ir10, s.RMean], MetricKeys.Select(key => json[key]));
    }

    [Fact]
    public void The_table_shows_recalls_sizes_and_chance()
    {
        var (code, stdout, stderr) = Cli.Run("eval", "--checkpoint", run.RunDir, "--manifest", run.Manifest, "--k", "0");
        Assert.True(code == 0, stderr);
        log.WriteLine(stdout);
        foreach (var text in new[] { "TR (image → text)", "IR (text → image)", "R@10", "r_mean", $"{run.Images} images, {run.Texts} captions", $"chance R@1 ≈ {100.0 / run.Images:F2}%", "(step 2, teacher weights)" })
            Assert.Contains(text, stdout);
        Assert.DoesNotContain("\u001b[", stdout);
    }

    [Fact]
    public void Missing_inputs_are_usage_errors_on_stderr()
    {
        using var empty = new TempFolder();
        var (code, stdout, stderr) = Cli.Run("eval", "--checkpoint", empty.Path, "--manifest", run.Manifest, "--json");
        Assert.Equal((2, ""), (code, stdout));
        Assert.Contains("no checkpoint at", stderr);

        (code, stdout, stderr) = Cli.Run("eval", "--checkpoint", run.RunDir, "--manifest", empty.File("none.jsonl"), "--json");
        Assert.Equal((2, ""), (code, stdout));
        Assert.Contains("no manifest at", stderr);

        File.WriteAllText(empty.File("bad.jsonl"), "{\"image\": \"missing.png\", \"caption\": \"gone\"}\n");
        (code, stdout, stderr) = Cli.Run("eval", "--checkpoint", run.RunDir, "--manifest", empty.File("bad.jsonl"), "--json");
        Assert.Equal((2, ""), (code, stdout));
        Assert.Contains("no usable image-text pair", stderr);
    }

    [Fact]
    public void Eval_honours_the_decode_limits_of_the_settings_and_refuses_a_bad_one()
    {
        // 48x40 = 1,920 pixels each: under training's default limit, over this one.
        var (code, stdout, stderr) = Cli.Run("eval", "--checkpoint", run.RunDir, "--manifest", run.Manifest, "--json", "--set", "data.max-image-pixels=1000");
        Assert.Equal((2, ""), (code, stdout));
        Assert.Contains("no usable image-text pair", stderr);
        Assert.Contains("1920 pixels", stderr.Replace(",", ""));

        (code, stdout, stderr) = Cli.Run("eval", "--checkpoint", run.RunDir, "--manifest", run.Manifest, "--json", "--set", "data.max-image-pixel=1000");
        Assert.Equal((2, ""), (code, stdout));
        Assert.Contains("--set data.max-image-pixel=1000: unknown configuration key 'mamo.data.max-image-pixel'", stderr);
    }

    [SkippableFact]
    public void Cuda_without_cuda_is_a_usage_error()
    {
        Skip.If(cuda.is_available(), "CUDA is available here, so --device cuda is valid");
        var (code, stdout, stderr) = Cli.Run("eval", "--checkpoint", run.RunDir, "--manifest", run.Manifest, "--device", "cuda");
        Assert.Equal((2, ""), (code, stdout));
        Assert.Contains("CUDA is not available", stderr);
    }
}
