using Mamo.Model;
using TorchSharp;
using Xunit;
using static TorchSharp.torch;
using F = TorchSharp.torch.nn.functional;

namespace Mamo.Model.Tests;

/// <summary>The bert text layout against BERT's forward pass written out from its definition (Devlin et al.; Hugging
/// Face's BertModel): embeddings = LN(word + position + token type 0), then per layer h = LN(x + attn(x)),
/// out = LN(h + W2 gelu_erf(W1 h)), LayerNorm eps 1e-12, no final norm.</summary>
public class TextLayoutTests
{
    [Fact]
    public void The_bert_layout_computes_berts_forward_pass()
    {
        using var scope = NewDisposeScope();
        var c = MamoConfig.Tiny with { TextLayout = TextLayouts.Bert, TextLayers = 2, Heads = 4, Width = 64 };
        using var encoder = Seeds.FromGlobal(3, () => new TextEncoder(c));
        encoder.eval();
        var g = new Generator(4);
        foreach (var (name, p) in encoder.named_parameters())
            if (name.Contains("Norm") || name.Contains("ln"))
                using (no_grad()) p.add_(randn(p.shape, generator: g) * 0.1);   // LayerNorms that are not the identity
        var ids = tensor(new long[,] { { 101, 2023, 2003, 1037, 102, 0 }, { 101, 7592, 102, 0, 0, 0 } });
        var mask = ids.ne(0).to(int64);
        using var noGrad = no_grad();
        var actual = encoder.forward(ids, mask);

        var w = encoder.state_dict();
        Tensor P(string name) => w.TryGetValue(name, out var t) ? t : throw new KeyNotFoundException($"{name} not in [{string.Join(", ", w.Keys)}]");
        Tensor Ln(Tensor x, string prefix) => F.layer_norm(x, [c.Width], P(prefix + ".weight"), P(prefix + ".bias"), 1e-12);
        var l = ids.shape[1];
        var x = Ln(P("wordEmbedding.weight")[ids] + P("positionEmbedding")[0, ..(int)l] + P("tokenTypeEmbedding")[0], "embeddingNorm");
        var keyBias = zeros(2, 1, 1, l).masked_fill(mask.eq(0).view(2, 1, 1, l), float.NegativeInfinity);
        int heads = c.Heads, d = c.Width / c.Heads;
        for (var layer = 0; layer < c.TextLayers; layer++)
        {
            var b = $"blocks.blocks.{layer}";
            var qkv = F.linear(x, P($"{b}.attn.qkv.weight"), P($"{b}.attn.qkv.bias")).view(2, l, 3, heads, d);
            Tensor Head(int i) => qkv[.., .., i].transpose(1, 2);                       // [B, H, L, D]
            var attention = F.softmax(Head(0).matmul(Head(1).transpose(-2, -1)) / Math.Sqrt(d) + keyBias, -1);
            var context = attention.matmul(Head(2)).transpose(1, 2).reshape(2, l, c.Width);
            var h = Ln(x + F.linear(context, P($"{b}.attn.proj.weight"), P($"{b}.attn.proj.bias")), $"{b}.ln1");
            var ffn = F.linear(F.gelu(F.linear(h, P($"{b}.mlp.fc.weight"), P($"{b}.mlp.fc.bias"))), P($"{b}.mlp.proj.weight"), P($"{b}.mlp.proj.bias"));
            x = Ln(h + ffn, $"{b}.ln2");
        }
        Assert.True(actual.allclose(x, rtol: 0, atol: 1e-5), $"max |diff| {(actual - x).abs().max().ToDouble()}");
        Assert.DoesNotContain(w.Keys, k => k.Contains("lnFinal"));   // BERT has no final norm
    }

    [Fact]
    public void The_minilm_preset_has_all_MiniLM_L6_v2s_text_shapes_and_old_configs_read_as_pre_ln()
    {
        using var scope = NewDisposeScope();
        using var encoder = Seeds.FromGlobal(0, () => new TextEncoder(MamoConfig.MiniLm));
        var w = encoder.state_dict();
        Assert.Equal([30522L, 384], w["wordEmbedding.weight"].shape);
        Assert.Equal([1L, 512, 384], w["positionEmbedding"].shape);
        Assert.Equal([2L, 384], w["tokenTypeEmbedding"].shape);
        Assert.Equal(6, w.Keys.Count(k => k.EndsWith(".attn.qkv.weight")));
        Assert.Equal([3L * 384, 384], w["blocks.blocks.0.attn.qkv.weight"].shape);
        Assert.Equal([1536L, 384], w["blocks.blocks.0.mlp.fc.weight"].shape);
        MamoConfig.MiniLm.Validate();
        Assert.Equal(MamoConfig.MiniLm, MamoConfig.FromJson(MamoConfig.MiniLm.ToJson()));
        var written = MamoConfig.Tiny.ToJson().Replace("\"TextLayout\": \"pre-ln\",", "");
        Assert.DoesNotContain("TextLayout", written);
        var old = MamoConfig.FromJson(written);
        Assert.Equal(TextLayouts.PreLn, old.TextLayout);
        Assert.Throws<ArgumentException>(() => (MamoConfig.Tiny with { TextLayout = "post-ln" }).Validate());
    }
}
