using System.Diagnostics;
using System.Globalization;
using System.Text.Json;
using System.Text.Json.Nodes;
using Akka.Actor;
using Mamo.Data;
using Serilog;
using Mamo.Actors.Sources;

namespace Mamo.Actors.Pipeline;

/// <summary>What a progress display shows.</summary>
/// <param name="Scores">the objective's running scores (prequential accuracy); empty: none</param>
/// <param name="LastClassify">the latest held-out classification result; null: none yet</param>
public sealed record RunProgress(long Step, double PairsPerSecond, double Loss, IReadOnlyDictionary<string, double> Terms, double LearningRate,
    long DeadLetters, long NonFiniteSteps, Evaluator.EvalCompleted? LastEval, long? LastCheckpointStep, TimeSpan Elapsed, TimeSpan? Remaining)
{
    public IReadOnlyDictionary<string, double> Scores { get; init; } = new Dictionary<string, double>();
    public Evaluator.ClassifyCompleted? LastClassify { get; init; }
}

/// <summary>What a training run tells its Metrics actor beside the steps (for the dashboard): what it runs, how many
/// times its pipeline restarted in this process, and where to ask the source and the reader how they are doing.</summary>
public sealed class RunStatus(string preset, ITrainingSource source, Func<long> samplesRead)
{
    int restarts, started;
    public string Preset => preset;
    public ITrainingSource Source => source;
    public long SamplesRead => samplesRead();
    public int Restarts => Volatile.Read(ref restarts);
    public void Restarted() => Interlocked.Increment(ref restarts);
    /// <summary>True once per process: its first pipeline writes the start line.</summary>
    public bool FirstStart() => Interlocked.Exchange(ref started, 1) == 0;
}

/// <summary>Structured logs, metrics.jsonl, the optional ledger, dead-letters.jsonl, and progress for the console.
/// Beside train and eval lines, metrics.jsonl gets what the dashboard (docs/DASHBOARD.md) shows between them:
/// start, state (running, paused, restarting, stopped), checkpoint, probe and thumbnail, publish, and, every
/// sample-every, process and kafka lines.</summary>
public sealed class Metrics : ReceiveActor, IWithTimers
{
    /// <summary>A sample or record that could not be used, with its reason.</summary>
    public sealed record DeadLetter(BadInput Bad);

    public const string MetricsFile = "metrics.jsonl", LedgerFile = "ledger.jsonl", DeadLetterFile = "dead-letters.jsonl";

    readonly AppendFile metricsOut;
    readonly StreamWriter? ledgerOut;
    readonly AppendFile deadLetterOut;
    readonly int everySteps;
    readonly IProgress<RunProgress>? progress;
    readonly DateTime started = DateTime.UtcNow;
    readonly Func<long, TimeSpan?> remaining;
    readonly RunStatus? status;
    readonly TimeSpan sampleEvery;
    readonly HashSet<(string Set, int Image)> thumbnailsWritten = [];
    string? pausedBecause;
    Evaluator.EvalCompleted? lastEval;
    Evaluator.ClassifyCompleted? lastClassify;
    long deadLetters, nonFinite, pairsSinceLog, lastCheckpoint = -1;
    DateTime lastLog = DateTime.UtcNow;

    sealed record Sample;

    public ITimerScheduler Timers { get; set; } = null!;

    /// <param name="status">null: no start, state, process or kafka lines (a cluster follower's metrics)</param>
    public Metrics(string runDir, int everySteps, bool ledger, IProgress<RunProgress>? progress, Func<long, TimeSpan?> remaining,
        RunStatus? status = null, TimeSpan sampleEvery = default)
    {
        this.status = status;
        this.sampleEvery = sampleEvery > TimeSpan.Zero ? sampleEvery : TimeSpan.FromSeconds(5);
        this.everySteps = everySteps;
        this.progress = progress;
        this.remaining = remaining;
        Directory.CreateDirectory(runDir);
        // Shared with the other writers of the run (a cluster's coordinator, evaluator and publisher): true appends.
        metricsOut = new AppendFile(Path.Combine(runDir, MetricsFile));
        deadLetterOut = new AppendFile(Path.Combine(runDir, DeadLetterFile));
        if (ledger) ledgerOut = Append(Path.Combine(runDir, LedgerFile));

        Receive<Trainer.StepCompleted>(OnStep);
        Receive<Evaluator.EvalCompleted>(OnEval);
        Receive<Evaluator.ClassifyCompleted>(OnClassify);
        Receive<DeadLetter>(OnDeadLetter);
        Receive<Checkpointer.CheckpointDurable>(OnCheckpoint);
        Receive<EmbeddingPublisher.Published>(OnPublished);
        Receive<Sample>(_ => OnSample());
    }

