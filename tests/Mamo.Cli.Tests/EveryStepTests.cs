using System.Diagnostics;
using TorchSharp;
using System.Text.Json;
using Xunit;
using Xunit.Abstractions;
using Model = Mamo.Model;

namespace Mamo.Cli.Tests;

/// <summary>cluster.sync = every-step as real node processes on 127.0.0.1, against single-node `mamo pretrain` on the
/// same manifest. Both pipeline the teacher's targets one update behind (teacher.pipelined, the default).</summary>
[Collection(ClusterCollection.Name)]
public class EveryStepTests(ITestOutputHelper output)
{
    static readonly string[] Common = ["--plain", "--ledger", "--set", "torch-threads=1", "--set", "eval.every-steps=0"];

    /// <summary>Runs the processes to their end, each of which must succeed; returns each one's output.</summary>
    static async Task<List<string>> Run(params (string Name, string[] Args)[] processes)
    {
        var started = processes.Select(p => (p.Name, Process: Process.Start(MamoProcess.StartInfo(["pretrain", .. Common, .. p.Args]))!)).ToList();
        var logs = started.Select(p => (Out: p.Process.StandardOutput.ReadToEndAsync(), Err: p.Process.StandardError.ReadToEndAsync())).ToList();
        using var patience = new CancellationTokenSource(TimeSpan.FromMinutes(4));
        try
        {
            foreach (var (_, p) in started) await p.WaitForExitAsync(patience.Token);
        }
        finally
        {
            foreach (var (_, p) in started.Where(p => !p.Process.HasExited)) p.Kill(entireProcessTree: true);
        }
        var output = new List<string>();
        for (int i = 0; i < started.Count; i++)
        {
            output.Add(await logs[i].Out + await logs[i].Err);
            Assert.True(started[i].Process.ExitCode == 0, $"{started[i].Name} exited {started[i].Process.ExitCode}: {output[i]}");
        }
        return output;
    }

    static string[] Node(string manifest, string run, int i, int port, int seedPort, int batch, int maxSteps, int replicas) =>
        ["--source", "manifest:" + manifest, "--run-dir", run, "--max-steps", $"{maxSteps}", "--set", $"batch-size={batch}",
         "--cluster", $"127.0.0.1:{port}", "--seed-nodes", $"127.0.0.1:{seedPort}", "--node-name", $"n{i}",
         "--set", "cluster.sync=every-step", "--set", $"cluster.min-replicas={replicas}"];

    static List<JsonElement> Ledger(string path) => MamoProcess.Steps(path);

    static IReadOnlyDictionary<string, TorchSharp.torch.Tensor> Student(string run, long step) =>
        Model.SafeTensors.Load(Path.Combine(run, Model.Checkpoint.RunFolder, Model.Checkpoint.StepFolderName(step), Model.Checkpoint.StudentFile));

