using System.Globalization;
using System.Text.Json;
using Mamo.Model;

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
            try
            {
                using var doc = JsonDocument.Parse(line);
                var root = doc.RootElement;
                var kind = root.ValueKind == JsonValueKind.Object && root.TryGetProperty("kind", out var k) && k.ValueKind == JsonValueKind.String ? k.GetString() : null;
                switch (kind)
                {
                    case "train" when ParseTrain(root) is { } t: train.Add(t); break;
                    case "eval" when ParseEval(root) is { } e: eval.Add(e); break;
                    case "eval" when ParseClassify(root) is { } c: classify.Add(c); break;
                    case "train" or "eval" or null: malformed++; break;
                    case var other when DashboardKinds.Contains(other): break;
                    default: unknown++; break;
                }
            }
            catch (JsonException)
            {
                malformed++;
            }
        }
        return new MetricsLog(train, eval, classify, malformed, unknown);
    }

    static TrainRecord? ParseTrain(JsonElement line)
    {
        if (Integer(line, "step") is not { } step || Number(line, "loss") is not { } loss) return null;
        var terms = LossTerms.Where(t => Number(line, t) is not null).ToDictionary(t => t, t => Number(line, t)!.Value);
        var scores = line.EnumerateObject().Where(p => p.Name.StartsWith(ScorePrefix) && Number(line, p.Name) is not null)
            .ToDictionary(p => p.Name, p => Number(line, p.Name)!.Value);
        return new TrainRecord(step, loss, terms, Number(line, "lr"), Number(line, "pairs_per_s")) { Scores = scores };
    }

    static ClassifyRecord? ParseClassify(JsonElement line)
    {
        if (Integer(line, "step") is not { } step || !line.TryGetProperty("set", out var set) || set.ValueKind != JsonValueKind.String) return null;
        if (Number(line, "accuracy") is not { } accuracy || Number(line, "macro_f1") is not { } f1) return null;
        return new ClassifyRecord(step, set.GetString()!, accuracy, f1);
    }

    static EvalRecord? ParseEval(JsonElement line)
    {
        if (Integer(line, "step") is not { } step || !line.TryGetProperty("set", out var set) || set.ValueKind != JsonValueKind.String) return null;
        var recalls = new[] { "tr1", "tr5", "tr10", "ir1", "ir5", "ir10" }.Select(name => Number(line, name)).ToArray();
        if (recalls.Any(r => r is null)) return null;
        var metrics = new RetrievalMetrics(recalls[0]!.Value, recalls[1]!.Value, recalls[2]!.Value, recalls[3]!.Value, recalls[4]!.Value, recalls[5]!.Value);
        return new EvalRecord(step, set.GetString()!, metrics, (int?)Integer(line, "images"), (int?)Integer(line, "texts"), Number(line, "chance"));
    }

    /// <summary>A number, or a non-finite one written as a string ("NaN", "Infinity"); null when absent or not a number.</summary>
    static double? Number(JsonElement line, string name)
    {
        if (!line.TryGetProperty(name, out var v)) return null;
        if (v.ValueKind == JsonValueKind.Number && v.TryGetDouble(out var d)) return d;
        if (v.ValueKind == JsonValueKind.String && double.TryParse(v.GetString(), NumberStyles.Float, CultureInfo.InvariantCulture, out d)) return d;
        return null;
    }

    static long? Integer(JsonElement line, string name) =>
        line.TryGetProperty(name, out var v) && v.ValueKind == JsonValueKind.Number && v.TryGetInt64(out var i) ? i : null;
}
