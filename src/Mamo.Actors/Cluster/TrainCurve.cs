using System.Diagnostics;
using Mamo.Actors.Pipeline;

namespace Mamo.Actors.Cluster;

/// <summary>A cluster run's training curve: the coordinator's train lines in RUN_DIR/metrics.jsonl, the single node's
/// TrainLine, so that `mamo plot` and the dashboard draw a cluster run's losses as they draw a single node's. The
/// evaluator and the publisher append to the same file from other nodes (AppendFile).</summary>
public sealed class TrainCurve(string runDir)
{
    readonly Stopwatch sinceLine = Stopwatch.StartNew();
    long pairs;

    /// <summary>Pairs trained since the last line, for its pairs_per_s.</summary>
    public void Trained(long count) => pairs += count;

    public void Write(TrainLine line)
    {
        line = line with { PairsPerSecond = pairs / Math.Max(1e-9, sinceLine.Elapsed.TotalSeconds) };
        pairs = 0;
        sinceLine.Restart();
        try { Metrics.AppendLine(runDir, line); }
        catch (IOException e) { Serilog.Log.Warning("{Metrics} not written: {Error}", Path.Combine(runDir, Metrics.MetricsFile), e.Message); }
    }
}
