using System.Diagnostics;
using System.Text.Json;
using System.Text.RegularExpressions;
using Mamo.Actors.Pipeline;
using Mamo.Actors.Run;
using Mamo.Data.Kafka;
using Mamo.Data.Datasets;
using Model = Mamo.Model;
using Xunit;
using Xunit.Abstractions;

namespace Mamo.Cli.Tests;

/// <summary>`mamo pretrain` as a user runs it: a separate process on real emoji data, killed with SIGKILL and
/// restarted. The ledger (each step's sample ids and loss) is the witness.</summary>
public class PretrainTests(ITestOutputHelper output)
{
    static (int Code, string Log) RunMamo(IEnumerable<string> args) => MamoProcess.Run(args);
    static TimeSpan KillAfter(IEnumerable<string> args, string runDir, int stepsDone, long checkpointAtLeast) => MamoProcess.KillAfter(args, runDir, stepsDone, checkpointAtLeast);
    static List<MamoProcess.LedgerEntry> Ledger(string runDir) => MamoProcess.Ledger(runDir);

    const int Batch = 8, Steps = 12, CheckpointEvery = 4, Samples = 40;

    static readonly string[] Common =
    [
        "--plain", "--ledger",
        "--set", $"batch-size={Batch}", "--set", $"checkpoint.every-steps={CheckpointEvery}", "--set", "eval.every-steps=0",
        "--set", "metrics.every-steps=1", "--set", "optimizer.warmup-steps=4", "--set", "torch-threads=1", "--set", "data.preprocess-parallelism=1",
    ];

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void A_killed_run_resumes_exactly_and_bad_input_is_counted_not_fatal(bool replay)
    {
        using var folder = new TempFolder();
        var manifest = WriteManifest(folder);
        // With replay, 2 of each batch of 8 come from a reservoir of 16, which the 36 good samples overflow in step 2.
        string[] Common = [.. PretrainTests.Common, .. replay ? new[] { "--set", "replay.fraction=0.25", "--set", "replay.capacity=16" } : []];

        // The reference: one uninterrupted run.
        var reference = folder.File("reference");
        var (code, log) = RunMamo(["pretrain", "--source", "manifest:" + manifest, "--run-dir", reference, .. Common, "--max-steps", $"{Steps}"]);
        Assert.True(code == 0, log);
        var expected = Ledger(reference);
        Assert.Equal(Enumerable.Range(0, Steps).Select(i => (long)i), expected.Select(e => e.Step));

        // The same run, killed with SIGKILL once it is past a checkpoint, then restarted.
        var killed = folder.File("killed");
        var killedAt = KillAfter(["pretrain", "--source", "manifest:" + manifest, "--run-dir", killed, .. Common, "--max-steps", $"{Steps}"], killed, stepsDone: CheckpointEvery + 2, checkpointAtLeast: CheckpointEvery);
        var beforeKill = Ledger(killed);
        var lastCheckpoint = MamoProcess.LastCheckpoint(killed);
        output.WriteLine($"killed after {beforeKill.Count} steps (at {killedAt}); last checkpoint at step {lastCheckpoint}");
        Assert.True(lastCheckpoint >= CheckpointEvery && lastCheckpoint <= beforeKill.Count);

        (code, log) = RunMamo(["pretrain", "--source", "manifest:" + manifest, "--run-dir", killed, .. Common, "--max-steps", $"{Steps}"]);
        Assert.True(code == 0, log);
        var all = Ledger(killed);
        var resumed = all.Skip(beforeKill.Count).ToList();

        // The resumed run continues from the checkpointed step and stream position.
        Assert.Equal(lastCheckpoint, resumed[0].Step);
        Assert.Equal(expected[(int)lastCheckpoint - 1].Cursor + Batch - resumed[0].Replayed.Length, resumed[0].Cursor);
        // Nothing is lost: the last record of each step matches the uninterrupted run, ids and all.
        Assert.Equal(expected.Select(e => e.Step), beforeKill.Take((int)lastCheckpoint).Concat(resumed).Select(e => e.Step));
        foreach (var r in resumed)
        {
            var e = expected[(int)r.Step];
            Assert.Equal(e.Ids, r.Ids);
            Assert.Equal(e.Replayed, r.Replayed);
            Assert.Equal(e.Cursor, r.Cursor);
            Assert.True(e.Loss == r.Loss, $"step {r.Step}: loss {r.Loss} after resume, {e.Loss} uninterrupted");   // bitwise
        }
        // Each step after the first replays 2 records trained in an earlier step, after its 6 fresh ones.
        var trainedBefore = new HashSet<string>();
        foreach (var e in expected)
        {
            Assert.Equal(replay && e.Step > 0 ? 2 : 0, e.Replayed.Length);
            Assert.Equal(e.Replayed, e.Ids[^e.Replayed.Length..]);
            Assert.Subset(trainedBefore, e.Replayed.ToHashSet());
            trainedBefore.UnionWith(e.Ids);
        }
        // The steps trained again after the kill stay within one checkpoint interval.
        Assert.True(beforeKill.Count - lastCheckpoint <= CheckpointEvery + 2);

        // The four bad lines were reported with reasons, and training went on.
        var deadLetters = File.ReadAllLines(Path.Combine(reference, "dead-letters.jsonl"));
        Assert.Equal(4, deadLetters.Length);
        Assert.Contains(deadLetters, l => l.Contains("malformed JSON"));
        Assert.Contains(deadLetters, l => l.Contains("id corrupt"));
        Assert.Contains(deadLetters, l => l.Contains("missing.png"));
        Assert.Contains(deadLetters, l => l.Contains("caption"));
    }

