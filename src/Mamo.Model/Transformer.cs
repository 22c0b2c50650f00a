using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;
using static TorchSharp.torch.nn;

namespace Mamo.Model;

/// <summary>Multi-head self-attention on [B, L, W] through the fused scaled-dot-product kernel.</summary>
public sealed class SelfAttention : Module<Tensor, Tensor?, Tensor>
{
    readonly Linear qkv, proj;
    readonly int heads;

    /// <summary>The output projection, which adds to the residual stream.</summary>
    public Linear Projection => proj;

    /// <summary>When set, forward computes the attention explicitly and keeps it in <see cref="Attention"/>, part of
    /// the autograd graph (Grad-CAM reads its gradient); else it runs the fused kernel.</summary>
    public bool KeepAttention { get; set; }

    /// <summary>[B, H, L, L] the softmax attention of the last forward with <see cref="KeepAttention"/>; the caller
    /// owns it.</summary>
    public Tensor? Attention { get; private set; }

    public SelfAttention(int width, int heads) : base(nameof(SelfAttention))
    {
        this.heads = heads;
        qkv = Linear(width, 3 * width);
        proj = Linear(width, width);
        RegisterComponents();
    }

    /// <param name="x">[B, L, W]</param>
    /// <param name="bias">additive key mask [B, 1, 1, L] (0 or -inf), or null</param>
    public override Tensor forward(Tensor x, Tensor? bias)
    {
        using var scope = NewDisposeScope();
        var (b, l, w) = (x.shape[0], x.shape[1], x.shape[2]);
        var qkvs = qkv.forward(x).view(b, l, 3, heads, w / heads).permute(2, 0, 3, 1, 4); // [3, B, H, L, D]
        Tensor y;
        if (KeepAttention)
        {
            var scores = qkvs[0].matmul(qkvs[1].transpose(-2, -1)) / Math.Sqrt(w / heads);
            var attention = functional.softmax(bias is null ? scores : scores + bias, -1);    // [B, H, L, L]
            y = attention.matmul(qkvs[2]);
            Attention?.Dispose();
            Attention = attention.DetachFromDisposeScope();   // outlives every scope of the forward
        }
        else y = functional.scaled_dot_product_attention(qkvs[0], qkvs[1], qkvs[2], bias); // [B, H, L, D]
        return proj.forward(y.transpose(1, 2).reshape(b, l, w)).MoveToOuterDisposeScope();
    }
}

/// <summary>The feed-forward network of a block: fc, GELU, proj (nanoGPT's MLP).</summary>
public sealed class Mlp : Module<Tensor, Tensor>
{
    readonly Linear fc, proj;

    /// <summary>The output projection, which adds to the residual stream.</summary>
    public Linear Projection => proj;

    public Mlp(int width, int hidden) : base(nameof(Mlp))
    {
        fc = Linear(width, hidden);
        proj = Linear(hidden, width);
        RegisterComponents();
    }

    public override Tensor forward(Tensor x)
    {
        using var scope = NewDisposeScope();
        return proj.forward(functional.gelu(fc.forward(x))).MoveToOuterDisposeScope();
    }
}

/// <summary>How a block stack places its LayerNorms: pre-LN as nanoGPT and ViT (x + f(ln(x)), one final norm), or
/// post-LN as BERT (ln(x + f(x)), eps 1e-12, no final norm), so that imported BERT weights mean what they meant.</summary>
public static class TextLayouts
{
    public const string PreLn = "pre-ln", Bert = "bert";
    /// <summary>BERT's LayerNorm epsilon; pre-LN keeps TorchSharp's 1e-5.</summary>
    public const double BertEps = 1e-12;
}

/// <summary>Transformer block. Pre-LN: x + attn(ln(x)), then x + mlp(ln(x)). Post-LN (BERT): ln(x + attn(x)), then
/// ln(x + mlp(x)).</summary>
public sealed class Block : Module<Tensor, Tensor?, Tensor>
{
    readonly LayerNorm ln1, ln2;
    readonly SelfAttention attn;
    readonly Mlp mlp;
    readonly bool postLn;

