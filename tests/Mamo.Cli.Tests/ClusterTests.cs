using System.Diagnostics;
using System.Net;
using System.Net.Sockets;
using System.Text.Json;
using Mamo.Data.Datasets;
using Xunit;
using Xunit.Abstractions;
using Model = Mamo.Model;

namespace Mamo.Cli.Tests;

/// <summary>Cluster tests run alone, after the others: three training processes and their heartbeats need the two cores
/// to themselves, or a starved heartbeat reads as a dead node.</summary>
[CollectionDefinition(Name, DisableParallelization = true)]
public sealed class ClusterCollection
{
    public const string Name = "cluster processes";
}

/// <summary>`mamo pretrain --cluster` as three real node processes on 127.0.0.1, ports chosen at run time.</summary>
[Collection(ClusterCollection.Name)]
public class ClusterTests(ITestOutputHelper output)
{
    const int Samples = 48, Batch = 8, InnerSteps = 2, Nodes = 3, Rounds = 2;

    /// <summary>Node n<paramref name="i"/> training the manifest with a ledger, listening on <paramref name="port"/>. The
    /// first round waits for all three (start-replicas): with fewer, two nodes could train the whole run before the
    /// third had joined (seen: a kill test waited 2 minutes for a node that joined a finished run).</summary>
    static Process StartNode(string manifest, string run, int i, int port, string seeds, int maxSteps, int minReplicas, params string[] more) =>
        Process.Start(MamoProcess.StartInfo([
            "pretrain", "--plain", "--ledger", "--source", "manifest:" + manifest, "--run-dir", run, "--max-steps", $"{maxSteps}",
            "--cluster", $"127.0.0.1:{port}", "--seed-nodes", seeds, "--node-name", $"n{i}",
            "--set", $"batch-size={Batch}", "--set", $"cluster.inner-steps={InnerSteps}", "--set", $"cluster.min-replicas={minReplicas}",
            "--set", $"cluster.start-replicas={Nodes}", "--set", "torch-threads=1", "--set", "eval.every-steps=0", .. more]))!;

    /// <summary>Waits for the run's first cluster checkpoint while <paramref name="seed"/> lives.</summary>
    static Stopwatch AwaitFirstCheckpoint(string run, Process seed)
    {
        var clock = Stopwatch.StartNew();
        while (Model.Checkpoint.Latest(run) is null)
        {
            Assert.True(clock.Elapsed < TimeSpan.FromMinutes(2) && !seed.HasExited, "no first checkpoint");
            Thread.Sleep(50);
        }
        return clock;
    }

    /// <summary>Waits until each node has trained a step: then all three are members, and losing one leaves a majority
    /// (a node still joining does not count towards the split-brain resolver's majority).</summary>
    static void AwaitEveryNodeTrained(string run, Stopwatch clock, List<Process> nodes)
    {
        while (!Enumerable.Range(0, Nodes).Select(i => new FileInfo(Path.Combine(run, "nodes", $"n{i}", "ledger.jsonl"))).All(f => f.Exists && f.Length > 0))
        {
            Assert.True(clock.Elapsed < TimeSpan.FromMinutes(2) && nodes.All(p => !p.HasExited), "not every node joined and trained; exits: " +
                string.Join(", ", nodes.Select((p, i) => $"n{i} {Exit(p)}")) + "; their logs:\n" +
                string.Join("\n", Enumerable.Range(0, Nodes).Select(i => Tail(Path.Combine(run, "nodes", $"n{i}", "mamo.log")))));
            Thread.Sleep(50);
        }
    }

    /// <summary>Runs the three nodes to max-steps and returns once every one has exited 0.</summary>
    async Task RunNodes(string manifest, string run, int maxSteps, params string[] more)
    {
        var ports = Enumerable.Range(0, Nodes).Select(_ => Ports.Free()).ToArray();
        var nodes = ports.Select((port, i) => StartNode(manifest, run, i, port, $"127.0.0.1:{ports[0]}", maxSteps, Nodes, more)).ToList();
        var logs = nodes.Select(p => (Out: p.StandardOutput.ReadToEndAsync(), Err: p.StandardError.ReadToEndAsync())).ToList();
        try { await AllExitZero(nodes, logs, TimeSpan.FromMinutes(4), run); }
        finally
        {
            foreach (var p in nodes.Where(p => !p.HasExited)) p.Kill(entireProcessTree: true);
        }
        output.WriteLine(await logs[0].Out);
    }

