using System.Globalization;
using System.Diagnostics;
using System.Text.Json;
using Mamo.Actors;
using Mamo.Data.Kafka;
using Xunit;
using Xunit.Abstractions;
using Model = Mamo.Model;
using Mamo.Actors.Sources;

namespace Mamo.Cli.Tests;

/// <summary>DiLoCo node processes on a Kafka topic of librdkafka's mock cluster: the consumer group splits the
/// partitions between the nodes, and the offsets wait for the cluster checkpoint that covers them.</summary>
[Collection(ClusterCollection.Name)]
public class ClusterKafkaTests(ITestOutputHelper output)
{
    const int Batch = 8, InnerSteps = 2, Rounds = 2, Nodes = 2;

    [Fact]
    public async Task Two_nodes_split_a_topics_partitions_train_each_record_once_and_commit_what_the_cluster_checkpoint_covers()
    {
        using var broker = new KafkaMockCluster();
        broker.CreateTopic("pairs", partitions: 4);
        KafkaTests.Ingest(broker, "pairs", 200);
        using var folder = new TempFolder();
        var run = folder.File("run");
        var ports = Enumerable.Range(0, Nodes).Select(_ => Ports.Free()).ToArray();
        var nodes = ports.Select((port, i) => Process.Start(MamoProcess.StartInfo([
            "pretrain", "--plain", "--ledger", "--source", $"kafka://{broker.BootstrapServers}/pairs?group=cluster", "--run-dir", run,
            "--max-steps", $"{InnerSteps * Rounds}", "--cluster", $"127.0.0.1:{port}", "--seed-nodes", $"127.0.0.1:{ports[0]}", "--node-name", $"n{i}",
            "--set", $"batch-size={Batch}", "--set", $"cluster.inner-steps={InnerSteps}", "--set", $"cluster.min-replicas={Nodes}",
            "--set", "torch-threads=1", "--set", "eval.every-steps=0", "--set", "data.preprocess-parallelism=1"]))!).ToList();
        var logs = nodes.Select(p => (Out: p.StandardOutput.ReadToEndAsync(), Err: p.StandardError.ReadToEndAsync())).ToList();
        using (var patience = new CancellationTokenSource(TimeSpan.FromMinutes(4)))
        {
            try { foreach (var p in nodes) await p.WaitForExitAsync(patience.Token); }
            finally { foreach (var p in nodes.Where(p => !p.HasExited)) p.Kill(entireProcessTree: true); }
        }
        for (int i = 0; i < Nodes; i++)
            Assert.True(nodes[i].ExitCode == 0, $"node n{i} exited {nodes[i].ExitCode}: {await logs[i].Err}");

        // Each round was applied with both nodes (min-replicas): InnerSteps steps of each.
        var applied = ReplicaTests.AppliedSteps(run, Nodes);
        Assert.Equal(Nodes * Rounds * InnerSteps, applied.Count);
        var partitions = Enumerable.Range(0, Nodes).Select(i => MamoProcess.Steps(Path.Combine(run, "nodes", $"n{i}", "ledger.jsonl"))
            .SelectMany(e => e.GetProperty("position").EnumerateObject().Select(p => p.Name)).ToHashSet()).ToList();
        output.WriteLine($"partitions trained: n0 {string.Join(",", partitions[0].Order())}; n1 {string.Join(",", partitions[1].Order())}");
        foreach (var refused in File.ReadLines(Path.Combine(run, "nodes", "n0", "mamo.log")).Where(l => l.Contains("both trained"))) output.WriteLine(refused);

        // Exactly once: the applied steps hold each record the cluster checkpoint's positions cover, once.
        var final = StreamPosition.FromExtra(Model.Checkpoint.ReadState(Model.Checkpoint.Latest(run)!).Extra);
        var trained = applied.SelectMany(Ids).ToList();
        var covered = KafkaTests.ReadTopic(broker, "pairs")
            .Where(r => final[KafkaRecords.PartitionKey("pairs", r.Partition)] is { } last && r.Offset <= last).Select(r => r.Id).ToList();
        output.WriteLine($"{trained.Count} trained in applied steps, {trained.Distinct().Count()} distinct, {covered.Count} covered by {final}");
        Assert.Equal(covered.Order(), trained.Order());
        // The group's committed offsets are the checkpoint's, one past each last record.
        Assert.Equal(final.Offsets.ToDictionary(kv => kv.Key, kv => kv.Value + 1), KafkaTests.Committed(broker, "pairs", 4, "cluster"));
    }