    [Theory]
    [InlineData("TERM", ExitCodes.Success)]
    [InlineData("INT", ExitCodes.Interrupted)]
    public async Task A_signal_finishes_the_step_and_checkpoints_then_sigterm_exits_0_and_ctrl_c_130(string signal, int exitCode)
    {
        using var folder = new TempFolder();
        var manifest = WriteManifest(folder);
        var run = folder.File("run");
        using var p = Process.Start(MamoProcess.StartInfo(["pretrain", "--source", "manifest:" + manifest, "--run-dir", run, .. Common, "--max-steps", "1000"],
            interruptible: true))!;
        var stdout = p.StandardOutput.ReadToEndAsync();
        var stderr = p.StandardError.ReadToEndAsync();
        var ledger = Path.Combine(run, "ledger.jsonl");
        var clock = Stopwatch.StartNew();
        while (!(File.Exists(ledger) && File.ReadAllLines(ledger).Length >= 3) && clock.Elapsed < TimeSpan.FromMinutes(3) && !p.HasExited) Thread.Sleep(20);
        if (p.HasExited) Assert.Fail("mamo exited before the signal: " + await stderr);   // awaiting the stream any earlier would wait for the exit
        await Process.Start("kill", [$"-{signal}", p.Id.ToString()])!.WaitForExitAsync();
        using var patience = new CancellationTokenSource(TimeSpan.FromMinutes(2));
        try { await p.WaitForExitAsync(patience.Token); }
        catch (OperationCanceledException)
        {
            p.Kill(entireProcessTree: true);
            Assert.Fail($"mamo did not exit within 2 minutes of SIG{signal}: {await stdout}{await stderr}");
        }
        Assert.True(p.ExitCode == exitCode, $"exited {p.ExitCode}: {await stdout}{await stderr}");
        var steps = Ledger(run).Count;
        var saved = Model.Checkpoint.ReadState(Model.Checkpoint.Latest(run)!);
        Assert.Equal(steps, saved.Step);   // the last step taken is in the checkpoint: nothing to redo
        Assert.Contains($"checkpoint at step {steps}", await stdout);
    }

