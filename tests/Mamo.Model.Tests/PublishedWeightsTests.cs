using System.Text;
using CsCheck;
using TorchSharp;
using Mamo.Model.Published;
using Xunit;
using static TorchSharp.torch;
using F = TorchSharp.torch.nn.functional;

namespace Mamo.Model.Tests;

/// <summary>
/// Published weights in their own layouts. The timm file is written here from timm's VisionTransformer
/// (timm/models/vision_transformer.py: PatchEmbed's proj conv, cls_token, pos_embed with the class token's first,
/// blocks of norm1, attn.qkv ([q; k; v], heads contiguous), attn.proj, norm2, mlp.fc1, mlp.fc2, all LayerNorms eps
/// 1e-6, then norm and head), and its forward pass is written out from the same source.
/// </summary>
public sealed class PublishedWeightsTests : IDisposable
{
    readonly string dir = Directory.CreateTempSubdirectory("mamo-published-").FullName;

    public void Dispose() => Directory.Delete(dir, recursive: true);

    static readonly MamoConfig Vit = MamoConfig.Tiny with { ImageLayers = 2 };

    /// <summary>A timm ViT's state dict for <paramref name="c"/>'s shapes with a <paramref name="grid"/>² position grid.</summary>
    static Dictionary<string, Tensor> TimmStateDict(MamoConfig c, int grid, int classes = 10)
    {
        long w = c.Width;
        var g = new Generator(11);
        Tensor Weight(params long[] shape) => randn(shape, generator: g) * 0.05;
        Tensor Norm() => 1 + randn(w, generator: g) * 0.1;
        var d = new Dictionary<string, Tensor>
        {
            ["cls_token"] = Weight(1, 1, w), ["pos_embed"] = Weight(1, 1 + grid * grid, w),
            ["patch_embed.proj.weight"] = Weight(w, 3, c.PatchSize, c.PatchSize), ["patch_embed.proj.bias"] = Weight(w),
            ["norm.weight"] = Norm(), ["norm.bias"] = Weight(w), ["head.weight"] = Weight(classes, w), ["head.bias"] = Weight(classes),
        };
        for (int i = 0; i < c.ImageLayers; i++)
        {
            var b = $"blocks.{i}";
            d[$"{b}.norm1.weight"] = Norm(); d[$"{b}.norm1.bias"] = Weight(w);
            d[$"{b}.attn.qkv.weight"] = Weight(3 * w, w); d[$"{b}.attn.qkv.bias"] = Weight(3 * w);
            d[$"{b}.attn.proj.weight"] = Weight(w, w); d[$"{b}.attn.proj.bias"] = Weight(w);
            d[$"{b}.norm2.weight"] = Norm(); d[$"{b}.norm2.bias"] = Weight(w);
            d[$"{b}.mlp.fc1.weight"] = Weight(c.MlpRatio * w, w); d[$"{b}.mlp.fc1.bias"] = Weight(c.MlpRatio * w);
            d[$"{b}.mlp.fc2.weight"] = Weight(w, c.MlpRatio * w); d[$"{b}.mlp.fc2.bias"] = Weight(w);
        }
        return d;
    }

    /// <summary>timm's VisionTransformer.forward_features on its own state dict.</summary>
    static Tensor TimmForward(IReadOnlyDictionary<string, Tensor> t, MamoConfig c, Tensor images)
    {
        Tensor Ln(Tensor x, string prefix) => F.layer_norm(x, [c.Width], t[prefix + ".weight"], t[prefix + ".bias"], 1e-6);
        var x = F.conv2d(images, t["patch_embed.proj.weight"], t["patch_embed.proj.bias"], strides: [c.PatchSize, c.PatchSize]).flatten(2).transpose(1, 2);
        var b = x.shape[0];
        x = cat([t["cls_token"].expand(b, -1, -1), x], 1) + t["pos_embed"];
        int heads = c.Heads, d = c.Width / c.Heads;
        var n = x.shape[1];
        for (int i = 0; i < c.ImageLayers; i++)
        {
            var p = $"blocks.{i}";
            var qkv = F.linear(Ln(x, $"{p}.norm1"), t[$"{p}.attn.qkv.weight"], t[$"{p}.attn.qkv.bias"]).reshape(b, n, 3, heads, d).permute(2, 0, 3, 1, 4);
            var attention = F.softmax(qkv[0].matmul(qkv[1].transpose(-2, -1)) * Math.Pow(d, -0.5), -1);
            var context = attention.matmul(qkv[2]).transpose(1, 2).reshape(b, n, c.Width);
            x = x + F.linear(context, t[$"{p}.attn.proj.weight"], t[$"{p}.attn.proj.bias"]);
            var hidden = F.gelu(F.linear(Ln(x, $"{p}.norm2"), t[$"{p}.mlp.fc1.weight"], t[$"{p}.mlp.fc1.bias"]));
            x = x + F.linear(hidden, t[$"{p}.mlp.fc2.weight"], t[$"{p}.mlp.fc2.bias"]);
        }
        return Ln(x, "norm");
    }