    [Fact]
    public async Task Three_nodes_train_diloco_rounds_that_cover_each_epoch_once_checkpoint_each_round_and_resume_after_a_restart()
    {
        using var folder = new TempFolder();
        var manifest = Manifest(folder);
        var run = folder.File("run");
        // One round, the whole cluster stops, and a restart goes on from the cluster checkpoint with the second. The
        // restart also evaluates and publishes: every node has both roles, and each is done once, on the checkpoints.
        // The run starts from another run's checkpoint (--init): round 0 begins at its θ on every replica.
        var init = folder.File("init");
        var (code, log) = MamoProcess.Run(["pretrain", "--plain", "--source", "manifest:" + manifest, "--run-dir", init, "--max-steps", "1",
            "--set", $"batch-size={Batch}", "--set", "torch-threads=1", "--set", "eval.every-steps=0", "--dashboard", "off"]);
        Assert.True(code == 0, log);
        var initStudent = Model.SafeTensors.Load(Path.Combine(Model.Checkpoint.Latest(init)!, Model.Checkpoint.StudentFile));
        var initHash = Model.Checkpoint.WeightHash(initStudent.Select(kv => (kv.Key, kv.Value)));
        await RunNodes(manifest, run, maxSteps: InnerSteps, "--init", init);
        Assert.Equal("1", Model.Checkpoint.ReadState(Model.Checkpoint.Latest(run)!).Extra["round"]);
        for (int i = 0; i < Nodes; i++)
            Assert.Contains($"n{i} round 0 starts from θ {initHash}", File.ReadAllText(Path.Combine(run, "nodes", $"n{i}", "mamo.log")));
        var embeddings = folder.File("embeddings.jsonl");
        // The run's own 48 pairs as the held-out and publish sets: small, so the nodes' wait for both stays short.
        await RunNodes(manifest, run, maxSteps: InnerSteps * Rounds, "--set", "eval.every-steps=1", "--set", $"eval.sets=[\"manifest:{manifest}\"]",
            "--set", $"publish.output=jsonl:{embeddings}", "--set", $"publish.input=manifest:{manifest}");

        // Each round hands the replicas disjoint cursor ranges that together make one epoch of the 48 samples.
        var entries = Enumerable.Range(0, Nodes).SelectMany(i => MamoProcess.Steps(Path.Combine(run, "nodes", $"n{i}", "ledger.jsonl"))).ToList();
        var ids = File.ReadLines(manifest).Select(l => JsonDocument.Parse(l).RootElement.GetProperty("id").GetString()).Order().ToList();
        for (int round = 0; round < Rounds; round++)
        {
            var trained = entries.Where(e => e.GetProperty("round").GetInt64() == round)
                .SelectMany(e => e.GetProperty("ids").EnumerateArray().Select(x => x.GetString())).Order().ToList();
            Assert.Equal(ids, trained);
        }
        Assert.Equal(Nodes * Rounds * InnerSteps, entries.Count);
        Assert.All(entries, e => Assert.True(double.IsFinite(e.GetProperty("loss").GetDouble())));
        // The coordinator's training curve, for plots and the dashboard: one train line per round at the step it ends
        // on, whose loss is the mean of the replicas' inner steps (each replica trained as many samples).
        var curve = Mamo.Cli.MetricsLog.Read(Path.Combine(run, Mamo.Cli.MetricsLog.FileName)).Train;
        Assert.Equal(Enumerable.Range(1, Rounds).Select(r => (long)r * InnerSteps), curve.Select(t => t.Step));
        for (int round = 0; round < Rounds; round++)
        {
            var mean = entries.Where(e => e.GetProperty("round").GetInt64() == round).Average(e => e.GetProperty("loss").GetDouble());
            Assert.Equal(mean, curve[round].Loss, 1e-9 * mean);
            Assert.Contains("mlm", curve[round].Terms.Keys);
        }

        // A cluster checkpoint after each round: global θ, the teacher and the outer optimizer, with the round and cursor.
        var checkpoints = Model.Checkpoint.Complete(run).Select(Path.GetFileName).Order().ToList();
        Assert.Equal([Model.Checkpoint.StepFolderName(InnerSteps), Model.Checkpoint.StepFolderName(InnerSteps * Rounds)], checkpoints);
        var state = Model.Checkpoint.ReadState(Model.Checkpoint.Latest(run)!);
        Assert.Equal([Model.Checkpoint.StudentPart, Model.Checkpoint.TeacherPart, "outer-optimizer"], state.Parts);
        Assert.Equal(($"{Rounds}", $"{Samples * Rounds - 1}"), (state.Extra["round"], state.Extra["position:cursor"]));

        // The evaluator scored the last checkpoint before the nodes left, each checkpoint at most once, into the run's
        // metrics; the publisher wrote each item of the publish set (the 48 pairs, image and text) once with that version.
        var evals = File.ReadAllLines(Path.Combine(run, "metrics.jsonl")).Select(l => JsonDocument.Parse(l).RootElement)
            .Where(e => e.GetProperty("kind").GetString() == "eval").Select(e => (Step: e.GetProperty("step").GetInt64(), Set: e.GetProperty("set").GetString())).ToList();
        Assert.Equal(evals.Distinct(), evals);
        Assert.Contains((InnerSteps * Rounds, Actors.Pipeline.HeldOutSet.NameOf($"manifest:{manifest}")), evals);
        var last = File.ReadAllLines(embeddings).Select(l => JsonDocument.Parse(l).RootElement)
            .Where(e => e.GetProperty("model_version").GetString() == $"step-{InnerSteps * Rounds}")
            .Select(e => (Id: e.GetProperty("id").GetString(), Modality: e.GetProperty("modality").GetString())).ToList();
        Assert.Equal(2 * Samples, last.Count);
        Assert.Equal(last.Distinct(), last);
        // ... and the dashboard's embeddings panel has that version with its record count.
        Assert.Contains(File.ReadAllLines(Path.Combine(run, "metrics.jsonl")).Select(l => JsonDocument.Parse(l).RootElement),
            e => e.GetProperty("kind").GetString() == "publish" && e.GetProperty("version").GetString() == $"step-{InnerSteps * Rounds}" && e.GetProperty("records").GetInt32() == 2 * Samples);

        // The dashboard's cluster panel: cluster.jsonl has every round with its participants, the members with their
        // roles, and the restarted coordinator as a recovery that its first round closed.
        var cluster = new Mamo.Cli.Dashboard.RunFiles(run);
        cluster.Poll();
        var panel = cluster.Snapshot(100)["cluster"]!;
        Assert.Equal(Enumerable.Range(0, Rounds).Select(r => (double)r), panel["round_seconds"]!["round"]!.AsArray().Select(r => (double)r!));
        Assert.All(panel["latest_rounds"]!.AsArray(), r => Assert.Equal(Enumerable.Range(0, Nodes).Select(i => $"n{i}"), r!["participants"]!.AsArray().Select(p => (string)p!).Order()));
        Assert.Equal(Enumerable.Range(0, Nodes).Select(i => $"n{i}"), panel["members"]!.AsArray().Select(m => (string)m!["name"]!));
        Assert.All(panel["members"]!.AsArray(), m => Assert.Contains("trainer", m!["roles"]!.AsArray().Select(r => (string)r!)));
        Assert.Contains(panel["recoveries"]!.AsArray(), r => (string?)r!["lost"] == "coordinator" && (double?)r["seconds"] > 0);
    }

