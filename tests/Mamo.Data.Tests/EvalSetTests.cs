using SkiaSharp;
using TorchSharp;
using static TorchSharp.torch;
using Xunit;

namespace Mamo.Data.Tests;

public class EvalSetTests(VocabFixture vocab) : IClassFixture<VocabFixture>
{
    private const int Size = 16, TextLength = 8;
    private static readonly ImageTransform Transform = new(new ImageTransformOptions(ImageSize: Size));

    private static string Manifest(TempFolder temp, params string[] lines)
    {
        var path = temp.File("eval.jsonl");
        File.WriteAllLines(path, lines);
        return path;
    }

    [Fact]
    public void Every_caption_points_at_its_image_and_bad_records_are_skipped()
    {
        using var temp = new TempFolder();
        File.WriteAllBytes(temp.File("red.png"), TestImages.SolidPng(4, 4, SKColors.Red));
        File.WriteAllBytes(temp.File("wide-blue.png"), TestImages.SolidPng(40, 20, SKColors.Blue));
        File.WriteAllBytes(temp.File("corrupt.png"), [0x89, (byte)'P', (byte)'N', (byte)'G', 1, 2, 3]);
        var manifest = Manifest(temp,
            """{"id": "r", "image": "red.png", "captions": ["a red square", "red"]}""",
            """{"id": "x", "image": "red.png", "caption": broken""",
            """{"id": "m", "image": "missing.png", "caption": "gone"}""",
            """{"id": "c", "image": "corrupt.png", "caption": "corrupt"}""",
            """{"id": "e", "image": "red.png", "captions": [" "]}""",
            """{"id": "b", "image": "wide-blue.png", "caption": "hello world"}""");

        using var set = EvalSet.Load(manifest, Transform, vocab.Tokenizer, TextLength);

        Assert.Equal(["r", "b"], set.ImageIds);
        Assert.Equal([0, 0, 1], set.TextToImage);
        Assert.Equal((2, 3), (set.ImageCount, set.TextCount));
        Assert.Equal(4, set.Bad.Count);
        Assert.Contains(set.Bad, b => b.Reason.StartsWith("UnrecognisedFormat") || b.Reason.StartsWith("Undecodable"));
        Assert.Equal(new long[] { 2, 3, Size, Size }, set.Images.shape);
        Assert.Equal(new long[] { 3, TextLength }, set.TokenIds.shape);
        Assert.Equal(new long[] { 3, TextLength }, set.AttentionMask.shape);
        Assert.Equal([101L, 7592, 2088, 102, 0, 0, 0, 0], set.TokenIds[2].data<long>().ToArray());
        Assert.Equal([1L, 1, 1, 1, 0, 0, 0, 0], set.AttentionMask[2].data<long>().ToArray());
        // Red in channel 0 of image 0, blue in channel 2 of image 1: (1 - mean) / std, CLIP normalisation.
        var mean = ImageTransformOptions.ClipMean;
        var std = ImageTransformOptions.ClipStd;
        Assert.Equal((1 - mean[0]) / std[0], set.Images[0, 0].mean().ToSingle(), 3);
        Assert.Equal((1 - mean[2]) / std[2], set.Images[1, 2].mean().ToSingle(), 3);
        Assert.Equal(-mean[0] / std[0], set.Images[1, 0].mean().ToSingle(), 3);
        // One PNG thumbnail per image, of the whole image (not the crop) scaled to fit the thumbnail size.
        var thumbnails = set.Thumbnails.Select(png => SKBitmap.Decode(png)).ToList();
        Assert.Equal([(48, 48), (48, 24)], thumbnails.Select(t => (t.Width, t.Height)));
        Assert.Equal([SKColors.Red, SKColors.Blue], thumbnails.Select(t => t.GetPixel(t.Width / 2, t.Height / 2)));
    }

    [Fact]
    public void The_tensors_outlive_the_dispose_scope_they_were_loaded_in()
    {
        using var temp = new TempFolder();
        File.WriteAllBytes(temp.File("red.png"), TestImages.SolidPng(4, 4, SKColors.Red));
        var manifest = Manifest(temp, """{"image": "red.png", "caption": "red"}""");
        EvalSet set;
        using (NewDisposeScope()) set = EvalSet.Load(manifest, Transform, vocab.Tokenizer, TextLength);
        using (set)
        {
            Assert.False(set.Images.IsInvalid);
            Assert.Equal(3 * Size * Size, set.Images.numel());
            Assert.Equal(101L, set.TokenIds[0, 0].item<long>());
        }
    }

    [Fact]
    public void An_empty_or_all_bad_set_is_a_clear_error()
    {
        using var temp = new TempFolder();
        var allBad = Manifest(temp, """{"image": "missing.png", "caption": "gone"}""");
        var error = Assert.Throws<InvalidDataException>(() => EvalSet.Load(allBad, Transform, vocab.Tokenizer, TextLength));
        Assert.Contains("no usable image-text pair", error.Message);
        Assert.Contains("missing or unreadable image file", error.Message);

        var empty = Manifest(temp);
        Assert.Contains("no records", Assert.Throws<InvalidDataException>(() => EvalSet.Load(empty, Transform, vocab.Tokenizer, TextLength)).Message);
        Assert.Throws<FileNotFoundException>(() => EvalSet.Load(temp.File("nope.jsonl"), Transform, vocab.Tokenizer, TextLength));
    }
}
