using System.Text.Json;
using Mamo.Actors.Pipeline;
using Mamo.Data;
using Mamo.Data.Datasets;
using Mamo.Model;
using Mamo.Model.Published;
using Microsoft.ML.OnnxRuntime;
using Microsoft.ML.OnnxRuntime.Tensors;
using Xunit;
using Xunit.Abstractions;
using static TorchSharp.torch;

namespace Mamo.Cli.Tests;

/// <summary>`mamo export --format onnx` (docs/SERVING.md, "ONNX"): ONNX Runtime, given the inputs preprocessing.json
/// describes, gives the embeddings `mamo embed` publishes.</summary>
public class OnnxExportTests(ITestOutputHelper output)
{
    /// <summary>The most an ONNX Runtime embedding may differ from `mamo embed`'s, per value: measured at most 3.6e-7
    /// (the issue asks 1e-4). The graphs compute attention explicitly where TorchSharp runs a fused kernel, so the last
    /// float bits differ.</summary>
    internal const float Parity = 1e-5f;

    [Fact]
    public void Onnx_runtime_gives_the_embeddings_mamo_embed_publishes_for_texts_and_images()
    {
        using var folder = new TempFolder();
        var run = folder.File("run");
        var dir = Path.Combine(run, Checkpoint.RunFolder, Checkpoint.StepFolderName(6));
        using (var trainer = new MamoTrainer(MamoConfig.Tiny, new OptimizerConfig(), CPU, seed: 5))
            Checkpoint.Save(dir, trainer.Config, trainer.Parts(), new Checkpoint.State(6, 0, 6, []));
        var exported = folder.File("onnx");
        var (code, stdout, stderr) = Cli.Run("export", "--format", "onnx", run, exported);
        Assert.True(code == 0, stdout + stderr);
        var embedded = folder.File("embeddings.jsonl");
        (code, stdout, stderr) = Cli.Run("embed", "--checkpoint", dir, "--input", "dataset:emoji/test", "--output", $"jsonl:{embedded}", "--modality", "both");
        Assert.True(code == 0, stdout + stderr);
        var published = File.ReadLines(embedded).Select(l => JsonDocument.Parse(l).RootElement)
            .ToDictionary(e => (e.GetProperty("id").GetString()!, e.GetProperty("modality").GetString()!),
                e => e.GetProperty("vector").EnumerateArray().Select(v => v.GetSingle()).ToArray());

        // The inputs as preprocessing.json says: the evaluation transform and the tokenizer over the exported vocab.
        using var preprocessing = JsonDocument.Parse(File.ReadAllText(Path.Combine(exported, "preprocessing.json")));
        var p = preprocessing.RootElement;
        Assert.Equal("step-6", p.GetProperty("version").GetString());
        int size = p.GetProperty("image").GetProperty("size").GetInt32(), length = p.GetProperty("text").GetProperty("max_length").GetInt32();
        var preparer = SamplePreparer.ForEvaluation(size, length, new TextTokenizer(Path.Combine(exported, p.GetProperty("text").GetProperty("vocab").GetString()!)));
        var samples = ManifestSource.ReadAll(BuiltinDatasets.Ensure(BuiltinDatasets.Emoji).File(BuiltinDatasets.TestSplit)).Samples;
        var items = EmbeddingItem.PrepareAll(samples, preparer, []);

        var (images, texts) = Run(exported, items, size, length);
        var worst = (Image: 0f, Text: 0f);
        for (var i = 0; i < items.Count; i++)
        {
            worst.Image = Math.Max(worst.Image, MaxDifference(images[i], published[(items[i].Id, "image")]));
            worst.Text = Math.Max(worst.Text, MaxDifference(texts[i], published[(items[i].Id, "text")]));
        }
        output.WriteLine($"{items.Count} items: largest difference from mamo embed, image {worst.Image:E2}, text {worst.Text:E2}");
        Assert.Equal(2 * items.Count, published.Count);
        // The import's reader reads what the export wrote (one schema, OnnxSharp's): the checkpoint's weights, named as there.
        var graph = OnnxModel.Load(Path.Combine(exported, OnnxExport.TextFile));
        using (var saved = Checkpoint.LoadInference(dir, CPU))
        using (var words = graph.Tensor("text.wordEmbedding.weight"))
            Assert.True(words.eq(saved.Text.WordEmbeddings).all().item<bool>());
        Assert.Equal([OnnxExport.Embedding], graph.Outputs);
        Assert.True(worst.Image <= Parity && worst.Text <= Parity, $"image {worst.Image}, text {worst.Text}: over {Parity}");
    }

    internal static float MaxDifference(float[] a, float[] b)
    {
        Assert.Equal(a.Length, b.Length);
        return a.Zip(b).Max(p => Math.Abs(p.First - p.Second));
    }

    /// <summary>Each item's image and text embedded by ONNX Runtime, in batches of 16.</summary>
    internal static (float[][] Images, float[][] Texts) Run(string exported, IReadOnlyList<EmbeddingItem> items, int size, int length)
    {
        using var image = new InferenceSession(Path.Combine(exported, OnnxExport.ImageFile));
        using var text = new InferenceSession(Path.Combine(exported, OnnxExport.TextFile));
        var (images, texts) = (new List<float[]>(), new List<float[]>());
        foreach (var batch in items.Chunk(16))
        {
            var pixels = new DenseTensor<float>(batch.SelectMany(i => i.Pixels).ToArray(), [batch.Length, 3, size, size]);
            using (var result = image.Run([NamedOnnxValue.CreateFromTensor(OnnxExport.Pixels, pixels)]))
                images.AddRange(Rows(result.Single().AsTensor<float>()));
            var ids = new DenseTensor<long>(batch.SelectMany(i => i.TokenIds).ToArray(), [batch.Length, length]);
            var mask = new DenseTensor<long>(batch.SelectMany(i => i.AttentionMask).ToArray(), [batch.Length, length]);
            using (var result = text.Run([NamedOnnxValue.CreateFromTensor(OnnxExport.InputIds, ids), NamedOnnxValue.CreateFromTensor(OnnxExport.AttentionMask, mask)]))
                texts.AddRange(Rows(result.Single().AsTensor<float>()));
        }
        return (images.ToArray(), texts.ToArray());
    }

    static IEnumerable<float[]> Rows(Tensor<float> t)
    {
        var dim = t.Dimensions[1];
        var flat = t.ToArray();
        for (var r = 0; r < t.Dimensions[0]; r++) yield return flat[(r * dim)..((r + 1) * dim)];
    }
}