    [Fact]
    public async Task Cluster_status_lists_the_members_with_their_roles_and_the_round_and_sigterm_makes_each_node_leave()
    {
        using var folder = new TempFolder();
        var manifest = Manifest(folder);
        var run = folder.File("run");
        var ports = Enumerable.Range(0, Nodes).Select(_ => Ports.Free()).ToArray();
        var seed = $"127.0.0.1:{ports[0]}";
        // One replica more than there are nodes: the first round waits, and the cluster stays up to be looked at.
        var nodes = ports.Select((port, i) => Process.Start(MamoProcess.StartInfo([
            "pretrain", "--plain", "--source", "manifest:" + manifest, "--run-dir", run, "--cluster", $"127.0.0.1:{port}", "--seed-nodes", seed,
            "--node-name", $"n{i}", "--roles", i == 2 ? "trainer" : "coordinator,trainer", "--set", $"cluster.min-replicas={Nodes + 1}",
            "--set", "torch-threads=1", "--set", "eval.every-steps=0"]))!).ToList();
        var logs = nodes.Select(p => (Out: p.StandardOutput.ReadToEndAsync(), Err: p.StandardError.ReadToEndAsync())).ToList();
        try
        {
            JsonElement report = default;
            var clock = Stopwatch.StartNew();
            while (true)
            {
                var (code, stdout, stderr) = Cli.Run("cluster", "status", "--seed-nodes", seed, "--json", "--timeout", "30");
                Assert.True(code == 0, stderr);
                report = JsonDocument.Parse(stdout).RootElement;   // stdout is the one object and nothing else
                // Members go joining, then up: wait for all three up.
                if (report.GetProperty("members").GetArrayLength() == Nodes && report.GetProperty("round").ValueKind == JsonValueKind.Number
                    && report.GetProperty("members").EnumerateArray().All(m => m.GetProperty("status").GetString() == "up")) break;
                Assert.True(clock.Elapsed < TimeSpan.FromMinutes(2), $"the cluster did not come up: {stdout}");
            }
            var members = report.GetProperty("members").EnumerateArray().ToList();
            Assert.Equal(["n0", "n1", "n2"], members.Select(m => m.GetProperty("name").GetString()));
            Assert.Equal($"127.0.0.1:{ports[1]}", members[1].GetProperty("address").GetString());
            Assert.Equal(["coordinator", "trainer"], members[0].GetProperty("roles").EnumerateArray().Select(r => r.GetString()));
            Assert.Equal(["trainer"], members[2].GetProperty("roles").EnumerateArray().Select(r => r.GetString()));
            Assert.Equal((0, JsonValueKind.Null), (report.GetProperty("round").GetInt64(), report.GetProperty("last_checkpoint").ValueKind));

            foreach (var p in nodes) await Process.Start("kill", ["-TERM", p.Id.ToString()])!.WaitForExitAsync();
            using var patience = new CancellationTokenSource(TimeSpan.FromMinutes(2));
            foreach (var p in nodes) await p.WaitForExitAsync(patience.Token);
            for (int i = 0; i < Nodes; i++)
                Assert.True(nodes[i].ExitCode == 0, $"node n{i} exited {nodes[i].ExitCode}: {await logs[i].Err}");
        }
        finally
        {
            foreach (var p in nodes.Where(p => !p.HasExited)) p.Kill(entireProcessTree: true);
        }
    }

