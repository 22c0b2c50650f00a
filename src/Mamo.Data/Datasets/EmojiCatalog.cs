using System.Text;
using System.Text.Json;

namespace Mamo.Data.Datasets;

/// <summary>One emoji: its codepoint key, image file name in the emoji-datasource packages, and captions.</summary>
/// <param name="Subcategory">Unicode's subgroup (e.g. "face-smiling"); null where the list has none</param>
public sealed record EmojiEntry(string Code, string ImageFile, string Category, IReadOnlyList<string> Captions, string? Subcategory = null);

/// <summary>
/// The emoji list of emoji-datasource-google (names, categories) joined with emojibase-data's CLDR labels and tags
/// by codepoint (lowercase hex, FE0F dropped), and turned into several natural captions per emoji.
/// </summary>
public static class EmojiCatalog
{
    /// <summary>One bucket of <see cref="SplitBuckets"/> by codepoint hash is the test split: about 10%.</summary>
    public const int SplitBuckets = 10;
    private const int MaxTagsInCaption = 4;
    private const string VariationSelector16 = "fe0f";

    /// <summary>Codepoints joined by '-', lowercase, without the emoji presentation selector FE0F.</summary>
    public static string NormaliseCode(string hex) =>
        string.Join('-', hex.ToLowerInvariant().Split('-').Where(part => part != VariationSelector16));

    /// <summary>Deterministic split: FNV-1a of the normalised code, so every style of an emoji lands in the same split.</summary>
    public static bool IsTest(string code)
    {
        const uint FnvOffset = 2166136261, FnvPrime = 16777619;
        var hash = FnvOffset;
        foreach (var b in Encoding.UTF8.GetBytes(code)) hash = (hash ^ b) * FnvPrime;
        return hash % SplitBuckets == 0;
    }

    /// <param name="datasourceEmojiJson">emoji-datasource-*/emoji.json</param>
    /// <param name="emojibaseJson">emojibase-data/en/data.json</param>
    /// <param name="hasImageField">which flag says the style has an image, e.g. has_img_google</param>
    public static IReadOnlyList<EmojiEntry> Load(string datasourceEmojiJson, string emojibaseJson, string hasImageField)
    {
        var cldr = new Dictionary<string, (string Label, List<string> Tags)>();
        using (var emojibase = JsonDocument.Parse(File.ReadAllText(emojibaseJson)))
        {
            foreach (var e in emojibase.RootElement.EnumerateArray())
            {
                var tags = e.TryGetProperty("tags", out var t) ? t.EnumerateArray().Select(x => x.GetString()!).ToList() : [];
                cldr[NormaliseCode(e.GetProperty("hexcode").GetString()!)] = (e.GetProperty("label").GetString()!, tags);
            }
        }

        var entries = new List<EmojiEntry>();
        using var datasource = JsonDocument.Parse(File.ReadAllText(datasourceEmojiJson));
        foreach (var e in datasource.RootElement.EnumerateArray())
        {
            if (!e.TryGetProperty(hasImageField, out var has) || !has.GetBoolean()) continue;
            var code = NormaliseCode(e.GetProperty("unified").GetString()!);
            if (!cldr.TryGetValue(code, out var labelled)) continue;
            var category = e.GetProperty("category").GetString()!;
            var subcategory = e.TryGetProperty("subcategory", out var sub) ? sub.GetString() : null;
            var name = e.TryGetProperty("name", out var n) && n.ValueKind == JsonValueKind.String ? n.GetString()! : labelled.Label;
            var shortNames = e.GetProperty("short_names").EnumerateArray().Select(s => s.GetString()!).ToList();
            entries.Add(new EmojiEntry(code, e.GetProperty("image").GetString()!, category,
                CaptionsFor(labelled.Label, name, shortNames, labelled.Tags, category, subcategory), subcategory));
        }
        return entries;
    }

    /// <summary>
    /// "grinning face", "an emoji of a grinning face", "an emoji for cheerful, grin and happy",
    /// "grinning face, an emoji in the face smiling group", plus the Unicode name and short name where they differ.
    /// </summary>
    public static IReadOnlyList<string> CaptionsFor(
        string label, string name, IReadOnlyList<string> shortNames, IReadOnlyList<string> tags, string category, string? subcategory)
    {
        var plainLabel = Plain(label);
        var captions = new List<string> { plainLabel, Plain(name), $"an emoji of {Subject(plainLabel)}" };

        var labelWords = plainLabel.Split(' ', ':', ',').ToHashSet();
        // Tags in capitals are codes (country codes of flags); symbols such as "<3" say nothing in words.
        var tagWords = tags.Where(t => t != t.ToUpperInvariant() && t.All(c => char.IsLetter(c) || c is ' ' or '-' or '\'' or '\u2019'))
            .Select(Plain).Where(t => !labelWords.Contains(t)).Take(MaxTagsInCaption).ToList();
        if (tagWords.Count > 0) captions.Add($"an emoji for {JoinWithAnd(tagWords)}");

        if (category != "Flags")
        {
            var shortName = shortNames.Select(s => Plain(s.Replace('_', ' ').Replace('-', ' '))).FirstOrDefault();
            if (shortName is not null && shortName.All(c => char.IsLetter(c) || c == ' ')) captions.Add(shortName);
        }
        var group = Plain((subcategory ?? category).Replace('-', ' ').Replace("&", "and"));
        captions.Add($"{plainLabel}, an emoji in the {group} group");
        return captions.Distinct().ToList();
    }

    private static string Plain(string text) => text.Trim().ToLowerInvariant().Replace('\u2019', '\'');

    /// <summary>"a grinning face", "the flag of japan", "sparkles" (plurals take no article).</summary>
    private static string Subject(string label)
    {
        const string FlagPrefix = "flag: ";
        if (label.StartsWith(FlagPrefix, StringComparison.Ordinal)) return $"the flag of {label[FlagPrefix.Length..]}";
        return Article(label) + label;
    }

    private static string Article(string noun)
    {
        var head = noun.Split(':')[0];
        if (head.EndsWith('s') && !head.EndsWith("ss", StringComparison.Ordinal)) return "";
        return "aeiou".Contains(noun[0]) ? "an " : "a ";
    }

    private static string JoinWithAnd(IReadOnlyList<string> words) =>
        words.Count == 1 ? words[0] : $"{string.Join(", ", words.Take(words.Count - 1))} and {words[^1]}";
}
