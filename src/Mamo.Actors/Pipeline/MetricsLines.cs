using System.Globalization;
using System.Text.Json;
using System.Text.Json.Nodes;
using Mamo.Actors.Sources;
using Mamo.Actors.Run;
using Mamo.Model;

namespace Mamo.Actors.Pipeline;

/// <summary>A line of a run's metrics.jsonl (docs/DASHBOARD.md), one record per kind, written and read through the
/// same type: the Metrics actor and a coordinator's curve write them, `mamo plot` and the dashboard read them. A
/// non-finite number is written as a string ("NaN"); a field that is absent or of another type reads as null.</summary>
public abstract record MetricsLine
{
    public DateTime Time { get; init; } = DateTime.UtcNow;
    public abstract string Kind { get; }

    public JsonObject ToJson()
    {
        var line = new JsonObject { ["kind"] = Kind, ["time"] = Time.ToString("O", CultureInfo.InvariantCulture) };
        Write(line);
        return line;
    }

    public sealed override string ToString() => ToJson().ToJsonString();

    protected abstract void Write(JsonObject line);

    static readonly JsonDocumentOptions Strict = new() { AllowDuplicateProperties = false };

    /// <summary>A line as an object; null when it is not JSON, not an object, or names a field twice (which value would
    /// it mean?).</summary>
    public static JsonObject? ParseObject(string line)
    {
        try { return JsonNode.Parse(line, documentOptions: Strict) as JsonObject; }
        catch (JsonException) { return null; }
    }

    public static string? Text(JsonObject line, string name) => line[name] is JsonValue v && v.TryGetValue<string>(out var s) ? s : null;

    public static double? Number(JsonObject line, string name) => Number(line[name]);

    public static double? Number(JsonNode? node)
    {
        if (node is not JsonValue v) return null;
        if (v.GetValueKind() == JsonValueKind.Number) return v.GetValue<double>();
        return v.TryGetValue<string>(out var s) && double.TryParse(s, NumberStyles.Float, CultureInfo.InvariantCulture, out var d) ? d : null;
    }

    public static long? Integer(JsonObject line, string name) =>
        line[name] is JsonValue v && v.GetValueKind() == JsonValueKind.Number && v.TryGetValue<long>(out var i) ? i : null;

    public static bool? Flag(JsonObject line, string name) =>
        line[name] is JsonValue v && v.GetValueKind() is JsonValueKind.True or JsonValueKind.False ? v.GetValue<bool>() : null;

    /// <summary>A finite number as it is, another as a string ("NaN", "Infinity").</summary>
    public static JsonNode? Finite(double v) => double.IsFinite(v) ? JsonValue.Create(v) : JsonValue.Create(v.ToString(CultureInfo.InvariantCulture));

    internal static IReadOnlyDictionary<string, long> ReadOffsets(JsonNode? node) =>
        node is JsonObject o ? o.Where(p => p.Value is JsonValue v && v.GetValueKind() == JsonValueKind.Number).ToDictionary(p => p.Key, p => p.Value!.GetValue<long>())
            : new Dictionary<string, long>();

    internal static JsonArray Strings(IEnumerable<string> values) => new(values.Select(v => (JsonNode)JsonValue.Create(v)!).ToArray());
}

/// <summary>`train`: a step's total loss and each enabled term, the objective's running scores (fine-tuning's preq_*,
/// as fractions), learning rate, gradient norm, throughput; a cluster's line also its round and replicas.</summary>
public sealed record TrainLine(long Step, double Loss, IReadOnlyDictionary<string, double> Terms) : MetricsLine
{
    /// <summary>The loss terms a train line may carry, in the order the objectives name them.</summary>
    public static readonly IReadOnlyList<string> LossTerms = ["itc", "itm", "mlm", "mim", "mrm", "classify"];
    const string ScorePrefix = "preq_";

    public override string Kind => "train";
    public IReadOnlyDictionary<string, double> Scores { get; init; } = new Dictionary<string, double>();
    public double? ElapsedSeconds { get; init; }
    public double? LearningRate { get; init; }
    public double? GradNorm { get; init; }
    public double? PairsPerSecond { get; init; }
    public long? DeadLetters { get; init; }
    public double? EtaSeconds { get; init; }
    public long? Round { get; init; }
    public int? Replicas { get; init; }

