using System.Diagnostics;
using System.Text.Json;
using Mamo.Actors;
using Mamo.Data.Kafka;
using Xunit;
using Xunit.Abstractions;
using Model = Mamo.Model;

namespace Mamo.Cli.Tests;

/// <summary>DiLoCo node processes on a Kafka topic of librdkafka's mock cluster: the consumer group splits the
/// partitions between the nodes, and the offsets wait for the cluster checkpoint that covers them.</summary>
[Collection(ClusterCollection.Name)]
public class ClusterKafkaTests(ITestOutputHelper output)
{
    const int Batch = 8, InnerSteps = 2, Rounds = 2, Nodes = 2;

    [Fact]
    public async Task Two_nodes_split_a_topics_partitions_lose_no_record_and_commit_what_the_cluster_checkpoint_covers()
    {
        using var broker = new KafkaMockCluster();
        broker.CreateTopic("pairs", partitions: 4);
        KafkaTests.Ingest(broker, "pairs", 200);
        using var folder = new TempFolder();
        var run = folder.File("run");
        var ports = Enumerable.Range(0, Nodes).Select(_ => ClusterTests.FreePort()).ToArray();
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

        var ledgers = Enumerable.Range(0, Nodes).Select(i => File.ReadAllLines(Path.Combine(run, "nodes", $"n{i}", "ledger.jsonl"))
            .Select(l => JsonDocument.Parse(l).RootElement).ToList()).ToList();
        Assert.All(ledgers, l => Assert.Equal(Rounds * InnerSteps, l.Count));   // both nodes trained every round
        var partitions = ledgers.Select(l => l.SelectMany(e => e.GetProperty("position").EnumerateObject().Select(p => p.Name)).ToHashSet()).ToList();
        output.WriteLine($"partitions trained: n0 {string.Join(",", partitions[0].Order())}; n1 {string.Join(",", partitions[1].Order())}");

        // 0 lost: the cluster checkpoint's positions cover exactly the records the nodes trained on.
        var final = StreamPosition.FromExtra(Model.Checkpoint.ReadState(Model.Checkpoint.Latest(run)!).Extra);
        var trained = ledgers.SelectMany(l => l.SelectMany(e => e.GetProperty("ids").EnumerateArray().Select(x => x.GetString()!))).ToList();
        var covered = KafkaTests.ReadTopic(broker, "pairs")
            .Where(r => final[KafkaRecords.PartitionKey("pairs", r.Partition)] is { } last && r.Offset <= last).Select(r => r.Id).ToList();
        output.WriteLine($"{trained.Count} trained, {trained.Distinct().Count()} distinct, {covered.Count} covered by {final}");
        Assert.Equal(covered.Order(), trained.Distinct().Order());
        Assert.Equal(Nodes * Rounds * InnerSteps * Batch, trained.Count);
        // The group's committed offsets are the checkpoint's, one past each last record.
        Assert.Equal(final.Offsets.ToDictionary(kv => kv.Key, kv => kv.Value + 1), KafkaTests.Committed(broker, "pairs", 4, "cluster"));
    }
}
