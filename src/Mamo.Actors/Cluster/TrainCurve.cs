using System.Diagnostics;
using System.Text.Json.Nodes;
using Mamo.Actors.Pipeline;

namespace Mamo.Actors.Cluster;

/// <summary>A cluster run's training curve: the coordinator's train lines in RUN_DIR/metrics.jsonl, in single-node's
/// format, so that `mamo plot` and the dashboard draw a cluster run's losses as they draw a single node's. The
/// evaluator and the publisher append to the same file from other nodes (AppendFile).</summary>
public sealed class TrainCurve(string runDir)
{
    readonly string path = Path.Combine(runDir, Metrics.MetricsFile);
    readonly Stopwatch sinceLine = Stopwatch.StartNew();
    long pairs;

    /// <summary>Pairs trained since the last line, for its pairs_per_s.</summary>
    public void Trained(long count) => pairs += count;

    /// <param name="more">fields after the loss terms (lr, grad_norm, round)</param>
    public void Write(long step, double loss, IReadOnlyDictionary<string, double> terms, Dictionary<string, JsonNode?> more)
    {
        var fields = new Dictionary<string, JsonNode?> { ["step"] = step, ["loss"] = Metrics.Finite(loss) };
        foreach (var (name, value) in terms) fields[name] = Metrics.Finite(value);
        foreach (var (name, value) in more) fields[name] = value;
        fields["pairs_per_s"] = Math.Round(pairs / Math.Max(1e-9, sinceLine.Elapsed.TotalSeconds), 2);
        pairs = 0;
        sinceLine.Restart();
        try { AppendFile.AppendLine(path, Metrics.Line("train", fields).ToJsonString()); }
        catch (IOException e) { Serilog.Log.Warning("{Metrics} not written: {Error}", path, e.Message); }
    }
}
