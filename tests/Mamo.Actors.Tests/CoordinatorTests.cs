using System.Text.Json;
using Akka.Actor;
using Akka.Streams;
using Akka.TestKit.Xunit2;
using Confluent.Kafka;
using Mamo.Actors.Cluster;
using Mamo.Data;
using Mamo.Data.Datasets;
using Mamo.Data.Kafka;
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

    /// <summary>A DiLoCo run of one replica at least, on the emoji test manifest, in rounds of InnerSteps.</summary>
    static MamoSettings Settings(string runDir, int maxSteps, params string[] extra)
    {
        var manifest = BuiltinDatasets.Ensure(BuiltinDatasets.Emoji).File(BuiltinDatasets.TestSplit);
        return MamoSettings.Load(null, [$"run-dir={runDir}", $"batch-size={Batch}", $"max-steps={maxSteps}", $"cluster.inner-steps={InnerSteps}",
            "cluster.min-replicas=1", "cluster.round-timeout=10m", $"source=\"manifest:{manifest}\"", .. extra]);
    }

    [Fact]
    public async Task A_replica_that_dies_mid_round_does_not_hold_the_round_and_its_range_is_trained_again()
    {
        var runDir = Directory.CreateTempSubdirectory("mamo-coordinator-").FullName;
        try
        {
            var settings = Settings(runDir, 2 * InnerSteps, "ledger=on");
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

    [Fact]
    public async Task The_teacher_follows_the_outer_step_so_a_teacher_that_is_its_student_stays_the_student()
    {
        // With momentum decay 0 the teacher is the student after every step. A round moves θ past the mean of the
        // replicas' students (Nesterov at lr 0.7): the teacher must take the same jump, or it is left behind at that mean.
        var runDir = Directory.CreateTempSubdirectory("mamo-coordinator-").FullName;
        try
        {
            var settings = Settings(runDir, InnerSteps, "model.momentum-decay=0");
            var coordinator = Sys.ActorOf(RoundCoordinator.Props(settings));
            using var inputs = RunInputs.Open(settings, TrainingTask.Of(settings), evaluate: false, publish: false);
            var hooks = new ReplicaHooks(settings, "b", coordinator);
            await new TrainingRun(settings).RunAsync(Sys, inputs, hooks, CancellationToken.None).WaitAsync(TimeSpan.FromMinutes(2));

            var dir = Checkpoint.Latest(runDir)!;
            Assert.Equal(InnerSteps, Checkpoint.ReadState(dir).Step);
            var student = Checkpoint.LoadPart(Path.Combine(dir, Checkpoint.StudentFile));
            var teacher = Checkpoint.LoadPart(Path.Combine(dir, Checkpoint.TeacherFile));
            var initial = MamoModel.Seeded(settings.Model, settings.Seed).named_parameters().ToDictionary(p => p.name, p => p.parameter);
            Assert.NotEmpty(teacher);
            foreach (var (name, t) in teacher) Assert.True(t.allclose(student[name], rtol: 1e-5, atol: 1e-6), $"{name}: the teacher is not θ");
            Assert.Contains(teacher, t => !t.Value.allclose(initial[t.Key]));   // and θ moved
        }
        finally { Directory.Delete(runDir, recursive: true); }
    }

    [Fact]
    public async Task A_rounds_last_pair_after_dead_letters_joins_the_batch_before_it_and_is_trained()
    {
        var runDir = Directory.CreateTempSubdirectory("mamo-coordinator-").FullName;
        try
        {
            // Sixteen emoji with their own copies of the images, so that three can be spoilt.
            var emoji = BuiltinDatasets.Ensure(BuiltinDatasets.Emoji).File(BuiltinDatasets.TestSplit);
            var data = Directory.CreateDirectory(Path.Combine(runDir, "data")).FullName;
            Directory.CreateDirectory(Path.Combine(data, "images"));
            var lines = File.ReadLines(emoji).Take(16).ToList();
            foreach (var line in lines)
            {
                var image = JsonDocument.Parse(line).RootElement.GetProperty("image").GetString()!;
                File.Copy(Path.Combine(Path.GetDirectoryName(emoji)!, image), Path.Combine(data, image));
            }
            var manifest = Path.Combine(data, "m.jsonl");
            File.WriteAllLines(manifest, lines);
            var settings = MamoSettings.Load(null, [$"run-dir={runDir}", $"batch-size={Batch}", $"max-steps={InnerSteps}", "ledger=on",
                $"cluster.inner-steps={InnerSteps}", "cluster.min-replicas=1", "cluster.round-timeout=10m", $"source=\"manifest:{manifest}\""]);

            // Round 0's share, in stream order: a full batch, three pairs whose images cannot be decoded, one more pair.
            var share = TrainingSamples.Load($"manifest:{manifest}", settings.Seed, long.MaxValue, _ => { }).From(0).Take(Span).Select(x => x.Sample.Id).ToList();
            foreach (var id in share.Skip(Batch).Take(Span - Batch - 1))
                File.WriteAllBytes(Path.Combine(data, "images", id + ".png"), [0x89, (byte)'P', (byte)'N', (byte)'G', 1, 2, 3]);

            var coordinator = Sys.ActorOf(RoundCoordinator.Props(settings));
            using var inputs = RunInputs.Open(settings, TrainingTask.Of(settings), evaluate: false, publish: false);
            await new TrainingRun(settings).RunAsync(Sys, inputs, new ReplicaHooks(settings, "b", coordinator), CancellationToken.None).WaitAsync(TimeSpan.FromMinutes(2));

            // The last pair is trained in the batch before it, not left alone in a step of one that trains nothing.
            var steps = File.ReadAllLines(Path.Combine(ClusterRun.NodeDir(runDir, "b"), Metrics.LedgerFile)).Select(l => JsonDocument.Parse(l).RootElement)
                .Where(e => e.TryGetProperty("step", out _)).ToList();
            var trained = Assert.Single(steps).GetProperty("ids").EnumerateArray().Select(i => i.GetString()).ToList();
            Assert.Equal([.. share.Take(Batch), share[^1]], trained);
            Assert.Equal(Span - Batch - 1, File.ReadAllLines(Path.Combine(runDir, Metrics.DeadLetterFile)).Length);
        }
        finally { Directory.Delete(runDir, recursive: true); }
    }

    [Fact]
    public async Task A_replica_whose_round_died_with_its_coordinator_reads_the_round_again_for_the_next_one()
    {
        var runDir = Directory.CreateTempSubdirectory("mamo-coordinator-").FullName;
        try
        {
            using var kafka = new KafkaMockCluster();
            kafka.CreateTopic("pairs", 1);
            var emoji = TrainingSamples.Open($"manifest:{BuiltinDatasets.Ensure(BuiltinDatasets.Emoji).File(BuiltinDatasets.TestSplit)}");
            var fed = emoji.Read(null, CancellationToken.None).OfType<SampleItem>().Take(3 * Span).Select(i => i.Sample).ToList();
            using (var producer = new ProducerBuilder<byte[]?, byte[]?>(new ProducerConfig { BootstrapServers = kafka.BootstrapServers }).Build())
            {
                foreach (var sample in fed) producer.Produce(new TopicPartition("pairs", 0), KafkaRecords.ToMessage(sample));
                producer.Flush(TimeSpan.FromSeconds(30));
            }
            var settings = MamoSettings.Load(null, [$"run-dir={runDir}", $"batch-size={Batch}", $"max-steps={2 * InnerSteps}", "ledger=on",
                $"cluster.inner-steps={InnerSteps}", "cluster.min-replicas=1", "cluster.round-timeout=10m",
                $"source=\"kafka://{kafka.BootstrapServers}/pairs?group=replicas\""]);

            // Coordinator A (a probe behind a proxy, as a singleton is) gives round 0; the replica trains it and hands it in.
            var a = CreateTestProbe();
            var proxy = Sys.ActorOf(Props.Create(() => new Proxy(a.Ref)));
            using var inputs = RunInputs.Open(settings, TrainingTask.Of(settings), evaluate: false, publish: false);
            var run = new TrainingRun(settings).RunAsync(Sys, inputs, new ReplicaHooks(settings, "b", proxy), CancellationToken.None);
            var register = a.ExpectMsg<Coordination.Register>(TimeSpan.FromSeconds(60));
            var replica = a.LastSender;
            a.Send(replica, new Coordination.Commit(new Dictionary<string, long>(), 0, []));
            using var global = new MamoTrainer(settings.Model, settings.Optimizer, CPU, settings.Seed, withTeacher: true, TrainingTask.Of(settings).Objective);
            a.Send(replica, new RoundCoordinator.RoundStart(1, 0, 0, 1, 0, -1, Span, false, global.Objective.SaveState(), Sys.ActorOf(WeightTransfer.Receiver.Props(a.Ref, 1L << 30))));
            Sys.ActorOf(WeightTransfer.Sender.Props(register.Receiver, a.Ref, new WeightTransfer.Tag(WeightTransfer.Kind.Weights, 1), global.Weights().ToList(),
                "float32", settings.Cluster.ChunkSize, settings.Cluster.Window));
            a.FishForMessage(m => m is RoundCoordinator.RoundDone, TimeSpan.FromSeconds(60));

            // A dies before it checkpoints the round; B takes over from no checkpoint and gives round 0 again. The replica's
            // stream had read the round's records; they are read again for B's round 0, not skipped.
            proxy.Tell(new Proxy.To(Sys.ActorOf(RoundCoordinator.Props(settings))));
            Sys.Stop(a.Ref);
            await run.WaitAsync(TimeSpan.FromMinutes(2));
            var steps = File.ReadAllLines(Path.Combine(ClusterRun.NodeDir(runDir, "b"), Metrics.LedgerFile)).Select(l => JsonDocument.Parse(l).RootElement)
                .Where(e => e.TryGetProperty("step", out _)).ToList();
            List<string?> Ids(Func<JsonElement, bool> which) => steps.Where(which).SelectMany(e => e.GetProperty("ids").EnumerateArray().Select(i => i.GetString())).ToList();
            var first = fed.Take(Span).Select(x => (string?)x.Id).ToList();
            Assert.Equal(first, Ids(e => e.GetProperty("attempt").GetInt64() == 1));
            Assert.Equal([.. first, .. fed.Skip(Span).Take(Span).Select(x => x.Id)], Ids(e => e.GetProperty("attempt").GetInt64() != 1));
        }
        finally { Directory.Delete(runDir, recursive: true); }
    }

    [Fact]
    public async Task A_replica_that_handed_in_an_abandoned_round_hears_so_and_stops_without_waiting_for_a_commit()
    {
        // Seen in ClusterTests: SIGTERM to every node right after a round began; the coordinator's node handed in its cut
        // short round, the round was abandoned (too few reported), and the node waited the round timeout (10 minutes)
        // for a commit that would never come before it could stop.
        var runDir = Directory.CreateTempSubdirectory("mamo-coordinator-").FullName;
        try
        {
            var manifest = BuiltinDatasets.Ensure(BuiltinDatasets.Emoji).File(BuiltinDatasets.TestSplit);
            var settings = MamoSettings.Load(null, [$"run-dir={runDir}", $"batch-size={Batch}", $"max-steps={4 * InnerSteps}", "ledger=on",
                $"cluster.inner-steps={InnerSteps}", "cluster.min-replicas=2", "cluster.round-timeout=10m", "checkpoint.write-timeout=10m",
                $"source=\"manifest:{manifest}\""]);
            var coordinator = Sys.ActorOf(RoundCoordinator.Props(settings));
            // Round 0 needs two replicas: a probe that dies once given its range, and a real one that trains and hands in.
            var doomed = CreateTestProbe();
            coordinator.Tell(new Coordination.Register("a-doomed", doomed.Ref), doomed.Ref);
            using var inputs = RunInputs.Open(settings, TrainingTask.Of(settings), evaluate: false, publish: false);
            using var stop = new CancellationTokenSource();
            var run = new TrainingRun(settings).RunAsync(Sys, inputs, new ReplicaHooks(settings, "b", coordinator), stop.Token);
            doomed.FishForMessage(m => m is RoundCoordinator.RoundStart, TimeSpan.FromSeconds(60));
            Sys.Stop(doomed.Ref);

            // One of the two needed reported: round 0 is abandoned, and the replica's ledger says its attempt was not applied.
            var ledger = Path.Combine(ClusterRun.NodeDir(runDir, "b"), Metrics.LedgerFile);
            List<JsonElement> Outcomes() => File.Exists(ledger) ? File.ReadAllLines(ledger).Where(l => l.EndsWith('}')).Select(l => JsonDocument.Parse(l).RootElement)
                .Where(e => e.TryGetProperty("applied", out _)).ToList() : [];
            var clock = System.Diagnostics.Stopwatch.StartNew();
            while (Outcomes().Count == 0)
            {
                Assert.True(clock.Elapsed < TimeSpan.FromMinutes(2), "the replica never heard that round 0 was abandoned");
                await Task.Delay(50);
            }
            Assert.False(Outcomes().Single().GetProperty("applied").GetBoolean());
            // Nothing it handed in waits for word: it stops at once (the round and write timeouts are 10 minutes).
            stop.Cancel();
            await run.WaitAsync(TimeSpan.FromMinutes(1));
        }
        finally { Directory.Delete(runDir, recursive: true); }
    }

    [Fact]
    public void A_replica_lost_moves_the_learning_rate_schedule_on_from_the_samples_trained_not_back_to_the_step_times_the_replicas_left()
    {
        var runDir = Directory.CreateTempSubdirectory("mamo-coordinator-").FullName;
        try
        {
            var settings = Settings(runDir, 3 * InnerSteps, "cluster.start-replicas=2");
            var coordinator = Sys.ActorOf(RoundCoordinator.Props(settings));
            using var shapes = new MamoTrainer(settings.Model, settings.Optimizer, CPU, settings.Seed, withTeacher: true, TrainingTask.Of(settings).Objective);
            var (a, b) = (CreateTestProbe(), CreateTestProbe());
            coordinator.Tell(new Coordination.Register("a", a.Ref), a.Ref);
            coordinator.Tell(new Coordination.Register("b", b.Ref), b.Ref);
            RoundCoordinator.RoundStart Given(Akka.TestKit.TestProbe replica, long round) =>
                (RoundCoordinator.RoundStart)replica.FishForMessage(m => m is RoundCoordinator.RoundStart s && s.Round == round, TimeSpan.FromSeconds(60));
            // A replica's whole round: its account, and a delta of zeros (θ stays; only the accounting matters here).
            void HandIn(Akka.TestKit.TestProbe replica, string node, RoundCoordinator.RoundStart start)
            {
                coordinator.Tell(new RoundCoordinator.RoundDone(start.Attempt, start.Round, node, start.Records,
                    new Dictionary<string, long> { [TrainingSamples.CursorPartition] = start.Cursor + start.Records - 1 }, 1.0, new Dictionary<string, double>(),
                    new Dictionary<string, string>(), Partial: false), replica.Ref);
                var zeros = shapes.Weights().Select(w => (w.Name, zeros_like(w.Value))).ToList();
                Sys.ActorOf(WeightTransfer.Sender.Props(start.DeltaReceiver, replica.Ref, new WeightTransfer.Tag(WeightTransfer.Kind.Delta, start.Attempt, node), zeros,
                    "float32", 256 * 1024, window: 16));
                foreach (var (_, t) in zeros) t.Dispose();
            }

            var (a0, b0) = (Given(a, 0), Given(b, 0));
            Assert.Equal((2, 0L), (a0.Replicas, a0.Schedule));
            HandIn(a, "a", a0);
            HandIn(b, "b", b0);
            // Both trained round 0: one node's 2 x InnerSteps steps of samples.
            var (a1, b1) = (Given(a, 1), Given(b, 1));
            Assert.Equal((2, 2L * InnerSteps), (a1.Replicas, a1.Schedule));
            // b is lost during round 1, which is applied with a's samples only: InnerSteps more.
            Sys.Stop(b.Ref);
            HandIn(a, "a", a1);
            var a2 = Given(a, 2);
            Assert.Equal((1, 3L * InnerSteps), (a2.Replicas, a2.Schedule));   // counted in steps it was 2 x InnerSteps: the schedule went back
            Assert.Equal($"{3 * InnerSteps}", Checkpoint.ReadState(Checkpoint.Latest(runDir)!).Extra[Coordination.ScheduleKey]);
        }
        finally { Directory.Delete(runDir, recursive: true); }
    }

    /// <summary>Forwards to the coordinator of the moment, as the singleton proxy does.</summary>
    sealed class Proxy : ReceiveActor
    {
        public sealed record To(IActorRef Coordinator);

        public Proxy(IActorRef coordinator)
        {
            Receive<To>(t => coordinator = t.Coordinator);
            ReceiveAny(m => coordinator.Forward(m));
        }
    }
}
