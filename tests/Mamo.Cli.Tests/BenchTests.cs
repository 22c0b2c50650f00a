using System.Text.RegularExpressions;
using Xunit;

namespace Mamo.Cli.Tests;

public class BenchTests
{
    [Fact]
    public void Bench_step_reports_parameters_and_step_times()
    {
        var (code, stdout, stderr) = Cli.Run("bench", "step", "--batch-size", "2", "--steps", "3", "--warmup", "1");
        Assert.True(code == 0, stderr);
        Assert.Contains("preset tiny, 10,111,165 parameters, batch 2", stdout);
        var m = Regex.Match(stdout, @"median (\d+\.\d), min (\d+\.\d), max (\d+\.\d) over 3 steps");
        Assert.True(m.Success, stdout);
        double Group(int i) => double.Parse(m.Groups[i].Value, System.Globalization.CultureInfo.InvariantCulture);
        Assert.True(Group(2) > 0 && Group(2) <= Group(1) && Group(1) <= Group(3));
    }

    [Fact]
    public void Bench_step_json_counts_flops_from_the_shapes()
    {
        var (code, stdout, stderr) = Cli.Run("bench", "step", "--batch-size", "32", "--steps", "1", "--warmup", "0", "--peak-seconds", "0.05", "--json");
        Assert.True(code == 0, stderr);
        var report = System.Text.Json.JsonDocument.Parse(stdout).RootElement;
        double Get(string key) => report.GetProperty(key).GetDouble();
        // Step = teacher forward + 3 x student forward; achieved = FLOPs / median time; MFU = achieved / peak.
        Assert.Equal(Get("teacher_forward_gflop") + 3 * Get("student_forward_gflop"), Get("step_gflop"), 6);
        Assert.Equal(Get("step_gflop") / (Get("median_ms") / 1000), Get("achieved_gflops"), 3);
        Assert.Equal(Get("achieved_gflops") / Get("peak_gflops"), Get("mfu"), 6);
        // The count is exact: docs/PERFORMANCE.md gives tiny at batch 32 (the student's part holds its seeded mask's tokens).
        Assert.Equal((13.75, 18.38, 68.9), (Math.Round(Get("teacher_forward_gflop"), 2), Math.Round(Get("student_forward_gflop"), 2), Math.Round(Get("step_gflop"), 1)));
        Assert.True(Get("peak_gflops") > 0);
    }

    [Fact]
    public void Bench_kafka_reads_back_every_ingested_record_through_preprocessing()
    {
        var (code, stdout, stderr) = Cli.Run("bench", "kafka", "--records", "60");
        Assert.True(code == 0, stderr);
        Assert.Matches(@"^60 of 60 records from Kafka through decode, transform and tokenise in [\d.]+s: \d+ records/s", stdout);
    }
}
