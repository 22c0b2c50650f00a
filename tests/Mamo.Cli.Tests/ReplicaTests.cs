using System.Diagnostics;
using System.Text.Json;
using System.Text.Json.Nodes;
using Mamo.Actors.Pipeline;
using Mamo.Actors.Sources;
using Mamo.Data.Datasets;
using Xunit;
using Xunit.Abstractions;
using Model = Mamo.Model;

namespace Mamo.Cli.Tests;

/// <summary>A cluster replica is the single-node pipeline between "load θ" and "hand the work in" (docs/ARCHITECTURE.md):
/// what a single node does, a replica does, as real node processes on 127.0.0.1 with ports chosen at run time.</summary>
[Collection(ClusterCollection.Name)]
public class ReplicaTests(ITestOutputHelper output)
{
    const int Batch = 8, InnerSteps = 2, Samples = 48;

    static string[] Node(string command, string run, int i, int port, int seedPort, int maxSteps, int minReplicas, params string[] more) =>
    [
        command, "--plain", "--ledger", "--run-dir", run, "--max-steps", $"{maxSteps}",
        "--cluster", $"127.0.0.1:{port}", "--seed-nodes", $"127.0.0.1:{seedPort}", "--node-name", $"n{i}",
        "--set", $"batch-size={Batch}", "--set", $"cluster.inner-steps={InnerSteps}", "--set", $"cluster.min-replicas={minReplicas}",
        "--set", "torch-threads=1", "--set", "eval.every-steps=0", "--set", "data.preprocess-parallelism=1", .. more,
    ];

    static Process Start(string[] args) => Process.Start(MamoProcess.StartInfo(args))!;

    /// <summary>Waits for every node to exit 0, killing the rest on the way out.</summary>
    static async Task ExitZero(IReadOnlyList<Process> nodes, TimeSpan patience)
    {
        var logs = nodes.Select(p => (Out: p.StandardOutput.ReadToEndAsync(), Err: p.StandardError.ReadToEndAsync())).ToList();
        using var cancel = new CancellationTokenSource(patience);
        try { foreach (var p in nodes) await p.WaitForExitAsync(cancel.Token); }
        finally { foreach (var p in nodes.Where(p => !p.HasExited)) p.Kill(entireProcessTree: true); }
        for (int i = 0; i < nodes.Count; i++) Assert.True(nodes[i].ExitCode == 0, $"n{i} exited {nodes[i].ExitCode}: {await logs[i].Err}");
    }

    static string Ledger(string run, int i) => Path.Combine(run, "nodes", $"n{i}", Metrics.LedgerFile);

    /// <summary>The steps of the attempts the coordinators applied, from every node's ledger. Applied: a ledger's outcome
    /// line says so, or a cluster checkpoint on disk lists the attempt (a node killed before the commit reached it never
    /// wrote the line).</summary>
    internal static List<JsonElement> AppliedSteps(string run, int nodes)
    {
        var checkpoints = Path.Combine(run, Model.Checkpoint.RunFolder);
        var applied = (Directory.Exists(checkpoints) ? Directory.GetDirectories(checkpoints) : [])
            .Select(d => Model.Checkpoint.ReadState(d).Extra.GetValueOrDefault(Actors.Cluster.Coordination.AppliedKey, ""))
            .SelectMany(a => a.Split(',', StringSplitOptions.RemoveEmptyEntries).Select(long.Parse)).ToHashSet();
        var ledgers = Enumerable.Range(0, nodes).Select(i => Ledger(run, i)).Where(File.Exists).ToList();
        foreach (var ledger in ledgers) applied.UnionWith(MamoProcess.Outcomes(ledger).Applied);
        return ledgers.SelectMany(MamoProcess.Steps).Where(e => applied.Contains(e.GetProperty("attempt").GetInt64())).ToList();
    }

    /// <summary>Each applied step's batch as the cursors it covers: a batch of a file source's range ends at its position,
    /// and holds <paramref name="batch"/> records where none is a dead letter.</summary>
    internal static List<long> AppliedCursors(string run, int nodes, int batch = Batch) =>
        AppliedSteps(run, nodes).SelectMany(step =>
        {
            var end = step.GetProperty("position").GetProperty(TrainingSamples.CursorPartition).GetInt64();
            return Enumerable.Range(0, batch).Select(k => end - batch + 1 + k);
        }).ToList();

