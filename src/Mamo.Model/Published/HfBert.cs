using System.Text.Json;
using System.Text.Json.Nodes;
using static TorchSharp.torch;

namespace Mamo.Model.Published;

/// <summary>
/// Hugging Face BERT's tensor names (transformers' BertModel) for our text encoder in the bert layout. BERT's
/// encoder.layer.i is our text block i; as in ALBEF, layers above the text encoder's continue into the fusion encoder
/// (layer TextLayers + j is fusion block j), where the published model has them. Our qkv is BERT's query, key and
/// value concatenated; ln1 is attention.output.LayerNorm, ln2 output.LayerNorm (BERT's blocks are post-LN).
/// </summary>
public static class HfBert
{
    /// <summary>Our block's parameter -> BERT layer's tensors, and each one's shape for width w and MLP width h.</summary>
    static readonly (string Ours, string[] Theirs, Func<long, long, long[]> Shape)[] BlockTensors =
    [
        ("attn.qkv.weight", ["attention.self.query.weight", "attention.self.key.weight", "attention.self.value.weight"], (w, _) => [w, w]),
        ("attn.qkv.bias", ["attention.self.query.bias", "attention.self.key.bias", "attention.self.value.bias"], (w, _) => [w]),
        ("attn.proj.weight", ["attention.output.dense.weight"], (w, _) => [w, w]),
        ("attn.proj.bias", ["attention.output.dense.bias"], (w, _) => [w]),
        ("ln1.weight", ["attention.output.LayerNorm.weight"], (w, _) => [w]),
        ("ln1.bias", ["attention.output.LayerNorm.bias"], (w, _) => [w]),
        ("mlp.fc.weight", ["intermediate.dense.weight"], (w, h) => [h, w]),
        ("mlp.fc.bias", ["intermediate.dense.bias"], (_, h) => [h]),
        ("mlp.proj.weight", ["output.dense.weight"], (w, h) => [w, h]),
        ("mlp.proj.bias", ["output.dense.bias"], (w, _) => [w]),
        ("ln2.weight", ["output.LayerNorm.weight"], (w, _) => [w]),
        ("ln2.bias", ["output.LayerNorm.bias"], (w, _) => [w]),
    ];

    /// <summary>The map for a config's text encoder and, where the published model has <paramref name="layers"/> &gt;
    /// TextLayers, the fusion blocks those layers fill.</summary>
    public static WeightMap Map(MamoConfig c, int layers)
    {
        if (c.TextLayout != TextLayouts.Bert) throw new ArgumentException($"BERT weights need the bert text layout, not {c.TextLayout}");
        long w = c.Width, hidden = c.MlpRatio * c.Width;
        var entries = new List<WeightMap.Entry>
        {
            new("text.wordEmbedding.weight", ["embeddings.word_embeddings.weight"], [c.VocabSize, w]),
            new("text.positionEmbedding", ["embeddings.position_embeddings.weight"], [MamoConfig.BertPositions, w]),
            new("text.tokenTypeEmbedding", ["embeddings.token_type_embeddings.weight"], [MamoConfig.BertTokenTypes, w]),
            new("text.embeddingNorm.weight", ["embeddings.LayerNorm.weight"], [w]),
            new("text.embeddingNorm.bias", ["embeddings.LayerNorm.bias"], [w]),
        };
        for (int layer = 0; layer < Math.Min(layers, c.TextLayers + c.FusionLayers); layer++)
        {
            var ours = layer < c.TextLayers ? $"text.blocks.blocks.{layer}" : $"fusion.blocks.blocks.{layer - c.TextLayers}";
            foreach (var (name, theirs, shape) in BlockTensors)
                entries.Add(new($"{ours}.{name}", theirs.Select(t => $"encoder.layer.{layer}.{t}").ToArray(), shape(w, hidden)));
        }
        return new WeightMap(entries);
    }

    /// <summary>BertForPreTraining's and BertForMaskedLM's MLM head (cls.predictions): its transform, and the output
    /// bias; the output weight is tied to the word embeddings, in BERT as here.</summary>
    public static WeightMap MlmHead(MamoConfig c) => new(
    [
        new("mlmTransform.dense.weight", [MlmPrefix + "transform.dense.weight"], [c.Width, c.Width]),
        new("mlmTransform.dense.bias", [MlmPrefix + "transform.dense.bias"], [c.Width]),
        new("mlmTransform.norm.weight", [MlmPrefix + "transform.LayerNorm.weight"], [c.Width]),
        new("mlmTransform.norm.bias", [MlmPrefix + "transform.LayerNorm.bias"], [c.Width]),
        new("mlmBias", [MlmPrefix + "bias"], [c.VocabSize]),
    ]);

    /// <summary>The export's map: the encoders under BertForMaskedLM's names ("bert." before BertModel's), then the MLM
    /// head, with the decoder written out as the word embeddings it is tied to. transformers loads it as
    /// BertForMaskedLM, and as BertModel (which drops the prefix and the head); an import reads it all back.</summary>
    public static WeightMap MaskedLm(MamoConfig c, int layers) => new(
    [
        .. Map(c, layers).Entries.Select(e => e with { Theirs = [.. e.Theirs.Select(t => BertPrefix + t)] }),
        .. MlmHead(c).Entries,
        new("text.wordEmbedding.weight", [MlmDecoder], [c.VocabSize, c.Width]),
    ]);