    [Fact]
    public async Task When_the_coordinators_node_is_killed_the_singleton_moves_and_the_survivors_train_on_from_the_last_checkpoint()
    {
        using var folder = new TempFolder();
        var manifest = Manifest(folder);
        var run = folder.File("run");
        const int rounds = 3;
        var ports = Enumerable.Range(0, Nodes).Select(_ => Ports.Free()).ToArray();
        var seeds = $"127.0.0.1:{ports[0]},127.0.0.1:{ports[1]}";
        // Every checkpoint kept: each lists the attempts it applied.
        var nodes = ports.Select((port, i) => StartNode(manifest, run, i, port, seeds, InnerSteps * rounds, minReplicas: 2, "--set", "checkpoint.keep-last=10")).ToList();
        var logs = nodes.Select(p => (Out: p.StandardOutput.ReadToEndAsync(), Err: p.StandardError.ReadToEndAsync())).ToList();
        try
        {
            // n0 is the oldest node, so the coordinator runs there: kill it once the first round is durable and all
            // three nodes have trained (the first round may start with two).
            var clock = AwaitFirstCheckpoint(run, nodes[0]);
            output.WriteLine($"first checkpoint at {clock.Elapsed.TotalSeconds:F1} s");
            AwaitEveryNodeTrained(run, clock, nodes);
            nodes[0].Kill();
            var killedAt = clock.Elapsed;
            output.WriteLine($"every node trained; n0 killed at {killedAt.TotalSeconds:F1} s");
            var first = Model.Checkpoint.ReadState(Model.Checkpoint.Latest(run)!).Step;
            while (Model.Checkpoint.ReadState(Model.Checkpoint.Latest(run)!).Step == first)
            {
                if (clock.Elapsed - killedAt > TimeSpan.FromSeconds(90))
                    Assert.Fail("no round completed after the coordinator's node died; the survivors' logs:\n" +
                        string.Join("\n", Enumerable.Range(1, Nodes - 1).Select(i => Tail(Path.Combine(run, "nodes", $"n{i}", "mamo.log")))));
                Thread.Sleep(100);
            }
            output.WriteLine($"next round durable {(clock.Elapsed - killedAt).TotalSeconds:F1} s after SIGKILL of the coordinator's node");

            using var patience = new CancellationTokenSource(TimeSpan.FromMinutes(3));
            foreach (var p in nodes.Skip(1)) await p.WaitForExitAsync(patience.Token);
            output.WriteLine($"survivors exited at {clock.Elapsed.TotalSeconds:F1} s");
            for (int i = 1; i < Nodes; i++)
                Assert.True(nodes[i].ExitCode == 0, $"node n{i} exited {nodes[i].ExitCode}: {await logs[i].Err}");
        }
        finally
        {
            foreach (var p in nodes.Where(p => !p.HasExited)) p.Kill(entireProcessTree: true);
        }
        // The survivors trained on in the actor system they started with: it never restarted.
        for (int i = 1; i < Nodes; i++)
        {
            var log = await logs[i].Out + await logs[i].Err;
            Assert.Equal(1, log.Split("Remoting started").Length - 1);
        }
        var state = Model.Checkpoint.ReadState(Model.Checkpoint.Latest(run)!);
        Assert.Equal($"{rounds}", state.Extra["round"]);
        // Nothing lost, nothing twice: the cursors of the applied attempts are every cursor up to the final position once,
        // but those of the ranges the checkpoint holds as unfinished (a round the kill cut short), given again next.
        var final = long.Parse(state.Extra["position:cursor"]);
        var unfinished = state.Extra["unfinished"].Split(',', StringSplitOptions.RemoveEmptyEntries)
            .Select(u => u.Split(':')).SelectMany(u => Enumerable.Range(0, int.Parse(u[1])).Select(k => long.Parse(u[0]) + k)).ToHashSet();
        Assert.Equal(Enumerable.Range(0, (int)final + 1).Select(c => (long)c).Where(c => !unfinished.Contains(c)),
            ReplicaTests.AppliedCursors(run, Nodes, Batch).Order());
    }

