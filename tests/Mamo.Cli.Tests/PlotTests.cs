using System.Globalization;
using SkiaSharp;
using Xunit;

namespace Mamo.Cli.Tests;

public class PlotTests
{
    const int TrainLines = 30, EvalEvery = 5, StepsPerLine = 10;
    const int MinPngBytes = 20_000;

    static readonly string[] Malformed =
    [
        "not json at all",
        """{"kind":"train","loss":1.0}""",                           // no step
        """{"kind":"eval","step":3,"tr1":1}""",                      // no set, no recalls
        """[1, 2, 3]""",
        """{"kind":"train","step":5,"loss":"high"}""",               // loss is not a number
        """{"kind":"train","step":5.5,"loss":1.0}""",               // step is not an integer
        """{"kind":"train","step":5,"step":6,"loss":1.0}""",        // which step?
    ];
    const string UnknownKind = """{"kind":"forecast","step":100,"loss":0.5}""";
    const string DashboardLine = """{"kind":"checkpoint","time":"2026-12-01T10:00:00Z","step":100,"path":"step-000000000100","bytes":1000,"offsets":{}}""";

    /// <summary>A metrics.jsonl as the Metrics actor writes it, with malformed and unknown lines mixed in.</summary>
    static IEnumerable<string> Lines()
    {
        var inv = CultureInfo.InvariantCulture;
        for (int i = 0; i < TrainLines; i++)
        {
            var step = i * StepsPerLine;
            var decay = Math.Exp(-i / 10.0);
            // MIM is switched on only from the fifth line: terms present only when enabled.
            var mim = i >= 5 ? string.Create(inv, $",\"mim\":{0.7 * decay}") : "";
            yield return string.Create(inv,
                $"{{\"kind\":\"train\",\"step\":{step},\"time\":\"2026-11-26T20:30:00Z\",\"elapsed_s\":{i * 0.5},\"loss\":{9 * decay + 1},\"itc\":{2 * decay}," +
                $"\"itm\":0.6,\"mlm\":{5 * decay + 0.5}{mim},\"mrm\":{0.7 * decay},\"lr\":0.0003,\"pairs_per_s\":31.5}}");
            if (i % EvalEvery == 0)
                foreach (var (set, images) in new[] { ("emoji-test", 181), ("emoji-openmoji", 400) })
                {
                    var r = 100.0 / images * (1 + i);
                    yield return string.Create(inv,
                        $"{{\"kind\":\"eval\",\"step\":{step},\"time\":\"2026-11-26T20:31:00Z\",\"elapsed_s\":{i},\"set\":\"{set}\",\"images\":{images},\"texts\":{4 * images}," +
                        $"\"chance\":{100.0 / images},\"tr1\":{r},\"tr5\":{3 * r},\"tr10\":{5 * r},\"ir1\":{r / 2},\"ir5\":{2 * r},\"ir10\":{4 * r},\"r_mean\":{(r + 3 * r + 5 * r + r / 2 + 2 * r + 4 * r) / 6}}}");
                }
            if (i == 3) foreach (var bad in Malformed) yield return bad;
            if (i == 7) { yield return UnknownKind; yield return DashboardLine; yield return ""; }
        }
    }

    [Fact]
    public void The_reader_keeps_good_lines_and_counts_bad_ones()
    {
        var log = MetricsLog.Parse(Lines());
        Assert.Equal(TrainLines, log.Train.Count);
        Assert.Equal(2 * TrainLines / EvalEvery, log.Eval.Count);
        Assert.Equal(Malformed.Length, log.Malformed);
        Assert.Equal(1, log.UnknownKind);
        Assert.Equal(["itc", "itm", "mlm", "mrm"], log.Train[0].Terms.Keys.Order());
        Assert.False(log.Train[4].Terms.ContainsKey("mim"));
        Assert.Equal(0.7 * Math.Exp(-0.5), log.Train[5].Terms["mim"], 9);
        Assert.Equal(10, log.Train[0].Loss, 9);
        Assert.Equal(31.5, log.Train[0].PairsPerSecond);
        var first = log.Eval[0];
        Assert.Equal(("emoji-test", 181, 724), (first.Set, first.Images, first.Texts));
        Assert.Equal(100.0 / 181, first.Chance!.Value, 9);
        Assert.Equal(100.0 / 181 / 2, first.Metrics.Ir1, 9);
    }