    [Fact]
    public void A_resume_applies_and_records_a_changed_learning_rate_and_refuses_a_changed_preset()
    {
        using var folder = new TempFolder();
        var manifest = WriteManifest(folder);
        var run = folder.File("run");
        string[] args = ["pretrain", "--source", "manifest:" + manifest, "--run-dir", run, .. Common];
        var (code, log) = RunMamo([.. args, "--max-steps", "1"]);
        Assert.True(code == 0, log);
        var recorded = File.ReadAllLines(Path.Combine(run, RunConfig.File));
        Assert.Contains("mamo.optimizer.learning-rate = \"5e-4\"", recorded);
        Assert.Contains(recorded, l => l.StartsWith("# command: ") && l.Contains("--max-steps 1"));

        // What a resume would change, before it runs: each value with its origin.
        var (shown, listing, _) = Cli.Run("config", "show", "--run-dir", run, "--set", "optimizer.learning-rate=1e-3");
        Assert.Equal(ExitCodes.Success, shown);
        Assert.Contains("mamo.optimizer.learning-rate = \"1e-3\"", listing);
        Assert.Contains("# --set optimizer.learning-rate=1e-3; recorded \"5e-4\": a resume applies this change", listing);
        Assert.Matches(@"mamo\.seed = ""1"" +# run folder, .*config\.resolved\.conf:\d+\n", listing);

        (code, log) = RunMamo([.. args, "--max-steps", "2", "--set", "optimizer.learning-rate=1e-3"]);
        Assert.True(code == 0, log);
        var changes = File.ReadAllLines(Path.Combine(run, "metrics.jsonl")).Select(l => JsonDocument.Parse(l).RootElement)
            .Where(l => l.GetProperty("kind").GetString() == "config").SelectMany(l => l.GetProperty("changes").EnumerateArray())
            .ToDictionary(c => c.GetProperty("key").GetString()!, c => (c.GetProperty("was").GetString(), c.GetProperty("now").GetString()));
        Assert.Equal(("\"5e-4\"", "\"1e-3\""), changes["mamo.optimizer.learning-rate"]);
        Assert.Equal(("\"1\"", "\"2\""), changes["mamo.max-steps"]);
        Assert.Equal(2, changes.Count);
        Assert.Contains("the resumed run applies a changed setting: mamo.optimizer.learning-rate was \"5e-4\", now \"1e-3\"", log);
        Assert.Contains("mamo.optimizer.learning-rate = \"1e-3\"", File.ReadAllLines(Path.Combine(run, RunConfig.File)));

        // A resume that leaves the learning rate out goes on with the recorded one: only max-steps changes.
        (code, log) = RunMamo([.. args, "--max-steps", "3"]);
        Assert.True(code == 0, log);
        Assert.DoesNotContain("mamo.optimizer.learning-rate was", log);
        Assert.Contains("mamo.optimizer.learning-rate = \"1e-3\"", File.ReadAllLines(Path.Combine(run, RunConfig.File)));

        (code, log) = RunMamo([.. args, "--max-steps", "4", "--preset", "small"]);
        Assert.Equal(ExitCodes.Usage, code);
        Assert.Contains("'mamo.preset' was \"tiny\", now \"small\" (the checkpoints hold a model of the recorded preset)", log);
        Assert.Equal(3, Model.Checkpoint.ReadState(Model.Checkpoint.Latest(run)!).Step);   // refused before a step
    }

