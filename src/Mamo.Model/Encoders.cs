using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;
using static TorchSharp.torch.nn;

namespace Mamo.Model;

/// <summary>ViT image encoder that, given the visible patch indices, encodes only those patches (as in MAE).</summary>
public sealed class ImageEncoder : Module<Tensor, Tensor?, Tensor>
{
    readonly Conv2d patchEmbed;
    readonly Parameter clsToken, positionEmbedding, maskToken;
    readonly BlockStack blocks;
    readonly int numPatches;

    public ImageEncoder(MamoConfig c) : base(nameof(ImageEncoder))
    {
        numPatches = c.NumPatches;
        patchEmbed = Conv2d(3, c.Width, c.PatchSize, stride: c.PatchSize);
        clsToken = Parameter(init.trunc_normal_(empty(1, 1, c.Width), std: 0.02));
        positionEmbedding = Parameter(init.trunc_normal_(empty(1, 1 + numPatches, c.Width), std: 0.02));
        maskToken = Parameter(init.trunc_normal_(empty(1, 1, c.Width), std: 0.02));
        blocks = new BlockStack(c.ImageLayers, c.Width, c.Heads, c.MlpRatio, eps: c.ImageNormEps);
        RegisterComponents();
    }

    /// <param name="images">[B, 3, S, S]</param>
    /// <param name="visible">[B, Nv] indices of the patches to encode, or null for all N</param>
    /// <returns>[B, 1 + Nv, W] ([CLS] first)</returns>
    public override Tensor forward(Tensor images, Tensor? visible)
    {
        using var scope = NewDisposeScope();
        var patches = patchEmbed.forward(images);                                 // [B, W, Gh, Gw]
        var x = patches.flatten(2).transpose(1, 2);                               // [B, N, W]
        x = KeptScalars.Add(x, PatchPositions(patches.shape[2], patches.shape[3]));
        if (visible is not null)
            x = x.gather(1, visible.unsqueeze(-1).expand(-1, -1, x.shape[2]));   // [B, Nv, W]
        var cls = KeptScalars.Add(clsToken, positionEmbedding[.., ..1]).expand(x.shape[0], -1, -1);
        return blocks.forward(cat(new[] { cls, x }, 1), null).MoveToOuterDisposeScope();
    }

    /// <summary>[1, Gh * Gw, W] the patches' position embeddings for a grid of that size: the trained ones as they
    /// are, else resized bicubically as a 2-D grid, as ALBEF does to take images larger than it was trained on.</summary>
    public Tensor PatchPositions(long gh, long gw)
    {
        var trained = positionEmbedding[.., 1..];
        var g = (long)Math.Round(Math.Sqrt(numPatches));
        if (gh == g && gw == g) return trained;
        using var scope = NewDisposeScope();
        var w = trained.shape[2];
        var grid = trained.reshape(1, g, g, w).permute(0, 3, 1, 2);               // [1, W, G, G]
        var resized = functional.interpolate(grid, [gh, gw], mode: InterpolationMode.Bicubic, align_corners: false);
        return resized.permute(0, 2, 3, 1).reshape(1, gh * gw, w).MoveToOuterDisposeScope();
    }

    /// <summary>Puts the encoded visible patches back on the full grid; a masked patch becomes the learned
    /// [MASK] embedding plus its position embedding. [B, 1 + Nv, W] -> [B, 1 + N, W].</summary>
    public Tensor FillMasked(Tensor encoded, Tensor visible)
    {
        using var scope = NewDisposeScope();
        var (b, w) = (encoded.shape[0], encoded.shape[2]);
        var full = KeptScalars.Add(maskToken, positionEmbedding[.., 1..]).expand(b, numPatches, w);
        full = full.scatter(1, visible.unsqueeze(-1).expand(-1, -1, w), encoded[.., 1..]);
        return cat(new[] { encoded[.., ..1], full }, 1).MoveToOuterDisposeScope();
    }
}

/// <summary>BERT-style text encoder: word + position embeddings, normed, then transformer blocks. In the bert layout
/// (MamoConfig.TextLayout) it is BERT exactly: also token-type embeddings (every token type 0), BERT's 512 learned
/// positions of which a text uses the first, LayerNorm eps 1e-12 and post-LN blocks.</summary>
public sealed class TextEncoder : Module<Tensor, Tensor, Tensor>
{
    readonly Embedding wordEmbedding;
    readonly Parameter positionEmbedding;
    readonly Parameter? tokenTypeEmbedding;
    readonly LayerNorm embeddingNorm;
    readonly BlockStack blocks;

