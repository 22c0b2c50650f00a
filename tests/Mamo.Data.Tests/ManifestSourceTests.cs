using System.Text;
using CsCheck;
using SkiaSharp;
using Xunit;

namespace Mamo.Data.Tests;

public class ManifestSourceTests
{
    [Fact]
    public void Every_kind_of_bad_line_is_reported_and_good_lines_still_come_through()
    {
        using var temp = new TempFolder();
        var data = Directory.CreateDirectory(temp.File("data")).FullName;
        File.WriteAllBytes(Path.Combine(data, "red.png"), TestImages.SolidPng(4, 4, SKColors.Red));
        Directory.CreateDirectory(Path.Combine(data, "sub"));
        File.WriteAllBytes(Path.Combine(data, "sub", "blue.png"), TestImages.SolidPng(4, 4, SKColors.Blue));
        File.WriteAllBytes(temp.File("outside.png"), TestImages.SolidPng(4, 4, SKColors.Green));
        var absoluteInside = Path.Combine(data, "sub", "blue.png");

        var lines = new List<byte[]>
        {
            Utf8("""{"id": "a", "image": "red.png", "captions": ["a red square", "red"]}"""),           // 1 good
            Utf8("""{"id": "b", "image": "red.png", "caption": broken"""),                                // 2 malformed JSON
            Utf8("""{"id": "c", "image": "nope.png", "caption": "missing"}"""),                           // 3 missing file
            Utf8("""{"id": "d", "image": "../outside.png", "caption": "escape"}"""),                      // 4 .. escape
            Utf8($$"""{"id": "e", "image": "{{temp.File("outside.png")}}", "caption": "absolute"}"""),   // 5 absolute outside
            Utf8("""{"id": "f", "image": "red.png", "captions": ["", "  "]}"""),                         // 6 empty captions
            Utf8("""{"id": "g", "image": "red.png", "caption": "bad """).Concat(new byte[] { 0xC3, 0x28 }).Concat(Utf8("\"}")).ToArray(),   // 7 invalid UTF-8
            Array.Empty<byte>(),                                                                           // 8 blank: skipped
            Utf8($$"""{"id": "h", "image": "{{absoluteInside}}", "caption": "absolute inside"}"""),      // 9 good
            Utf8("""{"id": 7, "image": "sub/../sub/blue.png", "caption": "blue"}"""),                     // 10 good, .. that stays inside
            Utf8("""{"id": "i", "image": "red.png"}"""),                                                  // 11 no captions
            Utf8("""["not", "an", "object"]"""),                                                          // 12 not an object
        };
        var manifest = Path.Combine(data, "manifest.jsonl");
        File.WriteAllBytes(manifest, lines.SelectMany(l => l.Append((byte)'\n')).ToArray());

        var (samples, bad) = ManifestSource.ReadAll(manifest);

        Assert.Equal(["a", "h", "7"], samples.Select(s => s.Id));
        Assert.Equal([0L, 8, 9], samples.Select(s => s.Position.Offset));
        Assert.Equal(["a red square", "red"], samples[0].Captions);
        Assert.Equal(File.ReadAllBytes(Path.Combine(data, "red.png")), samples[0].Image);

        var reasons = bad.ToDictionary(b => b.Position!.Offset + 1, b => b.Reason);
        Assert.Equal([2L, 3, 4, 5, 6, 7, 11, 12], reasons.Keys.Order());
        Assert.StartsWith("malformed JSON on line 2", reasons[2]);
        Assert.Contains("missing or unreadable image file", reasons[3]);
        Assert.Contains("escapes its root", reasons[4]);
        Assert.Contains("escapes its root", reasons[5]);
        Assert.Equal("empty captions", reasons[6]);
        Assert.Equal("invalid UTF-8", reasons[7]);
        Assert.Equal("empty captions", reasons[11]);
        Assert.Equal("line is not a JSON object", reasons[12]);
        Assert.All(bad, b => Assert.Equal($"{Path.GetFullPath(manifest)}:{b.Position!.Offset + 1}", b.Location));
    }