    protected override void Write(JsonObject line)
    {
        line["step"] = Step;
        if (ElapsedSeconds is { } elapsed) line["elapsed_s"] = Math.Round(elapsed, 3);
        line["loss"] = Finite(Loss);
        foreach (var (name, value) in Terms) line[name] = Finite(value);
        foreach (var (name, value) in Scores) line[name] = Math.Round(value, 6);
        if (LearningRate is { } lr) line["lr"] = lr;
        if (GradNorm is { } norm) line["grad_norm"] = Finite(norm);
        if (PairsPerSecond is { } pairs) line["pairs_per_s"] = Math.Round(pairs, 2);
        if (DeadLetters is { } dead) line["dead_letters"] = dead;
        if (EtaSeconds is { } eta) line["eta_s"] = Math.Round(eta, 1);
        if (Round is { } round) line["round"] = round;
        if (Replicas is { } replicas) line["replicas"] = replicas;
    }

    /// <summary>Null where the line lacks its step or loss.</summary>
    public static TrainLine? Parse(JsonObject line)
    {
        if (Integer(line, "step") is not { } step || Number(line, "loss") is not { } loss) return null;
        return new TrainLine(step, loss, LossTerms.Where(t => Number(line, t) is not null).ToDictionary(t => t, t => Number(line, t)!.Value))
        {
            Scores = line.Where(p => p.Key.StartsWith(ScorePrefix) && Number(p.Value) is not null).ToDictionary(p => p.Key, p => Number(p.Value)!.Value),
            ElapsedSeconds = Number(line, "elapsed_s"), LearningRate = Number(line, "lr"), GradNorm = Number(line, "grad_norm"),
            PairsPerSecond = Number(line, "pairs_per_s"), DeadLetters = Integer(line, "dead_letters"), EtaSeconds = Number(line, "eta_s"),
            Round = Integer(line, "round"), Replicas = (int?)Integer(line, "replicas"),
        };
    }
}

/// <summary>`eval` of a held-out retrieval set: R@1/5/10 both ways and their mean, in percent; Chance is R@1 by chance.</summary>
public sealed record RetrievalEvalLine(long Step, string Set, RetrievalMetrics Metrics, int? Images, int? Texts) : MetricsLine
{
    public override string Kind => "eval";
    public double? ElapsedSeconds { get; init; }
    public double? TookSeconds { get; init; }
    /// <summary>R@1 by chance, in percent: one over the images.</summary>
    public double? Chance { get; init; } = Images is > 0 and var n ? Math.Round(100.0 / n, 4) : null;

    protected override void Write(JsonObject line)
    {
        line["step"] = Step;
        if (ElapsedSeconds is { } elapsed) line["elapsed_s"] = Math.Round(elapsed, 3);
        line["set"] = Set;
        (line["images"], line["texts"], line["chance"]) = (Images, Texts, Chance);
        var m = Metrics;
        (line["tr1"], line["tr5"], line["tr10"], line["ir1"], line["ir5"], line["ir10"], line["r_mean"]) = (m.Tr1, m.Tr5, m.Tr10, m.Ir1, m.Ir5, m.Ir10, m.RMean);
        if (TookSeconds is { } took) line["took_s"] = Math.Round(took, 2);
    }

    /// <summary>Null where the line is not a retrieval result (a classifier's eval line, or one that lacks a recall).</summary>
    public static RetrievalEvalLine? Parse(JsonObject line)
    {
        if (Integer(line, "step") is not { } step || Text(line, "set") is not { } set) return null;
        var recalls = new[] { "tr1", "tr5", "tr10", "ir1", "ir5", "ir10" }.Select(name => Number(line, name)).ToArray();
        if (recalls.Any(r => r is null)) return null;
        var metrics = new RetrievalMetrics(recalls[0]!.Value, recalls[1]!.Value, recalls[2]!.Value, recalls[3]!.Value, recalls[4]!.Value, recalls[5]!.Value);
        return new RetrievalEvalLine(step, set, metrics, (int?)Integer(line, "images"), (int?)Integer(line, "texts"))
        {
            Chance = Number(line, "chance"), ElapsedSeconds = Number(line, "elapsed_s"), TookSeconds = Number(line, "took_s"),
        };
    }
}

