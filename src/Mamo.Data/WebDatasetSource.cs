using System.Formats.Tar;
using System.Text;
using System.Text.Json;
using System.Text.RegularExpressions;

namespace Mamo.Data;

/// <summary>
/// WebDataset tar shards as img2dataset writes them: consecutive entries sharing a key form one sample,
/// <c>key.jpg|jpeg|png|webp</c> with <c>key.txt</c> (the caption) or <c>key.json</c> (<c>caption</c> or
/// <c>captions</c>). The shards are streamed, never extracted. The glob is a path whose file name may use
/// <c>*</c>/<c>?</c> and WebDataset's brace ranges (<c>shard-{0000..0099}.tar</c>); shards are read in name order.
/// A sample's offset is its ordinal among the key groups of its shard. Entry names that are absolute or contain
/// <c>..</c> are refused, as are link entries. An http:// or https:// glob names shards on a web server (brace ranges
/// only: a server cannot be listed), streamed through <see cref="HttpShardStream"/>, which resumes a broken transfer
/// where it broke.
/// </summary>
public sealed partial class WebDatasetSource(string glob, SourceLimits? limits = null) : IImageTextSource
{
    private static readonly UTF8Encoding StrictUtf8 = new(encoderShouldEmitUTF8Identifier: false, throwOnInvalidBytes: true);
    private static readonly string[] ImageExtensions = ["jpg", "jpeg", "png", "webp"];
    private const string TextExtension = "txt";
    private const string JsonExtension = "json";
    private readonly SourceLimits _limits = limits ?? SourceLimits.Default;

    public string Glob { get; } = glob;

    public string Name => Glob;

    private bool OverHttp => Glob.StartsWith("http://", StringComparison.OrdinalIgnoreCase) || Glob.StartsWith("https://", StringComparison.OrdinalIgnoreCase);

    /// <summary>The shard paths (or URLs) the glob names, sorted.</summary>
    public IReadOnlyList<string> Shards()
    {
        var shards = new SortedSet<string>(StringComparer.Ordinal);
        foreach (var pattern in ExpandBraces(Glob))
        {
            if (OverHttp)
            {
                if (pattern.IndexOfAny(['*', '?']) < 0) shards.Add(pattern);
                continue;
            }
            var full = Path.GetFullPath(pattern);
            var directory = Path.GetDirectoryName(full)!;
            var name = Path.GetFileName(full);
            if (name.IndexOfAny(['*', '?']) < 0)
            {
                if (File.Exists(full)) shards.Add(full);
            }
            else if (Directory.Exists(directory))
            {
                foreach (var path in Directory.EnumerateFiles(directory, name)) shards.Add(path);
            }
        }
        return [.. shards];
    }

    public IEnumerable<SourceItem> Read(IReadOnlyDictionary<string, long>? resumeAfter, CancellationToken ct)
    {
        var shards = Shards();
        if (shards.Count == 0)
        {
            yield return new BadItem(new BadInput(OverHttp ? "no shard named: a web server cannot be listed, name the shards with {first..last}"
                : "no shard matches the glob", Glob, null));
            yield break;
        }
        foreach (var shard in shards)
        {
            var lastConsumed = resumeAfter is not null && resumeAfter.TryGetValue(shard, out var offset) ? offset : -1;
            foreach (var item in ReadShard(shard, lastConsumed, ct)) yield return item;
        }
    }

    private IEnumerable<SourceItem> ReadShard(string shard, long lastConsumed, CancellationToken ct)
    {
        Stream stream;
        try
        {
            stream = OverHttp ? HttpShardStream.Open(new Uri(shard), ct)
                : new FileStream(shard, FileMode.Open, FileAccess.Read, FileShare.Read, bufferSize: 1 << 16);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException or HttpRequestException or UriFormatException)
        {
            return [new BadItem(new BadInput($"cannot open shard: {e.Message}", shard, null))];
        }
        return ReadEntries(stream, shard, lastConsumed, ct);
    }

    private IEnumerable<SourceItem> ReadEntries(Stream stream, string shard, long lastConsumed, CancellationToken ct)
    {
        using var _ = stream;
        using var tar = new TarReader(stream);
        var group = new KeyGroup(shard, ordinal: -1, key: "");
        while (true)
        {
            ct.ThrowIfCancellationRequested();
            var entry = NextEntry(tar, out var corruption);
            if (entry is null)
            {
                if (group.Ordinal >= 0 && group.Ordinal > lastConsumed) yield return group.ToItem(_limits);
                if (corruption is not null)
                    yield return new BadItem(new BadInput($"corrupt tar, rest of shard skipped: {corruption}", shard, null));
                yield break;
            }
            if (entry.EntryType is TarEntryType.Directory) continue;

            var name = entry.Name;
            if (RootedPath.EscapesArchive(name))
            {
                yield return new BadItem(new BadInput($"tar entry escapes the archive root: {name}", $"{shard}:{name}", null));
                continue;
            }
            if (entry.EntryType is not (TarEntryType.RegularFile or TarEntryType.V7RegularFile or TarEntryType.ContiguousFile))
            {
                yield return new BadItem(new BadInput($"tar entry is not a regular file ({entry.EntryType}): {name}", $"{shard}:{name}", null));
                continue;
            }

            var (key, extension) = SplitKey(name);
            if (key != group.Key || group.Ordinal < 0)
            {
                if (group.Ordinal >= 0 && group.Ordinal > lastConsumed) yield return group.ToItem(_limits);
                group = new KeyGroup(shard, group.Ordinal + 1, key);
            }
            if (group.Ordinal <= lastConsumed) continue;
            var truncated = group.Add(extension, entry, _limits);
            if (truncated is not null)
            {
                yield return new BadItem(new BadInput($"corrupt tar, rest of shard skipped: {truncated}", $"{shard}:{name}", null));
                yield break;
            }
        }
    }