    [Fact]
    public async Task One_every_step_node_makes_the_same_20_steps_as_single_node_pretrain_from_the_same_init()
    {
        using var folder = new TempFolder();
        var manifest = ClusterTests.Manifest(folder);
        var (init, single, cluster) = (folder.File("init"), folder.File("single"), folder.File("cluster"));
        var port = Ports.Free();
        // Both start from another run's checkpoint (pretrain --init), not from the seed.
        await Run(("init", ["--source", "manifest:" + manifest, "--run-dir", init, "--max-steps", "2", "--set", "batch-size=8"]));
        await Run(("single node", ["--source", "manifest:" + manifest, "--run-dir", single, "--max-steps", "20", "--set", "batch-size=8", "--init", init]));
        await Run(("n0", [.. Node(manifest, cluster, 0, port, port, batch: 8, maxSteps: 20, replicas: 1), "--init", init]));
        var started = Student(init, 2);
        var step0 = Student(cluster, 0);
        foreach (var (name, value) in started) Assert.True(value.equal(step0[name]).all().item<bool>(), $"{name}: the cluster did not start from --init");

        var expected = Ledger(Path.Combine(single, "ledger.jsonl"));
        var actual = Ledger(Path.Combine(cluster, "nodes", "n0", "ledger.jsonl"));
        Assert.Equal(20, expected.Count);
        Assert.Equal(20, actual.Count);
        // Bitwise: the same ops in the same order on the same thread count.
        for (int s = 0; s < 20; s++)
        {
            Assert.Equal(expected[s].GetProperty("ids").ToString(), actual[s].GetProperty("ids").ToString());
            Assert.Equal(expected[s].GetProperty("loss").GetDouble(), actual[s].GetProperty("loss").GetDouble());
        }
        // The coordinator's training curve in the run's metrics.jsonl is single-node's: same steps, losses and terms.
        var (singleCurve, clusterCurve) = (MetricsLog.Read(Path.Combine(single, MetricsLog.FileName)).Train, MetricsLog.Read(Path.Combine(cluster, MetricsLog.FileName)).Train);
        Assert.NotEmpty(singleCurve);
        Assert.Equal(singleCurve.Select(t => t.Step), clusterCurve.Select(t => t.Step));
        foreach (var (a, b) in singleCurve.Zip(clusterCurve))
        {
            Assert.Equal(a.Terms.Keys.Order(), b.Terms.Keys.Order());
            foreach (var (term, value) in a.Terms.Append(KeyValuePair.Create("total", a.Loss)))
                Assert.True((term == "total" ? b.Loss : b.Terms[term]) == value, $"step {a.Step} {term}: {value} vs {b.Terms.GetValueOrDefault(term, b.Loss)}");
            Assert.Equal(a.LearningRate, b.LearningRate);
        }
        // Its checkpoints are a single-node run's: student, optimizer and teacher, at step 20, the teacher one update
        // behind (pipelined) and the same bits, from the state its replica reported.
        var (singleLast, clusterLast) = (Model.Checkpoint.Latest(single)!, Model.Checkpoint.Latest(cluster)!);
        var state = Model.Checkpoint.ReadState(clusterLast);
        Assert.Equal(new[] { Model.Checkpoint.StudentPart, Model.Checkpoint.OptimizerPart, Model.Checkpoint.TeacherPart }.Order(), state.Parts!.Order());
        Assert.Equal((20L, 19L), (state.Step, state.TeacherStep));
        Assert.Equal(Model.Checkpoint.ReadState(singleLast).TeacherStep, state.TeacherStep);
        var singleTeacher = Model.SafeTensors.Load(Path.Combine(singleLast, Model.Checkpoint.TeacherFile));
        foreach (var (name, value) in Model.SafeTensors.Load(Path.Combine(clusterLast, Model.Checkpoint.TeacherFile)))
            Assert.True(value.equal(singleTeacher[name]).all().item<bool>(), $"teacher {name} differs from the single node's");
    }

    [Fact]
    public async Task Two_every_step_nodes_stopped_together_with_sigterm_both_leave()
    {
        using var folder = new TempFolder();
        var manifest = ClusterTests.Manifest(folder);
        var run = folder.File("cluster");
        var ports = new[] { Ports.Free(), Ports.Free() };
        var nodes = Enumerable.Range(0, 2).Select(i => Process.Start(MamoProcess.StartInfo(["pretrain", .. Common,
            .. Node(manifest, run, i, ports[i], ports[0], batch: 4, maxSteps: 1_000_000, replicas: 2)]))!).ToList();
        var logs = nodes.Select(p => (Out: p.StandardOutput.ReadToEndAsync(), Err: p.StandardError.ReadToEndAsync())).ToList();
        try
        {
            // Both replicas in the middle of the run: each has trained steps, and the next is being given.
            var ledgers = Enumerable.Range(0, 2).Select(i => Path.Combine(run, "nodes", $"n{i}", "ledger.jsonl")).ToList();
            var clock = Stopwatch.StartNew();
            while (!ledgers.All(l => File.Exists(l) && Ledger(l).Count >= 3))
            {
                Assert.True(clock.Elapsed < TimeSpan.FromMinutes(3) && nodes.All(p => !p.HasExited), "the two replicas did not train 3 steps each");
                await Task.Delay(100);
            }
            foreach (var p in nodes) await Process.Start("kill", ["-TERM", p.Id.ToString()])!.WaitForExitAsync();
            // Each drops the step it is in; before, each waited a round-timeout (10 minutes) for the other's features.
            using var patience = new CancellationTokenSource(TimeSpan.FromMinutes(2));
            try { foreach (var p in nodes) await p.WaitForExitAsync(patience.Token); }
            catch (OperationCanceledException)
            {
                Assert.Fail($"2 minutes after SIGTERM: n0 {(nodes[0].HasExited ? "left" : "still up")}, n1 {(nodes[1].HasExited ? "left" : "still up")}; " +
                    string.Join("\n", Enumerable.Range(0, 2).Where(i => !nodes[i].HasExited).Select(i => $"n{i}'s log ends:\n" + ClusterTests.Tail(Path.Combine(run, "nodes", $"n{i}", "mamo.log")))));
            }
            for (int i = 0; i < 2; i++)
                Assert.True(nodes[i].ExitCode == 0, $"node n{i} exited {nodes[i].ExitCode}: {await logs[i].Out}{await logs[i].Err}");
            // The coordinator checkpointed the state its node's replica sent as it stopped (checkpoint.every-steps is
            // 250): a restart trains none of its steps again.
            var last = Model.Checkpoint.ReadState(Model.Checkpoint.Latest(run)!).Step;
            Assert.True(last >= 2, $"the last checkpoint is step {last}");
            // The coordinator's node (the seed) says the step it checkpointed as it left, not the one before.
            Assert.Contains($"node n0: the run reached step {last};", await logs[0].Out);
        }
        finally
        {
            foreach (var p in nodes.Where(p => !p.HasExited)) p.Kill(entireProcessTree: true);
        }
    }

