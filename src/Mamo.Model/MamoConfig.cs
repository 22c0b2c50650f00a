using System.Text.Json;
using System.Text.Json.Serialization;

namespace Mamo.Model;

/// <summary>Weights of the five pre-training terms. A weight of 0 removes the term and its computation.</summary>
public sealed record LossWeights(double Itc = 1, double Itm = 1, double Mlm = 1, double Mim = 1, double Mrm = 1)
{
    /// <summary>The paper's Table 6 rows, by name.</summary>
    public static LossWeights Ablation(string row) => row switch
    {
        "itc+itm" => new(Mlm: 0, Mim: 0, Mrm: 0),
        "itc+itm+mlm" => new(Mim: 0, Mrm: 0),
        "itc+itm+mlm+mrm" => new(Mim: 0),
        "all" => new(),
        _ => throw new ArgumentException($"unknown ablation row '{row}' (itc+itm, itc+itm+mlm, itc+itm+mlm+mrm, all)"),
    };
}

/// <summary>A MAMO model's architecture: every size, the vocabulary's special tokens, the temperature's range and how
/// the weights start. What pre-training masks and weighs is PretrainingConfig, apart, so that fine-tuning loads an
/// architecture without pre-training's objective. Presets: tiny (CPU tests and demo), small, base (the paper's scale).</summary>
public sealed record MamoConfig
{
    public int ImageSize { get; init; } = 64;
    public int PatchSize { get; init; } = 8;
    public int Width { get; init; } = 192;
    public int Heads { get; init; } = 3;
    public int MlpRatio { get; init; } = 4;
    public int ImageLayers { get; init; } = 4;
    public int TextLayers { get; init; } = 2;
    public int FusionLayers { get; init; } = 2;
    /// <summary>Width of the ITC space.</summary>
    public int EmbedDim { get; init; } = 128;
    public int VocabSize { get; init; } = 30522;
    public int MaxTextLength { get; init; } = 16;
    public int DecoderLayers { get; init; } = 1;

    public double TemperatureInit { get; init; } = 0.07;
    public double TemperatureMin { get; init; } = 0.001;
    public double TemperatureMax { get; init; } = 0.5;
    /// <summary>How a new model's weights start: WeightInit.Bert or WeightInit.Torch.</summary>
    public string WeightInit { get; init; } = Model.WeightInit.Torch;
    /// <summary>The text and fusion encoders' blocks: TextLayouts.PreLn (nanoGPT's) or TextLayouts.Bert (BERT's own, so
    /// that imported BERT weights mean what they meant). Configs written before it existed read as pre-ln.</summary>
    public string TextLayout { get; init; } = TextLayouts.PreLn;

    /// <summary>The image encoder's LayerNorm epsilon: TorchSharp's 1e-5, or timm's 1e-6 for an imported ViT.</summary>
    public double ImageNormEps { get; init; } = 1e-5;

    /// <summary>BERT's learned positions and token types (bert layout).</summary>
    public const int BertPositions = 512, BertTokenTypes = 2;

    // BERT uncased special token ids (bert-base-uncased vocab.txt).
    public int PadTokenId { get; init; } = 0;
    public int ClsTokenId { get; init; } = 101;
    public int SepTokenId { get; init; } = 102;
    public int MaskTokenId { get; init; } = 103;

    [JsonIgnore] public int GridSize => ImageSize / PatchSize;
    [JsonIgnore] public int NumPatches => GridSize * GridSize;

    public static MamoConfig Tiny => new();

    public static MamoConfig Small => new()
    {
        ImageSize = 128, PatchSize = 16, Width = 384, Heads = 6, ImageLayers = 6, TextLayers = 4, FusionLayers = 4,
        EmbedDim = 256, MaxTextLength = 32,
    };