    private static TarEntry? NextEntry(TarReader tar, out string? corruption)
    {
        corruption = null;
        try
        {
            return tar.GetNextEntry(copyData: false);
        }
        catch (Exception e) when (e is InvalidDataException or EndOfStreamException or FormatException or IOException or ArgumentException)
        {
            corruption = e.Message;
            return null;
        }
    }

    /// <summary>WebDataset's rule: the key is the path up to the first dot of the file name, the extension the rest.</summary>
    private static (string Key, string Extension) SplitKey(string name)
    {
        var slash = name.LastIndexOf('/');
        var dot = name.IndexOf('.', slash + 1);
        return dot < 0 ? (name, "") : (name[..dot], name[(dot + 1)..].ToLowerInvariant());
    }

    /// <summary>The entries of one key collected so far; sample or dead letter once the key changes.</summary>
    private sealed class KeyGroup(string shard, long ordinal, string key)
    {
        public string Shard { get; } = shard;
        public long Ordinal { get; } = ordinal;
        public string Key { get; } = key;

        private byte[]? _image;
        private IReadOnlyList<string>? _captions;
        private string? _problem;

        private SourcePosition Position => new(Shard, Ordinal);

        /// <summary>Takes the entry into the group; returns why the shard cannot be read further, if it cannot.</summary>
        public string? Add(string extension, TarEntry entry, SourceLimits limits)
        {
            if (_problem is not null) return null;
            var isImage = ImageExtensions.Contains(extension);
            var isText = extension is TextExtension or JsonExtension;
            if (!isImage && !isText) return null;   // other fields (.cls, extra metadata) are not ours
            if (isImage && _image is not null) return null;   // first image wins
            if (extension == JsonExtension && _captions is not null) return null;   // key.txt takes precedence
            var limit = isImage ? limits.MaxImageBytes : limits.MaxTextEntryBytes;
            if (entry.Length > limit)
            {
                _problem = $"{entry.Name} of {entry.Length} bytes exceeds the {limit}-byte limit";
                return null;
            }
            byte[] bytes;
            try
            {
                bytes = ReadData(entry);
            }
            catch (Exception e) when (e is EndOfStreamException or IOException or InvalidDataException)
            {
                return $"{entry.Name}: {e.Message}";
            }
            if (isImage)
            {
                _image = bytes;
                return null;
            }
            Caption(extension, entry.Name, bytes);
            return null;
        }

        private void Caption(string extension, string entryName, byte[] bytes)
        {
            string text;
            try
            {
                text = StrictUtf8.GetString(bytes);
            }
            catch (DecoderFallbackException)
            {
                _problem = $"invalid UTF-8 in {entryName}";
                return;
            }
            _captions = extension == TextExtension ? [text] : JsonCaptions(text, entryName);
        }

        private List<string>? JsonCaptions(string text, string entryName)
        {
            try
            {
                using var doc = JsonDocument.Parse(text);
                var root = doc.RootElement;
                if (root.ValueKind != JsonValueKind.Object) { _problem = $"{entryName} is not a JSON object"; return null; }
                var captions = new List<string>();
                if (root.TryGetProperty("captions", out var many) && many.ValueKind == JsonValueKind.Array)
                    captions.AddRange(many.EnumerateArray().Where(c => c.ValueKind == JsonValueKind.String).Select(c => c.GetString()!));
                if (root.TryGetProperty("caption", out var one) && one.ValueKind == JsonValueKind.String)
                    captions.Add(one.GetString()!);
                return captions;
            }
            catch (Exception e) when (e is JsonException or InvalidOperationException)
            {
                _problem = $"malformed JSON in {entryName}: {e.Message}";
                return null;
            }
        }

        private static byte[] ReadData(TarEntry entry)
        {
            if (entry.DataStream is null) return [];
            var bytes = new byte[entry.Length];
            entry.DataStream.ReadExactly(bytes);
            return bytes;
        }

        public SourceItem ToItem(SourceLimits limits)
        {
            var location = $"{Shard}:{Key}";
            BadItem Bad(string reason) => new(new BadInput(reason, location, Position));
            if (_problem is not null) return Bad(_problem);
            if (_image is null) return Bad($"no image (.{string.Join("/.", ImageExtensions)}) for key {Key}");
            if (_captions is null) return Bad($"no caption (.{TextExtension} or .{JsonExtension}) for key {Key}");
            var captions = Captions.Validate(_captions, limits, out var reason);
            if (captions is null) return Bad(reason!);
            return new SampleItem(new ImageTextSample(Key, _image, captions, Position));
        }
    }

    /// <summary>Expands WebDataset brace ranges, e.g. {000..012}, keeping the zero padding of the first bound.</summary>
    private static IEnumerable<string> ExpandBraces(string pattern)
    {
        var match = BraceRange().Match(pattern);
        if (!match.Success)
        {
            yield return pattern;
            yield break;
        }
        var first = match.Groups[1].Value;
        var (from, to) = (long.Parse(first), long.Parse(match.Groups[2].Value));
        for (var i = from; i <= to; i++)
        {
            var expanded = pattern[..match.Index] + i.ToString().PadLeft(first.Length, '0') + pattern[(match.Index + match.Length)..];
            foreach (var rest in ExpandBraces(expanded)) yield return rest;
        }
    }

    [GeneratedRegex(@"\{(\d+)\.\.(\d+)\}")]
    private static partial Regex BraceRange();
}
