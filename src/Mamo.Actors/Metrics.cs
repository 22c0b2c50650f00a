using System.Globalization;
using System.Text.Json;
using System.Text.Json.Nodes;
using Akka.Actor;
using Mamo.Data;
using Serilog;

namespace Mamo.Actors;

/// <summary>What a progress display shows.</summary>
/// <param name="Scores">the objective's running scores (prequential accuracy); empty: none</param>
/// <param name="LastClassify">the latest held-out classification result; null: none yet</param>
public sealed record RunProgress(long Step, double PairsPerSecond, double Loss, IReadOnlyDictionary<string, double> Terms, double LearningRate,
    long DeadLetters, long NonFiniteSteps, Evaluator.EvalCompleted? LastEval, long? LastCheckpointStep, TimeSpan Elapsed, TimeSpan? Remaining)
{
    public IReadOnlyDictionary<string, double> Scores { get; init; } = new Dictionary<string, double>();
    public Evaluator.ClassifyCompleted? LastClassify { get; init; }
}

/// <summary>Structured logs, metrics.jsonl, the optional ledger, dead-letters.jsonl, and progress for the console.</summary>
public sealed class Metrics : ReceiveActor
{
    /// <summary>A sample or record that could not be used, with its reason.</summary>
    public sealed record DeadLetter(BadInput Bad);

    public const string MetricsFile = "metrics.jsonl", LedgerFile = "ledger.jsonl", DeadLetterFile = "dead-letters.jsonl";

    readonly StreamWriter metricsOut;
    readonly StreamWriter? ledgerOut;
    readonly StreamWriter deadLetterOut;
    readonly int everySteps;
    readonly IProgress<RunProgress>? progress;
    readonly DateTime started = DateTime.UtcNow;
    readonly Func<long, TimeSpan?> remaining;
    Evaluator.EvalCompleted? lastEval;
    Evaluator.ClassifyCompleted? lastClassify;
    long deadLetters, nonFinite, pairsSinceLog, lastCheckpoint = -1;
    DateTime lastLog = DateTime.UtcNow;

    public Metrics(string runDir, int everySteps, bool ledger, IProgress<RunProgress>? progress, Func<long, TimeSpan?> remaining)
    {
        this.everySteps = everySteps;
        this.progress = progress;
        this.remaining = remaining;
        Directory.CreateDirectory(runDir);
        metricsOut = Append(Path.Combine(runDir, MetricsFile));
        deadLetterOut = Append(Path.Combine(runDir, DeadLetterFile));
        if (ledger) ledgerOut = Append(Path.Combine(runDir, LedgerFile));

        Receive<TrainerReplica.StepCompleted>(OnStep);
        Receive<Evaluator.EvalCompleted>(OnEval);
        Receive<Evaluator.ClassifyCompleted>(OnClassify);
        Receive<DeadLetter>(OnDeadLetter);
        Receive<Checkpointer.CheckpointDurable>(c => lastCheckpoint = c.Step);
    }

    public static Props Props(string runDir, int everySteps, bool ledger, IProgress<RunProgress>? progress, Func<long, TimeSpan?> remaining) =>
        Akka.Actor.Props.Create(() => new Metrics(runDir, everySteps, ledger, progress, remaining)).WithDispatcher(Dispatchers.Io);

    protected override void PreStart() => Context.System.EventStream.Subscribe(Self, typeof(Checkpointer.CheckpointDurable));

    static StreamWriter Append(string path) => new(new FileStream(path, FileMode.Append, FileAccess.Write, FileShare.Read)) { AutoFlush = true };

    void OnStep(TrainerReplica.StepCompleted s)
    {
        var r = s.Result;
        pairsSinceLog += s.Ids.Length;
        if (r.Skipped)
        {
            nonFinite++;
            Log.Warning("step {Step}: non-finite loss {Loss}; update skipped ({InARow} in a row)", r.Step, r.Loss, s.NonFiniteInARow);
        }
        if (ledgerOut is not null)
        {
            var line = new JsonObject
            {
                ["step"] = r.Step, ["position"] = new JsonObject(s.Position.Offsets.Select(kv => KeyValuePair.Create(kv.Key, (JsonNode?)kv.Value))), ["loss"] = Finite(r.Loss), ["skipped"] = r.Skipped,
                ["ids"] = Strings(s.Ids),
            };
            // Test, then train: each prediction was made by the weights of `predicted_at` (before step `step`'s update).
            if (r.Predictions is { } predicted)
            {
                line["predicted_at"] = r.Step;
                line["predictions"] = Strings(predicted);
                line["labels"] = Strings(s.Labels?.Select(l => l ?? "") ?? []);
            }
            ledgerOut.WriteLine(line.ToJsonString());
        }
        if ((r.Step + 1) % everySteps != 0) return;

        var now = DateTime.UtcNow;
        var pairsPerSecond = pairsSinceLog / Math.Max(1e-9, (now - lastLog).TotalSeconds);
        pairsSinceLog = 0;
        lastLog = now;
        var entry = new JsonObject
        {
            ["kind"] = "train", ["step"] = r.Step + 1, ["time"] = now.ToString("O", CultureInfo.InvariantCulture),
            ["elapsed_s"] = Math.Round((now - started).TotalSeconds, 3), ["loss"] = Finite(r.Loss),
        };
        foreach (var (name, value) in r.Terms) entry[name] = Finite(value);
        foreach (var (name, value) in r.Scores) entry[name] = Math.Round(value, 6);
        entry["lr"] = r.LearningRate;
        entry["grad_norm"] = Finite(r.GradNorm);
        entry["pairs_per_s"] = Math.Round(pairsPerSecond, 2);
        entry["dead_letters"] = deadLetters;
        metricsOut.WriteLine(entry.ToJsonString());
        Log.Information("step {Step} loss {Loss:F4} ({Terms}) lr {Lr:E2} {PairsPerSecond:F1} pairs/s",
            r.Step + 1, r.Loss, string.Join(" ", r.Terms.Select(t => $"{t.Key}={t.Value:F3}")), r.LearningRate, pairsPerSecond);
        progress?.Report(new RunProgress(r.Step + 1, pairsPerSecond, r.Loss, r.Terms, r.LearningRate, deadLetters, nonFinite, lastEval,
            lastCheckpoint >= 0 ? lastCheckpoint : null, now - started, remaining(r.Step + 1)) { Scores = r.Scores, LastClassify = lastClassify });
    }

