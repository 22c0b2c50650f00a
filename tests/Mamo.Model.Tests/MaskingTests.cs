using TorchSharp;
using static TorchSharp.torch;
using Xunit;

using static Mamo.Model.Tests.Pairs;
namespace Mamo.Model.Tests;

public class MaskingTests
{
    static readonly MamoConfig Tiny = MamoConfig.Tiny;
    static readonly PretrainingConfig Pretraining = new();

    [Fact]
    public void Masks_the_configured_share_of_patches_and_tokens()
    {
        using var scope = NewDisposeScope();
        var (_, ids, attn) = Pairs.Make(Tiny, 16, seed: 10);
        using var mask = JointMasking.Sample(Tiny, Pretraining, ids, attn, seed: 10);
        Assert.Equal(Tiny.NumPatches / 4, mask.Visible.shape[1]);            // 75% of patches masked
        Assert.Equal(Tiny.NumPatches * 3 / 4, mask.Masked.shape[1]);
        var visible = mask.Visible.data<long>().ToArray();
        var masked = mask.Masked.data<long>().ToArray();
        for (int b = 0; b < 16; b++)
        {
            var all = visible.Skip(b * 16).Take(16).Concat(masked.Skip(b * 48).Take(48)).Order();
            Assert.Equal(Enumerable.Range(0, Tiny.NumPatches).Select(i => (long)i), all);   // a partition of the grid
        }
        var lengths = attn.sum(1).data<long>().ToArray();
        var positions = mask.MaskedTokenPositions.data<long>().ToArray();
        for (int b = 0; b < 16; b++)
        {
            long words = lengths[b] - 2;
            var expected = Math.Max(1, (int)Math.Round(words * Pretraining.TextMaskRatio));
            Assert.Equal(expected, positions.Count(p => p / Tiny.MaxTextLength == b));
        }
    }

    [Fact]
    public void Special_and_padding_tokens_are_never_masked()
    {
        using var scope = NewDisposeScope();
        var (_, ids, attn) = Pairs.Make(Tiny, 64, seed: 11);
        using var mask = JointMasking.Sample(Tiny, Pretraining, ids, attn, seed: 11);
        var flatIds = ids.data<long>().ToArray();
        var flatAttn = attn.data<long>().ToArray();
        foreach (var p in mask.MaskedTokenPositions.data<long>().ToArray())
        {
            Assert.NotEqual(Tiny.ClsTokenId, flatIds[p]);
            Assert.NotEqual(Tiny.SepTokenId, flatIds[p]);
            Assert.Equal(1, flatAttn[p]);
        }
        // Untouched positions keep their token.
        var maskedIds = mask.MaskedTokenIds.data<long>().ToArray();
        var chosen = mask.MaskedTokenPositions.data<long>().ToArray().ToHashSet();
        for (int i = 0; i < flatIds.Length; i++)
            if (!chosen.Contains(i)) Assert.Equal(flatIds[i], maskedIds[i]);
    }

    [Fact]
    public void Text_masking_follows_bert_80_10_10()
    {
        using var scope = NewDisposeScope();
        var (_, ids, attn) = Pairs.Make(Tiny, 2048, seed: 12);
        using var mask = JointMasking.Sample(Tiny, Pretraining, ids, attn, seed: 12);
        var original = mask.MaskedTokenLabels.data<long>().ToArray();
        var maskedIds = mask.MaskedTokenIds.data<long>().ToArray();
        var positions = mask.MaskedTokenPositions.data<long>().ToArray();
        int total = positions.Length, toMask = 0, kept = 0;
        for (int i = 0; i < total; i++)
        {
            var now = maskedIds[positions[i]];
            if (now == Tiny.MaskTokenId) toMask++;
            else if (now == original[i]) kept++;
        }
        int random = total - toMask - kept;
        Assert.True(total > 2000);
        // Binomial standard deviations at n > 2000 are under 1 percentage point; allow 3.
        Assert.InRange(toMask / (double)total, 0.77, 0.83);
        Assert.InRange(kept / (double)total, 0.07, 0.13);
        Assert.InRange(random / (double)total, 0.07, 0.13);
    }

    [Fact]
    public void A_seed_reproduces_the_same_masks_and_another_seed_does_not()
    {
        using var scope = NewDisposeScope();
        var (_, ids, attn) = Pairs.Make(Tiny, 8, seed: 13);
        using var a = JointMasking.Sample(Tiny, Pretraining, ids, attn, seed: 42);
        using var b = JointMasking.Sample(Tiny, Pretraining, ids, attn, seed: 42);
        using var c = JointMasking.Sample(Tiny, Pretraining, ids, attn, seed: 43);
        Assert.True(Same(a.Visible, b.Visible));
        Assert.True(Same(a.MaskedTokenIds, b.MaskedTokenIds));
        Assert.True(Same(a.MaskedTokenPositions, b.MaskedTokenPositions));
        Assert.False(Same(a.Visible, c.Visible));
    }
}