    public TextEncoder(MamoConfig c) : base(nameof(TextEncoder))
    {
        var bert = c.TextLayout == TextLayouts.Bert;
        wordEmbedding = Embedding(c.VocabSize, c.Width);
        init.normal_(wordEmbedding.weight!, std: 0.02);
        positionEmbedding = Parameter(init.trunc_normal_(empty(1, bert ? MamoConfig.BertPositions : c.MaxTextLength, c.Width), std: 0.02));
        if (bert) tokenTypeEmbedding = Parameter(init.trunc_normal_(empty(MamoConfig.BertTokenTypes, c.Width), std: 0.02));
        embeddingNorm = LayerNorm(c.Width, bert ? TextLayouts.BertEps : 1e-5);
        blocks = new BlockStack(c.TextLayers, c.Width, c.Heads, c.MlpRatio, c.TextLayout);
        RegisterComponents();
    }

    /// <summary>[V, W], shared with the MLM output layer.</summary>
    public Parameter WordEmbeddings => wordEmbedding.weight!;

    /// <param name="tokenIds">[B, L]</param>
    /// <param name="attentionMask">[B, L] of 1 (token) and 0 (padding)</param>
    /// <returns>[B, L, W] ([CLS] first)</returns>
    public override Tensor forward(Tensor tokenIds, Tensor attentionMask) => Forward(tokenIds, attentionMask, keepHidden: false).Output;

    /// <returns>Output [B, L, W]; Hidden, when asked for: the normed embeddings, then each block's output, as
    /// transformers' hidden_states</returns>
    public (Tensor Output, Tensor[] Hidden) Forward(Tensor tokenIds, Tensor attentionMask, bool keepHidden)
    {
        using var scope = NewDisposeScope();
        var l = tokenIds.shape[1];
        var x = KeptScalars.Add(wordEmbedding.forward(tokenIds), positionEmbedding[.., ..(int)l]);
        if (tokenTypeEmbedding is not null) x = KeptScalars.Add(x, tokenTypeEmbedding[0]);   // one segment: type 0, as BERT gives a single text
        x = embeddingNorm.forward(x);
        var bias = BlockStack.PaddingBias(attentionMask, x.dtype);
        var (output, hidden) = blocks.ForwardAll(x, bias, keepHidden);
        Tensor[] all = keepHidden ? [x, .. hidden] : [];
        foreach (var h in all) h.MoveToOuterDisposeScope();
        return (output.MoveToOuterDisposeScope(), all);
    }
}

/// <summary>Self-attention over the concatenated [image ; text] sequence, with a modality embedding per part,
/// so that both image and text positions get multimodal representations.</summary>
public sealed class FusionEncoder : Module<Tensor, Tensor, Tensor, Tensor>
{
    readonly Parameter modalityEmbedding;
    readonly BlockStack blocks;

    public FusionEncoder(MamoConfig c) : base(nameof(FusionEncoder))
    {
        modalityEmbedding = Parameter(init.trunc_normal_(empty(2, c.Width), std: 0.02));
        // As in ALBEF, the fusion layers continue the text encoder (an imported BERT's upper layers go here).
        blocks = new BlockStack(c.FusionLayers, c.Width, c.Heads, c.MlpRatio, c.TextLayout);
        RegisterComponents();
    }

    public override Tensor forward(Tensor image, Tensor text, Tensor textMask) => Forward(image, text, textMask, keepHidden: false).Output;

    public int Layers => blocks.Count;

    /// <summary>The self-attention of fusion layer <paramref name="layer"/> (0 is the first).</summary>
    public SelfAttention AttentionAt(int layer) => blocks.Blocks.ElementAt(layer).Attention;

    /// <param name="image">[B, Li, W]</param>
    /// <param name="text">[B, Lt, W]</param>
    /// <param name="textMask">[B, Lt] attention mask of the text</param>
    /// <returns>Output [B, Li + Lt, W]; Hidden: each layer's [B, Li + Lt, W] when asked for</returns>
    public (Tensor Output, Tensor[] Hidden) Forward(Tensor image, Tensor text, Tensor textMask, bool keepHidden)
    {
        using var scope = NewDisposeScope();
        var x = cat(new[] { image + modalityEmbedding[0], text + modalityEmbedding[1] }, 1);
        var imageMask = ones(image.shape[0], image.shape[1], textMask.dtype, textMask.device);
        var bias = BlockStack.PaddingBias(cat(new[] { imageMask, textMask }, 1), x.dtype);
        var (output, hidden) = blocks.ForwardAll(x, bias, keepHidden);
        output.MoveToOuterDisposeScope();
        foreach (var h in hidden) h.MoveToOuterDisposeScope();
        return (output, hidden);
    }
}