    [Fact]
    public async Task A_run_killed_while_it_publishes_a_version_publishes_it_whole_when_it_resumes()
    {
        using var folder = new TempFolder();
        var run = folder.File("run");
        var output = folder.File("out/embeddings.jsonl");
        var eventsFile = EmbeddingSinks.VersionsFile(output);
        // The 1,730 emoji of the train split, image and text: seconds of publishing after the step-2 checkpoint to kill in.
        string[] args = ["pretrain", "--source", "manifest:" + WriteManifest(folder), "--run-dir", run, .. Common, "--max-steps", "2",
            "--set", "checkpoint.every-steps=2", "--set", $"publish.output=jsonl:{output}", "--set", "publish.input=dataset:emoji/train"];
        List<VersionRecord> Events() => File.Exists(eventsFile)
            ? File.ReadLines(eventsFile).Where(l => l.EndsWith('}')).Select(l => VersionRecord.Parse(System.Text.Encoding.UTF8.GetBytes(l))).ToList() : [];
        int Vectors() => File.Exists(output) ? File.ReadLines(output).Count(l => l.Contains("\"model_version\":\"step-2\"")) : 0;

        using (var first = Process.Start(MamoProcess.StartInfo(args))!)
        {
            var stderr = first.StandardError.ReadToEndAsync();
            _ = first.StandardOutput.ReadToEndAsync();
            var clock = Stopwatch.StartNew();
            while (!(Vectors() > 0 && Events().All(e => e.State == VersionRecord.Started)))
            {
                Assert.True(clock.Elapsed < TimeSpan.FromMinutes(2) && !first.HasExited, "no publication to kill in: " + (first.HasExited ? await stderr : ""));
                Thread.Sleep(10);
            }
            first.Kill();
            await first.WaitForExitAsync();
        }
        var (killedAt, killedBytes) = (Vectors(), new FileInfo(output).Length);
        Assert.Equal([("step-2", "started")], Events().Select(e => (e.Version, e.State)));
        Assert.InRange(killedAt, 1, 2 * 1730 - 1);   // the premise: killed mid-version

        var (code, log) = RunMamo(args);
        Assert.True(code == 0, log);
        var events = Events();
        Assert.Equal([("step-2", "started"), ("step-2", "started"), ("step-2", "complete")], events.Select(e => (e.Version, e.State)));
        // Complete means whole: the vectors written after the second start are every item once, as counted and hashed.
        // (The kill may have cut a line short: the sink ends it before it appends.)
        using var rest = File.OpenRead(output);
        rest.Seek(killedBytes, SeekOrigin.Begin);
        var after = new StreamReader(rest).ReadToEnd().Split('\n', StringSplitOptions.RemoveEmptyEntries).Select(l => JsonDocument.Parse(l).RootElement)
            .Select(e => (e.GetProperty("id").GetString()!, e.GetProperty("modality").GetString()!)).ToList();
        Assert.Equal((2 * 1730, 2 * 1730), (events[^1].Records, after.Distinct().Count()));
        Assert.Equal(VersionRecord.IdsChecksum(after), events[^1].IdsSha256);
        Assert.False(File.Exists(Path.Combine(run, VersionPublication.StateFile)));
    }

    [Fact]
    public void A_run_from_a_manifest_with_no_eval_sets_named_evaluates_nothing_and_says_so_once()
    {
        using var folder = new TempFolder();
        var run = folder.File("run");
        var (code, log) = RunMamo(["pretrain", "--source", "manifest:" + WriteManifest(folder), "--run-dir", run, .. Common, "--max-steps", "2",
            "--set", "eval.every-steps=1"]);
        Assert.True(code == 0, log);
        Assert.Single(Regex.Matches(log, Regex.Escape("this run evaluates nothing: no held-out set is named for a manifest:")));
        var kinds = File.ReadAllLines(Path.Combine(run, "metrics.jsonl")).Select(l => JsonDocument.Parse(l).RootElement.GetProperty("kind").GetString()).ToList();
        Assert.Equal(2, kinds.Count(k => k == "train"));
        Assert.DoesNotContain("eval", kinds);
    }

    [Theory]
    [InlineData("pretrain")]
    [InlineData("finetune")]
    public void The_help_of_a_training_command_gives_each_options_default_and_every_kind_of_source(string name)
    {
        var command = MamoRoot.Create().Subcommands.Single(c => c.Name == name);
        var silent = command.Options.Where(o => !o.Required && o.Name != "--help" && o.Description?.Contains("default") != true).Select(o => o.Name).ToList();
        Assert.True(silent.Count == 0, $"options without their default: {string.Join(", ", silent)}");
        var source = command.Options.Single(o => o.Name == "--source").Description!;
        foreach (var kind in new[] { "dataset:NAME", "manifest:PATH", "wds:GLOB", "kafka://HOST:PORT/TOPIC" }) Assert.Contains(kind, source);
    }

