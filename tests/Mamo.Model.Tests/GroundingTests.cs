using TorchSharp;
using static TorchSharp.torch;
using Xunit;

namespace Mamo.Model.Tests;

public class GroundingTests
{
    static readonly MamoConfig Tiny = MamoConfig.Tiny;

    [Fact]
    public void Grad_cam_puts_all_heat_on_the_one_patch_the_match_score_depends_on()
    {
        using var scope = NewDisposeScope();
        var model = MamoModel.Seeded(Tiny, 3);
        // At the first fusion layer, with no modality embedding and no qkv bias, a zero token has zero key and value:
        // only patch k carries anything, so the match score depends on no other patch, and their heat must be 0.
        var parameters = model.named_parameters().ToDictionary(p => p.name, p => p.parameter);
        using (no_grad())
        {
            parameters["fusion.modalityEmbedding"].zero_();
            parameters["fusion.blocks.blocks.0.attn.qkv.bias"].zero_();
        }
        var (_, ids, mask) = Pairs.Make(Tiny, 1, seed: 5);
        var n = Tiny.NumPatches;
        const int k = 37;
        var imageTokens = zeros(1, 1 + n, Tiny.Width);
        imageTokens[0, 1 + k] = randn(Tiny.Width, generator: new Generator(11));
        var textTokens = model.EncodeText(ids, mask);

        var heat = Grounding.PatchHeat(model, imageTokens, textTokens, mask, layer: 0)[0];
        Assert.Equal(k, heat.argmax().ToInt64());
        Assert.True(heat[k].ToDouble() > 0);
        Assert.Equal(0.0, cat([heat[..k], heat[(k + 1)..]]).abs().max().ToDouble());
    }

    [Fact]
    public void Grad_cam_reads_the_attention_of_the_models_own_forward_and_leaves_no_gradients()
    {
        using var scope = NewDisposeScope();
        var model = MamoModel.Seeded(Tiny, 4);
        var (images, ids, mask) = Pairs.Make(Tiny, 2, seed: 6);
        var (imageTokens, textTokens) = (model.EncodeImage(images), model.EncodeText(ids, mask));
        var fused = model.MatchLogits(imageTokens, textTokens, mask);
        var attention = model.Fusion.AttentionAt(1);
        attention.KeepAttention = true;
        var kept = model.MatchLogits(imageTokens, textTokens, mask);
        attention.KeepAttention = false;
        attention.Attention!.Dispose();
        Assert.True(fused.allclose(kept, rtol: 1e-5, atol: 1e-6), $"{fused.str()} vs {kept.str()}");

        var heat = Grounding.GradCam(model, images, ids, mask, layer: 0);
        Assert.Equal(new long[] { 2, Tiny.GridSize, Tiny.GridSize }, heat.shape);
        Assert.True(heat.min().ToDouble() >= 0 && heat.max().ToDouble() > 0);
        // The ITM head reads the fused [CLS] alone: after the last layer no text query reaches the score.
        Assert.Equal(0.0, Grounding.GradCam(model, images, ids, mask, layer: Tiny.FusionLayers - 1).abs().max().ToDouble());
        Assert.All(model.parameters(), p => Assert.Null(p.grad));
        Assert.Throws<ArgumentOutOfRangeException>(() => Grounding.GradCam(model, images, ids, mask, layer: Tiny.FusionLayers));
    }

    [Fact]
    public void Position_embeddings_are_the_trained_ones_at_the_trained_grid_and_resize_bicubically_for_larger_images()
    {
        using var scope = NewDisposeScope();
        var model = MamoModel.Seeded(Tiny, 5);
        var trained = model.named_parameters().Single(p => p.name == "image.positionEmbedding").parameter;
        var g = Tiny.GridSize;
        Assert.True(Pairs.Same(trained[.., 1..], model.Image.PatchPositions(g, g)));
        var (images, _, _) = Pairs.Make(Tiny, 2, seed: 7);
        var before = model.EncodeImage(images);
        // The same image at twice the size gives a twice as fine grid, and the model still runs.
        var larger = nn.functional.interpolate(images, [2L * Tiny.ImageSize, 2L * Tiny.ImageSize], mode: InterpolationMode.Nearest);
        Assert.Equal(new long[] { 2, 1 + 4 * Tiny.NumPatches, Tiny.Width }, model.EncodeImage(larger).shape);
        Assert.True(Pairs.Same(before, model.EncodeImage(images)));

        // Bicubic resizing keeps a constant embedding constant and matches torch's bicubic on the grid itself.
        var resized = model.Image.PatchPositions(2 * g, 2 * g);
        var grid = trained[.., 1..].reshape(1, g, g, Tiny.Width).permute(0, 3, 1, 2);
        var expected = nn.functional.interpolate(grid, [2L * g, 2L * g], mode: InterpolationMode.Bicubic, align_corners: false);
        Assert.True(Pairs.Same(expected.permute(0, 2, 3, 1).reshape(1, 4 * g * g, Tiny.Width), resized));
        Assert.Equal(new long[] { 1, Tiny.GridSize * 2, Tiny.GridSize * 2 },
            Grounding.GradCam(model, larger[..1], Pairs.Make(Tiny, 1, seed: 8).TokenIds, Pairs.Make(Tiny, 1, seed: 8).AttentionMask, 0).shape);
    }

    [Fact]
    public void Box_ranking_scores_heat_over_the_square_root_of_area_and_pointing_finds_the_peak()
    {
        using var scope = NewDisposeScope();
        var heat = zeros(10, 10);
        heat[2, 3] = tensor(5f);                        // one hot pixel at (x 3, y 2)
        heat[6..10, 6..10] = full(4, 4, 1f);            // a warm 4x4 square: sum 16
        var small = new Box(2, 1, 2, 2);                 // holds the hot pixel: 5 / 2 = 2.5
        var square = new Box(6, 6, 4, 4);                // 16 / 4 = 4
        var wide = new Box(0, 0, 10, 10);                // 21 / 10 = 2.1
        Assert.Equal(2.5, Grounding.BoxScore(heat, small), 6);
        Assert.Equal(4.0, Grounding.BoxScore(heat, square), 6);
        Assert.Equal(2.1, Grounding.BoxScore(heat, wide), 6);
        Assert.Equal(1, Grounding.BestBox(heat, [small, square, wide]));
        Assert.Equal((3, 2), Grounding.Peak(heat));
        Assert.True(Grounding.HasPeak(heat));
        // A flat map ranks no box first and has no peak: the proposals' order cannot make a hit.
        Assert.Equal(-1, Grounding.BestBox(zeros(10, 10), [small, square]));
        Assert.False(Grounding.HasPeak(zeros(10, 10)));
        Assert.True(small.Contains(3, 2));
        Assert.False(square.Contains(3, 2));
        Assert.False(new Box(6, 6, 4, 4).Contains(10, 6));   // right and bottom edges are outside
    }
}