    public static Props Props(string runDir, int everySteps, bool ledger, IProgress<RunProgress>? progress, Func<long, TimeSpan?> remaining,
        RunStatus? status = null, TimeSpan sampleEvery = default) =>
        Akka.Actor.Props.Create(() => new Metrics(runDir, everySteps, ledger, progress, remaining, status, sampleEvery)).WithDispatcher(Dispatchers.Io);

    protected override void PreStart()
    {
        Context.System.EventStream.Subscribe(Self, typeof(Checkpointer.CheckpointDurable));
        Context.System.EventStream.Subscribe(Self, typeof(EmbeddingPublisher.Published));
        if (status is null) return;
        if (status.FirstStart())
            Write(Line("start", new() { ["preset"] = status.Preset, ["source"] = status.Source.Name, ["pid"] = Environment.ProcessId }));
        Write(State("running", status.Restarts));
        OnSample();
        Timers.StartPeriodicTimer(nameof(Sample), new Sample(), sampleEvery);
    }

    /// <summary>A state line: running, paused, restarting or stopped, with why where there is a reason.</summary>
    public static JsonObject State(string state, int restarts, string? reason = null)
    {
        var line = Line("state", new() { ["state"] = state, ["restarts"] = restarts });
        if (reason is not null) line["reason"] = reason;
        return line;
    }

    /// <summary>A metrics.jsonl line of <paramref name="kind"/> at the current time.</summary>
    public static JsonObject Line(string kind, Dictionary<string, JsonNode?> fields)
    {
        var line = new JsonObject { ["kind"] = kind, ["time"] = DateTime.UtcNow.ToString("O", CultureInfo.InvariantCulture) };
        foreach (var (k, v) in fields) line[k] = v;
        return line;
    }

    /// <summary>Appends a line to RUN_DIR/metrics.jsonl while no Metrics actor writes there (between and after pipelines).</summary>
    public static void AppendLine(string runDir, JsonObject line) => AppendFile.AppendLine(Path.Combine(runDir, MetricsFile), line.ToJsonString());

    void Write(JsonObject line) => metricsOut.WriteLine(line.ToJsonString());

    void OnSample()
    {
        using var process = Process.GetCurrentProcess();
        Write(Line("process", new()
        {
            ["rss_bytes"] = process.WorkingSet64, ["cpu_s"] = Math.Round(process.TotalProcessorTime.TotalSeconds, 3),
            ["gc_heap_bytes"] = GC.GetTotalMemory(false), ["gc"] = new JsonArray(GC.CollectionCount(0), GC.CollectionCount(1), GC.CollectionCount(2)),
            ["threads"] = process.Threads.Count, ["samples_read"] = status!.SamplesRead,
        }));
        if (status.Source.Partitions is { Count: > 0 } partitions)
            Write(Line("kafka", new()
            {
                ["partitions"] = new JsonObject(partitions.Select(p => KeyValuePair.Create(p.Partition, (JsonNode?)new JsonObject
                {
                    ["position"] = p.Position, ["end"] = p.End, ["lag"] = p.Lag, ["committed"] = p.Committed,
                }))),
            }));
        var paused = status.Source.PausedBecause;
        if (paused == pausedBecause) return;
        pausedBecause = paused;
        Write(paused is null ? State("running", status.Restarts) : State("paused", status.Restarts, paused));
    }