    public static MamoConfig Base => new()
    {
        ImageSize = 224, PatchSize = 16, Width = 768, Heads = 12, ImageLayers = 12, TextLayers = 6, FusionLayers = 6,
        EmbedDim = 256, MaxTextLength = 40, DecoderLayers = 2,
    };

    /// <summary>all-MiniLM-L6-v2's text encoder (BERT layout, width 384, 12 heads, 6 layers, MLP 1536), so that its
    /// weights import as they are; a small ViT and two fusion layers beside it.</summary>
    public static MamoConfig MiniLm => new()
    {
        ImageSize = 64, PatchSize = 8, Width = 384, Heads = 12, ImageLayers = 6, TextLayers = 6, FusionLayers = 2,
        EmbedDim = 256, MaxTextLength = 32, TextLayout = TextLayouts.Bert,
    };

    public static readonly IReadOnlyList<string> PresetNames = ["tiny", "small", "base", "minilm"];

    /// <summary>The preset whose sizes <paramref name="c"/> has, or null. Its text layout and image LayerNorm epsilon
    /// may be its own: an import sets them to the published model's.</summary>
    public static string? PresetOf(MamoConfig c) =>
        PresetNames.FirstOrDefault(p => (Preset(p) with { TextLayout = c.TextLayout, ImageNormEps = c.ImageNormEps }).SameArchitecture(c));

    /// <summary>This config with <paramref name="saved"/>'s text layout and image epsilon (a checkpoint's, which a run
    /// starting from it must keep).</summary>
    public MamoConfig WithLayoutOf(MamoConfig saved) => this with { TextLayout = saved.TextLayout, ImageNormEps = saved.ImageNormEps };

    public static MamoConfig Preset(string name) => name switch
    {
        "tiny" => Tiny,
        "small" => Small,
        "base" => Base,
        "minilm" => MiniLm,
        _ => throw new ArgumentException($"unknown preset '{name}' ({string.Join(", ", PresetNames)})"),
    };

    public void Validate()
    {
        void Require(bool ok, string message) { if (!ok) throw new ArgumentException(message); }
        Require(ImageSize > 0 && PatchSize > 0 && ImageSize % PatchSize == 0, $"image size {ImageSize} must be a positive multiple of patch size {PatchSize}");
        Require(Width > 0 && Heads > 0 && Width % Heads == 0, $"width {Width} must be divisible by heads {Heads}");
        Require(ImageLayers > 0 && TextLayers > 0 && FusionLayers > 0, "every encoder needs at least one layer");
        Require(MaxTextLength >= 3, "max text length must leave room for [CLS] and [SEP]");
        Require(TemperatureMin > 0 && TemperatureMin <= TemperatureInit && TemperatureInit <= TemperatureMax, "temperature must satisfy 0 < min <= init <= max");
        Require(WeightInit is Model.WeightInit.Bert or Model.WeightInit.Torch, $"weight init '{WeightInit}' must be {Model.WeightInit.Bert} or {Model.WeightInit.Torch}");
        Require(TextLayout is TextLayouts.PreLn or TextLayouts.Bert, $"text layout '{TextLayout}' must be {TextLayouts.PreLn} or {TextLayouts.Bert}");
        Require(ImageNormEps > 0 && ImageNormEps < 1, $"image LayerNorm epsilon {ImageNormEps} must lie in (0, 1)");
        Require(TextLayout != TextLayouts.Bert || MaxTextLength <= BertPositions, $"the bert layout has {BertPositions} positions; max text length {MaxTextLength} exceeds them");
    }

    /// <summary>The same weights fit both: only how they start and the temperature's range may differ.</summary>
    public bool SameArchitecture(MamoConfig other) => this with
    {
        TemperatureInit = other.TemperatureInit, TemperatureMin = other.TemperatureMin, TemperatureMax = other.TemperatureMax, WeightInit = other.WeightInit,
    } == other;