    [Fact]
    public async Task A_trainer_node_killed_mid_round_costs_one_round_its_partitions_move_and_each_record_is_trained_once()
    {
        const int batch = 4, rounds = 15;
        using var broker = new KafkaMockCluster();
        broker.CreateTopic("pairs", partitions: 4);
        // The group moves a silent member's partitions after 10 s (a broker setting; the mock's default is about 30 s).
        broker.SetConsumerSessionTimeout(TimeSpan.FromSeconds(10));
        // Enough that one node with one partition does not run dry before the end (8 records a round).
        KafkaTests.Ingest(broker, "pairs", 600);
        using var folder = new TempFolder();
        var run = folder.File("run");
        var ports = Enumerable.Range(0, 3).Select(_ => Ports.Free()).ToArray();
        var nodes = ports.Select((port, i) => Process.Start(MamoProcess.StartInfo([
            "pretrain", "--plain", "--ledger", "--source", $"kafka://{broker.BootstrapServers}/pairs?group=cluster", "--run-dir", run,
            "--max-steps", $"{InnerSteps * rounds}", "--cluster", $"127.0.0.1:{port}", "--seed-nodes", $"127.0.0.1:{ports[0]}", "--node-name", $"n{i}",
            "--set", $"batch-size={batch}", "--set", $"cluster.inner-steps={InnerSteps}", "--set", "cluster.min-replicas=2", "--set", "cluster.start-replicas=3", "--set", "checkpoint.keep-last=40",
            "--set", "torch-threads=1", "--set", "eval.every-steps=0", "--set", "data.preprocess-parallelism=1"]))!).ToList();
        var logs = nodes.Select(p => (Out: p.StandardOutput.ReadToEndAsync(), Err: p.StandardError.ReadToEndAsync())).ToList();
        var ledger = Enumerable.Range(0, 3).Select(i => Path.Combine(run, "nodes", $"n{i}", "ledger.jsonl")).ToList();
        List<JsonElement> Read(int i) => File.Exists(ledger[i]) ? MamoProcess.Steps(ledger[i]) : [];
        long LatestRound() => Model.Checkpoint.Latest(run) is { } c ? long.Parse(Model.Checkpoint.ReadState(c).Extra[Actors.Cluster.RoundCoordinator.RoundKey]) : 0;
        var pids = nodes.Select(p => p.Id).ToList();
        TimeSpan recovery;
        long killedIn;
        var killedAtUtc = DateTimeOffset.MaxValue;
        try
        {
            // n0 is the oldest, so the coordinator runs there; n2 is a trainer only. Kill n2 mid-round: after the
            // second round's checkpoint, once every node has trained (all three are members, so the survivors are a
            // majority: a node still joining is no part of SBR's count) and n2 has trained a step of the round in progress.
            var clock = Stopwatch.StartNew();
            while (!(LatestRound() >= 2 && Read(0).Count > 0 && Read(1).Count > 0 && Read(2).Any(e => e.GetProperty("round").GetInt64() == LatestRound())))
            {
                Assert.True(clock.Elapsed < TimeSpan.FromMinutes(2) && nodes.All(p => !p.HasExited), "the cluster did not get going: " + await Describe(nodes, logs));
                Thread.Sleep(20);
            }
            killedIn = LatestRound();
            nodes[2].Kill();
            killedAtUtc = DateTimeOffset.UtcNow;
            var killedAt = clock.Elapsed;
            while (LatestRound() == killedIn)
            {
                if (clock.Elapsed - killedAt >= TimeSpan.FromSeconds(60))
                    Assert.Fail("no round was committed within 60 s of the kill; membership as the survivors saw it:\n" + string.Join("\n",
                        Enumerable.Range(0, 2).Select(i => $"n{i}:\n" + ClusterTests.Membership(Path.Combine(run, "nodes", $"n{i}", "mamo.log")))));
                Thread.Sleep(20);
            }
            recovery = clock.Elapsed - killedAt;
            output.WriteLine($"round {killedIn} committed {recovery.TotalSeconds:F1} s after SIGKILL of n2");
            using var patience = new CancellationTokenSource(TimeSpan.FromMinutes(4));
            foreach (var p in nodes.Take(2)) await p.WaitForExitAsync(patience.Token);
            for (int i = 0; i < 2; i++) Assert.True(nodes[i].ExitCode == 0, $"n{i} exited {nodes[i].ExitCode}: {await logs[i].Err}");
        }
        finally
        {
            foreach (var p in nodes.Where(p => !p.HasExited)) p.Kill(entireProcessTree: true);
        }
        // The survivors never restarted: the processes started are the ones that finished, each with one actor system.
        Assert.Equal(pids.Take(2), nodes.Take(2).Select(p => p.Id));
        for (int i = 0; i < 2; i++) Assert.Equal(1, (await logs[i].Out + await logs[i].Err).Split("Remoting started").Length - 1);

        // Exactly once: the applied steps hold each record the final checkpoint covers, once. What the dead node trained in
        // a round that was never applied (read after the last checkpoint that took its hand-in) is trained again by the
        // partitions' new owners; so is a round a node handed in on a partition the group moved away during it (the
        // coordinator applies one hand-in per partition).
        var applied = ReplicaTests.AppliedSteps(run, 3);
        var attempts = applied.Select(e => e.GetProperty("attempt").GetInt64()).ToHashSet();
        var dead = Read(2);
        var deadUnapplied = dead.Where(e => !attempts.Contains(e.GetProperty("attempt").GetInt64())).SelectMany(Ids).ToHashSet();
        Assert.NotEmpty(deadUnapplied);   // it was killed mid-round
        var trained = applied.SelectMany(Ids).ToList();
        var final = StreamPosition.FromExtra(Model.Checkpoint.ReadState(Model.Checkpoint.Latest(run)!).Extra);
        var covered = KafkaTests.ReadTopic(broker, "pairs")
            .Where(r => final[KafkaRecords.PartitionKey("pairs", r.Partition)] is { } last && r.Offset <= last).Select(r => r.Id).ToList();
        output.WriteLine($"{covered.Count} records covered by {final}; {trained.Count} in applied steps, {trained.Distinct().Count()} distinct; " +
            $"{deadUnapplied.Intersect(trained).Count()} of the {deadUnapplied.Count} n2 trained in its unapplied round trained again");
        Assert.Equal(covered.Order(), trained.Order());
        // n2's partitions moved to a survivor, which starts each right after what a cluster checkpoint covers: the group's
        // committed offset (not n2's own last position: another node may have trained the partition after n2 did). Its
        // records may not be trained before the end: a survivor's stream first drains what it had buffered of its own.
        var deadPartitions = dead.SelectMany(e => e.GetProperty("position").EnumerateObject().Select(p => p.Name)).ToHashSet();
        // The survivors' assignments after the kill, from their log files (which date each line). A partition nobody
        // has committed yet starts where auto.offset.reset (earliest) says: offset 0, logged Unset.
        var survivorLogs = string.Join("\n", Enumerable.Range(0, 2).SelectMany(i => File.ReadLines(Path.Combine(run, "nodes", $"n{i}", "mamo.log")))
            .Where(l => l.Contains("Kafka partitions assigned") && DateTimeOffset.Parse(l[..30], CultureInfo.InvariantCulture) >= killedAtUtc));
        var moves = System.Text.RegularExpressions.Regex.Matches(survivorLogs, @"pairs \[\[(\d+)\]\] @(\d+|Unset)")
            .Select(m => (Partition: $"pairs/{m.Groups[1].Value}", Start: m.Groups[2].Value == "Unset" ? 0 : long.Parse(m.Groups[2].Value))).ToList();
        var checkpointed = Directory.GetDirectories(Path.Combine(run, Model.Checkpoint.RunFolder))
            .Select(d => StreamPosition.FromExtra(Model.Checkpoint.ReadState(d).Extra)).ToList();
        bool AtACommit(string partition, long start) => start == 0 || checkpointed.Any(c => c[partition] + 1 == start);
        var deadMoves = moves.Where(m => deadPartitions.Contains(m.Partition)).ToList();
        Assert.True(deadMoves.Count > 0 && deadMoves.All(m => AtACommit(m.Partition, m.Start)),
            $"n2's partitions ({string.Join(", ", deadPartitions)}) did not all move to a survivor at a committed offset: moves {string.Join(", ", moves)}; " +
            $"checkpoints {string.Join("; ", checkpointed)}:\n{survivorLogs}");
        // The group's committed offsets are the final checkpoint's.
        Assert.Equal(final.Offsets.ToDictionary(kv => kv.Key, kv => kv.Value + 1), KafkaTests.Committed(broker, "pairs", 4, "cluster"));
    }

    static IEnumerable<string> Ids(JsonElement entry) => entry.GetProperty("ids").EnumerateArray().Select(x => x.GetString()!);

    static async Task<string> Describe(List<Process> nodes, List<(Task<string> Out, Task<string> Err)> logs)
    {
        var exited = nodes.Select((p, i) => (p, i)).Where(x => x.p.HasExited).ToList();
        return exited.Count == 0 ? "no node exited" : string.Join("\n", await Task.WhenAll(exited.Select(async x => $"n{x.i} exited {x.p.ExitCode}: {await logs[x.i].Err}")));
    }
}