    [Fact]
    public async Task Dead_letters_of_a_cluster_run_come_from_the_node_that_read_them_into_the_runs_file_and_the_dashboard()
    {
        using var folder = new TempFolder();
        var manifest = ClusterTests.Manifest(folder);
        // Three of the 48 images do not decode: they are checked where they are prepared, on the node that reads them.
        var lines = File.ReadAllLines(manifest);
        var broken = new[] { 5, 20, 41 }.Select(i => JsonDocument.Parse(lines[i]).RootElement).ToList();
        foreach (var b in broken) File.WriteAllBytes(folder.File(b.GetProperty("image").GetString()!), [0x89, 0x50, 0x4e, 0x47, 1, 2, 3]);
        var brokenIds = broken.Select(b => b.GetProperty("id").GetString()!).ToHashSet();
        var run = folder.File("run");
        const int nodes = 3, rounds = 2;
        var ports = Enumerable.Range(0, nodes).Select(_ => Ports.Free()).ToArray();
        await ExitZero(ports.Select((port, i) => Start(Node("pretrain", run, i, port, ports[0], InnerSteps * rounds, nodes, "--source", "manifest:" + manifest))).ToList(),
            TimeSpan.FromMinutes(4));

        // Each dead letter is in the run's dead-letters.jsonl, from the node whose range held it (once per node: a node
        // knows a sample it has dead-lettered when it comes round again), and no broken image was trained.
        var deadLetters = File.ReadAllLines(Path.Combine(run, Metrics.DeadLetterFile)).Select(l => DeadLetterLine.Parse(JsonNode.Parse(l)!.AsObject())!).ToList();
        output.WriteLine(string.Join("\n", deadLetters.Select(d => $"{d.Node}: {d.Reason} at {d.Location}")));
        var samples = TrainingSamples.Load("manifest:" + manifest, seed: 1, maxBytes: 1 << 30, _ => { });   // mamo.conf's seed
        var readBy = Enumerable.Range(0, nodes).ToDictionary(i => $"n{i}", i => MamoProcess.Steps(Ledger(run, i))
            .GroupBy(e => e.GetProperty("attempt").GetInt64())
            .SelectMany(g => samples.From(g.Max(e => e.GetProperty("position").GetProperty("cursor").GetInt64()) - InnerSteps * Batch + 1).Take(InnerSteps * Batch))
            .Select(x => x.Sample.Id).ToHashSet());
        foreach (var d in deadLetters)
        {
            var id = d.Location[(d.Location.LastIndexOf("(id ", StringComparison.Ordinal) + 4)..^1];
            Assert.Contains(id, brokenIds);
            Assert.Contains(id, readBy[d.Node!]);
        }
        Assert.Equal(brokenIds.Order(), deadLetters.Select(d => d.Location[(d.Location.LastIndexOf("(id ", StringComparison.Ordinal) + 4)..^1]).Distinct().Order());
        Assert.Equal(deadLetters.Count, deadLetters.Select(d => (d.Node, d.Location)).Distinct().Count());
        var trained = Enumerable.Range(0, nodes).SelectMany(i => MamoProcess.Steps(Ledger(run, i))).SelectMany(e => e.GetProperty("ids").EnumerateArray().Select(x => x.GetString()!)).ToList();
        Assert.Empty(trained.Intersect(brokenIds));
        Assert.Equal(rounds * (Samples - brokenIds.Count), trained.Count);   // every other sample, once an epoch

        // The dashboard of the run's folder counts them.
        var files = new Mamo.Cli.Dashboard.RunFiles(run);
        files.Poll();
        Assert.Equal(deadLetters.Count, (long)files.Snapshot(100)["dead_letters"]!["total"]!);
    }

