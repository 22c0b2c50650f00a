using System.Text.Json;

namespace Mamo.Data;

/// <summary>A box on a canvas, in pixels from the top left; the target box is the region the caption names.</summary>
public sealed record GroundingBox(int X, int Y, int W, int H, bool Target);

/// <summary>One canvas of a grounding benchmark: an image, a caption that names one region, and the known boxes
/// (exactly one of them the target).</summary>
public sealed record GroundingCanvas(string Id, string Image, string Caption, IReadOnlyList<GroundingBox> Boxes, int Width, int Height)
{
    public GroundingBox Target => Boxes.Single(b => b.Target);
}

/// <summary>
/// A grounding manifest: JSON lines of <c>{"id", "image", "caption", "boxes": [{"x", "y", "w", "h", "target"}]}</c>,
/// image paths relative to the manifest's folder and kept inside it (docs/DATA.md). It is a benchmark, so a bad line is
/// an error that names the line and what is wrong, not a skipped record: a score over part of a set would mislead.
/// </summary>
public static class GroundingSet
{
    /// <exception cref="FileNotFoundException">no manifest</exception>
    /// <exception cref="InvalidDataException">a bad line, box or image, or no canvas at all</exception>
    public static List<GroundingCanvas> Read(string manifestPath, DecodeLimits? limits = null)
    {
        if (!File.Exists(manifestPath)) throw new FileNotFoundException($"no grounding manifest at {manifestPath}", manifestPath);
        var root = Path.GetDirectoryName(Path.GetFullPath(manifestPath))!;
        var canvases = new List<GroundingCanvas>();
        var number = 0;
        foreach (var text in File.ReadLines(manifestPath))
        {
            number++;
            if (string.IsNullOrWhiteSpace(text)) continue;
            try { canvases.Add(Parse(text, root, limits ?? DecodeLimits.Default, number)); }
            catch (Exception e) when (e is JsonException or FormatException or InvalidOperationException or KeyNotFoundException)
            {
                throw new InvalidDataException($"{manifestPath}:{number}: {e.Message}");
            }
        }
        if (canvases.Count == 0) throw new InvalidDataException($"{manifestPath} holds no canvas");
        return canvases;
    }

    static GroundingCanvas Parse(string text, string root, DecodeLimits limits, int number)
    {
        using var doc = JsonDocument.Parse(text);
        var line = doc.RootElement;
        if (line.ValueKind != JsonValueKind.Object) throw new FormatException("a line must be a JSON object");
        string Text(string field) => line.TryGetProperty(field, out var v) && v.ValueKind == JsonValueKind.String && v.GetString()!.Length > 0
            ? v.GetString()! : throw new FormatException($"\"{field}\" must be a non-empty string");
        var image = Text("image");
        var caption = Text("caption");
        var id = line.TryGetProperty("id", out var idValue) && idValue.ValueKind == JsonValueKind.String ? idValue.GetString()! : $"line {number}";
        if (!line.TryGetProperty("boxes", out var boxesValue) || boxesValue.ValueKind != JsonValueKind.Array)
            throw new FormatException("\"boxes\" must be an array of {x, y, w, h, target}");
        var boxes = new List<GroundingBox>();
        foreach (var b in boxesValue.EnumerateArray())
        {
            var at = $"box {boxes.Count}";
            if (b.ValueKind != JsonValueKind.Object) throw new FormatException($"{at} must be an object {{x, y, w, h, target}}");
            int Int(string field) => b.TryGetProperty(field, out var v) && v.ValueKind == JsonValueKind.Number && v.TryGetInt32(out var i)
                ? i : throw new FormatException($"{at}: \"{field}\" must be an integer number of pixels");
            var target = b.TryGetProperty("target", out var t) && t.ValueKind is JsonValueKind.True or JsonValueKind.False
                ? t.GetBoolean() : throw new FormatException($"{at}: \"target\" must be true or false");
            var box = new GroundingBox(Int("x"), Int("y"), Int("w"), Int("h"), target);
            if (box.W <= 0 || box.H <= 0) throw new FormatException($"{at}: width and height must be positive, got {box.W}x{box.H}");
            if (box.X < 0 || box.Y < 0) throw new FormatException($"{at}: x and y must not be negative, got ({box.X}, {box.Y})");
            boxes.Add(box);
        }
        var targets = boxes.Count(b => b.Target);
        if (targets != 1) throw new FormatException($"exactly one box must be the target, found {targets} of {boxes.Count}");
        if (!RootedPath.TryResolve(root, image, out var path, out var reason)) throw new FormatException(reason);
        if (!File.Exists(path)) throw new FormatException($"image not found: {path}");
        if (!ImageDecoder.TryDecode(File.ReadAllBytes(path), limits, out var bitmap, out var error))
            throw new FormatException($"image {path}: {error.Reason}");
        using (bitmap)
        {
            foreach (var (box, i) in boxes.Select((b, i) => (b, i)))
                if (box.X + box.W > bitmap.Width || box.Y + box.H > bitmap.Height)
                    throw new FormatException($"box {i} ({box.X}, {box.Y}, {box.W}x{box.H}) leaves the {bitmap.Width}x{bitmap.Height} image");
            return new GroundingCanvas(id, path, caption, boxes, bitmap.Width, bitmap.Height);
        }
    }

    /// <summary>Writes a canvas as a manifest line, its image path relative to <paramref name="root"/>.</summary>
    public static string Line(GroundingCanvas canvas, string root) => JsonSerializer.Serialize(new
    {
        id = canvas.Id,
        image = Path.GetRelativePath(root, canvas.Image).Replace('\\', '/'),
        caption = canvas.Caption,
        boxes = canvas.Boxes.Select(b => new { x = b.X, y = b.Y, w = b.W, h = b.H, target = b.Target }),
    });
}
