using System.Text.Json;
using SkiaSharp;

namespace Mamo.Data.Datasets;

/// <summary>
/// Builds emoji-grounding from emoji-labels: canvases of 2–4 emoji of one style, seeded and non-overlapping on white,
/// each with a caption (the target's name) and every emoji's box. The benchmark splits use test emoji only: easy, where
/// the distractors are of other groups, and hard, where they share the target's subgroup. train (every training emoji
/// once per style, for weakly supervised tuning, which never reads the boxes) and val (for choosing the Grad-CAM layer)
/// use training emoji only.
/// </summary>
public static class GroundingCanvases
{
    public const int CanvasSize = 128;
    public const string Easy = "easy", Hard = "hard", Train = "train", Val = "val";
    public static readonly string[] Splits = [Easy, Hard, Train, Val];
    const int MinEmoji = 32, MaxEmoji = 52, Gap = 2, ValPerStyle = 100;
    static readonly (string Style, string TrainSplit, string TestSplit)[] Styles =
        [("noto", "train", "test"), ("twitter", "twitter-train", "twitter-test"), ("openmoji", "openmoji-train", "openmoji-test")];

    sealed record Emoji(string Code, string Image, string Name, string Group, string Subgroup);

    /// <param name="labels">the emoji-labels folder</param>
    public static void Build(string labels, string staging, Action<string>? log)
    {
        foreach (var (split, seed) in Splits.Select((s, i) => (s, 17 + i)))
        {
            var random = new Random(seed);
            var folder = Path.Combine(staging, "images", split);
            Directory.CreateDirectory(folder);
            using var manifest = new StreamWriter(Path.Combine(staging, $"{split}.jsonl"));
            var count = 0;
            foreach (var (style, trainSplit, testSplit) in Styles)
            {
                var pool = Read(labels, split is Easy or Hard ? testSplit : trainSplit);
                var targets = split == Val ? pool.OrderBy(_ => random.Next()).Take(ValPerStyle).ToList() : pool;
                foreach (var target in targets)
                {
                    var others = split == Hard
                        ? pool.Where(e => e.Subgroup == target.Subgroup && e.Code != target.Code).ToList()
                        : pool.Where(e => e.Group != target.Group).ToList();
                    if (others.Count == 0) continue;   // hard: a subgroup of one has no distractor
                    var distractors = others.OrderBy(_ => random.Next()).Take(random.Next(1, 4)).ToList();
                    var id = $"{style}-{target.Code}";
                    var path = Path.Combine(folder, id + ".png");
                    // Listed in a random order: the target is not always the first box.
                    var boxes = Draw([target, .. distractors], path, random).OrderBy(_ => random.Next()).ToList();
                    manifest.WriteLine(GroundingSet.Line(new GroundingCanvas(id, path, target.Name, boxes, CanvasSize, CanvasSize), staging));
                    count++;
                }
            }
            log?.Invoke($"emoji-grounding {split}: {count} canvases");
        }
    }

    static List<Emoji> Read(string labels, string split) =>
        File.ReadLines(Path.Combine(labels, $"{split}.jsonl")).Select(l =>
        {
            var e = JsonDocument.Parse(l).RootElement;
            return new Emoji(e.GetProperty("id").GetString()!, Path.Combine(labels, e.GetProperty("image").GetString()!),
                e.GetProperty("captions")[0].GetString()!, e.GetProperty("label").GetString()!, e.GetProperty("subgroup").GetString() ?? "");
        }).ToList();

    /// <summary>Draws the emoji (the first is the target) at random sizes and places, none overlapping another; an
    /// emoji that finds no free place in 200 draws is left out, so a canvas may hold fewer, never fewer than two.</summary>
    static List<GroundingBox> Draw(IReadOnlyList<Emoji> emoji, string path, Random random)
    {
        var boxes = new List<GroundingBox>();
        using var bitmap = new SKBitmap(new SKImageInfo(CanvasSize, CanvasSize, SKColorType.Rgba8888, SKAlphaType.Premul));
        using (var canvas = new SKCanvas(bitmap))
        {
            canvas.Clear(SKColors.White);
            foreach (var (e, i) in emoji.Select((e, i) => (e, i)))
            {
                for (var attempt = 0; attempt < 200; attempt++)
                {
                    var size = random.Next(MinEmoji, MaxEmoji + 1);
                    var box = new GroundingBox(random.Next(0, CanvasSize - size + 1), random.Next(0, CanvasSize - size + 1), size, size, i == 0);
                    if (boxes.Any(b => Overlap(b, box))) continue;
                    using var image = SKImage.FromEncodedData(e.Image) ?? throw new DatasetFetchException($"cannot decode {e.Image}");
                    canvas.DrawImage(image, new SKRect(box.X, box.Y, box.X + size, box.Y + size), new SKSamplingOptions(SKFilterMode.Linear, SKMipmapMode.None));
                    boxes.Add(box);
                    break;
                }
                if (i == 0 && boxes.Count == 0) throw new InvalidOperationException("the target found no place on an empty canvas");
            }
        }
        if (boxes.Count < 2) throw new InvalidOperationException($"only {boxes.Count} emoji fit on {path}");
        using var png = bitmap.Encode(SKEncodedImageFormat.Png, quality: 100);
        using var file = File.Create(path);
        png.SaveTo(file);
        return boxes;
    }

    static bool Overlap(GroundingBox a, GroundingBox b) =>
        a.X < b.X + b.W + Gap && b.X < a.X + a.W + Gap && a.Y < b.Y + b.H + Gap && b.Y < a.Y + a.H + Gap;
}