    string Save(Dictionary<string, Tensor> tensors, string name)
    {
        var path = Path.Combine(dir, name);
        SafeTensors.Save(path, tensors.Select(kv => (kv.Key, kv.Value)));
        return path;
    }

    MamoModel Imported(string checkpoint)
    {
        var model = new MamoModel(Checkpoint.ReadConfig(checkpoint));
        Checkpoint.LoadModel(checkpoint, Checkpoint.StudentFile, model);
        model.eval();
        return model;
    }

    [Fact]
    public void A_timm_vit_imports_and_computes_timms_forward_pass()
    {
        using var scope = NewDisposeScope();
        var timm = TimmStateDict(Vit, Vit.GridSize);
        var source = new WeightSource(WeightSource.TimmVit, Save(timm, "vit.safetensors"));
        var report = WeightImport.Run(null, source, Vit, Path.Combine(dir, "ckpt"), seed: 1);
        Assert.Equal($"image: {4 + 12 * Vit.ImageLayers + 2} tensors from {source}", Assert.Single(report));
        using var model = Imported(Path.Combine(dir, "ckpt"));
        Assert.Equal(TimmVit.TimmEps, model.Config.ImageNormEps);

        var images = randn(new long[] { 2, 3, Vit.ImageSize, Vit.ImageSize }, generator: new Generator(12));
        using var noGrad = no_grad();
        var ours = model.Image.forward(images, null);
        var theirs = TimmForward(timm, Vit, images);
        Assert.True(ours.allclose(theirs, rtol: 0, atol: 1e-5), $"max |diff| {(ours - theirs).abs().max().ToDouble()}");
    }

    [Fact]
    public void A_position_grid_of_another_size_is_resized_to_the_presets()
    {
        using var scope = NewDisposeScope();
        var timm = TimmStateDict(Vit, grid: 4);
        // Bicubic weights sum to one: a constant grid stays that constant at any size.
        timm["pos_embed"] = cat([full(1, 1, Vit.Width, 5f), full(1, 16, Vit.Width, 0.25f)], 1);
        WeightImport.Run(null, new WeightSource(WeightSource.TimmVit, Save(timm, "vit4.safetensors")), Vit, Path.Combine(dir, "ckpt"), seed: 1);
        using var model = Imported(Path.Combine(dir, "ckpt"));
        var positions = model.named_parameters().Single(p => p.name == "image.positionEmbedding").parameter;
        Assert.Equal([1L, 1 + Vit.NumPatches, Vit.Width], positions.shape);
        Assert.True(positions[0, 0].eq(5f).all().item<bool>(), "the class token's position is kept as it is");
        Assert.True(positions[0, 1..].sub(0.25f).abs().max().item<float>() < 1e-6f);
    }

    [Fact]
    public void Export_as_timm_vit_gives_the_imported_file_back_but_the_classifier()
    {
        using var scope = NewDisposeScope();
        var timm = TimmStateDict(Vit, Vit.GridSize);
        WeightImport.Run(null, new WeightSource(WeightSource.TimmVit, Save(timm, "vit.safetensors")), Vit, Path.Combine(dir, "ckpt"), seed: 1);
        WeightExport.Run(Path.Combine(dir, "ckpt"), Checkpoint.StudentFile, WeightSource.TimmVit, Path.Combine(dir, "out"));
        var exported = SafeTensors.Load(Path.Combine(dir, "out", "model.safetensors"));
        Assert.Equal(timm.Keys.Where(k => !k.StartsWith("head.")).Order(), exported.Keys.Order());
        foreach (var (name, value) in exported)
            Assert.True(value.eq(timm[name]).all().item<bool>(), $"{name} changed in the round trip");
        Assert.Contains("\"depth\": 2", File.ReadAllText(Path.Combine(dir, "out", "config.json")));
    }

