using System.Text;
using System.Text.Json;

namespace Mamo.Data;

/// <summary>
/// A JSONL manifest, one image per line:
/// <c>{"id": "...", "image": "relative/or/absolute.png", "captions": ["...", "..."]}</c> (or a single <c>"caption"</c>).
/// Image paths resolve against the manifest's folder and must stay inside it. Offsets are 0-based line numbers;
/// dead-letter locations name the 1-based line, as editors do. A labelled manifest (fine-tuning) carries each record's
/// class in the field <c>label</c>, or in the one named by <c>labelField</c>: a string or a number. Images are read here but decoded later, so an
/// undecodable image is reported by <see cref="ImageDecoder"/>, not by this source.
/// </summary>
public sealed class ManifestSource(string path, SourceLimits? limits = null, string labelField = ManifestSource.LabelField) : IImageTextSource
{
    public const string LabelField = "label";

    private static readonly UTF8Encoding StrictUtf8 = new(encoderShouldEmitUTF8Identifier: false, throwOnInvalidBytes: true);
    private readonly SourceLimits _limits = limits ?? SourceLimits.Default;

    public string Path { get; } = System.IO.Path.GetFullPath(path);

    public string Name => Path;

    /// <summary>Reads a whole manifest into memory: the samples, and the dead letters met on the way.</summary>
    public static (List<ImageTextSample> Samples, List<BadInput> Bad) ReadAll(string path, SourceLimits? limits = null, string labelField = LabelField)
    {
        var samples = new List<ImageTextSample>();
        var bad = new List<BadInput>();
        foreach (var item in new ManifestSource(path, limits, labelField).Read(null, CancellationToken.None))
        {
            if (item is SampleItem s) samples.Add(s.Sample);
            else if (item is BadItem b) bad.Add(b.Bad);
        }
        return (samples, bad);
    }

    public IEnumerable<SourceItem> Read(IReadOnlyDictionary<string, long>? resumeAfter, CancellationToken ct)
    {
        var root = System.IO.Path.GetDirectoryName(Path)!;
        var lastConsumed = resumeAfter is not null && resumeAfter.TryGetValue(Path, out var offset) ? offset : -1;
        Stream stream;
        try
        {
            stream = new FileStream(Path, FileMode.Open, FileAccess.Read, FileShare.Read, bufferSize: 1 << 16);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            return [new BadItem(new BadInput($"cannot open manifest: {e.Message}", Path, null))];
        }
        return ReadLines(stream, root, lastConsumed, ct);
    }

    private IEnumerable<SourceItem> ReadLines(Stream stream, string root, long lastConsumed, CancellationToken ct)
    {
        using var _ = stream;
        long lineIndex = -1;
        foreach (var line in ByteLines(stream))
        {
            ct.ThrowIfCancellationRequested();
            lineIndex++;
            if (lineIndex <= lastConsumed) continue;
            var position = new SourcePosition(Path, lineIndex);
            var item = ParseLine(line, root, position);
            if (item is not null) yield return item;
        }
    }

    /// <summary>Splits on '\n' without decoding, so invalid UTF-8 is caught per line; overlong lines come back null.</summary>
    private IEnumerable<byte[]?> ByteLines(Stream stream)
    {
        var buffer = new MemoryStream();
        var tooLong = false;
        int b;
        while ((b = stream.ReadByte()) >= 0)
        {
            if (b == '\n')
            {
                yield return tooLong ? null : buffer.ToArray();
                buffer.SetLength(0);
                tooLong = false;
            }
            else if (!tooLong)
            {
                if (buffer.Length >= _limits.MaxLineBytes) { tooLong = true; buffer.SetLength(0); }
                else buffer.WriteByte((byte)b);
            }
        }
        if (tooLong || buffer.Length > 0) yield return tooLong ? null : buffer.ToArray();
    }

