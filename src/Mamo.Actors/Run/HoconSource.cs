using Akka.Configuration;

namespace Mamo.Actors.Run;

/// <summary>A HOCON file read for its lines before Akka's parser reads its values: Akka's parser accepts an unclosed
/// brace and reports its errors without a line, so a user's mistake would train on silently or point nowhere. This scan
/// knows strings, comments and ${substitutions}; it finds the blocks that never close or close what is not open, the
/// line of each key, and, where Akka rejects the file, the first line it rejects.</summary>
sealed class HoconSource
{
    readonly string origin;
    readonly string[] lines;
    readonly Dictionary<string, int> keyLines = [];
    // The closers that end each line's open blocks (a prefix of the file parses on its own with them); null: inside a """string""".
    readonly List<string?> closersAfter = [];

    sealed record Block(char Open, int Line, string? Path);

    HoconSource(string text, string origin)
    {
        this.origin = origin;
        lines = text.Split('\n');
    }

    /// <summary>The text parsed, with its scan; or a SettingsException that says FILE:LINE and what is wrong there.</summary>
    public static (Config Config, HoconSource Source) Parse(string text, string origin)
    {
        var source = new HoconSource(text, origin);
        source.Scan(text);
        try { return (ConfigurationFactory.ParseString(text), source); }
        catch (Exception e) { throw new SettingsException($"{source.At(source.FirstRejectedLine())}{e.Message.Trim()}{source.Hint()}"); }
    }

    /// <summary>Where the text sets the key: "FILE:LINE", or "FILE" where the scan cannot tell the line.</summary>
    public string Where(string key) => At(keyLines.TryGetValue(key, out var line) ? line : null).TrimEnd(':', ' ');

    string At(int? line) => line is { } l && lines.Length > 1 ? $"{origin}:{l}: " : $"{origin}: ";

    void Scan(string text)
    {
        var stack = new List<Block> { new('{', 0, "") };
        var line = 1;
        var expectKey = true;
        int i = 0, n = text.Length;

        void Fail(int at, string what) => throw new SettingsException($"{At(at)}{what}{Hint()}");
        void EndLine()
        {
            closersAfter.Add(string.Concat(stack.Skip(1).Reverse().Select(b => b.Open == '{' ? '}' : ']')));
            line++;
        }
        string? Child(string? path, string key) => path is null ? null : path.Length == 0 ? key : $"{path}.{key}";
        void Open(char c, string? key)
        {
            var path = key is null ? (c == '{' && stack[^1].Open == '{' ? stack[^1].Path : null) : Child(stack[^1].Path, key);
            if (key is not null && path is not null) keyLines.TryAdd(path, line);
            stack.Add(new Block(c, line, c == '[' ? null : path));
            expectKey = c == '{';
        }
        void Close(char c)
        {
            var want = c == '}' ? '{' : '[';
            if (stack.Count == 1) Fail(line, $"'{c}' closes no block");
            var open = stack[^1];
            if (open.Open != want) Fail(line, $"'{c}' closes the '{open.Open}' of line {open.Line}");
            stack.RemoveAt(stack.Count - 1);
            expectKey = false;
        }
        // A "string" or """string""" from i; returns its text and the index after it.
        (string Text, int Next) Quoted(int at)
        {
            if (string.CompareOrdinal(text, at, "\"\"\"", 0, 3) == 0)
            {
                var end = text.IndexOf("\"\"\"", at + 3, StringComparison.Ordinal);
                if (end < 0) Fail(line, "a \"\"\" string is never closed");
                var body = text[(at + 3)..end];
                foreach (var _ in body.Where(ch => ch == '\n')) { closersAfter.Add(null); line++; }
                return (body, end + 3);
            }
            var j = at + 1;
            while (j < n && text[j] != '"' && text[j] != '\n') j += text[j] == '\\' ? 2 : 1;
            if (j >= n || text[j] != '"') Fail(line, "a quoted string is never closed on its line");
            return (text[(at + 1)..j], j + 1);
        }
        bool Comment(int at) => text[at] == '#' || (text[at] == '/' && at + 1 < n && text[at + 1] == '/');

        while (i < n)
        {
            var c = text[i];
            if (c == '\n') { EndLine(); expectKey = stack[^1].Open == '{'; i++; continue; }
            if (char.IsWhiteSpace(c)) { i++; continue; }
            if (Comment(i)) { while (i < n && text[i] != '\n') i++; continue; }
            if (c is '}' or ']') { Close(c); i++; continue; }
            if (c == ',') { expectKey = stack[^1].Open == '{'; i++; continue; }
            if (expectKey && c is not ('{' or '['))
            {
                // A key: unquoted and "quoted" parts up to its separator (whitespace inside is part of it, as in HOCON).
                var key = new System.Text.StringBuilder();
                while (i < n && !Comment(i) && text[i] is not ('=' or ':' or '{' or '}' or '[' or ']' or ',' or '\n'))
                {
                    if (text[i] == '"') { var (part, next) = Quoted(i); key.Append(part); i = next; }
                    else key.Append(text[i++]);
                }
                var name = key.ToString().TrimEnd();
                if (i < n && text[i] is '=' or ':') { i++; while (i < n && text[i] is ' ' or '\t') i++; }
                if (i < n && text[i] is '{' or '[') { Open(text[i], name); i++; continue; }
                if (Child(stack[^1].Path, name) is { } path && !name.StartsWith("include ")) keyLines[path] = line;
                expectKey = false;
                continue;
            }
            if (c == '"') { i = Quoted(i).Next; continue; }
            if (c == '$' && i + 1 < n && text[i + 1] == '{')
            {
                var end = text.IndexOfAny(['}', '\n'], i);
                if (end < 0 || text[end] != '}') Fail(line, "a ${substitution} is never closed on its line");
                i = end + 1;
                continue;
            }
            if (c is '{' or '[') { Open(c, null); i++; continue; }
            // Akka's parser never returns from a character that unquoted text may not hold when it is in an array.
            if (stack[^1].Open == '[' && "=:$+`^?!@*&\\".Contains(c))
                Fail(line, $"'{c}' in the '[' of line {stack[^1].Line}: quote a value that holds it");
            i++;
        }
        EndLine();
        if (stack.Count > 1)
        {
            var open = stack[^1];
            Fail(open.Line, $"the '{open.Open}' opened here is never closed{(stack.Count > 2 ? $" (nor {stack.Count - 2} more around it)" : "")}");
        }

    }

    /// <summary>The first line at which the file, cut after it with its open blocks closed, no longer parses.</summary>
    int? FirstRejectedLine()
    {
        for (var k = 0; k < lines.Length && k < closersAfter.Count; k++)
        {
            if (closersAfter[k] is not { } closers) continue;
            try { ConfigurationFactory.ParseString(string.Join('\n', lines.Take(k + 1)) + "\n" + closers); }
            catch (Exception) { return k + 1; }
        }
        return null;
    }

    /// <summary>A hint where the file reads as another format than HOCON.</summary>
    string Hint()
    {
        var yaml = lines.Any(l => System.Text.RegularExpressions.Regex.IsMatch(l, @"^\s*[\w.-]+:\s*$")) || lines.Any(l => l.TrimStart().StartsWith("- "));
        return yaml || origin.EndsWith(".yaml", StringComparison.OrdinalIgnoreCase) || origin.EndsWith(".yml", StringComparison.OrdinalIgnoreCase)
            ? "\n(mamo reads HOCON, not YAML: `key = value`, blocks in braces, e.g. mamo { batch-size = 16, optimizer { learning-rate = 3e-4 } }; docs/CONFIG.md)"
            : "";
    }
}