    [Fact]
    public async Task Two_every_step_replicas_at_batch_4_make_the_update_of_one_process_at_batch_8()
    {
        using var folder = new TempFolder();
        var manifest = ClusterTests.Manifest(folder);
        var (single, cluster) = (folder.File("single"), folder.File("cluster"));
        var ports = new[] { Ports.Free(), Ports.Free() };
        // ITM's hard negatives come from each replica's own 4 pairs, as ALBEF's GPUs draw them; the single process
        // draws them from each half of its batch. The full learning rate from step 0 (no warm-up): a warm-up step's
        // update (1e-6 per weight) is close to float32's spacing of the weights themselves, which would be all one measured.
        string[] fullRate = ["--set", "optimizer.warmup-steps=1"];
        await Run(("single node", ["--source", "manifest:" + manifest, "--run-dir", single, "--max-steps", "1", "--set", "batch-size=8",
            "--set", "model.itm-negative-group=4", .. fullRate]));
        await Run(("n0", [.. Node(manifest, cluster, 0, ports[0], ports[0], batch: 4, maxSteps: 1, replicas: 2), .. fullRate]),
                  ("n1", [.. Node(manifest, cluster, 1, ports[1], ports[0], batch: 4, maxSteps: 1, replicas: 2), .. fullRate]));

        // The replicas' rows, in node order, are the single process's batch.
        var ids = Ledger(Path.Combine(single, "ledger.jsonl")).Single().GetProperty("ids").EnumerateArray().Select(x => x.GetString()).ToList();
        var shards = Enumerable.Range(0, 2).Select(i => Ledger(Path.Combine(cluster, "nodes", $"n{i}", "ledger.jsonl")).Single()).ToList();
        Assert.Equal(ids, shards.SelectMany(e => e.GetProperty("ids").EnumerateArray().Select(x => x.GetString())).ToList());
        var loss = Ledger(Path.Combine(single, "ledger.jsonl")).Single().GetProperty("loss").GetDouble();
        Assert.Equal(loss, shards.Sum(e => e.GetProperty("loss").GetDouble()), 1e-5 * loss);   // each replica's loss is its share

        // The update θ1 − θ0, as one vector over every parameter.
        var (start, expected, actual) = (Student(single, 0), Student(single, 1), Student(cluster, 1));
        Assert.Equal(Model.Checkpoint.WeightHash(start.Select(kv => (kv.Key, kv.Value))),
            Model.Checkpoint.WeightHash(Student(cluster, 0).Select(kv => (kv.Key, kv.Value))));
        double difference = 0, update = 0;
        foreach (var (name, t0) in start)
        {
            difference += Math.Pow(actual[name].sub(expected[name]).norm().ToDouble(), 2);
            update += Math.Pow(expected[name].sub(t0).norm().ToDouble(), 2);
        }
        var relative = Math.Sqrt(difference / update);
        output.WriteLine($"relative difference of the updates: {relative:E2}");
        Assert.True(update > 0 && relative <= 1e-5, $"relative difference of the updates {relative:E2}");
    }