    [Fact]
    public async Task A_killed_node_shows_in_cluster_status_as_removed_with_its_recovery_then_restarted_with_its_name_and_port_rejoins()
    {
        using var folder = new TempFolder();
        var manifest = Manifest(folder);
        var run = folder.File("run");
        const int rounds = 40;   // a round takes about 2.5 s here: room for the recovery, the status and the restart (stopped sooner)
        var ports = Enumerable.Range(0, Nodes).Select(_ => Ports.Free()).ToArray();
        Process Start(int i) => StartNode(manifest, run, i, ports[i], $"127.0.0.1:{ports[0]}", InnerSteps * rounds, minReplicas: 2,
            "--set", "checkpoint.keep-last=40");
        var nodes = Enumerable.Range(0, Nodes).Select(Start).ToList();
        var logs = nodes.Select(p => (Out: p.StandardOutput.ReadToEndAsync(), Err: p.StandardError.ReadToEndAsync())).ToList();
        long LatestRound() => Model.Checkpoint.Latest(run) is { } c ? long.Parse(Model.Checkpoint.ReadState(c).Extra["round"]) : 0;
        var ledger = Path.Combine(run, "nodes", "n2", "ledger.jsonl");
        long killedIn;
        try
        {
            // n2 is not the coordinator (n0 is the oldest): kill it once every node has trained and a round n2 trained
            // in is committed, and restart it once the survivors have committed a round without it.
            var clock = AwaitFirstCheckpoint(run, nodes[0]);
            AwaitEveryNodeTrained(run, clock, nodes);
            long TrainedIn() => File.Exists(ledger) ? MamoProcess.Steps(ledger)
                .Select(e => e.GetProperty("round").GetInt64()).DefaultIfEmpty(long.MaxValue).Min() : long.MaxValue;
            while (LatestRound() <= TrainedIn())
            {
                Assert.True(clock.Elapsed < TimeSpan.FromMinutes(2), "n2 did not train: " + Tail(Path.Combine(run, "nodes", "n2", "mamo.log")));
                Thread.Sleep(50);
            }
            nodes[2].Kill();
            killedIn = LatestRound();
            output.WriteLine($"n2 killed in round {killedIn} at {clock.Elapsed.TotalSeconds:F1} s");
            while (LatestRound() <= killedIn)
            {
                if (clock.Elapsed >= TimeSpan.FromMinutes(3))
                    Assert.Fail($"the survivors committed no round after round {killedIn}; exits: n0 {Exit(nodes[0])}, n1 {Exit(nodes[1])}; membership as each node saw it:\n"
                        + string.Join("\n", Enumerable.Range(0, Nodes).Select(i => $"n{i}:\n" + Membership(Path.Combine(run, "nodes", $"n{i}", "mamo.log")))));
                Thread.Sleep(50);
            }
            // cluster status shows it removed, the rounds with and without it, and how long the recovery took.
            var (code, stdout, stderr) = Cli.Run("cluster", "status", "--seed-nodes", $"127.0.0.1:{ports[0]}", "--json", "--timeout", "30");
            Assert.True(code == 0, stderr);
            output.WriteLine(stdout);
            var report = JsonDocument.Parse(stdout).RootElement;
            var gone = report.GetProperty("members").EnumerateArray().Single(m => m.GetProperty("name").GetString() == "n2");
            Assert.Equal(("removed", $"127.0.0.1:{ports[2]}"), (gone.GetProperty("status").GetString(), gone.GetProperty("address").GetString()));
            var recovery = report.GetProperty("recoveries").EnumerateArray().Single(r => r.GetProperty("lost").GetString() == "n2");
            // From when the cluster marked n2 unreachable to the next round committed without it.
            Assert.True(recovery.GetProperty("seconds").GetDouble() > 0, recovery.ToString());
            var recent = report.GetProperty("recent_rounds").EnumerateArray()
                .Select(r => (Round: r.GetProperty("round").GetInt64(), With: r.GetProperty("participants").EnumerateArray().Select(p => p.GetString()).ToList())).ToList();
            Assert.Contains(recent, r => r.With.Contains("n2"));
            Assert.Contains(recent, r => r.Round >= killedIn && r.With.SequenceEqual(["n0", "n1"]));
            Assert.True(LatestRound() < rounds, "the run ended before the killed node could rejoin");
            output.WriteLine($"n2 restarted in round {LatestRound()} at {clock.Elapsed.TotalSeconds:F1} s");
            nodes[2] = Start(2);
            logs[2] = (nodes[2].StandardOutput.ReadToEndAsync(), nodes[2].StandardError.ReadToEndAsync());
            // Once a round the new incarnation trained in is committed, the run has shown the rejoin: SIGTERM stops all
            // three (each hands in, the coordinator checkpoints) rather than training the rounds left.
            while (!MamoProcess.Steps(ledger).Any(e => e.GetProperty("round").GetInt64() > killedIn && e.GetProperty("round").GetInt64() < LatestRound()))
            {
                Assert.True(clock.Elapsed < TimeSpan.FromMinutes(4) && nodes.All(p => !p.HasExited), $"the restarted n2 trained no committed round; exits: " +
                    string.Join(", ", nodes.Select((p, i) => $"n{i} {Exit(p)}")) + "\n" + Tail(Path.Combine(run, "nodes", "n2", "mamo.log")));
                Thread.Sleep(50);
            }
            output.WriteLine($"n2 trained a committed round; all stopped in round {LatestRound()} at {clock.Elapsed.TotalSeconds:F1} s");
            foreach (var p in nodes) await Process.Start("kill", ["-TERM", p.Id.ToString()])!.WaitForExitAsync();
            await AllExitZero(nodes, logs, TimeSpan.FromMinutes(2), run);
            output.WriteLine($"all exited at {clock.Elapsed.TotalSeconds:F1} s");
        }
        finally
        {
            foreach (var p in nodes.Where(p => !p.HasExited)) p.Kill(entireProcessTree: true);
        }
        // The new incarnation joined the running cluster and took a round after the kill, from exactly the θ of the
        // cluster checkpoint before it: a node that joins mid-run trains from the current global weights.
        var round = FirstRoundFromItsCheckpoint(run, "n2", await logs[2].Err);
        Assert.True(round > killedIn, $"round {round}, killed in {killedIn}");
        Assert.Contains(MamoProcess.Steps(ledger), e => e.GetProperty("round").GetInt64() == round);
        Assert.True(long.Parse(Model.Checkpoint.ReadState(Model.Checkpoint.Latest(run)!).Extra["round"]) > round, "the round n2 took was not committed");
    }

