using Akka.Actor;
using Mamo.Actors.Cluster;
using Xunit;
using SerializationException = System.Runtime.Serialization.SerializationException;

namespace Mamo.Actors.Tests;

/// <summary>The wire format of the messages between nodes, read back and fuzzed: what the network sends is parsed here.</summary>
public sealed class ClusterSerializerTests : IDisposable
{
    readonly ActorSystem system = ActorSystem.Create("wire");
    readonly ClusterSerializer serializer;
    readonly IActorRef someone;

    public ClusterSerializerTests()
    {
        serializer = new ClusterSerializer((ExtendedActorSystem)system);
        someone = system.ActorOf(Props.Empty, "someone");
    }

    public void Dispose() => system.Terminate().Wait();

    /// <summary>One of each message that crosses nodes.</summary>
    IClusterMessage[] Messages() =>
    [
        new WeightTransfer.Offer(Guid.NewGuid(), new WeightTransfer.Tag(WeightTransfer.Kind.Features, 1_733_000_000_000_000_003, "n2", 1), ["a.weight", "b"], [[4, 2], []],
            "bfloat16", 262144),
        new WeightTransfer.Chunk(Guid.NewGuid(), 5, [1, 2, 3, 250]),
        new WeightTransfer.Ack(Guid.NewGuid(), 9),
        new WeightTransfer.Accept(Guid.NewGuid(), "10.0.0.7", 40213, Guid.NewGuid()),
        new Coordination.Register("n1", someone),
        new RoundCoordinator.RoundStart(12, 7, 350, 3, 1_040, 480, 400, true, new Dictionary<string, string> { ["finetune.labels"] = "[\"cat\"]" }, someone),
        new RoundCoordinator.RoundDone(12, 7, "n2", 1600, new Dictionary<string, long> { ["pairs/0"] = 41, ["pairs/3"] = -1 }, 5.75,
            new Dictionary<string, double> { ["itc"] = 2.25, ["mim"] = double.NaN }, new Dictionary<string, string> { ["finetune.hits"] = "0110" }, true),
        new Coordination.Commit(new Dictionary<string, long> { ["cursor"] = 959 }, 8, [12, 13]),
        new Coordination.Finish(8, 400),
        new Coordination.GetProgress(),
        new Coordination.Progress(8, "/run/checkpoints/step-000000000400", [new(7, ["n0", "n2"], 12.5)],
            [new("n1", "akka.tcp://mamo@127.0.0.1:4054", new DateTime(2026, 12, 2, 1, 2, 3, DateTimeKind.Utc), 13.25), new("coordinator", "akka.tcp://mamo@127.0.0.1:4053", DateTime.UtcNow, null)]),
        new StepCoordinator.StepStart(3, 12, 26, 96, 4, 1, 4, true, new Dictionary<string, string> { ["finetune.labels"] = "[]" }, 11, 11, [new("n0", someone), new("n1", someone)],
            false, true, true, someone),
        new StepCoordinator.StepDone(3, "n0", 4, 9.25, new Dictionary<string, double> { ["itc"] = 2.5, ["mlm"] = double.NaN },
            new Dictionary<string, string> { ["finetune.admitted"] = "[\"dog\"]" }, "9f86d081884c7d65"),
        new StepCoordinator.Abort(3),
        new StepCoordinator.StepMade(3, 1.5, false, 2.5e-4),
        new StepCoordinator.ReportState(1_733_000_000_000_000_009, someone),
        new StepCoordinator.StateReport(0, "n1", 40, 38, 39, new Dictionary<string, string> { ["finetune.labels"] = "[\"cat\"]" }),
        new CheckpointFollower.AwaitStep(400),
        new CheckpointFollower.Followed(400),
    ];

    [Fact]
    public void Every_message_type_that_crosses_nodes_has_a_wire_format_and_reads_back_as_it_was_written()
    {
        var messages = Messages();
        var types = typeof(IClusterMessage).Assembly.GetTypes().Where(t => t.IsClass && typeof(IClusterMessage).IsAssignableFrom(t));
        Assert.Equal(types.Select(t => t.FullName).Order(), messages.Select(m => m.GetType().FullName).Order());
        foreach (var m in messages)
        {
            var bytes = serializer.ToBinary(m);
            var back = serializer.FromBinary(bytes, serializer.Manifest(m));
            Assert.IsType(m.GetType(), back);
            Assert.Equal(bytes, serializer.ToBinary(back));   // records holding maps compare by reference: compare their bytes
        }
        var register = Messages().OfType<Coordination.Register>().Single();
        Assert.Equal(someone, ((Coordination.Register)serializer.FromBinary(serializer.ToBinary(register), serializer.Manifest(register))).Receiver);
    }

    [Fact]
    public void A_truncated_corrupted_or_unknown_message_is_a_serialization_error_and_never_another_exception()
    {
        var random = new Random(11);
        int refused = 0, read = 0;
        foreach (var m in Messages())
        {
            var bytes = serializer.ToBinary(m);
            var manifest = serializer.Manifest(m);
            var cases = Enumerable.Range(0, bytes.Length).Select(n => bytes[..n])                           // every truncation
                .Concat(Enumerable.Range(0, 200).Select(_ =>
                {
                    var b = (byte[])bytes.Clone();
                    for (int i = random.Next(1, 4); i > 0 && b.Length > 0; i--) b[random.Next(b.Length)] = (byte)random.Next(256);
                    return b;
                }))                                                                                      // random bytes changed
                .Append([.. bytes, 0]);                                                                   // a byte too many
            foreach (var c in cases)
            {
                try
                {
                    Assert.NotNull(serializer.FromBinary(c, manifest));
                    read++;
                }
                catch (SerializationException) { refused++; }
            }
        }
        Assert.Throws<SerializationException>(() => serializer.FromBinary([0], "System.IO.FileInfo, System.IO.FileSystem"));
        Assert.True(refused > 0 && read > 0, $"{refused} refused, {read} read");   // the fuzz reached both outcomes
    }
}
