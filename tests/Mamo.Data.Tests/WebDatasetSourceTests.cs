using System.Formats.Tar;
using System.Text;
using SkiaSharp;
using Xunit;

namespace Mamo.Data.Tests;

public class WebDatasetSourceTests
{
    private static readonly byte[] Png = TestImages.SolidPng(4, 4, SKColors.Red);
    private static readonly byte[] Jpeg = TestImages.Encode(TestImages.Solid(4, 4, SKColors.Blue), SKEncodedImageFormat.Jpeg);

    [Fact]
    public void Groups_consecutive_entries_by_key_and_reports_bad_groups()
    {
        using var temp = new TempFolder();
        var shard = temp.File("shard-000.tar");
        WriteTar(shard,
            ("000/0001.jpg", Jpeg), ("000/0001.txt", Utf8("a blue square")), ("000/0001.json", Utf8("""{"url": "x"}""")),
            ("../evil.png", Png),
            ("000/0002.png", Png), ("000/0002.json", Utf8("""{"captions": ["red", "a red square"]}""")),
            ("000/0003.png", Png),
            ("000/0004.txt", Utf8("caption without image")),
            ("000/0005.webp", Png), ("000/0005.json", Utf8("""{"caption": "one caption"}""")),
            ("000/0006.png", Png), ("000/0006.txt", Utf8("   ")),
            ("/etc/passwd.txt", Utf8("absolute")));

        var items = new WebDatasetSource(shard).Read(null, CancellationToken.None).ToList();

        var samples = items.OfType<SampleItem>().Select(s => s.Sample).ToList();
        Assert.Equal(["000/0001", "000/0002", "000/0005"], samples.Select(s => s.Id));
        Assert.Equal(["a blue square"], samples[0].Captions);
        Assert.Equal(Jpeg, samples[0].Image);
        Assert.Equal(["red", "a red square"], samples[1].Captions);
        Assert.Equal(["one caption"], samples[2].Captions);
        Assert.Equal([0L, 1, 4], samples.Select(s => s.Position.Offset));
        Assert.All(samples, s => Assert.Equal(Path.GetFullPath(shard), s.Position.Source));

        var bad = items.OfType<BadItem>().Select(b => b.Bad.Reason).ToList();
        Assert.Equal(6, bad.Count);
        Assert.Contains(bad, r => r.Contains("escapes the archive root: ../evil.png"));
        Assert.Contains(bad, r => r.Contains("escapes the archive root: /etc/passwd.txt"));
        Assert.Contains(bad, r => r.StartsWith("no caption") && r.Contains("000/0003"));
        Assert.Contains(bad, r => r.StartsWith("no image") && r.Contains("000/0004"));
        Assert.Contains("empty captions", bad);
        Assert.Contains(bad, r => r.Contains("not a regular file"));
    }

    [Fact]
    public void Resumes_after_the_last_consumed_sample_of_each_shard_and_expands_brace_globs()
    {
        using var temp = new TempFolder();
        for (var s = 0; s < 2; s++)
            WriteTar(temp.File($"shard-{s:000}.tar"), Enumerable.Range(0, 3).SelectMany(i => new[]
            {
                ($"s{s}k{i}.png", Png), ($"s{s}k{i}.txt", Utf8($"caption {i}")),
            }).ToArray());

        var source = new WebDatasetSource(temp.File("shard-{000..001}.tar"));
        Assert.Equal(2, source.Shards().Count);
        var all = source.Read(null, CancellationToken.None).OfType<SampleItem>().Select(s => s.Sample.Id).ToList();
        Assert.Equal(["s0k0", "s0k1", "s0k2", "s1k0", "s1k1", "s1k2"], all);

        var resume = new Dictionary<string, long> { [Path.GetFullPath(temp.File("shard-000.tar"))] = 1 };
        var rest = new WebDatasetSource(temp.File("shard-*.tar")).Read(resume, CancellationToken.None)
            .OfType<SampleItem>().Select(s => s.Sample.Id);
        Assert.Equal(["s0k2", "s1k0", "s1k1", "s1k2"], rest);
    }

    [Fact]
    public void Truncated_shards_and_empty_globs_are_dead_letters_not_crashes()
    {
        using var temp = new TempFolder();
        var shard = temp.File("cut.tar");
        WriteTar(shard, ("a.png", Png), ("a.txt", Utf8("fine")), ("b.png", new byte[5000]), ("b.txt", Utf8("cut off")));
        // Ustar: 512-byte header, data padded to 512. Cut inside b.png's data, after a's two entries.
        var bytes = File.ReadAllBytes(shard);
        File.WriteAllBytes(shard, bytes[..3000]);

        var items = new WebDatasetSource(shard).Read(null, CancellationToken.None).ToList();
        Assert.Equal("a", Assert.Single(items.OfType<SampleItem>()).Sample.Id);
        Assert.Contains(items.OfType<BadItem>(), b => b.Bad.Reason.StartsWith("corrupt tar"));

        var none = Assert.Single(new WebDatasetSource(temp.File("missing-*.tar")).Read(null, CancellationToken.None));
        Assert.Equal("no shard matches the glob", Assert.IsType<BadItem>(none).Bad.Reason);
    }

    /// <summary>Writes the entries, then a symbolic link entry (which the reader must refuse).</summary>
    private static void WriteTar(string path, params (string Name, byte[] Data)[] entries)
    {
        using var file = File.Create(path);
        using var tar = new TarWriter(file, TarEntryFormat.Ustar);
        foreach (var (name, data) in entries)
            tar.WriteEntry(new UstarTarEntry(TarEntryType.RegularFile, name) { DataStream = new MemoryStream(data) });
        tar.WriteEntry(new UstarTarEntry(TarEntryType.SymbolicLink, "link.png") { LinkName = "/etc/shadow" });
    }

    private static byte[] Utf8(string text) => Encoding.UTF8.GetBytes(text);
}
