using System.Text.Json;
using Akka.Actor;
using Akka.Streams;
using Akka.TestKit.Xunit2;
using Mamo.Actors.Cluster;
using Mamo.Data;
using Mamo.Data.Datasets;
using Mamo.Model;
using Xunit;
using static TorchSharp.torch;
using Mamo.Actors.Sources;
using Mamo.Actors.Run;
using Mamo.Actors.Pipeline;

namespace Mamo.Actors.Tests;

/// <summary>The DiLoCo coordinator with a real replica, in one actor system; the replica that dies is a probe, so that
/// it dies at a known moment: after it was given a range and before it reported.</summary>
public class CoordinatorTests() : TestKit(ClusterNode.Config())
{
    const int Batch = 4, InnerSteps = 2, Span = Batch * InnerSteps;

    [Fact]
    public async Task A_replica_that_dies_mid_round_does_not_hold_the_round_and_its_range_is_trained_again()
    {
        var runDir = Directory.CreateTempSubdirectory("mamo-coordinator-").FullName;
        try
        {
            var manifest = BuiltinDatasets.Ensure(BuiltinDatasets.Emoji).File(BuiltinDatasets.TestSplit);
            var settings = MamoSettings.Load(null, [$"run-dir={runDir}", $"batch-size={Batch}", $"max-steps={2 * InnerSteps}", "ledger=on",
                $"cluster.inner-steps={InnerSteps}", "cluster.min-replicas=1", "cluster.round-timeout=10m", $"source=\"manifest:{manifest}\""]);
            var coordinator = Sys.ActorOf(RoundCoordinator.Props(settings));

            // The doomed replica registers alone, is given round 0's first range, and dies before it reports.
            var doomed = CreateTestProbe();
            coordinator.Tell(new Coordination.Register("a-doomed", doomed.Ref), doomed.Ref);
            Assert.Empty(doomed.ExpectMsg<Coordination.Commit>(TimeSpan.FromSeconds(30)).Positions);   // a new run: no stream position yet
            var start = doomed.ExpectMsg<RoundCoordinator.RoundStart>(TimeSpan.FromSeconds(30));
            Assert.Equal((0L, 0L, Span), (start.Round, start.Cursor, start.Records));
            Sys.Stop(doomed.Ref);

            // A real replica (the single-node pipeline with the replica's hooks) joins and trains: round 0 again, on the
            // dead one's range, then round 1 on the next; the run ends when the coordinator says so.
            using var inputs = RunInputs.Open(settings, TrainingTask.Of(settings), evaluate: false, publish: false);
            var hooks = new ReplicaHooks(settings, "b", coordinator);
            await new TrainingRun(settings).RunAsync(Sys, inputs, hooks, CancellationToken.None).WaitAsync(TimeSpan.FromMinutes(2));
            Assert.Equal(2 * InnerSteps, hooks.FinalStep);

            var samples = (TrainingSamples)inputs.Source!;
            var nodeDir = ClusterRun.NodeDir(runDir, "b");
            var ledger = File.ReadAllLines(Path.Combine(nodeDir, Metrics.LedgerFile)).Select(l => JsonDocument.Parse(l).RootElement)
                .Where(e => e.TryGetProperty("step", out _)).ToList();
            var cursors = ledger.Select(e => (e.GetProperty("round").GetInt64(), e.GetProperty("position").GetProperty("cursor").GetInt64())).ToList();
            Assert.Equal([(0L, Batch - 1L), (0L, Span - 1L), (1L, Span + Batch - 1L), (1L, 2L * Span - 1)], cursors);
            var expected = samples.From(0).Take(2 * Span).Select(x => x.Sample.Id).ToList();
            Assert.Equal(expected, ledger.SelectMany(e => e.GetProperty("ids").EnumerateArray().Select(i => i.GetString())));
            var state = Checkpoint.ReadState(Checkpoint.Latest(runDir)!);
            Assert.Equal(("2", $"{2 * Span - 1}", ""), (state.Extra[RoundCoordinator.RoundKey], state.Extra["position:cursor"], state.Extra[RoundCoordinator.UnfinishedKey]));
        }
        finally { Directory.Delete(runDir, recursive: true); }
    }
}