    [SkippableFact]
    public void Plot_writes_both_charts_and_warns_about_skipped_lines()
    {
        using var run = new TempFolder();
        File.WriteAllLines(run.File(MetricsLog.FileName), Lines());
        var outDir = run.File("charts");

        var (code, stdout, stderr) = Cli.Run("plot", run.Path, "--out", outDir);

        Assert.Equal(0, code);
        Assert.Contains($"skipped {Malformed.Length} malformed lines and 1 lines of unknown kind", stderr);
        var written = stdout.Split('\n', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
        Assert.Equal([Path.Combine(outDir, "losses.png"), Path.Combine(outDir, "eval.png")], written);
        foreach (var png in written)
        {
            Assert.True(new FileInfo(png).Length > MinPngBytes, $"{png} is only {new FileInfo(png).Length} bytes");
            using var bitmap = SKBitmap.Decode(png);
            Assert.Equal((1200, 700), (bitmap.Width, bitmap.Height));
            Assert.True(DistinctColours(bitmap) > 20, $"{png} looks blank");
        }
        Assert.False(File.Exists(run.File("losses.png")));
        Skip.If(ChartFonts.Ensure() is null, "no TrueType font under /usr/share/fonts or ~/.fonts: the charts have no titles to check (apt install fonts-dejavu-core)");
        foreach (var png in written)
        {
            using var bitmap = SKBitmap.Decode(png);
            Assert.True(DarkPixelsInTitle(bitmap) > MinTitlePixels, $"{png} has no title text");
        }
    }

    static int DistinctColours(SKBitmap bitmap) => bitmap.Pixels.Select(p => (uint)p).Distinct().Count();

    // The title is dark text centred in the top band; without a usable font that band stays white.
    const int TitleBand = 30, MinTitlePixels = 50, Dark = 100;
    static int DarkPixelsInTitle(SKBitmap bitmap) =>
        Enumerable.Range(0, TitleBand).Sum(y => Enumerable.Range(bitmap.Width / 4, bitmap.Width / 2).Count(x => bitmap.GetPixel(x, y).Red < Dark));

    [Fact]
    public void Without_out_the_charts_go_into_the_run_folder_and_a_run_without_eval_gets_no_eval_chart()
    {
        using var run = new TempFolder();
        File.WriteAllLines(run.File(MetricsLog.FileName), Lines().Where(l => !l.Contains("\"eval\"")));
        var (code, _, stderr) = Cli.Run("plot", run.Path);
        Assert.Equal(0, code);
        Assert.True(File.Exists(run.File("losses.png")));
        Assert.False(File.Exists(run.File("eval.png")));
        Assert.Contains("no eval lines", stderr);
    }

    [Fact]
    public void A_fine_tuning_run_gets_a_chart_of_its_prequential_and_held_out_accuracy()
    {
        using var run = new TempFolder();
        var lines = Enumerable.Range(1, 20).Select(i => string.Create(CultureInfo.InvariantCulture,
                $"{{\"kind\":\"train\",\"step\":{10 * i},\"loss\":{2.0 / i},\"classify\":{2.0 / i},\"preq_acc\":{i / 40.0},\"preq_acc_window\":{i / 30.0},\"preq_acc_faded\":{i / 25.0}}}"))
            .Concat(Enumerable.Range(0, 3).Select(i => $"{{\"kind\":\"eval\",\"step\":{100 * i},\"set\":\"emoji-labels-test\",\"examples\":181,\"accuracy\":{0.2 + 0.2 * i},\"macro_f1\":0.1}}"))
            .ToList();
        File.WriteAllLines(run.File(MetricsLog.FileName), lines);

        var log = MetricsLog.Parse(lines);
        Assert.Equal(0, log.Malformed);
        Assert.Equal(["preq_acc", "preq_acc_faded", "preq_acc_window"], log.Train[0].Scores.Keys.Order());
        Assert.Equal(Enumerable.Range(0, 3).Select(i => 0.2 + 0.2 * i), log.Classify.Select(c => c.Accuracy));
        Assert.Equal(["classify"], log.Train[0].Terms.Keys);

        var (code, stdout, _) = Cli.Run("plot", run.Path);
        Assert.Equal(0, code);
        Assert.Contains(run.File("finetune.png"), stdout);
        using var bitmap = SKBitmap.Decode(run.File("finetune.png"));
        Assert.True(DistinctColours(bitmap) > 20, "finetune.png looks blank");
        Assert.False(File.Exists(run.File("eval.png")));   // no retrieval evaluation in this run
    }

    [Fact]
    public void A_run_without_metrics_is_a_usage_error()
    {
        using var run = new TempFolder();
        var (code, stdout, stderr) = Cli.Run("plot", run.Path);
        Assert.Equal(2, code);
        Assert.Empty(stdout);
        Assert.Contains("no metrics.jsonl", stderr);

        File.WriteAllLines(run.File(MetricsLog.FileName), Malformed);
        (code, _, stderr) = Cli.Run("plot", run.Path);
        Assert.Equal(2, code);
        Assert.Contains("no train or eval lines", stderr);
    }
}
