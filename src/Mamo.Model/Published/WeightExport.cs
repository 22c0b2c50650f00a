namespace Mamo.Model.Published;

/// <summary>`mamo export`: a checkpoint's encoder in a published layout, as OUT/model.safetensors under the original
/// tensor names and OUT/config.json, so that transformers or timm load it (importing the export gives the same
/// tensors back, bit for bit); or both encoders as ONNX graphs that give the run's embeddings (OnnxExport).</summary>
public static class WeightExport
{
    /// <returns>a line saying what was written</returns>
    public static string Run(string checkpoint, string weightsFile, string format, string output)
    {
        var config = Checkpoint.ReadConfig(checkpoint);
        var tensors = Checkpoint.LoadPart(Path.Combine(checkpoint, weightsFile));
        try
        {
            if (format == WeightSource.Onnx)
            {
                OnnxExport.Write(config, tensors, output, $"step-{Checkpoint.ReadState(checkpoint).Step}");
                return $"wrote the image and text encoders of {checkpoint} ({weightsFile}) as ONNX ({OnnxExport.ImageFile}, {OnnxExport.TextFile}) to {Path.GetFullPath(output)}";
            }
            var (map, json) = format switch
            {
                // The fusion layers go above the text encoder's, where an import puts them.
                WeightSource.HfBert when config.TextLayout == TextLayouts.Bert =>
                    (HfBert.MaskedLm(config, config.TextLayers + config.FusionLayers), HfBert.ConfigJson(config, config.TextLayers + config.FusionLayers)),
                WeightSource.HfBert =>
                    throw new InvalidDataException($"{checkpoint}: the text encoder is in the {config.TextLayout} layout; only the {TextLayouts.Bert} layout is BERT"),
                WeightSource.TimmVit => (TimmVit.Map(config), TimmVit.ConfigJson(config)),
                _ => throw new ArgumentException($"export format must be {WeightSource.HfBert}, {WeightSource.TimmVit} or {WeightSource.Onnx}, not {format}"),
            };
            var exported = map.Export(tensors);
            try
            {
                Directory.CreateDirectory(output);
                SafeTensors.Save(Path.Combine(output, "model.safetensors"), exported, new Dictionary<string, string> { ["format"] = "pt" });
                Checkpoint.WriteDurably(Path.Combine(output, "config.json"), json);
            }
            finally { foreach (var (_, t) in exported) t.Dispose(); }
            return $"wrote {exported.Count} tensors of {checkpoint} ({weightsFile}) as {format} to {Path.GetFullPath(output)}";
        }
        finally { foreach (var t in tensors.Values) t.Dispose(); }
    }
}
