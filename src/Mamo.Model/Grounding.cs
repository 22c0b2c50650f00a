using TorchSharp;
using static TorchSharp.torch;
using F = TorchSharp.torch.nn.functional;

namespace Mamo.Model;

/// <summary>A box on an image, in pixels: a phrase's region, or a proposal.</summary>
public readonly record struct Box(int X, int Y, int W, int H)
{
    public bool Contains(int x, int y) => x >= X && x < X + W && y >= Y && y < Y + H;
}

/// <summary>Weakly supervised grounding, ALBEF's way: Grad-CAM of the ITM match score on the attention of one fusion
/// layer. Here the fusion encoder is self-attention over [image ; text], so the map is the text queries' attention to
/// the image patches' keys, times its gradient clamped at 0, averaged over heads and over the text tokens that are not
/// padding.</summary>
public static class Grounding
{
    /// <summary>[B, Gh, Gw] the heat over each image's patch grid for its text.</summary>
    /// <param name="images">[B, 3, S, S], any multiple of the patch size (the position embeddings are resized)</param>
    /// <param name="layer">fusion layer, 0 is the first</param>
    public static Tensor GradCam(MamoModel model, Tensor images, Tensor tokenIds, Tensor attentionMask, int layer)
    {
        using var scope = NewDisposeScope();
        var grid = images.shape[2] / model.Config.PatchSize;
        using var grad = enable_grad();
        var imageTokens = model.EncodeImage(images);
        return PatchHeat(model, imageTokens, model.EncodeText(tokenIds, attentionMask), attentionMask, layer)
            .view(images.shape[0], grid, images.shape[3] / model.Config.PatchSize).MoveToOuterDisposeScope();
    }

    /// <summary>[B, N] the heat over the N patches of encoded pairs: imageTokens [B, 1 + N, W], textTokens [B, L, W].</summary>
    public static Tensor PatchHeat(MamoModel model, Tensor imageTokens, Tensor textTokens, Tensor attentionMask, int layer)
    {
        if (layer < 0 || layer >= model.Fusion.Layers)
            throw new ArgumentOutOfRangeException(nameof(layer), $"fusion layer {layer} does not exist: the model has layers 0 to {model.Fusion.Layers - 1}");
        using var scope = NewDisposeScope();
        using var grad = enable_grad();
        var attention = model.Fusion.AttentionAt(layer);
        attention.KeepAttention = true;
        Tensor map;
        try
        {
            var match = model.MatchLogits(imageTokens, textTokens, attentionMask)[.., 1].sum();
            map = attention.Attention!;
            var gradient = autograd.grad([match], [map])[0];
            map = map.detach() * gradient.clamp_min(0);
        }
        finally
        {
            attention.KeepAttention = false;
            attention.Attention?.Dispose();
        }
        var li = imageTokens.shape[1];
        var textToPatches = map.mean([1])[.., (int)li.., 1..(int)li];                  // [B, L, N]
        var words = attentionMask.to_type(textToPatches.dtype).unsqueeze(-1);           // [B, L, 1]
        return ((textToPatches * words).sum(1) / words.sum(1)).MoveToOuterDisposeScope();
    }

    /// <summary>[B, H, W] the grid's heat resized to the image's pixels (bilinear).</summary>
    public static Tensor Upsample(Tensor heat, int height, int width)
    {
        using var scope = NewDisposeScope();
        return F.interpolate(heat.unsqueeze(1), [height, width], mode: InterpolationMode.Bilinear, align_corners: false)
            .squeeze(1).MoveToOuterDisposeScope();
    }

    /// <summary>The pixel (x, y) of the heat's maximum, the first in row order on a tie. heat: [H, W].</summary>
    public static (int X, int Y) Peak(Tensor heat)
    {
        var index = heat.flatten().argmax().ToInt64();
        return ((int)(index % heat.shape[1]), (int)(index / heat.shape[1]));
    }

    /// <summary>ALBEF's box score: the heat inside the box over the square root of its area. heat: [H, W].</summary>
    public static double BoxScore(Tensor heat, Box box)
    {
        using var scope = NewDisposeScope();
        return heat[box.Y..(box.Y + box.H), box.X..(box.X + box.W)].sum().ToDouble() / Math.Sqrt((double)box.W * box.H);
    }

    /// <summary>Whether the heat has a maximum at all: a flat map (all 0, say) points nowhere.</summary>
    public static bool HasPeak(Tensor heat) => heat.max().ToDouble() > heat.min().ToDouble();

    /// <summary>The index of the best-scoring proposal, or -1 when two or more share the best score: a tie picks none,
    /// so that the order of the proposals cannot score a hit.</summary>
    public static int BestBox(Tensor heat, IReadOnlyList<Box> proposals)
    {
        if (proposals.Count == 0) throw new ArgumentException("no proposals", nameof(proposals));
        var scores = proposals.Select(b => BoxScore(heat, b)).ToList();
        var best = scores.Max();
        return scores.Count(s => s == best) == 1 ? scores.IndexOf(best) : -1;
    }
}