    /// <param name="eps">the LayerNorms' epsilon (TorchSharp's 1e-5 unless given; timm's ViTs use 1e-6)</param>
    public Block(int width, int heads, int mlpRatio, bool postLn = false, double? eps = null) : base(nameof(Block))
    {
        this.postLn = postLn;
        eps ??= postLn ? TextLayouts.BertEps : 1e-5;
        ln1 = LayerNorm(width, eps.Value);
        attn = new SelfAttention(width, heads);
        ln2 = LayerNorm(width, eps.Value);
        mlp = new Mlp(width, mlpRatio * width);
        RegisterComponents();
    }

    public SelfAttention Attention => attn;

    /// <summary>The two projections that add to the residual stream.</summary>
    public IEnumerable<Linear> ResidualProjections => [attn.Projection, mlp.Projection];

    public override Tensor forward(Tensor x, Tensor? bias)
    {
        using var scope = NewDisposeScope();
        if (postLn)
        {
            x = ln1.forward(KeptScalars.Add(x, attn.forward(x, bias)));
            x = ln2.forward(KeptScalars.Add(x, mlp.forward(x)));
        }
        else
        {
            x = KeptScalars.Add(x, attn.forward(ln1.forward(x), bias));
            x = KeptScalars.Add(x, mlp.forward(ln2.forward(x)));
        }
        return x.MoveToOuterDisposeScope();
    }
}

/// <summary>A stack of blocks that can hand back every layer's hidden state.</summary>
public sealed class BlockStack : Module<Tensor, Tensor?, Tensor>
{
    readonly ModuleList<Block> blocks;
    readonly LayerNorm? lnFinal;

    /// <param name="layout">TextLayouts.PreLn (a final norm after the blocks) or TextLayouts.Bert (post-LN blocks, none)</param>
    /// <param name="eps">every LayerNorm's epsilon, if not the layout's</param>
    public BlockStack(int layers, int width, int heads, int mlpRatio, string layout = TextLayouts.PreLn, double? eps = null) : base(nameof(BlockStack))
    {
        var postLn = layout == TextLayouts.Bert;
        blocks = new ModuleList<Block>(Enumerable.Range(0, layers).Select(_ => new Block(width, heads, mlpRatio, postLn, eps)).ToArray());
        lnFinal = postLn ? null : LayerNorm(width, eps ?? 1e-5);
        RegisterComponents();
    }

    public int Count => blocks.Count;

    public IEnumerable<Block> Blocks => blocks;

    public override Tensor forward(Tensor x, Tensor? bias) => ForwardAll(x, bias, keepHidden: false).Output;

    /// <summary>Runs every block; Hidden holds each block's output (before the final norm, if any) when asked for.</summary>
    public (Tensor Output, Tensor[] Hidden) ForwardAll(Tensor x, Tensor? bias, bool keepHidden)
    {
        using var scope = NewDisposeScope();
        var hidden = new List<Tensor>();
        foreach (var block in blocks)
        {
            x = block.forward(x, bias);
            if (keepHidden) hidden.Add(x);
        }
        var output = lnFinal is null ? x.alias() : lnFinal.forward(x);
        output.MoveToOuterDisposeScope();
        foreach (var h in hidden) h.MoveToOuterDisposeScope();
        return (output, hidden.ToArray());
    }

    /// <summary>Additive key-padding bias [B, 1, 1, L] from an attention mask [B, L] of 1 (keep) and 0 (pad).</summary>
    public static Tensor PaddingBias(Tensor attentionMask, ScalarType dtype)
    {
        using var scope = NewDisposeScope();
        var bias = zeros(attentionMask.shape, dtype, attentionMask.device)
            .masked_fill(attentionMask.eq(0), float.NegativeInfinity);
        return bias.unsqueeze(1).unsqueeze(1).MoveToOuterDisposeScope();
    }
}