    void OnEval(Evaluator.EvalCompleted e)
    {
        lastEval = e;
        var m = e.Metrics;
        WriteEval(e.Step, e.Set, e.Took, new()
        {
            ["images"] = e.Images, ["texts"] = e.Texts, ["chance"] = Math.Round(100.0 / e.Images, 4),
            ["tr1"] = m.Tr1, ["tr5"] = m.Tr5, ["tr10"] = m.Tr10, ["ir1"] = m.Ir1, ["ir5"] = m.Ir5, ["ir10"] = m.Ir10, ["r_mean"] = m.RMean,
        });
        Log.Information("eval {Set} at step {Step}: TR@1 {Tr1:F1} TR@5 {Tr5:F1} TR@10 {Tr10:F1} IR@1 {Ir1:F1} IR@5 {Ir5:F1} IR@10 {Ir10:F1} r_mean {RMean:F1} (chance {Chance:F2}%, {Took:F0}s)",
            e.Set, e.Step, m.Tr1, m.Tr5, m.Tr10, m.Ir1, m.Ir5, m.Ir10, m.RMean, 100.0 / e.Images, e.Took.TotalSeconds);
    }

    void OnClassify(Evaluator.ClassifyCompleted e)
    {
        lastClassify = e;
        var r = e.Report;
        WriteEval(e.Step, e.Set, e.Took, new() { ["examples"] = r.Examples, ["accuracy"] = Math.Round(r.Accuracy, 6), ["macro_f1"] = Math.Round(r.MacroF1, 6) });
        Log.Information("eval {Set} at step {Step}: accuracy {Accuracy:P1} macro-F1 {MacroF1:F3} ({Examples} examples, {Took:F0}s)",
            e.Set, e.Step, r.Accuracy, r.MacroF1, r.Examples, e.Took.TotalSeconds);
    }

    /// <summary>An eval line of metrics.jsonl: kind, step, time and set, then the scores, then how long it took.</summary>
    void WriteEval(long step, string set, TimeSpan took, Dictionary<string, JsonNode?> scores)
    {
        var now = DateTime.UtcNow;
        var entry = new JsonObject
        {
            ["kind"] = "eval", ["step"] = step, ["time"] = now.ToString("O", CultureInfo.InvariantCulture),
            ["elapsed_s"] = Math.Round((now - started).TotalSeconds, 3), ["set"] = set,
        };
        foreach (var (k, v) in scores) entry[k] = v;
        entry["took_s"] = Math.Round(took.TotalSeconds, 2);
        metricsOut.WriteLine(entry.ToJsonString());
    }

    static JsonArray Strings(IEnumerable<string> values) => new(values.Select(v => (JsonNode)JsonValue.Create(v)!).ToArray());

    void OnDeadLetter(DeadLetter d)
    {
        deadLetters++;
        var entry = new JsonObject
        {
            ["time"] = DateTime.UtcNow.ToString("O", CultureInfo.InvariantCulture), ["reason"] = d.Bad.Reason, ["location"] = d.Bad.Location,
            ["source"] = d.Bad.Position?.Source, ["offset"] = d.Bad.Position?.Offset,
        };
        deadLetterOut.WriteLine(entry.ToJsonString());
        Log.Warning("dead letter: {Reason} at {Location}", d.Bad.Reason, d.Bad.Location);
    }

    static JsonNode? Finite(double v) => double.IsFinite(v) ? JsonValue.Create(v) : JsonValue.Create(v.ToString(CultureInfo.InvariantCulture));

    protected override void PostStop()
    {
        metricsOut.Dispose();
        ledgerOut?.Dispose();
        deadLetterOut.Dispose();
        base.PostStop();
    }
}