    internal static readonly JsonSerializerOptions Json = new() { WriteIndented = true };
    public string ToJson() => JsonSerializer.Serialize(this, Json);
    /// <summary>Reads config.json; the pre-training settings that older checkpoints kept there are ignored.</summary>
    public static MamoConfig FromJson(string json) => JsonSerializer.Deserialize<MamoConfig>(json) ?? throw new InvalidDataException("empty model config");
}

/// <summary>MAMO's pre-training objective: what is masked, how the momentum teacher follows and what it targets, and
/// the weight of each loss.</summary>
public sealed record PretrainingConfig
{
    public double ImageMaskRatio { get; init; } = 0.75;
    public double TextMaskRatio { get; init; } = 0.25;
    public double MomentumDecay { get; init; } = 0.995;
    /// <summary>MRM target: the average of the teacher's top-K fusion layers, each layer-normalised.</summary>
    public int MrmTopK { get; init; } = 2;
    /// <summary>ITC and ITM see only the visible patches (as in FLIP), so the student's image encoder runs once per step.</summary>
    public bool AlignOnVisiblePatches { get; init; } = true;
    /// <summary>ITM draws each hard negative among this many consecutive pairs of the batch (0: the whole batch).
    /// Every-step replicas draw them from their own batch, as ALBEF's GPUs do; a single process with the replica's batch
    /// size here makes the same step on the replicas' concatenated batch.</summary>
    public int ItmNegativeGroup { get; init; }
    public LossWeights Weights { get; init; } = new();
    /// <summary>ALBEF's momentum distillation (retrieval fine-tuning): ITC's targets are this share of the teacher's
    /// similarities and the rest the true pairs; 0 (pre-training): the true pairs alone.</summary>
    public double DistillAlpha { get; init; }

    /// <summary>The patches of a model's grid that the student sees.</summary>
    public int NumVisiblePatches(MamoConfig c) => Math.Max(1, c.NumPatches - (int)Math.Round(c.NumPatches * ImageMaskRatio));

    /// <summary>The settings that go with each model preset (the deeper fusion encoders average three layers).</summary>
    public static PretrainingConfig Preset(string name) => name switch
    {
        "tiny" or "minilm" => new(),
        "small" or "base" => new() { MrmTopK = 3 },
        _ => throw new ArgumentException($"unknown preset '{name}' ({string.Join(", ", MamoConfig.PresetNames)})"),
    };

    public void Validate(MamoConfig c)
    {
        void Require(bool ok, string message) { if (!ok) throw new ArgumentException(message); }
        Require(MrmTopK >= 1 && MrmTopK <= c.FusionLayers, $"mrm top-k {MrmTopK} must lie in 1..{c.FusionLayers}");
        Require(ImageMaskRatio is >= 0 and < 1, "image mask ratio must lie in [0, 1)");
        Require(DistillAlpha is >= 0 and < 1, "distillation alpha must lie in [0, 1)");
        Require(TextMaskRatio is >= 0 and < 1, "text mask ratio must lie in [0, 1)");
        Require(ImageMaskRatio > 0 || Weights.Mim == 0 && Weights.Mrm == 0, "MIM and MRM need an image mask ratio above 0");
        Require(TextMaskRatio > 0 || Weights.Mlm == 0 && Weights.Mrm == 0, "MLM and MRM need a text mask ratio above 0");
        Require(ItmNegativeGroup >= 0, "itm negative group must be >= 0 (0: the whole batch)");
        Require(MomentumDecay is >= 0 and <= 1, "momentum decay must lie in [0, 1]");
        Require(new[] { Weights.Itc, Weights.Itm, Weights.Mlm, Weights.Mim, Weights.Mrm }.All(w => w >= 0 && double.IsFinite(w)), "loss weights must be finite and >= 0");
        Require(Weights.Itc + Weights.Itm + Weights.Mlm + Weights.Mim + Weights.Mrm > 0, "at least one loss weight must be positive");
    }

    public string ToJson() => JsonSerializer.Serialize(this, MamoConfig.Json);
}