    [Fact]
    public async Task Two_every_step_replicas_take_in_a_third_then_lose_it_to_sigkill_and_train_on_from_a_survivors_state_hash_checked_at_every_step()
    {
        using var folder = new TempFolder();
        var manifest = ClusterTests.Manifest(folder);
        var run = folder.File("cluster");
        const int steps = 24, nodes = 3, batch = 4;
        var ports = Enumerable.Range(0, nodes).Select(_ => Ports.Free()).ToArray();
        // Every step hashed and checkpointed: the replicas' states are checked against each other, and against the checkpoint of the step.
        string[] more = ["--set", "cluster.hash-every-steps=1", "--set", "checkpoint.every-steps=1", "--set", "checkpoint.keep-last=100",
            "--set", "cluster.start-replicas=2", "--set", "metrics.every-steps=1"];
        var processes = new List<Process>();
        var logs = new List<(Task<string> Out, Task<string> Err)>();
        void Start(int i)
        {
            processes.Add(Process.Start(MamoProcess.StartInfo(["pretrain", .. Common, .. Node(manifest, run, i, ports[i], ports[0], batch, steps, replicas: 2), .. more]))!);
            logs.Add((processes[^1].StandardOutput.ReadToEndAsync(), processes[^1].StandardError.ReadToEndAsync()));
        }
        try
        {
            // n0 and n1 train; n2 joins the run under way, and trains; then it is killed (n0, the oldest node, runs the coordinator).
            var ledgers = Enumerable.Range(0, nodes).Select(i => Path.Combine(run, "nodes", $"n{i}", "ledger.jsonl")).ToList();
            var clock = Stopwatch.StartNew();
            async Task Trained(int first, int count, string what)
            {
                while (!ledgers.Skip(first).Take(count).All(l => File.Exists(l) && Ledger(l).Count >= 2))
                {
                    Assert.True(clock.Elapsed < TimeSpan.FromMinutes(3) && processes.All(p => !p.HasExited), what);
                    await Task.Delay(100);
                }
            }
            Start(0);
            Start(1);
            await Trained(0, 2, "n0 and n1 did not train 2 steps each");
            Start(2);
            await Trained(2, 1, "n2 did not join the run and train 2 steps");
            processes[2].Kill();
            using var patience = new CancellationTokenSource(TimeSpan.FromMinutes(3));
            try { foreach (var p in processes.Take(2)) await p.WaitForExitAsync(patience.Token); }
            catch (OperationCanceledException) { Assert.Fail("the two replicas left did not finish the run within 3 minutes of the kill"); }
            for (int i = 0; i < 2; i++)
                Assert.True(processes[i].ExitCode == 0, $"node n{i} exited {processes[i].ExitCode}: {await logs[i].Out}{await logs[i].Err}");
        }
        finally
        {
            foreach (var p in processes.Where(p => !p.HasExited)) p.Kill(entireProcessTree: true);
        }
        var survivors = Enumerable.Range(0, 2).Select(i => File.ReadAllText(Path.Combine(run, "nodes", $"n{i}", "mamo.log"))).ToArray();
        var all = string.Concat(survivors);
        // n2 joined with the state at a step the replicas under way reported.
        Assert.Matches(@"step \d+: the state to n2\b", all);
        // The coordinator dropped the steps in flight, went on from a survivor's state (it keeps no copy of its own) and
        // gave it to the two left.
        Assert.Contains("replica n2 left", all);
        Assert.Matches(@"step \d+: the run goes on from n[01]'s state", all);
        Assert.Contains("the state to n0, n1", all);
        Assert.DoesNotContain("do not hold the run's state", all);
        Assert.Contains("2 replicas hold the run's state", all);
        // What each survivor last started each step from is, bit for bit, the cluster checkpoint of that step.
        var started = new System.Text.RegularExpressions.Regex(@"started step (\d+) from replica state \W?([0-9a-f]{16})");
        for (int step = 1; step < steps; step++)
        {
            var dir = Path.Combine(run, Model.Checkpoint.RunFolder, Model.Checkpoint.StepFolderName(step));
            using var copy = Model.MamoTrainer.Load(dir, new Model.OptimizerConfig(), TorchSharp.torch.CPU, seed: 0, withTeacher: false);
            var expected = copy.ReplicaHash();
            for (int i = 0; i < 2; i++)
            {
                var last = started.Matches(survivors[i]).LastOrDefault(m => m.Groups[1].Value == $"{step}");
                Assert.True(last is not null, $"n{i} logged no start of step {step}:\n{survivors[i]}");
                Assert.Equal(expected, last.Groups[2].Value);
            }
        }
        // Nothing lost, nothing twice: the applied steps' cursors are every cursor up to the final position, once.
        var state = Model.Checkpoint.ReadState(Model.Checkpoint.Latest(run)!);
        Assert.Equal(steps, state.Step);
        var final = long.Parse(state.Extra["position:cursor"]);
        Assert.Equal(Enumerable.Range(0, (int)final + 1).Select(c => (long)c), ReplicaTests.AppliedCursors(run, nodes, batch).Order());
        // The schedule follows the samples: the rate rose at every step of the warm-up (24 steps of 2 and 3 replicas, at
        // most 72 of one node's 100), across n2's join and loss too (counted in steps it fell where three became two).
        var rates = MetricsLog.Read(Path.Combine(run, MetricsLog.FileName)).Train.Select(t => t.LearningRate!.Value).ToList();
        Assert.Equal(steps, rates.Count);
        Assert.True(rates.Zip(rates.Skip(1)).All(r => r.Second > r.First), string.Join(", ", rates));
    }