    [Fact]
    public void A_label_is_read_where_a_line_has_one_and_a_bad_one_is_a_dead_letter()
    {
        using var temp = new TempFolder();
        File.WriteAllBytes(temp.File("red.png"), TestImages.SolidPng(4, 4, SKColors.Red));
        var manifest = temp.File("labelled.jsonl");
        File.WriteAllLines(manifest,
        [
            """{"id": "a", "image": "red.png", "caption": "red", "label": "warm"}""",
            """{"id": "b", "image": "red.png", "caption": "red", "label": 3}""",
            """{"id": "c", "image": "red.png", "caption": "red"}""",
            """{"id": "d", "image": "red.png", "caption": "red", "label": ["warm"]}""",
        ]);
        var (samples, bad) = ManifestSource.ReadAll(manifest);
        Assert.Equal([("a", "warm"), ("b", "3"), ("c", null)], samples.Select(x => (x.Id, x.Label)));
        Assert.Contains("\"label\" must be a string or number", Assert.Single(bad).Reason);

        // Another field holds the label when named; null and blank are no label.
        File.WriteAllLines(manifest,
        [
            """{"id": "a", "image": "red.png", "caption": "red", "label": "warm", "subgroup": "face-smiling"}""",
            """{"id": "b", "image": "red.png", "caption": "red", "subgroup": null}""",
            """{"id": "c", "image": "red.png", "caption": "red", "subgroup": "  "}""",
            """{"id": "d", "image": "red.png", "caption": "red", "subgroup": {"x": 1}}""",
        ]);
        (samples, bad) = ManifestSource.ReadAll(manifest, labelField: "subgroup");
        Assert.Equal([("a", "face-smiling"), ("b", null), ("c", null)], samples.Select(x => (x.Id, x.Label)));
        Assert.Contains("\"subgroup\" must be a string or number", Assert.Single(bad).Reason);
    }

    [Fact]
    public void Reading_resumes_after_the_last_consumed_line()
    {
        using var temp = new TempFolder();
        File.WriteAllBytes(temp.File("x.png"), TestImages.SolidPng(2, 2, SKColors.Red));
        var manifest = temp.File("m.jsonl");
        File.WriteAllLines(manifest, Enumerable.Range(0, 5).Select(i => $$"""{"id": "s{{i}}", "image": "x.png", "caption": "c{{i}}"}"""));
        var source = new ManifestSource(manifest);

        var after = source.Read(new Dictionary<string, long> { [source.Name] = 2 }, CancellationToken.None)
            .OfType<SampleItem>().Select(s => s.Sample.Id);
        Assert.Equal(["s3", "s4"], after);

        var otherSourceOnly = source.Read(new Dictionary<string, long> { ["elsewhere"] = 3 }, CancellationToken.None);
        Assert.Equal(5, otherSourceOnly.Count());
    }

    [Fact]
    public void Oversized_lines_captions_and_images_are_refused_by_the_limits()
    {
        using var temp = new TempFolder();
        var png = TestImages.SolidPng(8, 8, SKColors.Red);
        File.WriteAllBytes(temp.File("x.png"), png);
        var manifest = temp.File("m.jsonl");
        File.WriteAllLines(manifest,
        [
            $$"""{"image": "x.png", "caption": "{{new string('a', 300)}}"}""",
            $$"""{"image": "x.png", "caption": "{{new string('b', 50)}}"}""",
        ]);
        var limits = new SourceLimits(MaxCaptionChars: 100, MaxLineBytes: 200, MaxImageBytes: png.Length - 1);
        var (samples, bad) = ManifestSource.ReadAll(manifest, limits);
        Assert.Empty(samples);
        Assert.Equal("line longer than 200 bytes", bad[0].Reason);
        Assert.Contains("exceeds the", bad[1].Reason);

        var (_, badCaption) = ManifestSource.ReadAll(manifest, limits with { MaxLineBytes = 1000, MaxImageBytes = png.Length });
        Assert.Equal("caption longer than 100 characters", badCaption[0].Reason);
    }

    [Fact]
    public void A_missing_manifest_is_one_dead_letter()
    {
        var item = Assert.Single(new ManifestSource("/nonexistent/manifest.jsonl").Read(null, CancellationToken.None));
        Assert.StartsWith("cannot open manifest", Assert.IsType<BadItem>(item).Bad.Reason);
    }

    [Fact]
    public void Random_lines_give_only_samples_or_dead_letters()
    {
        using var temp = new TempFolder();
        File.WriteAllBytes(temp.File("x.png"), TestImages.SolidPng(2, 2, SKColors.Red));
        var fragments = new[] { "{", "}", "\"image\"", "\"caption\"", "\"captions\"", ":", ",", "[", "]", "\"x.png\"", "\"../x.png\"", "\"a\"", "null", "1", "\\u0000", "\\ud800", "\"" };
        var line = Gen.OneOf(
            Gen.Byte.Array[0, 80],
            Gen.Int[0, fragments.Length - 1].Select(i => fragments[i]).Array[0, 12].Select(parts => Encoding.UTF8.GetBytes(string.Concat(parts))));
        var counter = 0;
        Gen.Select(line.Array[1, 6], lines => lines).Sample(lines =>
        {
            var manifest = temp.File($"fuzz-{Interlocked.Increment(ref counter)}.jsonl");
            File.WriteAllBytes(manifest, lines.SelectMany(l => l.Append((byte)'\n')).ToArray());
            foreach (var item in new ManifestSource(manifest).Read(null, CancellationToken.None))
                Assert.True(item is SampleItem or BadItem);
        }, iter: 500);
    }

    private static byte[] Utf8(string text) => Encoding.UTF8.GetBytes(text);
}
