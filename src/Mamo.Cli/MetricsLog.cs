using Mamo.Actors.Pipeline;

namespace Mamo.Cli;

/// <summary>
/// Reads a run's metrics.jsonl through the types that write it (Actors/Pipeline/MetricsLines): its train lines, and
/// its eval lines of retrieval sets and of a classifier's labelled sets. Lines that are not JSON objects, or lack a
/// field their kind needs, are counted as malformed; lines of a kind this reader does not know are counted apart.
/// Neither stops the reading.
/// </summary>
public sealed class MetricsLog
{
    public const string FileName = Metrics.MetricsFile;
    /// <summary>Kinds written for the dashboard (docs/DASHBOARD.md), which the plots do not draw.</summary>
    static readonly HashSet<string> DashboardKinds = ["start", "state", "config", "process", "kafka", "checkpoint", "probe", "thumbnail", "publish"];

    public IReadOnlyList<TrainLine> Train { get; }
    public IReadOnlyList<RetrievalEvalLine> Eval { get; }
    public IReadOnlyList<ClassifyEvalLine> Classify { get; }
    public int Malformed { get; }
    public int UnknownKind { get; }

    MetricsLog(IReadOnlyList<TrainLine> train, IReadOnlyList<RetrievalEvalLine> eval, IReadOnlyList<ClassifyEvalLine> classify, int malformed, int unknownKind)
    {
        Train = train;
        Eval = eval;
        Classify = classify;
        Malformed = malformed;
        UnknownKind = unknownKind;
    }

    public static MetricsLog Read(string path) => Parse(File.ReadLines(path));

    public static MetricsLog Parse(IEnumerable<string> lines)
    {
        var train = new List<TrainLine>();
        var eval = new List<RetrievalEvalLine>();
        var classify = new List<ClassifyEvalLine>();
        int malformed = 0, unknown = 0;
        foreach (var line in lines)
        {
            if (string.IsNullOrWhiteSpace(line)) continue;
            var root = MetricsLine.ParseObject(line);
            switch (root is null ? null : MetricsLine.Text(root, "kind"))
            {
                case "train" when TrainLine.Parse(root!) is { } t: train.Add(t); break;
                case "eval" when RetrievalEvalLine.Parse(root!) is { } e: eval.Add(e); break;
                case "eval" when ClassifyEvalLine.Parse(root!) is { } c: classify.Add(c); break;
                case "train" or "eval" or null: malformed++; break;
                case var other when DashboardKinds.Contains(other): break;
                default: unknown++; break;
            }
        }
        return new MetricsLog(train, eval, classify, malformed, unknown);
    }
}