    [Fact]
    public void A_vit_of_another_depth_or_a_distilled_deit_is_a_clear_error()
    {
        using var scope = NewDisposeScope();
        var deeper = TimmStateDict(Vit with { ImageLayers = 3 }, Vit.GridSize);
        var e = Assert.Throws<InvalidDataException>(() => WeightImport.Run(null,
            new WeightSource(WeightSource.TimmVit, Save(deeper, "deep.safetensors")), Vit, Path.Combine(dir, "a"), seed: 1));
        Assert.Contains("has 3 blocks; the preset's image encoder has 2", e.Message);
        var distilled = TimmStateDict(Vit, Vit.GridSize);
        distilled["dist_token"] = zeros(1, 1, Vit.Width);
        e = Assert.Throws<InvalidDataException>(() => WeightImport.Run(null,
            new WeightSource(WeightSource.TimmVit, Save(distilled, "deit.safetensors")), Vit, Path.Combine(dir, "b"), seed: 1));
        Assert.Contains("distilled DeiT", e.Message);
        var wide = TimmStateDict(Vit with { Width = 96 }, Vit.GridSize);
        e = Assert.Throws<InvalidDataException>(() => WeightImport.Run(null,
            new WeightSource(WeightSource.TimmVit, Save(wide, "wide.safetensors")), Vit, Path.Combine(dir, "c"), seed: 1));
        Assert.Contains("'patch_embed.proj.weight' has shape [96, 3, 8, 8], the preset's 'image.patchEmbed.weight' needs [192, 3, 8, 8]", e.Message);
        Assert.False(Directory.Exists(Path.Combine(dir, "c")));
    }

    [Fact]
    public void Bert_weights_under_BertForPreTraining_names_with_gamma_and_beta_import_as_BertModels()
    {
        using var scope = NewDisposeScope();
        var c = MamoConfig.MiniLm with { TextLayers = 1, FusionLayers = 1, Width = 64, Heads = 4 };
        using var model = MamoModel.Seeded(c, 5);
        var ours = model.named_parameters().ToDictionary(p => p.name, p => (Tensor)p.parameter);
        var bert = HfBert.Map(c, 2).Export(ours).ToDictionary(t => t.Name, t => t.Value);
        var original = bert.ToDictionary(kv => "bert." + kv.Key.Replace("LayerNorm.weight", "LayerNorm.gamma").Replace("LayerNorm.bias", "LayerNorm.beta"), kv => kv.Value);
        var path = Save(original, "bert.safetensors");
        var read = HfBert.ReadSafeTensors(path);
        Assert.Equal(bert.Keys.Order(), read.Keys.Order());
        var back = HfBert.Map(c, HfBert.Layers(read.Keys)).Import(read, path);
        foreach (var (name, value) in back) Assert.True(value.eq(ours[name].reshape(value.shape)).all().item<bool>(), name);
        Assert.Contains(back.Keys, k => k.StartsWith("fusion.blocks.blocks.0."));   // layer 1 continues into the fusion encoder
    }

    [Fact]
    public void A_BertForPreTrainings_mlm_head_imports_and_scores_words_as_BERTs_and_an_untied_one_is_an_error()
    {
        using var scope = NewDisposeScope();
        var c = MamoConfig.MiniLm with { TextLayers = 1, FusionLayers = 1, Width = 64, Heads = 4 };
        long w = c.Width;
        using var source = MamoModel.Seeded(c, 5);
        var published = HfBert.Map(c, 1).Export(source.named_parameters().ToDictionary(p => p.name, p => (Tensor)p.parameter))
            .ToDictionary(t => "bert." + t.Name, t => t.Value);
        var g = new Generator(6);
        // A small dense weight keeps the LayerNorm's input variance near 1e-4, where BERT's eps (1e-12) and
        // TorchSharp's (1e-5) give different words' scores.
        var (dense, denseBias) = (randn([w, w], generator: g) * 0.002, randn([w], generator: g) * 0.002);
        var (gamma, beta, bias) = (1 + randn([w], generator: g) * 0.1, randn([w], generator: g) * 0.1, randn([c.VocabSize], generator: g) * 0.1);
        var words = published["bert.embeddings.word_embeddings.weight"];
        foreach (var (name, t) in new[] { ("transform.dense.weight", dense), ("transform.dense.bias", denseBias), ("transform.LayerNorm.gamma", gamma),
                     ("transform.LayerNorm.beta", beta), ("bias", bias), ("decoder.weight", words) })
            published[HfBert.MlmPrefix + name] = t;

        var report = WeightImport.Run(new WeightSource(WeightSource.HfBert, Save(published, "pretraining.safetensors")), null, c, Path.Combine(dir, "mlm"), seed: 2);
        Assert.EndsWith("; the MLM head)", Assert.Single(report));
        using var model = Imported(Path.Combine(dir, "mlm"));
        var fused = randn([5, w], generator: g);
        using var noGrad = no_grad();
        var bert = F.linear(F.layer_norm(F.gelu(F.linear(fused, dense, denseBias)), [w], gamma, beta, TextLayouts.BertEps), words, bias);
        var difference = (model.WordLogits(fused) - bert).abs().max().ToDouble();
        Assert.True(difference <= 1e-5 * bert.abs().max().ToDouble(), $"max difference {difference:E2}");

        published[HfBert.MlmPrefix + "decoder.weight"] = randn([c.VocabSize, w], generator: g);
        var e = Assert.Throws<InvalidDataException>(() => WeightImport.Run(
            new WeightSource(WeightSource.HfBert, Save(published, "untied.safetensors")), null, c, Path.Combine(dir, "untied"), seed: 2));
        Assert.Contains("'cls.predictions.decoder.weight' is not 'embeddings.word_embeddings.weight'", e.Message);
    }

