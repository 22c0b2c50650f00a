using Xunit;
using static TorchSharp.torch;

namespace Mamo.Data.Tests;

public class CollatorTests
{
    private const int Size = 4;
    private const int TextLength = 5;

    [Fact]
    public void Batch_has_the_model_shapes_and_dtypes_and_keeps_values_in_order()
    {
        var samples = Enumerable.Range(0, 3).Select(i => new PreparedSample(
            $"s{i}",
            Enumerable.Range(0, 3 * Size * Size).Select(p => i * 1000f + p).ToArray(),
            [101, 7592 + i, 102, 0, 0],
            [1, 1, 1, 0, 0],
            new SourcePosition("m.jsonl", i))).ToList();

        using var batch = Collator.Collate(samples, Size);

        Assert.Equal([3L, 3, Size, Size], batch.Images.shape);
        Assert.Equal(ScalarType.Float32, batch.Images.dtype);
        Assert.Equal([3L, TextLength], batch.TokenIds.shape);
        Assert.Equal(ScalarType.Int64, batch.TokenIds.dtype);
        Assert.Equal(ScalarType.Int64, batch.AttentionMask.dtype);
        Assert.Equal(["s0", "s1", "s2"], batch.Ids);
        Assert.Equal([0L, 1, 2], batch.Positions.Select(p => p.Offset));
        // Sample 2, channel 1, row 3, column 2 is pixel index 1*16 + 3*4 + 2 = 30 of its array.
        Assert.Equal(2030f, batch.Images[2, 1, 3, 2].item<float>());
        Assert.Equal(7593L, batch.TokenIds[1, 1].item<long>());
        Assert.Equal(3L, batch.AttentionMask[2].sum().item<long>());
    }

    [Fact]
    public void Mismatched_sizes_are_refused()
    {
        var good = new PreparedSample("a", new float[3 * Size * Size], [1, 2], [1, 1], new SourcePosition("m", 0));
        Assert.Throws<ArgumentException>(() => Collator.Collate([good, good with { Pixels = new float[3] }], Size));
        Assert.Throws<ArgumentException>(() => Collator.Collate([good, good with { TokenIds = [1, 2, 3] }], Size));
        Assert.Throws<ArgumentException>(() => Collator.Collate([], Size));
    }
}
