using System.Diagnostics;
using System.Net;
using System.Net.Sockets;
using System.Text.Json;
using Mamo.Data.Datasets;
using Xunit;
using Xunit.Abstractions;
using Model = Mamo.Model;

namespace Mamo.Cli.Tests;

/// <summary>`mamo pretrain --cluster` as three real node processes on 127.0.0.1, ports chosen at run time.</summary>
public class ClusterTests(ITestOutputHelper output)
{
    const int Samples = 48, Batch = 8, InnerSteps = 2, Nodes = 3, Rounds = 2;

    [Fact]
    public async Task Three_nodes_train_diloco_rounds_that_cover_each_epoch_once_and_checkpoint_each_round()
    {
        using var folder = new TempFolder();
        var manifest = Manifest(folder);
        var run = folder.File("run");
        var ports = Enumerable.Range(0, Nodes).Select(_ => FreePort()).ToArray();
        var seed = $"127.0.0.1:{ports[0]}";
        var nodes = ports.Select((port, i) => Process.Start(MamoProcess.StartInfo([
            "pretrain", "--plain", "--ledger", "--source", "manifest:" + manifest, "--run-dir", run, "--max-steps", $"{InnerSteps * Rounds}",
            "--cluster", $"127.0.0.1:{port}", "--seed-nodes", seed, "--node-name", $"n{i}",
            "--set", $"batch-size={Batch}", "--set", $"cluster.inner-steps={InnerSteps}", "--set", $"cluster.min-replicas={Nodes}",
            "--set", "torch-threads=1", "--set", "eval.every-steps=0"]))!).ToList();
        var logs = nodes.Select(p => (Out: p.StandardOutput.ReadToEndAsync(), Err: p.StandardError.ReadToEndAsync())).ToList();
        using var patience = new CancellationTokenSource(TimeSpan.FromMinutes(4));
        try
        {
            foreach (var p in nodes) await p.WaitForExitAsync(patience.Token);
        }
        finally
        {
            foreach (var p in nodes.Where(p => !p.HasExited)) p.Kill(entireProcessTree: true);
        }
        for (int i = 0; i < Nodes; i++)
            Assert.True(nodes[i].ExitCode == 0, $"node n{i} exited {nodes[i].ExitCode}: {await logs[i].Out}{await logs[i].Err}");

        // Each round hands the replicas disjoint cursor ranges that together make one epoch of the 48 samples.
        var entries = Enumerable.Range(0, Nodes).SelectMany(i => File.ReadAllLines(Path.Combine(run, "nodes", $"n{i}", "ledger.jsonl")))
            .Select(l => JsonDocument.Parse(l).RootElement).ToList();
        var ids = File.ReadLines(manifest).Select(l => JsonDocument.Parse(l).RootElement.GetProperty("id").GetString()).Order().ToList();
        for (int round = 0; round < Rounds; round++)
        {
            var trained = entries.Where(e => e.GetProperty("round").GetInt64() == round)
                .SelectMany(e => e.GetProperty("ids").EnumerateArray().Select(x => x.GetString())).Order().ToList();
            Assert.Equal(ids, trained);
        }
        Assert.Equal(Nodes * Rounds * InnerSteps, entries.Count);
        Assert.All(entries, e => Assert.True(double.IsFinite(e.GetProperty("loss").GetDouble())));

        // A cluster checkpoint after each round: global θ, the teacher and the outer optimizer, with the round and cursor.
        var checkpoints = Model.Checkpoint.Complete(run).Select(Path.GetFileName).Order().ToList();
        Assert.Equal([Model.Checkpoint.StepFolderName(InnerSteps), Model.Checkpoint.StepFolderName(InnerSteps * Rounds)], checkpoints);
        var state = Model.Checkpoint.ReadState(Model.Checkpoint.Latest(run)!);
        Assert.Equal([Model.Checkpoint.StudentPart, Model.Checkpoint.TeacherPart, "outer-optimizer"], state.Parts);
        Assert.Equal(($"{Rounds}", $"{Samples * Rounds - 1}"), (state.Extra["round"], state.Extra["position:cursor"]));
        output.WriteLine(await logs[0].Out);
    }

    /// <summary>48 real emoji, so that one round of 3 replicas × 2 steps × 8 pairs is one epoch.</summary>
    static string Manifest(TempFolder folder)
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

    static int FreePort()
    {
        using var listener = new TcpListener(IPAddress.Loopback, 0);
        listener.Start();
        return ((IPEndPoint)listener.LocalEndpoint).Port;
    }
}