    // ---- ONNX

    /// <summary>A protobuf field, written by hand.</summary>
    static byte[] Field(int number, byte[] payload) => [.. Varint((ulong)(number << 3 | 2)), .. Varint((ulong)payload.Length), .. payload];
    static byte[] VarintField(int number, ulong value) => [.. Varint((ulong)(number << 3)), .. Varint(value)];
    static byte[] Text(int number, string s) => Field(number, Encoding.UTF8.GetBytes(s));
    static byte[] Varint(ulong v)
    {
        var bytes = new List<byte>();
        for (; v >= 0x80; v >>= 7) bytes.Add((byte)(v | 0x80));
        bytes.Add((byte)v);
        return [.. bytes];
    }

    /// <summary>An ONNX model as a PyTorch export writes a Linear: bias named, weight anonymous and [in, out], one
    /// stored as raw_data, the other as float_data.</summary>
    static byte[] LinearModel()
    {
        byte[] Floats(float[] v) => v.SelectMany(BitConverter.GetBytes).ToArray();
        var weight = Field(5, [.. VarintField(1, 3), .. VarintField(1, 2), .. VarintField(2, 1), .. Text(8, "7"),
            .. Field(9, Floats([1, 2, 3, 4, 5, 6]))]);                                         // [in 3, out 2]
        var bias = Field(5, [.. Field(1, [.. Varint(2)]), .. VarintField(2, 1), .. Text(8, "encoder.layer.0.output.dense.bias"),
            .. Field(4, Floats([0.5f, -0.5f]))]);                                                // packed dims, float_data
        var matmul = Field(1, [.. Text(1, "x"), .. Text(1, "7"), .. Text(2, "8"), .. Text(3, "MatMul_1"), .. Text(4, "MatMul")]);
        var add = Field(1, [.. Text(1, "encoder.layer.0.output.dense.bias"), .. Text(1, "8"), .. Text(2, "y"), .. Text(3, "Add_2"), .. Text(4, "Add")]);
        var graph = Field(7, [.. matmul, .. add, .. Text(2, "g"), .. weight, .. bias, .. Field(12, Text(1, "y"))]);
        return [.. VarintField(1, 7), .. Text(2, "pytorch"), .. graph, .. Field(8, VarintField(2, 13))];
    }

    [Fact]
    public void The_onnx_reader_names_an_exports_anonymous_linear_weight_from_its_bias()
    {
        var onnx = OnnxModel.Parse(LinearModel());
        Assert.Equal([3L, 2], onnx.Initializers["7"].Dims);
        Assert.Equal([0.5f, -0.5f], onnx.Initializers["encoder.layer.0.output.dense.bias"].Values);
        Assert.Equal(["y"], onnx.Outputs);
        using var scope = NewDisposeScope();
        var bert = HfBert.ReadOnnx(onnx);
        // PyTorch's [out, in]: the transpose of the MatMul's [in, out].
        Assert.Equal(new float[] { 1, 3, 5, 2, 4, 6 }, bert["encoder.layer.0.output.dense.weight"].data<float>().ToArray());
        Assert.Equal([2L, 3], bert["encoder.layer.0.output.dense.weight"].shape);

        var more = OnnxModel.Parse(OnnxModel.WithOutputs(LinearModel(), ["8"]));
        Assert.Equal(["y", "8"], more.Outputs);
        Assert.Equal(onnx.Nodes.Count, more.Nodes.Count);
    }

    [Fact]
    public void A_damaged_onnx_file_gives_a_clear_error_never_a_crash()
    {
        var original = LinearModel();
        int parsed = 0, refused = 0;   // CsCheck samples on several threads
        // Half the inputs whole (only bytes changed), half cut short.
        Gen.Select(Gen.Int[0, original.Length - 1].Array[1, 8], Gen.Byte.Array[1, 8], Gen.Int[0, 2 * original.Length])
            .Sample((positions, values, cut) =>
            {
                var bytes = (byte[])original.Clone();
                for (int i = 0; i < positions.Length; i++) bytes[positions[i]] = values[i % values.Length];
                try
                {
                    OnnxModel.Parse(bytes[..Math.Min(cut, bytes.Length)]);
                    Interlocked.Increment(ref parsed);
                }
                catch (InvalidDataException) { Interlocked.Increment(ref refused); }
            }, iter: 5000);
        Assert.True(parsed > 0 && refused > 0, $"{parsed} parsed, {refused} refused");   // the fuzz reached both outcomes
        Assert.Throws<InvalidDataException>(() => OnnxModel.Parse(Encoding.UTF8.GetBytes("not a model")));
    }
}