    private SourceItem? ParseLine(byte[]? bytes, string root, SourcePosition position)
    {
        var location = $"{Path}:{position.Offset + 1}";
        BadItem Bad(string reason) => new(new BadInput(reason, location, position));

        if (bytes is null) return Bad($"line longer than {_limits.MaxLineBytes} bytes");
        string text;
        try
        {
            text = StrictUtf8.GetString(bytes).TrimStart('\uFEFF').Trim();
        }
        catch (DecoderFallbackException)
        {
            return Bad("invalid UTF-8");
        }
        if (text.Length == 0) return null;

        ManifestLine? line;
        try
        {
            line = ManifestLine.Parse(text, labelField);
        }
        catch (JsonException e)
        {
            return Bad($"malformed JSON on line {position.Offset + 1}: {e.Message}");
        }
        catch (InvalidOperationException e)
        {
            // A string escape that is not valid UTF-16 (a lone surrogate) parses but cannot be read as text.
            return Bad($"malformed JSON on line {position.Offset + 1}: {e.Message}");
        }
        if (line.Error is not null) return Bad(line.Error);

        var captions = Captions.Validate(line.Captions, _limits, out var captionError);
        if (captions is null) return Bad(captionError!);
        if (!RootedPath.TryResolve(root, line.Image, out var imagePath, out var pathError)) return Bad(pathError!);

        byte[] image;
        try
        {
            var length = new FileInfo(imagePath).Length;
            if (length > _limits.MaxImageBytes)
                return Bad($"image file of {length} bytes exceeds the {_limits.MaxImageBytes}-byte limit: {line.Image}");
            image = File.ReadAllBytes(imagePath);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            return Bad($"missing or unreadable image file: {line.Image}");
        }
        return new SampleItem(new ImageTextSample(line.Id ?? line.Image, image, captions, position, line.Label));
    }

    /// <summary>One manifest line's fields, or the reason the JSON is well-formed but not a manifest record.</summary>
    private sealed record ManifestLine(string? Id, string Image, IReadOnlyList<string> Captions, string? Error, string? Label = null)
    {
        public static ManifestLine Parse(string text, string labelField)
        {
            using var doc = JsonDocument.Parse(text);
            var root = doc.RootElement;
            if (root.ValueKind != JsonValueKind.Object) return Fail("line is not a JSON object");
            string? id = null;
            if (root.TryGetProperty("id", out var idElement))
            {
                if (idElement.ValueKind is JsonValueKind.String) id = idElement.GetString();
                else if (idElement.ValueKind is JsonValueKind.Number) id = idElement.GetRawText();
                else return Fail("\"id\" must be a string or number");
            }
            if (!root.TryGetProperty("image", out var image) || image.ValueKind != JsonValueKind.String)
                return Fail("missing \"image\" path");

            var captions = new List<string>();
            if (root.TryGetProperty("captions", out var many))
            {
                if (many.ValueKind != JsonValueKind.Array) return Fail("\"captions\" must be an array of strings");
                foreach (var c in many.EnumerateArray())
                {
                    if (c.ValueKind != JsonValueKind.String) return Fail("\"captions\" must be an array of strings");
                    captions.Add(c.GetString()!);
                }
            }
            if (root.TryGetProperty("caption", out var one))
            {
                if (one.ValueKind != JsonValueKind.String) return Fail("\"caption\" must be a string");
                captions.Add(one.GetString()!);
            }
            string? label = null;
            if (root.TryGetProperty(labelField, out var labelElement))
            {
                if (labelElement.ValueKind is JsonValueKind.String) label = labelElement.GetString();
                else if (labelElement.ValueKind is JsonValueKind.Number) label = labelElement.GetRawText();
                else if (labelElement.ValueKind is not JsonValueKind.Null) return Fail($"\"{labelField}\" must be a string or number");
                if (string.IsNullOrWhiteSpace(label)) label = null;
            }
            return new ManifestLine(id, image.GetString()!, captions, null, label);
        }

        private static ManifestLine Fail(string error) => new(null, "", [], error);
    }
}
