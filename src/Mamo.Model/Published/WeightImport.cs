using static TorchSharp.torch;

namespace Mamo.Model.Published;

/// <summary>A published weights file and its format: hf-bert:PATH, onnx:PATH (text) or timm-vit:PATH (image).</summary>
public sealed record WeightSource(string Format, string Path)
{
    public const string HfBert = "hf-bert", Onnx = "onnx", TimmVit = "timm-vit";

    public static WeightSource Parse(string spec, params string[] formats)
    {
        var colon = spec.IndexOf(':');
        var format = colon > 0 ? spec[..colon] : "";
        if (!formats.Contains(format))
            throw new ArgumentException($"'{spec}' must be FORMAT:PATH with FORMAT one of {string.Join(", ", formats)}");
        return new WeightSource(format, spec[(colon + 1)..]);
    }

    public override string ToString() => $"{Format}:{Path}";
}

/// <summary>
/// `mamo import`: a checkpoint whose text encoder (and fusion layers above it, where the published BERT has them) and
/// image encoder hold published weights, with every other parameter initialised from the seed as a new run's would be.
/// Pre-training (--init) and fine-tuning (--from) start from it as from any checkpoint: step 0, the teacher a copy.
/// </summary>
public static class WeightImport
{
    public const string TextSourceKey = "imported-text", ImageSourceKey = "imported-image";

    /// <summary>The config an import writes: the preset's, in the bert text layout when BERT weights come in, and with
    /// timm's LayerNorm epsilon when a ViT does.</summary>
    static MamoConfig Config(MamoConfig preset, WeightSource? text, WeightSource? image) => preset with
    {
        TextLayout = text is null ? preset.TextLayout : TextLayouts.Bert,
        ImageNormEps = image is null ? preset.ImageNormEps : TimmVit.TimmEps,
    };

    /// <summary>Writes the checkpoint to <paramref name="output"/>; returns what was imported, one line per source.</summary>
    public static IReadOnlyList<string> Run(WeightSource? text, WeightSource? image, MamoConfig preset, string output, int seed)
    {
        if (text is null && image is null) throw new ArgumentException("nothing to import: give --text and/or --image");
        if (Directory.Exists(output) && Directory.EnumerateFileSystemEntries(output).Any())
            throw new IOException($"{output} exists and is not empty; choose a new --out");
        var config = Config(preset, text, image);
        using var model = MamoModel.Seeded(config, seed);
        var report = new List<string>();
        var extra = new Dictionary<string, string>();
        if (text is not null)
        {
            var published = ReadText(text);
            try
            {
                var layers = HfBert.Layers(published.Keys);
                if (layers < config.TextLayers)
                    throw new InvalidDataException($"{text} has {layers} encoder layers; the preset's text encoder has {config.TextLayers}");
                var imported = HfBert.Map(config, layers).Import(published, text.ToString());
                var count = imported.Count;
                Copy(model, imported);
                // BertForPreTraining and BertForMaskedLM bring their MLM head: continued pre-training starts from it.
                var head = HfBert.HasMlmHead(published, text.ToString());
                if (head)
                {
                    var mlm = HfBert.MlmHead(config).Import(published, text.ToString());
                    count += mlm.Count;
                    Copy(model, mlm);
                }
                var fusion = Math.Min(layers - config.TextLayers, config.FusionLayers);
                var unused = layers - config.TextLayers - fusion;
                report.Add($"text: {count} tensors from {text} ({layers} layers: {config.TextLayers} text{(fusion > 0 ? $", {fusion} fusion" : "")}" +
                           $"{(unused > 0 ? $", the top {unused} not used: the preset has no room for them" : "")}{(head ? "; the MLM head" : "")})");
                extra[TextSourceKey] = text.ToString();
            }
            finally { foreach (var t in published.Values) t.Dispose(); }
        }
        if (image is not null)
        {
            var published = TimmVit.Read(image.Path);
            try
            {
                var imported = TimmVit.Import(config, published, image.ToString());
                Copy(model, imported);
                report.Add($"image: {imported.Count} tensors from {image}");
                extra[ImageSourceKey] = image.ToString();
            }
            finally { foreach (var t in published.Values) t.Dispose(); }
        }
        Checkpoint.Save(output, config, [new Checkpoint.Part(Checkpoint.StudentPart, Checkpoint.Named(model))], new Checkpoint.State(0, 0, 0, extra));
        return report;
    }

    static Dictionary<string, Tensor> ReadText(WeightSource text) => text.Format switch
    {
        WeightSource.HfBert => HfBert.ReadSafeTensors(text.Path),
        WeightSource.Onnx => HfBert.ReadOnnx(OnnxModel.Load(text.Path)),
        _ => throw new ArgumentException($"text weights are hf-bert: or onnx:, not {text.Format}:"),
    };

    static void Copy(MamoModel model, Dictionary<string, Tensor> imported)
    {
        try { WeightMap.CopyInto(model, imported); }
        finally { foreach (var t in imported.Values) t.Dispose(); }
    }
}