    void OnCheckpoint(Checkpointer.CheckpointDurable c)
    {
        lastCheckpoint = c.Step;
        long bytes = 0;
        try { bytes = new DirectoryInfo(c.Path).EnumerateFiles("*", SearchOption.AllDirectories).Sum(f => f.Length); }
        catch (IOException) { }   // pruned already: the line still says it was durable
        Write(Line("checkpoint", new()
        {
            ["step"] = c.Step, ["path"] = Path.GetFileName(c.Path), ["bytes"] = bytes,
            ["offsets"] = new JsonObject(c.Position.Offsets.Select(kv => KeyValuePair.Create(kv.Key, (JsonNode?)kv.Value))),
        }));
    }

    void OnPublished(EmbeddingPublisher.Published p) => Write(Line("publish", new()
    {
        ["version"] = p.Version, ["step"] = p.Step, ["records"] = p.Records, ["predictions"] = p.Predictions, ["output"] = p.Output,
    }));

    static StreamWriter Append(string path) => new(new FileStream(path, FileMode.Append, FileAccess.Write, FileShare.Read)) { AutoFlush = true };

    void OnStep(Trainer.StepCompleted s)
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
        var eta = remaining(r.Step + 1);
        if (eta is { } left) entry["eta_s"] = Math.Round(left.TotalSeconds, 1);
        metricsOut.WriteLine(entry.ToJsonString());
        Log.Information("step {Step} loss {Loss:F4} ({Terms}) lr {Lr:E2} {PairsPerSecond:F1} pairs/s",
            r.Step + 1, r.Loss, string.Join(" ", r.Terms.Select(t => $"{t.Key}={t.Value:F3}")), r.LearningRate, pairsPerSecond);
        progress?.Report(new RunProgress(r.Step + 1, pairsPerSecond, r.Loss, r.Terms, r.LearningRate, deadLetters, nonFinite, lastEval,
            lastCheckpoint >= 0 ? lastCheckpoint : null, now - started, eta) { Scores = r.Scores, LastClassify = lastClassify });
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
        WriteProbes(e);
        Log.Information("eval {Set} at step {Step}: TR@1 {Tr1:F1} TR@5 {Tr5:F1} TR@10 {Tr10:F1} IR@1 {Ir1:F1} IR@5 {Ir5:F1} IR@10 {Ir10:F1} r_mean {RMean:F1} (chance {Chance:F2}%, {Took:F0}s)",
            e.Set, e.Step, m.Tr1, m.Tr5, m.Tr10, m.Ir1, m.Ir5, m.Ir10, m.RMean, 100.0 / e.Images, e.Took.TotalSeconds);
    }

    /// <summary>The probe captions' top images; each image's thumbnail goes out once, before the first line that shows it.</summary>
    void WriteProbes(Evaluator.EvalCompleted e)
    {
        if (e.Probes.Count == 0) return;
        foreach (var (image, png) in e.Thumbnails.OrderBy(t => t.Key))
            if (png.Length > 0 && thumbnailsWritten.Add((e.Set, image)))
                Write(Line("thumbnail", new() { ["set"] = e.Set, ["image"] = image, ["png"] = Convert.ToBase64String(png) }));
        Write(Line("probe", new()
        {
            ["step"] = e.Step, ["set"] = e.Set,
            ["probes"] = new JsonArray(e.Probes.Select(p => (JsonNode)new JsonObject
            {
                ["caption"] = p.Caption, ["truth"] = p.Truth,
                ["top"] = new JsonArray(p.Top.Select(h => (JsonNode)new JsonObject { ["image"] = h.Image, ["id"] = h.Id, ["score"] = Math.Round(h.Score, 5) }).ToArray()),
            }).ToArray()),
        }));
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

    internal static JsonNode? Finite(double v) => double.IsFinite(v) ? JsonValue.Create(v) : JsonValue.Create(v.ToString(CultureInfo.InvariantCulture));

    protected override void PostStop()
    {
        metricsOut.Dispose();
        ledgerOut?.Dispose();
        deadLetterOut.Dispose();
        base.PostStop();
    }
}
