using static TorchSharp.torch;

namespace Mamo.Model.Tests;

/// <summary>Synthetic image-text pairs at the tiny preset's shapes: distinct random images and captions.</summary>
static class Pairs
{
    public static (Tensor Images, Tensor TokenIds, Tensor AttentionMask) Make(MamoConfig c, int batch, int seed, int? textLength = null)
    {
        var rng = new Random(seed);
        var images = new float[batch * 3 * c.ImageSize * c.ImageSize];
        for (int i = 0; i < images.Length; i++) images[i] = (float)(rng.NextDouble() * 2 - 1);
        int l = c.MaxTextLength;
        var ids = new long[batch * l];
        var mask = new long[batch * l];
        for (int b = 0; b < batch; b++)
        {
            int words = textLength ?? rng.Next(3, l - 2);
            ids[b * l] = c.ClsTokenId;
            for (int t = 1; t <= words; t++) ids[b * l + t] = rng.Next(1000, c.VocabSize);
            ids[b * l + words + 1] = c.SepTokenId;
            for (int t = 0; t < words + 2; t++) mask[b * l + t] = 1;
        }
        return (tensor(images, new long[] { batch, 3, c.ImageSize, c.ImageSize }),
                tensor(ids, new long[] { batch, l }), tensor(mask, new long[] { batch, l }));
    }

    /// <summary>Bitwise equality of two tensors of the same shape.</summary>
    public static bool Same(Tensor a, Tensor b) => a.shape.SequenceEqual(b.shape) && a.eq(b).all().item<bool>();
}