    [Fact]
    public async Task Cluster_classification_finetuning_killed_and_resumed_ends_with_the_label_map_and_prequential_sums_of_an_uninterrupted_run()
    {
        using var folder = new TempFolder();
        var manifest = LabelledManifest(folder);
        var init = folder.File("init");
        using (var trainer = new Model.MamoTrainer(Model.MamoConfig.Tiny, new Model.OptimizerConfig(), TorchSharp.torch.CPU, seed: 5)) trainer.Save(init);
        const int rounds = 3;
        string[] Finetune(string run, int i, int[] ports) => Node("finetune", run, i, ports[i], ports[0], InnerSteps * rounds, minReplicas: 2,
            "--from", init, "--task", "classify", "--source", "manifest:" + manifest);

        var uninterrupted = folder.File("uninterrupted");
        var ports = new[] { Ports.Free(), Ports.Free() };
        await ExitZero([Start(Finetune(uninterrupted, 0, ports)), Start(Finetune(uninterrupted, 1, ports))], TimeSpan.FromMinutes(4));

        // The same run, both nodes SIGKILLed once round 1 is checkpointed and a node has trained a step of the round after,
        // then started again: the cluster resumes from its checkpoint, each replica its optimiser from its own.
        var killed = folder.File("killed");
        ports = [Ports.Free(), Ports.Free()];
        var first = new[] { Start(Finetune(killed, 0, ports)), Start(Finetune(killed, 1, ports)) };
        long Round() => Model.Checkpoint.Latest(killed) is { } c ? long.Parse(Model.Checkpoint.ReadState(c).Extra["round"]) : -1;
        var clock = Stopwatch.StartNew();
        while (!(Round() >= 1 && Enumerable.Range(0, 2).Any(i => File.Exists(Ledger(killed, i))
                   && MamoProcess.Steps(Ledger(killed, i)).Any(e => e.GetProperty("round").GetInt64() == Round()))))
        {
            Assert.True(clock.Elapsed < TimeSpan.FromMinutes(3) && first.All(p => !p.HasExited), "the cluster did not get to round 2");
            Thread.Sleep(20);
        }
        foreach (var p in first) p.Kill();
        output.WriteLine($"killed in round {Round()}");
        ports = [Ports.Free(), Ports.Free()];
        await ExitZero([Start(Finetune(killed, 0, ports)), Start(Finetune(killed, 1, ports))], TimeSpan.FromMinutes(4));

        var (expected, actual) = (State(uninterrupted), State(killed));
        Assert.Equal(($"{rounds}", expected["finetune.labels"], expected["finetune.prequential"]), (actual["round"], actual["finetune.labels"], actual["finetune.prequential"]));
        Assert.True(JsonSerializer.Deserialize<List<string>>(actual["finetune.labels"])!.Count > 1, actual["finetune.labels"]);
        // The prequential curve is in the run's metrics.jsonl: a train line per round with its scores.
        var curve = MetricsLog.Read(Path.Combine(killed, MetricsLog.FileName)).Train;
        Assert.Contains(curve, t => t.Step == rounds * InnerSteps && t.Scores.ContainsKey("preq_acc"));
    }

    static Dictionary<string, string> State(string run) => Model.Checkpoint.ReadState(Model.Checkpoint.Latest(run)!).Extra;

    /// <summary>48 labelled emoji (their group is the label).</summary>
    static string LabelledManifest(TempFolder folder)
    {
        var labels = BuiltinDatasets.Ensure(BuiltinDatasets.EmojiLabels).File(BuiltinDatasets.TestSplit);
        var root = Path.GetDirectoryName(labels)!;
        var lines = File.ReadLines(labels).Take(Samples).ToList();
        foreach (var line in lines)
        {
            var image = JsonDocument.Parse(line).RootElement.GetProperty("image").GetString()!;
            Directory.CreateDirectory(Path.GetDirectoryName(folder.File(image))!);
            File.Copy(Path.Combine(root, image), folder.File(image));
        }
        var manifest = folder.File("labelled.jsonl");
        File.WriteAllLines(manifest, lines);
        return manifest;
    }

    [Fact]
    public async Task A_replica_whose_trainer_fails_is_restarted_by_its_nodes_supervisor_and_the_run_completes()
    {
        using var folder = new TempFolder();
        var manifest = ClusterTests.Manifest(folder);
        var run = folder.File("run");
        const int rounds = 4;
        var ports = new[] { Ports.Free(), Ports.Free() };
        // n1's trainer throws at step 3 (in round 1): its node restarts the pipeline, which registers again.
        await ExitZero([Start(Node("pretrain", run, 0, ports[0], ports[0], InnerSteps * rounds, 2, "--source", "manifest:" + manifest)),
            Start(Node("pretrain", run, 1, ports[1], ports[0], InnerSteps * rounds, 2, "--source", "manifest:" + manifest, "--set", "supervision.fail-at-step=3"))],
            TimeSpan.FromMinutes(4));

        Assert.Equal($"{rounds}", State(run)["round"]);
        var log = File.ReadAllText(Path.Combine(run, "nodes", "n1", "mamo.log"));
        Assert.Contains("supervision.fail-at-step: the fault injected at step 3", log);
        Assert.Contains("the pipeline failed; restarting from the last checkpoint", log);
        var states = MetricsLog.Read(Path.Combine(run, "nodes", "n1", MetricsLog.FileName));
        Assert.Contains(File.ReadLines(Path.Combine(run, "nodes", "n1", MetricsLog.FileName)), l => l.Contains("\"state\":\"restarting\""));
        // The restarted replica trained again, and nothing the cluster applied was lost or applied twice.
        Assert.Contains(MamoProcess.Steps(Ledger(run, 1)), e => e.GetProperty("round").GetInt64() > 1);
        var cursors = AppliedCursors(run, 2);
        Assert.Equal(Enumerable.Range(0, rounds * 2 * InnerSteps * Batch).Select(c => (long)c), cursors.Order());
        Assert.Equal(0, states.Malformed);
    }