    [Fact]
    public void A_diverging_run_stops_with_a_clear_error()
    {
        using var folder = new TempFolder();
        var manifest = WriteManifest(folder);
        var (code, log) = RunMamo(["pretrain", "--source", "manifest:" + manifest, "--run-dir", folder.File("run"), .. Common,
            "--max-steps", "200", "--set", "optimizer.learning-rate=1e30", "--set", "optimizer.min-learning-rate=1e30",
            "--set", "optimizer.clip-norm=0", "--set", "supervision.max-nonfinite-steps=3"]);
        Assert.Equal(1, code);
        Assert.Contains("non-finite losses in a row", log);
    }

    [Fact]
    public void A_bad_setting_is_a_clear_error_naming_the_key()
    {
        using var folder = new TempFolder();
        var (code, log) = RunMamo(["pretrain", "--run-dir", folder.File("run"), "--set", "optimizer.learnig-rate=1"]);
        Assert.Equal(2, code);
        Assert.Contains("mamo.optimizer.learnig-rate", log);
        (code, log) = RunMamo(["pretrain", "--run-dir", folder.File("run"), "--set", "batch-size=lots"]);
        Assert.Equal(2, code);
        Assert.Contains("mamo.batch-size", log);
        // An option the command does not have is a usage error too, not the 1 of a failed run.
        var (unknown, _, stderr) = Cli.Run("pretrain", "--batch", "8");
        Assert.Equal(ExitCodes.Usage, unknown);
        Assert.Contains("Unrecognized command or argument '--batch'", stderr);
    }

    [SkippableFact]
    public void Cuda_on_a_cpu_build_is_a_clear_error_naming_the_build_switch()
    {
        Skip.If(TorchSharp.torch.cuda.is_available(), "CUDA is available here: a CUDA build takes --device cuda");
        using var folder = new TempFolder();
        var (code, log) = RunMamo(["pretrain", "--run-dir", folder.File("run"), "--device", "cuda", "--max-steps", "1"]);
        Assert.Equal(2, code);
        Assert.Contains("CUDA is not available", log);
        Assert.Contains("dotnet build -p:TorchBackend=cuda", log);
        Assert.False(Directory.Exists(Path.Combine(folder.File("run"), Model.Checkpoint.RunFolder)));   // refused before anything was written
    }

    /// <summary>Forty real emoji plus four bad lines: malformed JSON, an undecodable PNG, a missing file, no caption.</summary>
    internal static string WriteManifest(TempFolder folder)
    {
        var emoji = BuiltinDatasets.Ensure(BuiltinDatasets.Emoji).File(BuiltinDatasets.TrainSplit);
        var root = Path.GetDirectoryName(emoji)!;
        Directory.CreateDirectory(folder.File("images"));
        var lines = new List<string>();
        foreach (var line in File.ReadLines(emoji).Take(Samples))
        {
            var image = JsonDocument.Parse(line).RootElement.GetProperty("image").GetString()!;
            File.Copy(Path.Combine(root, image), folder.File(image));
            lines.Add(line);
        }
        File.WriteAllBytes(folder.File("images/corrupt.png"), [0x89, (byte)'P', (byte)'N', (byte)'G', 1, 2, 3]);
        lines.Insert(5, "{\"id\": \"broken\", \"image\": ");
        lines.Insert(11, "{\"id\": \"corrupt\", \"image\": \"images/corrupt.png\", \"caption\": \"a broken picture\"}");
        lines.Insert(17, "{\"id\": \"missing\", \"image\": \"images/missing.png\", \"caption\": \"nothing here\"}");
        lines.Insert(23, "{\"id\": \"silent\", \"image\": \"" + JsonDocument.Parse(lines[0]).RootElement.GetProperty("image").GetString() + "\", \"captions\": [\"\", \"  \"]}");
        var manifest = folder.File("train.jsonl");
        File.WriteAllLines(manifest, lines);
        return manifest;
    }
}
