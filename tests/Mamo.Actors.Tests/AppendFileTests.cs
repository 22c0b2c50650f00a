using Xunit;
using Mamo.Actors.Pipeline;

namespace Mamo.Actors.Tests;

/// <summary>Several writers of one run file, as a cluster's coordinator, evaluator and publisher are.</summary>
public sealed class AppendFileTests : IDisposable
{
    readonly string dir = Directory.CreateTempSubdirectory("mamo-append-").FullName;

    public void Dispose() => Directory.Delete(dir, recursive: true);

    [Fact]
    public void Writers_opened_at_once_each_append_at_the_end_and_overwrite_nothing()
    {
        var path = Path.Combine(dir, "metrics.jsonl");
        File.WriteAllText(path, "before\n");
        using (var a = new AppendFile(path))
        using (var b = new AppendFile(path))
        {
            a.WriteLine("a1");
            b.WriteLine("b1");   // a FileMode.Append stream opened with a would write here over "a1"
            a.WriteLine("a2");
            AppendFile.AppendLine(path, "c1");
            b.WriteLine("b2");
        }
        Assert.Equal(["before", "a1", "b1", "a2", "c1", "b2"], File.ReadAllLines(path));
    }

    [Fact]
    public void Four_concurrent_writers_leave_every_line_whole()
    {
        var path = Path.Combine(dir, "many.jsonl");
        var writers = Enumerable.Range(0, 4).Select(_ => new AppendFile(path)).ToList();
        Parallel.For(0, 4, w =>
        {
            for (var i = 0; i < 2000; i++) writers[w].WriteLine($"{{\"writer\":{w},\"line\":{i},\"pad\":\"{new string('x', 100 + i % 200)}\"}}");
        });
        foreach (var writer in writers) writer.Dispose();
        var lines = File.ReadAllLines(path);
        Assert.Equal(8000, lines.Length);
        Assert.All(lines, l => System.Text.Json.JsonDocument.Parse(l).Dispose());
        for (var w = 0; w < 4; w++)
            Assert.Equal(Enumerable.Range(0, 2000), lines.Where(l => l.StartsWith($"{{\"writer\":{w},")).Select(l => int.Parse(l.Split("\"line\":")[1].Split(',')[0])));
    }
}