/// <summary>`eval` of a labelled set by a fine-tuned classifier: accuracy and macro-F1, as fractions.</summary>
public sealed record ClassifyEvalLine(long Step, string Set, double Accuracy, double MacroF1, int? Examples) : MetricsLine
{
    public override string Kind => "eval";
    public double? ElapsedSeconds { get; init; }
    public double? TookSeconds { get; init; }

    protected override void Write(JsonObject line)
    {
        line["step"] = Step;
        if (ElapsedSeconds is { } elapsed) line["elapsed_s"] = Math.Round(elapsed, 3);
        (line["set"], line["examples"], line["accuracy"], line["macro_f1"]) = (Set, Examples, Math.Round(Accuracy, 6), Math.Round(MacroF1, 6));
        if (TookSeconds is { } took) line["took_s"] = Math.Round(took, 2);
    }

    public static ClassifyEvalLine? Parse(JsonObject line)
    {
        if (Integer(line, "step") is not { } step || Text(line, "set") is not { } set) return null;
        if (Number(line, "accuracy") is not { } accuracy || Number(line, "macro_f1") is not { } f1) return null;
        return new ClassifyEvalLine(step, set, accuracy, f1, (int?)Integer(line, "examples")) { ElapsedSeconds = Number(line, "elapsed_s"), TookSeconds = Number(line, "took_s") };
    }
}

/// <summary>`state`: running, paused, restarting or stopped, with why where there is a reason, and the restarts so far.</summary>
public sealed record StateLine(string State, int Restarts, string? Reason = null) : MetricsLine
{
    public override string Kind => "state";

    protected override void Write(JsonObject line)
    {
        (line["state"], line["restarts"]) = (State, Restarts);
        if (Reason is not null) line["reason"] = Reason;
    }

    public static StateLine? Parse(JsonObject line) =>
        Text(line, "state") is { } state ? new StateLine(state, (int)(Integer(line, "restarts") ?? 0), Text(line, "reason")) : null;
}

/// <summary>`config`: a resumed run applies settings other than the ones its folder recorded (Run/RunConfig), each with
/// the value it was and is now (null: unset).</summary>
public sealed record ConfigLine(IReadOnlyList<RunConfig.Change> Changes) : MetricsLine
{
    public override string Kind => "config";

    protected override void Write(JsonObject line) =>
        line["changes"] = new JsonArray(Changes.Select(c => (JsonNode)new JsonObject { ["key"] = c.Key, ["was"] = c.Was, ["now"] = c.Now }).ToArray());
}

/// <summary>`start`: a process began the run: its preset, source and pid.</summary>
public sealed record StartLine(string Preset, string Source, int Pid) : MetricsLine
{
    public override string Kind => "start";
    protected override void Write(JsonObject line) => (line["preset"], line["source"], line["pid"]) = (Preset, Source, Pid);
}

/// <summary>`process`: the process's memory, CPU time, garbage collections, threads and samples read.</summary>
public sealed record ProcessLine(long RssBytes, double CpuSeconds, long GcHeapBytes, int[] Collections, int Threads, long SamplesRead) : MetricsLine
{
    public override string Kind => "process";

    protected override void Write(JsonObject line)
    {
        (line["rss_bytes"], line["cpu_s"], line["gc_heap_bytes"]) = (RssBytes, Math.Round(CpuSeconds, 3), GcHeapBytes);
        (line["gc"], line["threads"], line["samples_read"]) = (new JsonArray(Collections.Select(c => (JsonNode)c).ToArray()), Threads, SamplesRead);
    }

    public static ProcessLine? Parse(JsonObject line) =>
        Integer(line, "rss_bytes") is { } rss && Number(line, "cpu_s") is { } cpu && Integer(line, "gc_heap_bytes") is { } heap
            ? new ProcessLine(rss, cpu, heap, line["gc"] is JsonArray gc ? gc.Select(g => (int?)g ?? 0).ToArray() : [], (int)(Integer(line, "threads") ?? 0),
                Integer(line, "samples_read") ?? 0)
            : null;
}

