using System.Text;
using System.Text.RegularExpressions;
using Xunit;

namespace Mamo.Cli.Tests;

/// <summary>Every `./mamo ...` line of the README's and docs' code blocks parses as the CLI parses it: an option that
/// was renamed or removed, or a command that no longer exists, fails here instead of in a reader's shell.</summary>
public class DocsCommandsTests
{
    [Fact]
    public void Every_mamo_command_in_the_readme_and_docs_parses()
    {
        var root = BuildTests.Root();
        var pages = new[] { Path.Combine(root, "README.md") }.Concat(Directory.GetFiles(Path.Combine(root, "docs"), "*.md"));
        var checkedLines = 0;
        var failures = new List<string>();
        foreach (var page in pages)
            foreach (var (line, number) in CommandLines(File.ReadAllLines(page)))
            {
                checkedLines++;
                var parse = MamoRoot.Create().Parse(Words(line).Skip(1).ToArray());
                if (parse.Errors.Count > 0) failures.Add($"{Path.GetFileName(page)}:{number}: {line}\n    {string.Join("; ", parse.Errors.Select(e => e.Message))}");
            }
        Assert.True(failures.Count == 0, string.Join("\n", failures));
        Assert.True(checkedLines >= 30, $"only {checkedLines} command lines found: has the pattern stopped matching?");
    }

    /// <summary>The `./mamo` lines of the fenced code blocks, continuation lines joined, each with its line number.</summary>
    static IEnumerable<(string Line, int Number)> CommandLines(string[] lines)
    {
        var inCode = false;
        for (var i = 0; i < lines.Length; i++)
        {
            if (lines[i].TrimStart().StartsWith("```")) { inCode = !inCode; continue; }
            var text = lines[i].Trim();
            if (!inCode || !text.StartsWith("./mamo ")) continue;
            var number = i + 1;
            while (text.EndsWith('\\') && i + 1 < lines.Length) text = text[..^1] + " " + lines[++i].Trim();
            yield return (text, number);
        }
    }

    /// <summary>A command line's words as a POSIX shell splits them (quotes, escapes), up to a comment, a pipe or a redirection.</summary>
    static List<string> Words(string line)
    {
        var words = new List<string>();
        var word = new StringBuilder();
        var inWord = false;
        for (var i = 0; i < line.Length; i++)
        {
            var c = line[i];
            if (c == '#' && !inWord) break;
            if (char.IsWhiteSpace(c)) { if (inWord) words.Add(word.ToString()); (word, inWord) = (new StringBuilder(), false); continue; }
            inWord = true;
            if (c == '\'') { var close = line.IndexOf('\'', i + 1); word.Append(line[(i + 1)..close]); i = close; }
            else if (c == '"')
            {
                for (i++; line[i] != '"'; i++) word.Append(line[i] == '\\' && line[i + 1] is '"' or '\\' or '$' ? line[++i] : line[i]);
            }
            else if (c == '\\' && i + 1 < line.Length) word.Append(line[++i]);
            else word.Append(c);
        }
        if (inWord) words.Add(word.ToString());
        // Up to a pipe, a redirection or the next command.
        var end = words.FindIndex(w => w.Length > 0 && ("|;&<>".Contains(w[0]) || Regex.IsMatch(w, @"^\d>")));
        return end < 0 ? words : words[..end];
    }
}