    /// <summary>Waits for every node to exit, each with code 0; one still running after <paramref name="patience"/>
    /// fails the test with the end of its log (<paramref name="run"/>'s node folder).</summary>
    static async Task AllExitZero(List<Process> nodes, List<(Task<string> Out, Task<string> Err)> logs, TimeSpan patience, string run)
    {
        using var cancel = new CancellationTokenSource(patience);
        try { foreach (var p in nodes) await p.WaitForExitAsync(cancel.Token); }
        catch (OperationCanceledException)
        {
            Assert.Fail($"not every node exited within {patience}: " + string.Join("\n", nodes.Select((p, i) => $"n{i} {Exit(p)}" +
                (p.HasExited ? "" : ", its log ends:\n" + Tail(Path.Combine(run, "nodes", $"n{i}", "mamo.log"))))));
        }
        for (int i = 0; i < nodes.Count; i++)
            Assert.True(nodes[i].ExitCode == 0, $"node n{i} exited {nodes[i].ExitCode}: {await logs[i].Err}");
    }

    /// <summary>The first round <paramref name="node"/>'s log shows it taking, asserted to start from exactly the θ
    /// of the cluster checkpoint before that round.</summary>
    static int FirstRoundFromItsCheckpoint(string run, string node, string log)
    {
        var line = log.Split('\n').FirstOrDefault(l => l.Contains($"{node} round ") && l.Contains(" starts from θ "));
        Assert.True(line is not null, $"{node} took no round: {log}");
        var match = System.Text.RegularExpressions.Regex.Match(line, $@"{node} round (\d+) starts from θ ([0-9a-f]+)");
        var round = int.Parse(match.Groups[1].Value);
        var before = Path.Combine(run, Model.Checkpoint.RunFolder, Model.Checkpoint.StepFolderName(round * InnerSteps));
        var theta = Model.SafeTensors.Load(Path.Combine(before, Model.Checkpoint.StudentFile));
        Assert.Equal(Model.Checkpoint.WeightHash(theta.Select(kv => (kv.Key, kv.Value))), match.Groups[2].Value);
        return round;
    }