/// <summary>`kafka`: where the consumer stands in each partition it reads.</summary>
public sealed record KafkaLine(IReadOnlyList<PartitionStatus> Partitions) : MetricsLine
{
    public override string Kind => "kafka";

    protected override void Write(JsonObject line) => line["partitions"] = new JsonObject(Partitions.Select(p => KeyValuePair.Create(p.Partition, (JsonNode?)new JsonObject
    {
        ["position"] = p.Position, ["end"] = p.End, ["lag"] = p.Lag, ["committed"] = p.Committed, ["expired"] = p.Expired,
    })));

    public static KafkaLine Parse(JsonObject line) => new(line["partitions"] is JsonObject partitions
        ? partitions.Where(p => p.Value is JsonObject).Select(p => (Name: p.Key, Status: (JsonObject)p.Value!))
            .Select(p => new PartitionStatus(p.Name, Integer(p.Status, "position"), Integer(p.Status, "end"), Integer(p.Status, "lag"), Integer(p.Status, "committed"),
                Integer(p.Status, "expired") ?? 0))
            .ToList()
        : []);
}

/// <summary>`checkpoint`: a durable checkpoint, its folder, size and the stream offsets it covers.</summary>
public sealed record CheckpointLine(long Step, string Path, long Bytes, IReadOnlyDictionary<string, long> Offsets) : MetricsLine
{
    public override string Kind => "checkpoint";

    protected override void Write(JsonObject line)
    {
        (line["step"], line["path"], line["bytes"]) = (Step, Path, Bytes);
        line["offsets"] = new JsonObject(Offsets.Select(kv => KeyValuePair.Create(kv.Key, (JsonNode?)kv.Value)));
    }

    public static CheckpointLine? Parse(JsonObject line) =>
        Integer(line, "step") is { } step ? new CheckpointLine(step, Text(line, "path") ?? "", Integer(line, "bytes") ?? 0, ReadOffsets(line["offsets"])) : null;
}

/// <summary>`publish`: a model version's embeddings (and the task's predictions) went out.</summary>
public sealed record PublishLine(string Version, long Step, int Records, int Predictions, string Output) : MetricsLine
{
    public override string Kind => "publish";
    protected override void Write(JsonObject line) =>
        (line["version"], line["step"], line["records"], line["predictions"], line["output"]) = (Version, Step, Records, Predictions, Output);
}

/// <summary>`probe`: a held-out set's fixed captions and the images they retrieved at an evaluation.</summary>
public sealed record ProbeLine(long Step, string Set, IReadOnlyList<Evaluator.RetrievalProbe> Probes) : MetricsLine
{
    public override string Kind => "probe";

    protected override void Write(JsonObject line)
    {
        (line["step"], line["set"]) = (Step, Set);
        line["probes"] = new JsonArray(Probes.Select(p => (JsonNode)new JsonObject
        {
            ["caption"] = p.Caption, ["truth"] = p.Truth,
            ["top"] = new JsonArray(p.Top.Select(h => (JsonNode)new JsonObject { ["image"] = h.Image, ["id"] = h.Id, ["score"] = Math.Round(h.Score, 5) }).ToArray()),
        }).ToArray());
    }
}

/// <summary>`thumbnail`: a held-out image's PNG, written once before the first probe line that shows it.</summary>
public sealed record ThumbnailLine(string Set, int Image, byte[] Png) : MetricsLine
{
    public override string Kind => "thumbnail";
    protected override void Write(JsonObject line) => (line["set"], line["image"], line["png"]) = (Set, Image, Convert.ToBase64String(Png));

    /// <summary>Null where a field is missing or the PNG is not base64.</summary>
    public static ThumbnailLine? Parse(JsonObject line)
    {
        if (Text(line, "set") is not { } set || Integer(line, "image") is not { } image || Text(line, "png") is not { } png) return null;
        try { return new ThumbnailLine(set, (int)image, Convert.FromBase64String(png)); }
        catch (FormatException) { return null; }
    }
}

