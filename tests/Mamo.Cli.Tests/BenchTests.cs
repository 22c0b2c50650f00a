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
}
