using System.Diagnostics;
using Akka.Actor;
using Akka.Cluster;
using Mamo.Actors.Cluster;
using Mamo.Model;
using Xunit;
using Xunit.Abstractions;
using static TorchSharp.torch;

namespace Mamo.Actors.Tests;

/// <summary>Two real cluster nodes (ActorSystems with remoting on 127.0.0.1 and ports chosen at run time) in this
/// process, joined into one cluster, shared by the tests below.</summary>
public sealed class TwoNodes : IDisposable
{
    public ActorSystem A { get; } = ActorSystem.Create("mamo", ClusterNode.Config());
    public ActorSystem B { get; } = ActorSystem.Create("mamo", ClusterNode.Config());
    /// <summary>On each node, the unreachability events it has seen.</summary>
    public IActorRef WatchA { get; }
    public IActorRef WatchB { get; }

    public TwoNodes()
    {
        var seed = Akka.Cluster.Cluster.Get(A).SelfAddress;
        Akka.Cluster.Cluster.Get(A).Join(seed);
        Akka.Cluster.Cluster.Get(B).Join(seed);
        var clock = Stopwatch.StartNew();
        while (new[] { A, B }.Any(s => Akka.Cluster.Cluster.Get(s).State.Members.Count(m => m.Status == MemberStatus.Up) < 2))
        {
            if (clock.Elapsed > TimeSpan.FromSeconds(60)) throw new TimeoutException("the two nodes did not form a cluster");
            Thread.Sleep(50);
        }
        WatchA = A.ActorOf(Props.Create(() => new UnreachableCount()));
        WatchB = B.ActorOf(Props.Create(() => new UnreachableCount()));
    }

    public void Dispose()
    {
        Task.WaitAll(B.Terminate(), A.Terminate());
    }

    public sealed record Count(int Unreachable);
    public sealed record GetCount;

    sealed class UnreachableCount : ReceiveActor
    {
        int unreachable;
        public UnreachableCount()
        {
            Receive<ClusterEvent.UnreachableMember>(_ => unreachable++);
            Receive<ClusterEvent.CurrentClusterState>(s => unreachable += s.Unreachable.Count);
            Receive<GetCount>(_ => Sender.Tell(new Count(unreachable)));
        }
        protected override void PreStart() => Akka.Cluster.Cluster.Get(Context.System).Subscribe(Self, typeof(ClusterEvent.UnreachableMember));
    }
}

[Collection(HeartbeatCollection.Name)]
public class ClusterTransferTests(TwoNodes nodes, ITestOutputHelper output) : IClassFixture<TwoNodes>
{
    const int ChunkSize = 256 * 1024;

    async Task<(WeightTransfer.Received Received, WeightTransfer.Sent Sent)> Transfer(IReadOnlyList<(string Name, Tensor Value)> tensors, string dtype)
    {
        var owner = Inbox.Create(nodes.B);
        var name = "receiver-" + Guid.NewGuid().ToString("N");
        nodes.B.ActorOf(WeightTransfer.Receiver.Props(owner.Receiver, maxBytes: 1L << 30), name);
        var remote = await nodes.A.ActorSelection(new RootActorPath(Akka.Cluster.Cluster.Get(nodes.B).SelfAddress) / "user" / name)
            .ResolveOne(TimeSpan.FromSeconds(10));
        var requester = Inbox.Create(nodes.A);
        nodes.A.ActorOf(WeightTransfer.Sender.Props(remote, requester.Receiver, new WeightTransfer.Tag(WeightTransfer.Kind.Weights, 1), tensors, dtype, ChunkSize, window: 16));
        var received = (WeightTransfer.Received)await owner.ReceiveAsync(TimeSpan.FromMinutes(3));
        var sent = (WeightTransfer.Sent)await requester.ReceiveAsync(TimeSpan.FromMinutes(1));
        return (received, sent);
    }

    [Fact]
    public async Task Small_weights_cross_between_two_nodes_in_chunks_while_both_stay_reachable()
    {
        using var model = new MamoModel(MamoConfig.Small);
        var weights = Checkpoint.Named(model);
        var (received, sent) = await Transfer(weights, "float32");
        var mb = sent.Bytes / 1e6;
        output.WriteLine($"moved {mb:F1} MB of `small` weights in {sent.Took.TotalSeconds:F2} s: {mb / sent.Took.TotalSeconds:F0} MB/s, {ChunkSize / 1024} KiB chunks");
        Assert.Equal(weights.Sum(w => w.Value.numel()) * 4, sent.Bytes);
        Assert.Equal(weights.Select(w => w.Name), received.Tensors.Select(t => t.Name));
        foreach (var ((name, want), (_, got)) in weights.Zip(received.Tensors))
        {
            Assert.True(want.allclose(got, rtol: 0, atol: 0), $"{name} changed on the way");
            got.Dispose();
        }
        // Neither node ever saw the other as unreachable while 150 MB crossed the one connection between them.
        foreach (var watch in new[] { nodes.WatchA, nodes.WatchB })
            Assert.Equal(0, (await watch.Ask<TwoNodes.Count>(new TwoNodes.GetCount(), TimeSpan.FromSeconds(10))).Unreachable);
    }

    [Theory]
    [InlineData("bfloat16", ScalarType.BFloat16)]
    [InlineData("float16", ScalarType.Float16)]
    public async Task Deltas_in_half_precision_arrive_as_their_rounded_values(string dtype, ScalarType wire)
    {
        using var delta = randn(new long[] { 3, 1000 }, generator: new Generator(3)) * 1e-3;
        using var empty = zeros(0);
        var (received, sent) = await Transfer([("delta", delta), ("empty", empty)], dtype);
        Assert.Equal(3000 * 2, sent.Bytes);
        using var expected = delta.to(wire).to(float32);
        Assert.True(received.Tensors[0].Value.allclose(expected, rtol: 0, atol: 0));
        Assert.Equal([0L], received.Tensors[1].Value.shape);
        foreach (var (_, t) in received.Tensors) t.Dispose();
    }

    sealed record Unregistered(string Text);

    [Fact]
    public async Task A_message_with_no_registered_wire_format_is_refused_and_type_names_are_never_read()
    {
        var arrived = Inbox.Create(nodes.B);
        var name = "probe-" + Guid.NewGuid().ToString("N");
        nodes.B.ActorOf(Props.Create(() => new Forward(arrived.Receiver)), name);
        var remote = await nodes.A.ActorSelection(new RootActorPath(Akka.Cluster.Cluster.Get(nodes.B).SelfAddress) / "user" / name)
            .ResolveOne(TimeSpan.FromSeconds(10));
        remote.Tell(new Unregistered("hello"));
        remote.Tell(new WeightTransfer.Ack(Guid.Empty, 7));
        // Messages between two actors arrive in order: had the first crossed, it would come before the second.
        Assert.Equal(new WeightTransfer.Ack(Guid.Empty, 7), await arrived.ReceiveAsync(TimeSpan.FromSeconds(30)));

        // Neither end can read a payload that names its type (Akka's JSON format): no serializer does that here.
        var serialization = nodes.B.Serialization;
        Assert.IsType<RefusingSerializer>(serialization.FindSerializerFor(new Unregistered("x")));
        Assert.ThrowsAny<Exception>(() => serialization.Deserialize("{\"$type\":\"System.IO.FileInfo, System.IO.FileSystem\"}"u8.ToArray(), 1,
            "System.IO.FileInfo, System.IO.FileSystem"));
    }

    sealed class Forward : ReceiveActor
    {
        public Forward(IActorRef to) => ReceiveAny(m => to.Tell(m));
    }
}