/// <summary>A line of dead-letters.jsonl: what could not be used, why, and where it was; in a cluster run, which node
/// read it (Node).</summary>
public sealed record DeadLetterLine(string Reason, string Location, string? Source, long? Offset)
{
    public DateTime Time { get; init; } = DateTime.UtcNow;
    public string? Node { get; init; }

    public JsonObject ToJson()
    {
        var line = new JsonObject
        {
            ["time"] = Time.ToString("O", CultureInfo.InvariantCulture), ["reason"] = Reason, ["location"] = Location, ["source"] = Source, ["offset"] = Offset,
        };
        if (Node is not null) line["node"] = Node;
        return line;
    }

    public static DeadLetterLine? Parse(JsonObject line) =>
        MetricsLine.Text(line, "reason") is { } reason ? new DeadLetterLine(reason, MetricsLine.Text(line, "location") ?? "", MetricsLine.Text(line, "source"),
            MetricsLine.Integer(line, "offset")) { Node = MetricsLine.Text(line, "node") } : null;
}

/// <summary>A line of ledger.jsonl (--ledger): a step's sample ids, where the stream stood after it, and its loss; a
/// fine-tuned classifier's predictions (made by the weights of predicted_at, before the step's update) and labels; a
/// cluster replica's round and attempt, whose fate a RoundLedgerLine gives.</summary>
public sealed record StepLedgerLine(long Step, IReadOnlyDictionary<string, long> Position, double Loss, bool Skipped, IReadOnlyList<string> Ids)
{
    public IReadOnlyList<string>? Predictions { get; init; }
    public IReadOnlyList<string>? Labels { get; init; }
    public long? Round { get; init; }
    public long? Attempt { get; init; }
    /// <summary>The ids among Ids that the replay buffer gave (the last of them); null or empty: none.</summary>
    public IReadOnlyList<string>? Replayed { get; init; }

    public JsonObject ToJson()
    {
        var line = new JsonObject
        {
            ["step"] = Step, ["position"] = new JsonObject(Position.Select(kv => KeyValuePair.Create(kv.Key, (JsonNode?)kv.Value))),
            ["loss"] = MetricsLine.Finite(Loss), ["skipped"] = Skipped, ["ids"] = MetricsLine.Strings(Ids),
        };
        if (Round is { } round) (line["round"], line["attempt"]) = (round, Attempt);
        if (Replayed is { Count: > 0 }) line["replayed"] = MetricsLine.Strings(Replayed);
        if (Predictions is not null) (line["predicted_at"], line["predictions"], line["labels"]) = (Step, MetricsLine.Strings(Predictions), MetricsLine.Strings(Labels ?? []));
        return line;
    }

    public static StepLedgerLine? Parse(JsonObject line)
    {
        if (MetricsLine.Integer(line, "step") is not { } step || line["ids"] is not JsonArray ids) return null;
        static List<string>? List(JsonNode? node) => node is JsonArray a ? a.Select(x => (string?)x ?? "").ToList() : null;
        return new StepLedgerLine(step, MetricsLine.ReadOffsets(line["position"]), MetricsLine.Number(line, "loss") ?? double.NaN, MetricsLine.Flag(line, "skipped") ?? false,
            List(ids)!)
        {
            Predictions = List(line["predictions"]), Labels = List(line["labels"]), Round = MetricsLine.Integer(line, "round"), Attempt = MetricsLine.Integer(line, "attempt"),
            Replayed = List(line["replayed"]),
        };
    }
}

/// <summary>A line of a cluster replica's ledger.jsonl after a round's steps: whether its coordinator applied the
/// attempt (its effect is in a durable cluster checkpoint), or not (the deadline passed, the round was given up).
/// Steps of an attempt with no such line were not applied either (the replica died first).</summary>
public sealed record RoundLedgerLine(long Round, long Attempt, bool Applied)
{
    public JsonObject ToJson() => new() { ["round"] = Round, ["attempt"] = Attempt, ["applied"] = Applied };

    public static RoundLedgerLine? Parse(JsonObject line) =>
        MetricsLine.Flag(line, "applied") is { } applied && MetricsLine.Integer(line, "round") is { } round && MetricsLine.Integer(line, "attempt") is { } attempt
            ? new RoundLedgerLine(round, attempt, applied) : null;
}