    [Fact]
    public async Task A_node_stopped_with_sigterm_mid_round_hands_in_its_partial_round_which_is_applied_and_not_trained_again()
    {
        using var folder = new TempFolder();
        var manifest = ClusterTests.Manifest(folder);
        var run = folder.File("run");
        const int rounds = 5, innerSteps = 4;
        var ports = new[] { Ports.Free(), Ports.Free() };
        // Both begin with round 0 (start-replicas), and n0 goes on alone once n1 has left (min-replicas).
        string[] Args(int i) => Node("pretrain", run, i, ports[i], ports[0], innerSteps * rounds, 1, "--source", "manifest:" + manifest,
            "--set", $"cluster.inner-steps={innerSteps}", "--set", "cluster.start-replicas=2");
        var n0 = Start(Args(0));
        var n1 = Start(Args(1));
        var logs = new[] { n0, n1 }.Select(p => (Out: p.StandardOutput.ReadToEndAsync(), Err: p.StandardError.ReadToEndAsync())).ToList();
        try
        {
            // SIGTERM n1 (not the coordinator's node: n0 is the oldest) once it has trained one of the four steps of a round: the step
            // in hand and the one whose targets are being computed still train, and the round stays short of its four.
            var clock = Stopwatch.StartNew();
            while (!(File.Exists(Ledger(run, 1)) && MamoProcess.Steps(Ledger(run, 1)).GroupBy(e => e.GetProperty("attempt").GetInt64()).LastOrDefault()?.Count() == 1))
            {
                if (n1.HasExited) Assert.Fail($"n1 exited {n1.ExitCode} before it got half-way through a round: {await logs[1].Err}");
                Assert.True(clock.Elapsed < TimeSpan.FromMinutes(3), "n1 did not get half-way through a round");
                Thread.Sleep(10);
            }
            await Process.Start("kill", ["-TERM", n1.Id.ToString()])!.WaitForExitAsync();
            using var patience = new CancellationTokenSource(TimeSpan.FromMinutes(4));
            await n1.WaitForExitAsync(patience.Token);
            await n0.WaitForExitAsync(patience.Token);
            Assert.True(n1.ExitCode == 0, $"n1 exited {n1.ExitCode}: {await logs[1].Err}");
            Assert.True(n0.ExitCode == 0, $"n0 exited {n0.ExitCode}: {await logs[0].Err}");
        }
        finally
        {
            foreach (var p in new[] { n0, n1 }.Where(p => !p.HasExited)) p.Kill(entireProcessTree: true);
        }

        // n1's last round was cut short, handed in and applied: its ledger says so.
        var last = MamoProcess.Steps(Ledger(run, 1)).GroupBy(e => e.GetProperty("attempt").GetInt64()).Last();
        Assert.True(last.Count() < innerSteps, $"n1's last round has {last.Count()} steps");
        Assert.Contains(last.Key, MamoProcess.Outcomes(Ledger(run, 1)).Applied);
        Assert.Contains($"n1 hands in round {last.First().GetProperty("round").GetInt64()} cut short", File.ReadAllText(Path.Combine(run, "nodes", "n1", "mamo.log")));
        // Every cursor the run covers was applied exactly once: the rest of n1's range went to n0, not the part it trained.
        var cursors = AppliedCursors(run, 2);
        var final = long.Parse(State(run)["position:cursor"]);
        Assert.Equal("", State(run)["unfinished"]);
        Assert.Equal(Enumerable.Range(0, (int)final + 1).Select(c => (long)c), cursors.Order());
    }
}