    [Fact]
    public async Task Two_nodes_go_on_from_an_every_step_warm_start_as_diloco_with_its_adamw_and_a_sync_that_cannot_go_on_is_refused()
    {
        using var folder = new TempFolder();
        var manifest = ClusterTests.Manifest(folder);
        var run = folder.File("cluster");
        var ports = new[] { Ports.Free(), Ports.Free() };
        string[] Diloco(int i, int innerSteps) => [.. Node(manifest, run, i, ports[i], ports[0], batch: 4, maxSteps: 4, replicas: 2),
            "--set", "cluster.sync=diloco", "--set", $"cluster.inner-steps={innerSteps}"];
        // A synchronous warm start: 2 every-step steps...
        await Run(("n0", Node(manifest, run, 0, ports[0], ports[0], batch: 4, maxSteps: 2, replicas: 2)),
                  ("n1", Node(manifest, run, 1, ports[1], ports[0], batch: 4, maxSteps: 2, replicas: 2)));
        var warm = Path.Combine(run, Model.Checkpoint.RunFolder, Model.Checkpoint.StepFolderName(2));
        Assert.Equal(2, Model.Checkpoint.ReadState(warm).OptimizerStep);

        // ...whose step is no round boundary of 3-step rounds: refused before the node joins, saying what to set.
        var (code, log) = MamoProcess.Run(["pretrain", .. Common, .. Diloco(0, innerSteps: 3)]);
        Assert.True(code == 2, $"exit {code}: {log}");
        Assert.Contains("cluster.inner-steps = 3, which must divide 2", log);

        // Then DiLoCo from it, in rounds of 2 steps: one round, from step 2.
        await Run(("n0", Diloco(0, innerSteps: 2)), ("n1", Diloco(1, innerSteps: 2)));
        var state = Model.Checkpoint.ReadState(Model.Checkpoint.Latest(run)!);
        Assert.Equal(4, state.Step);
        Assert.Equal("2", state.Extra["round"]);
        Assert.Contains(Model.Checkpoint.ReadState(warm).Parts!, p => p == Model.Checkpoint.OptimizerPart);
        for (int i = 0; i < 2; i++)
        {
            // Each replica trained steps 2 and 3, and its AdamW went on from the warm start's: its checkpoint of the round
            // holds AdamW at step 4 (a fresh AdamW would be at 2), its moments not the warm start's any more.
            var node = Path.Combine(run, "nodes", $"n{i}");
            Assert.Equal([2L, 3L], Ledger(Path.Combine(node, "ledger.jsonl")).Select(e => e.GetProperty("step").GetInt64()).TakeLast(2));
            var replica = Path.Combine(node, Model.Checkpoint.RunFolder, Model.Checkpoint.StepFolderName(4));
            Assert.Equal(4, Model.Checkpoint.ReadState(replica).OptimizerStep);
        }

        // every-step cannot go on from a DiLoCo checkpoint: its replicas' AdamW is in none.
        (code, log) = MamoProcess.Run(["pretrain", .. Common, .. Node(manifest, run, 0, ports[0], ports[0], batch: 4, maxSteps: 6, replicas: 2)]);
        Assert.True(code == 2, $"exit {code}: {log}");
        Assert.Contains("is a checkpoint of a diloco run", log);
    }
}
