using SkiaSharp;
using Xunit;

namespace Mamo.Data.Tests;

/// <summary>The grounding manifest: a good line reads back, and every kind of bad line is an error naming its line.</summary>
public class GroundingSetTests
{
    static string Manifest(TempFolder folder, params string[] lines)
    {
        File.WriteAllBytes(folder.File("canvas.png"), TestImages.SolidPng(100, 80, SKColors.White));
        var path = folder.File("grounding.jsonl");
        File.WriteAllLines(path, lines);
        return path;
    }

    const string Good = """{"id": "c1", "image": "canvas.png", "caption": "a red heart", "boxes": [{"x": 10, "y": 5, "w": 30, "h": 30, "target": false}, {"x": 50, "y": 40, "w": 50, "h": 40, "target": true}]}""";

    [Fact]
    public void A_good_line_reads_back_with_its_boxes_target_and_image_size_and_writes_the_same_line()
    {
        using var folder = new TempFolder();
        var canvas = Assert.Single(GroundingSet.Read(Manifest(folder, Good, "")));
        Assert.Equal(("c1", "a red heart", 100, 80), (canvas.Id, canvas.Caption, canvas.Width, canvas.Height));
        Assert.Equal([new GroundingBox(10, 5, 30, 30, false), new GroundingBox(50, 40, 50, 40, true)], canvas.Boxes);
        Assert.Equal(new GroundingBox(50, 40, 50, 40, true), canvas.Target);
        File.WriteAllText(folder.File("again.jsonl"), GroundingSet.Line(canvas, folder.Path) + "\n");
        Assert.Equal(canvas.Boxes, Assert.Single(GroundingSet.Read(folder.File("again.jsonl"))).Boxes);
    }

    [Theory]
    [InlineData("""{"image": "canvas.png", "caption": "x", "boxes": [{"x": 0, "y": 0, "w": 0, "h": 5, "target": true}]}""", "width and height must be positive")]
    [InlineData("""{"image": "canvas.png", "caption": "x", "boxes": [{"x": -1, "y": 0, "w": 5, "h": 5, "target": true}]}""", "must not be negative")]
    [InlineData("""{"image": "canvas.png", "caption": "x", "boxes": [{"x": 90, "y": 0, "w": 20, "h": 5, "target": true}]}""", "leaves the 100x80 image")]
    [InlineData("""{"image": "canvas.png", "caption": "x", "boxes": [{"x": 0, "y": 0, "w": 5, "h": 5, "target": false}]}""", "exactly one box must be the target, found 0")]
    [InlineData("""{"image": "canvas.png", "caption": "x", "boxes": [{"x": 0, "y": 0, "w": 5, "h": 5, "target": true}, {"x": 9, "y": 9, "w": 5, "h": 5, "target": true}]}""", "found 2")]
    [InlineData("""{"image": "canvas.png", "caption": "x", "boxes": [{"x": 1.5, "y": 0, "w": 5, "h": 5, "target": true}]}""", "\"x\" must be an integer")]
    [InlineData("""{"image": "canvas.png", "caption": "x", "boxes": [{"x": 0, "y": 0, "w": 5, "h": 5}]}""", "\"target\" must be true or false")]
    [InlineData("""{"image": "canvas.png", "caption": "x", "boxes": {"x": 0}}""", "\"boxes\" must be an array")]
    [InlineData("""{"image": "canvas.png", "boxes": []}""", "\"caption\" must be a non-empty string")]
    [InlineData("""{"image": "../outside.png", "caption": "x", "boxes": [{"x": 0, "y": 0, "w": 5, "h": 5, "target": true}]}""", "escapes its root")]
    [InlineData("""{"image": "missing.png", "caption": "x", "boxes": [{"x": 0, "y": 0, "w": 5, "h": 5, "target": true}]}""", "image not found")]
    [InlineData("""{"image": "grounding.jsonl", "caption": "x", "boxes": [{"x": 0, "y": 0, "w": 5, "h": 5, "target": true}]}""", "not a PNG")]
    [InlineData("""[1, 2]""", "must be a JSON object")]
    [InlineData("""{"image": "canvas.png", "caption": "x", """, "grounding.jsonl:2")]
    public void A_bad_line_is_an_error_that_names_the_line_and_what_is_wrong(string bad, string expected)
    {
        using var folder = new TempFolder();
        var e = Assert.Throws<InvalidDataException>(() => GroundingSet.Read(Manifest(folder, Good, bad)));
        Assert.Contains(expected, e.Message);
        Assert.Contains("grounding.jsonl:2", e.Message);
    }

    [Fact]
    public void An_empty_or_missing_manifest_is_an_error()
    {
        using var folder = new TempFolder();
        Assert.Contains("holds no canvas", Assert.Throws<InvalidDataException>(() => GroundingSet.Read(Manifest(folder, "", " "))).Message);
        Assert.Throws<FileNotFoundException>(() => GroundingSet.Read(folder.File("none.jsonl")));
    }

    [Fact]
    public void Fuzzed_lines_give_a_canvas_or_an_invalid_data_error_never_another_exception()
    {
        using var folder = new TempFolder();
        var manifest = Manifest(folder, Good);
        var random = new Random(7);
        int read = 0, refused = 0;
        for (var i = 0; i < 2000; i++)
        {
            var chars = Good.ToCharArray();
            for (var m = random.Next(1, 4); m > 0; m--) chars[random.Next(chars.Length)] = "{}[]\":,0123456789-.tfxyz \\"[random.Next(26)];
            File.WriteAllText(manifest, new string(chars));
            try { GroundingSet.Read(manifest); read++; }
            catch (InvalidDataException) { refused++; }
        }
        Assert.True(read > 0 && refused > 0, $"{read} read, {refused} refused");   // the fuzz reached both outcomes
    }
}
