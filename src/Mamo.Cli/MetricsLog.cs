using System.Text.Json.Nodes;
using Mamo.Model;
using static Mamo.Cli.MetricsFields;

namespace Mamo.Cli;

/// <summary>A `"kind":"train"` line of metrics.jsonl: the total loss, each enabled term, learning rate and throughput.</summary>
/// <param name="Scores">fine-tuning's prequential scores (preq_*), as fractions; empty in pre-training</param>
public sealed record TrainRecord(long Step, double Loss, IReadOnlyDictionary<string, double> Terms, double? LearningRate, double? PairsPerSecond)
{
    public IReadOnlyDictionary<string, double> Scores { get; init; } = new Dictionary<string, double>();
}

/// <summary>A `"kind":"eval"` line of a fine-tuned classifier: accuracy and macro-F1 on one labelled set, as fractions.</summary>
public sealed record ClassifyRecord(long Step, string Set, double Accuracy, double MacroF1);

/// <summary>A `"kind":"eval"` line of metrics.jsonl: retrieval on one held-out set. <see cref="Chance"/> is R@1 by chance, in percent.</summary>
public sealed record EvalRecord(long Step, string Set, RetrievalMetrics Metrics, int? Images, int? Texts, double? Chance);

/// <summary>
/// Reads a run's metrics.jsonl. Lines that are not JSON objects, or lack a field their kind needs, are counted as
/// malformed; lines of a kind this reader does not know are counted apart. Neither stops the reading.
/// </summary>
public sealed class MetricsLog
{
    public const string FileName = "metrics.jsonl";
    /// <summary>The loss terms a train line may carry, in the order MAMO names them.</summary>
    public static readonly IReadOnlyList<string> LossTerms = ["itc", "itm", "mlm", "mim", "mrm", "classify"];
    const string ScorePrefix = "preq_";
    /// <summary>Kinds written for the dashboard (docs/DASHBOARD.md), which the plots do not draw.</summary>
    static readonly HashSet<string> DashboardKinds = ["start", "state", "process", "kafka", "checkpoint", "probe", "thumbnail", "publish"];

    public IReadOnlyList<TrainRecord> Train { get; }
    public IReadOnlyList<EvalRecord> Eval { get; }
    public IReadOnlyList<ClassifyRecord> Classify { get; }
    public int Malformed { get; }
    public int UnknownKind { get; }

    MetricsLog(IReadOnlyList<TrainRecord> train, IReadOnlyList<EvalRecord> eval, IReadOnlyList<ClassifyRecord> classify, int malformed, int unknownKind)
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
        var train = new List<TrainRecord>();
        var eval = new List<EvalRecord>();
        var classify = new List<ClassifyRecord>();
        int malformed = 0, unknown = 0;
        foreach (var line in lines)
        {
            if (string.IsNullOrWhiteSpace(line)) continue;
            var root = ParseLine(line);
            switch (root is null ? null : Text(root, "kind"))
            {
                case "train" when ParseTrain(root!) is { } t: train.Add(t); break;
                case "eval" when ParseEval(root!) is { } e: eval.Add(e); break;
                case "eval" when ParseClassify(root!) is { } c: classify.Add(c); break;
                case "train" or "eval" or null: malformed++; break;
                case var other when DashboardKinds.Contains(other): break;
                default: unknown++; break;
            }
        }
        return new MetricsLog(train, eval, classify, malformed, unknown);
    }

    static TrainRecord? ParseTrain(JsonObject line)
    {
        if (Integer(line, "step") is not { } step || Number(line, "loss") is not { } loss) return null;
        var terms = LossTerms.Where(t => Number(line, t) is not null).ToDictionary(t => t, t => Number(line, t)!.Value);
        var scores = line.Where(p => p.Key.StartsWith(ScorePrefix) && Number(p.Value) is not null).ToDictionary(p => p.Key, p => Number(p.Value)!.Value);
        return new TrainRecord(step, loss, terms, Number(line, "lr"), Number(line, "pairs_per_s")) { Scores = scores };
    }

    static ClassifyRecord? ParseClassify(JsonObject line)
    {
        if (Integer(line, "step") is not { } step || Text(line, "set") is not { } set) return null;
        if (Number(line, "accuracy") is not { } accuracy || Number(line, "macro_f1") is not { } f1) return null;
        return new ClassifyRecord(step, set, accuracy, f1);
    }

    static EvalRecord? ParseEval(JsonObject line)
    {
        if (Integer(line, "step") is not { } step || Text(line, "set") is not { } set) return null;
        var recalls = new[] { "tr1", "tr5", "tr10", "ir1", "ir5", "ir10" }.Select(name => Number(line, name)).ToArray();
        if (recalls.Any(r => r is null)) return null;
        var metrics = new RetrievalMetrics(recalls[0]!.Value, recalls[1]!.Value, recalls[2]!.Value, recalls[3]!.Value, recalls[4]!.Value, recalls[5]!.Value);
        return new EvalRecord(step, set, metrics, (int?)Integer(line, "images"), (int?)Integer(line, "texts"), Number(line, "chance"));
    }
}
