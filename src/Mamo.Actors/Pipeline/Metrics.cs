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
    /// <summary>Whether a cluster replica's round was applied by its coordinator (and so is in a durable cluster
    /// checkpoint), or not (the deadline passed, the round was given up): the ledger says so after the round's steps.</summary>
    public sealed record RoundOutcome(Round Round, bool Applied);
    /// <summary>Replies Flushed once what the sender told it before is written: a stopping replica's round outcomes are
    /// in the ledger before its pipeline stops (a stop would drop what is still in this actor's mailbox).</summary>
    public sealed record Flush;
    public sealed record Flushed;

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
    readonly string? node;
    readonly HashSet<(string Set, int Image)> thumbnailsWritten = [];
    string? pausedBecause;
    Evaluator.EvalCompleted? lastEval;
    Evaluator.ClassifyCompleted? lastClassify;
    long deadLetters, nonFinite, pairsSinceLog, lastCheckpoint = -1;
    DateTime lastLog = DateTime.UtcNow;

    sealed record Sample;

    public ITimerScheduler Timers { get; set; } = null!;

    /// <param name="dir">where metrics.jsonl and the ledger go: the run's folder (a cluster replica's own)</param>
    /// <param name="deadLetterDir">where dead-letters.jsonl goes: the run's folder, whichever process read the record</param>
    /// <param name="status">null: no start, state, process or kafka lines (a cluster follower's metrics)</param>
    /// <param name="node">the cluster node whose replica this is, named in its dead letters; null: a single node</param>
    public Metrics(string dir, string deadLetterDir, int everySteps, bool ledger, IProgress<RunProgress>? progress, Func<long, TimeSpan?> remaining,
        RunStatus? status = null, TimeSpan sampleEvery = default, string? node = null)
    {
        this.node = node;
        this.status = status;
        this.sampleEvery = sampleEvery > TimeSpan.Zero ? sampleEvery : TimeSpan.FromSeconds(5);
        this.everySteps = everySteps;
        this.progress = progress;
        this.remaining = remaining;
        Directory.CreateDirectory(dir);
        // Shared with the other writers of the run (a cluster's coordinator, evaluator and publisher): true appends.
        metricsOut = new AppendFile(Path.Combine(dir, MetricsFile));
        Directory.CreateDirectory(deadLetterDir);
        deadLetterOut = new AppendFile(Path.Combine(deadLetterDir, DeadLetterFile));
        if (ledger) ledgerOut = Append(Path.Combine(dir, LedgerFile));

        Receive<Trainer.StepCompleted>(OnStep);
        Receive<Evaluator.EvalCompleted>(OnEval);
        Receive<Evaluator.ClassifyCompleted>(OnClassify);
        Receive<DeadLetter>(OnDeadLetter);
        Receive<Checkpointer.CheckpointDurable>(OnCheckpoint);
        Receive<EmbeddingPublisher.Published>(OnPublished);
        Receive<RoundOutcome>(o => ledgerOut?.WriteLine(new RoundLedgerLine(o.Round.Number, o.Round.Attempt, o.Applied).ToJson().ToJsonString()));
        Receive<Flush>(_ =>
        {
            ledgerOut?.Flush();
            Sender.Tell(new Flushed());
        });
        Receive<Evaluator.EvaluationDone>(_ => { });
        Receive<Sample>(_ => OnSample());
    }

    public static Props Props(string dir, string deadLetterDir, int everySteps, bool ledger, IProgress<RunProgress>? progress, Func<long, TimeSpan?> remaining,
        RunStatus? status = null, TimeSpan sampleEvery = default, string? node = null) =>
        Akka.Actor.Props.Create(() => new Metrics(dir, deadLetterDir, everySteps, ledger, progress, remaining, status, sampleEvery, node)).WithDispatcher(Dispatchers.Io);

    protected override void PreStart()
    {
        Context.System.EventStream.Subscribe(Self, typeof(EmbeddingPublisher.Published));
        if (status is null) return;
        if (status.FirstStart()) Write(new StartLine(status.Preset, status.Source.Name, Environment.ProcessId));
        Write(new StateLine("running", status.Restarts));
        OnSample();
        Timers.StartPeriodicTimer(nameof(Sample), new Sample(), sampleEvery);
    }

    /// <summary>Appends a line to a run folder's metrics.jsonl while no Metrics actor writes there (between and after pipelines).</summary>
    public static void AppendLine(string dir, MetricsLine line) => AppendFile.AppendLine(Path.Combine(dir, MetricsFile), line.ToString());

    void Write(MetricsLine line) => metricsOut.WriteLine(line.ToString());

    void OnSample()
    {
        using var process = Process.GetCurrentProcess();
        Write(new ProcessLine(process.WorkingSet64, process.TotalProcessorTime.TotalSeconds, GC.GetTotalMemory(false),
            [GC.CollectionCount(0), GC.CollectionCount(1), GC.CollectionCount(2)], process.Threads.Count, status!.SamplesRead));
        if (status.Source.Partitions is { Count: > 0 } partitions) Write(new KafkaLine(partitions));
        var paused = status.Source.PausedBecause;
        if (paused == pausedBecause) return;
        pausedBecause = paused;
        Write(paused is null ? new StateLine("running", status.Restarts) : new StateLine("paused", status.Restarts, paused));
    }

    void OnCheckpoint(Checkpointer.CheckpointDurable c)
    {
        lastCheckpoint = c.Step;
        long bytes = 0;
        try { bytes = new DirectoryInfo(c.Path).EnumerateFiles("*", SearchOption.AllDirectories).Sum(f => f.Length); }
        catch (IOException) { }   // pruned already: the line still says it was durable
        Write(new CheckpointLine(c.Step, Path.GetFileName(c.Path), bytes, c.Position.Offsets));
    }

    void OnPublished(EmbeddingPublisher.Published p) => Write(new PublishLine(p.Version, p.Step, p.Records, p.Predictions, p.Output));

    static StreamWriter Append(string path) => new(new FileStream(path, FileMode.Append, FileAccess.Write, FileShare.Read)) { AutoFlush = true };

    void OnStep(Trainer.StepCompleted s)
    {
        var r = s.Result!;
        pairsSinceLog += s.Ids.Length;
        if (r.Skipped)
        {
            nonFinite++;
            Log.Warning("step {Step}: non-finite loss {Loss}; update skipped ({InARow} in a row)", r.Step, r.Loss, s.NonFiniteInARow);
        }
        // Test, then train: each prediction was made by the weights before step `step`'s update.
        ledgerOut?.WriteLine(new StepLedgerLine(r.Step, s.Position.Offsets, r.Loss, r.Skipped, s.Ids)
        {
            Predictions = r.Predictions, Labels = r.Predictions is null ? null : s.Labels?.Select(l => l ?? "").ToList(),
            Round = s.Round?.Number, Attempt = s.Round?.Attempt, Replayed = s.Replayed,
        }.ToJson().ToJsonString());
        if ((r.Step + 1) % everySteps != 0) return;

        var now = DateTime.UtcNow;
        var pairsPerSecond = pairsSinceLog / Math.Max(1e-9, (now - lastLog).TotalSeconds);
        pairsSinceLog = 0;
        lastLog = now;
        var eta = remaining(r.Step + 1);
        Write(new TrainLine(r.Step + 1, r.Loss, r.Terms)
        {
            Time = now, ElapsedSeconds = (now - started).TotalSeconds, Scores = r.Scores, LearningRate = r.LearningRate, GradNorm = r.GradNorm,
            PairsPerSecond = pairsPerSecond, DeadLetters = deadLetters, EtaSeconds = eta?.TotalSeconds,
        });
        Log.Information("step {Step} loss {Loss:F4} ({Terms}) lr {Lr:E2} {PairsPerSecond:F1} pairs/s",
            r.Step + 1, r.Loss, string.Join(" ", r.Terms.Select(t => $"{t.Key}={t.Value:F3}")), r.LearningRate, pairsPerSecond);
        progress?.Report(new RunProgress(r.Step + 1, pairsPerSecond, r.Loss, r.Terms, r.LearningRate, deadLetters, nonFinite, lastEval,
            lastCheckpoint >= 0 ? lastCheckpoint : null, now - started, eta) { Scores = r.Scores, LastClassify = lastClassify });
    }

    void OnEval(Evaluator.EvalCompleted e)
    {
        lastEval = e;
        var m = e.Metrics;
        Write(new RetrievalEvalLine(e.Step, e.Set, m, e.Images, e.Texts) { ElapsedSeconds = (DateTime.UtcNow - started).TotalSeconds, TookSeconds = e.Took.TotalSeconds });
        WriteProbes(e);
        Log.Information("eval {Set} at step {Step}: TR@1 {Tr1:F1} TR@5 {Tr5:F1} TR@10 {Tr10:F1} IR@1 {Ir1:F1} IR@5 {Ir5:F1} IR@10 {Ir10:F1} r_mean {RMean:F1} (chance {Chance:F2}%, {Took:F0}s)",
            e.Set, e.Step, m.Tr1, m.Tr5, m.Tr10, m.Ir1, m.Ir5, m.Ir10, m.RMean, 100.0 / e.Images, e.Took.TotalSeconds);
    }

    /// <summary>The probe captions' top images; each image's thumbnail goes out once, before the first line that shows it.</summary>
    void WriteProbes(Evaluator.EvalCompleted e)
    {
        if (e.Probes.Count == 0) return;
        foreach (var (image, png) in e.Thumbnails.OrderBy(t => t.Key))
            if (png.Length > 0 && thumbnailsWritten.Add((e.Set, image))) Write(new ThumbnailLine(e.Set, image, png));
        Write(new ProbeLine(e.Step, e.Set, e.Probes));
    }

    void OnClassify(Evaluator.ClassifyCompleted e)
    {
        lastClassify = e;
        var r = e.Report;
        Write(new ClassifyEvalLine(e.Step, e.Set, r.Accuracy, r.MacroF1, r.Examples) { ElapsedSeconds = (DateTime.UtcNow - started).TotalSeconds, TookSeconds = e.Took.TotalSeconds });
        Log.Information("eval {Set} at step {Step}: accuracy {Accuracy:P1} macro-F1 {MacroF1:F3} ({Examples} examples, {Took:F0}s)",
            e.Set, e.Step, r.Accuracy, r.MacroF1, r.Examples, e.Took.TotalSeconds);
    }

    void OnDeadLetter(DeadLetter d)
    {
        deadLetters++;
        deadLetterOut.WriteLine(new DeadLetterLine(d.Bad.Reason, d.Bad.Location, d.Bad.Position?.Source, d.Bad.Position?.Offset) { Node = node }.ToJson().ToJsonString());
        Log.Warning("dead letter: {Reason} at {Location}", d.Bad.Reason, d.Bad.Location);
    }

    protected override void PostStop()
    {
        metricsOut.Dispose();
        ledgerOut?.Dispose();
        deadLetterOut.Dispose();
        base.PostStop();
    }
}
