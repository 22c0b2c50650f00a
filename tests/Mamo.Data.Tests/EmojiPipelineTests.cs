using System.Diagnostics;
using Mamo.Data.Datasets;
using Xunit;
using Xunit.Abstractions;

namespace Mamo.Data.Tests;

/// <summary>The whole preprocess path on the real emoji training set: read, decode, transform, tokenise, collate.</summary>
public class EmojiPipelineTests(VocabFixture vocab, ITestOutputHelper output) : IClassFixture<VocabFixture>
{
    private const int ImageSize = 64;
    private const int TextLength = 32;
    private const int BatchSize = 64;

    [Fact]
    public void Emoji_train_set_flows_through_preparation_into_batches_on_one_thread()
    {
        var emoji = BuiltinDatasets.Ensure(BuiltinDatasets.Emoji);
        var (samples, _) = ManifestSource.ReadAll(emoji.File(BuiltinDatasets.TrainSplit));
        var preparer = new SamplePreparer(new ImageTransform(new ImageTransformOptions(ImageSize)), vocab.Tokenizer, TextLength);
        var random = new Random(0);

        var clock = Stopwatch.StartNew();
        var prepared = 0;
        foreach (var chunk in samples.Chunk(BatchSize))
        {
            var batchSamples = new List<PreparedSample>();
            foreach (var sample in chunk)
            {
                Assert.True(preparer.TryPrepareForTraining(sample, random, out var ready, out var bad), bad?.Reason);
                batchSamples.Add(ready!);
            }
            using var batch = Collator.Collate(batchSamples, ImageSize);
            Assert.Equal([chunk.Length, 3L, ImageSize, ImageSize], batch.Images.shape);
            prepared += batch.Size;
        }
        clock.Stop();

        Assert.Equal(samples.Count, prepared);
        output.WriteLine($"{prepared} emoji prepared and collated in {clock.Elapsed.TotalSeconds:F2} s: {prepared / clock.Elapsed.TotalSeconds:F0} samples/s on one thread");
    }

    [Fact]
    public void Evaluation_preparation_encodes_every_caption()
    {
        var emoji = BuiltinDatasets.Ensure(BuiltinDatasets.Emoji);
        var (test, _) = ManifestSource.ReadAll(emoji.File(BuiltinDatasets.TestSplit));
        var preparer = new SamplePreparer(new ImageTransform(new ImageTransformOptions(ImageSize)), vocab.Tokenizer, TextLength);
        var pairs = Captions.ForEvaluation(test);
        Assert.Equal(test.Sum(s => s.Captions.Count), pairs.Count);

        Assert.True(preparer.TryPrepareForEvaluation(test[0], out var pixels, out var captions, out _));
        Assert.Equal(3 * ImageSize * ImageSize, pixels.Length);
        Assert.Equal(test[0].Captions.Count, captions.Count);
        Assert.All(captions, c => Assert.Equal(vocab.Tokenizer.ClsId, c.Ids[0]));
    }

    [Fact]
    public void Undecodable_images_become_dead_letters_with_their_position()
    {
        var preparer = new SamplePreparer(new ImageTransform(new ImageTransformOptions(ImageSize)), vocab.Tokenizer, TextLength);
        var broken = new ImageTextSample("x", "not an image"u8.ToArray(), ["caption"], new SourcePosition("m.jsonl", 4));
        Assert.False(preparer.TryPrepareForTraining(broken, new Random(0), out _, out var bad));
        Assert.StartsWith(nameof(DecodeErrorKind.UnrecognisedFormat), bad!.Reason);
        Assert.Equal(broken.Position, bad.Position);
    }
}