    /// <summary>48 real emoji, so that one round of 3 replicas × 2 steps × 8 pairs is one epoch.</summary>
    internal static string Manifest(TempFolder folder)
    {
        var emoji = BuiltinDatasets.Ensure(BuiltinDatasets.Emoji).File(BuiltinDatasets.TestSplit);
        var root = Path.GetDirectoryName(emoji)!;
        Directory.CreateDirectory(folder.File("images"));
        var lines = File.ReadLines(emoji).Take(Samples).ToList();
        foreach (var line in lines)
        {
            var image = JsonDocument.Parse(line).RootElement.GetProperty("image").GetString()!;
            File.Copy(Path.Combine(root, image), folder.File(image));
        }
        var manifest = folder.File("train.jsonl");
        File.WriteAllLines(manifest, lines);
        return manifest;
    }

    static string Exit(Process p) => p.HasExited ? $"exited {p.ExitCode}" : "running";

    /// <summary>The lines of a node's log on reachability, downing, quarantine and the singleton.</summary>
    internal static string Membership(string log) => File.Exists(log)
        ? string.Join("\n", File.ReadLines(log).Where(l => new[] { "REACHABLE", "SBR", "quarantin", "removed", "Downing", "singleton", "stopped", "leader" }
            .Any(w => l.Contains(w, StringComparison.OrdinalIgnoreCase))).Select(l => l.Length > 300 ? l[..300] : l).TakeLast(40))
        : $"(no {log})";

    internal static string Tail(string log) => File.Exists(log) ? string.Join("\n", File.ReadLines(log).TakeLast(40)) : $"(no {log})";
}