    public const string MlmPrefix = "cls.predictions.", BertPrefix = "bert.";
    const string MlmDecoder = MlmPrefix + "decoder.weight", WordEmbeddings = "embeddings.word_embeddings.weight";

    /// <summary>Whether the published model has an MLM head; one whose output weight is not the word embeddings (an
    /// untied decoder) is an error, as this model has no separate output matrix.</summary>
    public static bool HasMlmHead(IReadOnlyDictionary<string, Tensor> published, string source)
    {
        if (!published.Keys.Any(k => k.StartsWith(MlmPrefix))) return false;
        if (published.TryGetValue(MlmDecoder, out var decoder) && published.TryGetValue(WordEmbeddings, out var words)
            && !(decoder.shape.SequenceEqual(words.shape) && decoder.eq(words).all().item<bool>()))
            throw new InvalidDataException($"{source}: '{MlmDecoder}' is not '{WordEmbeddings}'; MAMO ties the MLM output to the word embeddings, so an untied head cannot be imported");
        return true;
    }

    /// <summary>The number of encoder layers a published BERT has (the highest encoder.layer.i, plus one).</summary>
    public static int Layers(IEnumerable<string> names) =>
        names.Select(n => n.Split('.')).Where(p => p.Length > 2 && p[0] == "encoder" && p[1] == "layer" && int.TryParse(p[2], out _))
            .Select(p => int.Parse(p[2]) + 1).DefaultIfEmpty(0).Max();

    /// <summary>BERT tensors from a safetensors file (or a folder holding model.safetensors), under BertModel's names:
    /// a BertForPreTraining's "bert." prefix is dropped, and the original checkpoints' LayerNorm gamma/beta read as
    /// weight/bias. The caller owns the tensors.</summary>
    public static Dictionary<string, Tensor> ReadSafeTensors(string path)
    {
        var file = Directory.Exists(path) ? Path.Combine(path, "model.safetensors") : path;
        if (!File.Exists(file)) throw new FileNotFoundException($"no BERT weights at {file} (expected a .safetensors file or a folder with model.safetensors)");
        return SafeTensors.Load(file).ToDictionary(kv => Normalise(kv.Key), kv => kv.Value);
    }

    static string Normalise(string name)
    {
        if (name.StartsWith(BertPrefix)) name = name[BertPrefix.Length..];
        if (name.EndsWith("LayerNorm.gamma")) name = name[..^"gamma".Length] + "weight";
        if (name.EndsWith("LayerNorm.beta")) name = name[..^"beta".Length] + "bias";
        return name;
    }

    /// <summary>
    /// BERT tensors from an ONNX export of BertModel. Named initializers keep their names; the exporter leaves each
    /// Linear's weight anonymous and transposed, as the second input of a MatMul whose output an Add with the named
    /// bias takes. So X.weight is that MatMul's initializer, transposed back to PyTorch's [out, in].
    /// </summary>
    public static Dictionary<string, Tensor> ReadOnnx(OnnxModel onnx)
    {
        var result = new Dictionary<string, Tensor>();
        foreach (var (name, init) in onnx.Initializers)
            if (init.DataType == OnnxModel.Float && (name.StartsWith("embeddings.") || name.StartsWith("encoder.") || name.StartsWith("pooler.")))
                result[name] = onnx.Tensor(name);
        foreach (var bias in result.Keys.Where(n => n.EndsWith(".bias")).ToList())
        {
            var weight = bias[..^"bias".Length] + "weight";
            if (result.ContainsKey(weight)) continue;   // a LayerNorm, or a Linear exported with its name
            var add = onnx.Nodes.FirstOrDefault(n => n.Op == "Add" && n.Inputs.Contains(bias));
            var matmul = add?.Inputs.Where(i => i != bias).Select(onnx.Producer).FirstOrDefault(p => p?.Op == "MatMul");
            var anonymous = matmul?.Inputs.FirstOrDefault(i => onnx.Initializers.ContainsKey(i));
            if (anonymous is null) continue;
            using var t = onnx.Tensor(anonymous);
            result[weight] = t.t().contiguous();
        }
        return result;
    }

    /// <summary>transformers' config.json for the exported BertForMaskedLM.</summary>
    public static string ConfigJson(MamoConfig c, int layers) => new JsonObject
    {
        ["architectures"] = new JsonArray("BertForMaskedLM"),
        ["model_type"] = "bert",
        ["hidden_size"] = c.Width,
        ["num_hidden_layers"] = layers,
        ["num_attention_heads"] = c.Heads,
        ["intermediate_size"] = c.MlpRatio * c.Width,
        ["hidden_act"] = "gelu",
        ["layer_norm_eps"] = TextLayouts.BertEps,
        ["max_position_embeddings"] = MamoConfig.BertPositions,
        ["type_vocab_size"] = MamoConfig.BertTokenTypes,
        ["vocab_size"] = c.VocabSize,
        ["pad_token_id"] = c.PadTokenId,
        ["hidden_dropout_prob"] = 0.0,
        ["attention_probs_dropout_prob"] = 0.0,
    }.ToJsonString(new JsonSerializerOptions { WriteIndented = true });
}
