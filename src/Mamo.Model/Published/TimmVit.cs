using System.Text.Json;
using System.Text.Json.Nodes;
using TorchSharp;
using static TorchSharp.torch;

namespace Mamo.Model.Published;

/// <summary>
/// timm's VisionTransformer tensor names (timm/models/vision_transformer.py; DeiT's are the same) for our image
/// encoder. Both are pre-LN ViTs with a class token whose position embedding comes first: patch_embed.proj is our
/// patchEmbed, blocks.i.norm1 / attn.qkv / attn.proj / norm2 / mlp.fc1 / mlp.fc2 are our ln1 / attn.qkv / attn.proj /
/// ln2 / mlp.fc / mlp.proj (timm's qkv is [q; k; v] with heads contiguous, as ours), and norm is our final norm.
/// timm's LayerNorms use eps 1e-6, which an import writes into the config (MamoConfig.ImageNormEps). The classifier
/// (head.*) is not imported; our [MASK] patch embedding keeps its initial value.
/// </summary>
public static class TimmVit
{
    public const double TimmEps = 1e-6;

    /// <summary>Our block's module -> timm's, and its weight's shape for width w and MLP width h (its bias is [rows]).</summary>
    static readonly (string Ours, string Theirs, Func<long, long, long[]> Weight)[] BlockModules =
    [
        ("ln1", "norm1", (w, _) => [w]), ("attn.qkv", "attn.qkv", (w, _) => [3 * w, w]), ("attn.proj", "attn.proj", (w, _) => [w, w]),
        ("ln2", "norm2", (w, _) => [w]), ("mlp.fc", "mlp.fc1", (w, h) => [h, w]), ("mlp.proj", "mlp.fc2", (w, h) => [w, h]),
    ];

    public static WeightMap Map(MamoConfig c)
    {
        long w = c.Width, hidden = c.MlpRatio * c.Width;
        var entries = new List<WeightMap.Entry>
        {
            new("image.patchEmbed.weight", ["patch_embed.proj.weight"], [w, 3, c.PatchSize, c.PatchSize]),
            new("image.patchEmbed.bias", ["patch_embed.proj.bias"], [w]),
            new("image.clsToken", ["cls_token"], [1, 1, w]),
            new("image.positionEmbedding", ["pos_embed"], [1, 1 + c.NumPatches, w]),
        };
        for (int i = 0; i < c.ImageLayers; i++)
            foreach (var (ours, theirs, weight) in BlockModules)
            {
                var shape = weight(w, hidden);
                entries.Add(new($"image.blocks.blocks.{i}.{ours}.weight", [$"blocks.{i}.{theirs}.weight"], shape));
                entries.Add(new($"image.blocks.blocks.{i}.{ours}.bias", [$"blocks.{i}.{theirs}.bias"], [shape[0]]));
            }
        entries.Add(new("image.blocks.lnFinal.weight", ["norm.weight"], [w]));
        entries.Add(new("image.blocks.lnFinal.bias", ["norm.bias"], [w]));
        return new WeightMap(entries);
    }

    /// <summary>The number of blocks a published ViT has.</summary>
    public static int Layers(IEnumerable<string> names) =>
        names.Select(n => n.Split('.')).Where(p => p.Length > 1 && p[0] == "blocks" && int.TryParse(p[1], out _))
            .Select(p => int.Parse(p[1]) + 1).DefaultIfEmpty(0).Max();

    /// <summary>timm tensors from a safetensors file or a folder holding model.safetensors. The caller owns them.</summary>
    public static Dictionary<string, Tensor> Read(string path)
    {
        var file = Directory.Exists(path) ? Path.Combine(path, "model.safetensors") : path;
        if (!File.Exists(file)) throw new FileNotFoundException($"no ViT weights at {file} (expected a .safetensors file or a folder with model.safetensors)");
        return SafeTensors.Load(file);
    }

    /// <summary>Our image encoder's parameters from timm's; a position grid of another size is resized bicubically
    /// to the preset's, as ALBEF and timm do when they change the image size.</summary>
    public static Dictionary<string, Tensor> Import(MamoConfig c, IReadOnlyDictionary<string, Tensor> published, string source)
    {
        if (published.ContainsKey("dist_token"))
            throw new InvalidDataException($"{source} is a distilled DeiT (it has dist_token); import the non-distilled model");
        var layers = Layers(published.Keys);
        if (layers != c.ImageLayers)
            throw new InvalidDataException($"{source} has {layers} blocks; the preset's image encoder has {c.ImageLayers}");
        return Map(c).Import(published, source, (entry, t) => entry.Ours == "image.positionEmbedding" ? ResizePositions(t, c, source) : null);
    }

    static Tensor? ResizePositions(Tensor positions, MamoConfig c, string source)
    {
        if (positions.dim() != 3 || positions.shape[0] != 1 || positions.shape[2] != c.Width) return null;
        var patches = positions.shape[1] - 1;
        var g = (long)Math.Round(Math.Sqrt(patches));
        if (g * g != patches)
            throw new InvalidDataException($"{source}: pos_embed has {positions.shape[1]} tokens, not a class token and a square grid");
        using var scope = NewDisposeScope();
        var grid = positions[.., 1..].reshape(1, g, g, c.Width).permute(0, 3, 1, 2);
        var resized = nn.functional.interpolate(grid, [c.GridSize, c.GridSize], mode: InterpolationMode.Bicubic, align_corners: false);
        var patchPositions = resized.permute(0, 2, 3, 1).reshape(1, c.NumPatches, c.Width);
        return cat([positions[.., ..1], patchPositions], 1).MoveToOuterDisposeScope();
    }

    /// <summary>A config.json in timm's pretrained_cfg style, enough to build the same VisionTransformer.</summary>
    public static string ConfigJson(MamoConfig c) => new JsonObject
    {
        ["architecture"] = "vit",
        ["num_classes"] = 0,
        ["model_args"] = new JsonObject
        {
            ["img_size"] = c.ImageSize, ["patch_size"] = c.PatchSize, ["embed_dim"] = c.Width, ["depth"] = c.ImageLayers,
            ["num_heads"] = c.Heads, ["mlp_ratio"] = c.MlpRatio, ["qkv_bias"] = true, ["class_token"] = true, ["global_pool"] = "token",
        },
        ["pretrained_cfg"] = new JsonObject { ["input_size"] = new JsonArray(3, c.ImageSize, c.ImageSize) },
    }.ToJsonString(new JsonSerializerOptions { WriteIndented = true });
}
