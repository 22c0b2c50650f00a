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
        PlaneA = DataPlane.StartAsync(A, "127.0.0.1", 0).GetAwaiter().GetResult();
        PlaneB = DataPlane.StartAsync(B, "127.0.0.1", 0).GetAwaiter().GetResult();
    }

    public DataPlane PlaneA { get; }
    public DataPlane PlaneB { get; }

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

    async Task<(WeightTransfer.Received Received, WeightTransfer.Sent Sent)> Transfer(IReadOnlyList<(string Name, Tensor Value)> tensors, string dtype,
        bool dataPlane = true)
    {
        var owner = Inbox.Create(nodes.B);
        var name = "receiver-" + Guid.NewGuid().ToString("N");
        nodes.B.ActorOf(WeightTransfer.Receiver.Props(owner.Receiver, maxBytes: 1L << 30, dataPlane), name);
        var remote = await nodes.A.ActorSelection(new RootActorPath(Akka.Cluster.Cluster.Get(nodes.B).SelfAddress) / "user" / name)
            .ResolveOne(TimeSpan.FromSeconds(10));
        var requester = Inbox.Create(nodes.A);
        nodes.A.ActorOf(WeightTransfer.Sender.Props(remote, requester.Receiver, new WeightTransfer.Tag(WeightTransfer.Kind.Weights, 1), tensors, dtype, ChunkSize, window: 16));
        var received = (WeightTransfer.Received)await owner.ReceiveAsync(TimeSpan.FromMinutes(3));
        var sent = (WeightTransfer.Sent)await requester.ReceiveAsync(TimeSpan.FromMinutes(1));
        return (received, sent);
    }

    [Theory]
    [InlineData(true)]
    [InlineData(false)]
    public async Task Small_weights_cross_between_two_nodes_bit_for_bit_while_both_stay_reachable(bool dataPlane)
    {
        using var model = new MamoModel(MamoConfig.Small);
        var weights = Checkpoint.Named(model);
        var connections = nodes.PlaneB.Connections;
        await Transfer(weights, "float32", dataPlane);   // the first transfer pays for the buffer pool and the JIT
        const int Measured = 3;
        var gen2 = GC.CollectionCount(2);
        var rates = new List<double>();
        var (received, sent) = await Transfer(weights, "float32", dataPlane);
        for (int i = 1; ; i++)
        {
            rates.Add(sent.Bytes / 1e6 / sent.Took.TotalSeconds);
            if (i == Measured) break;
            foreach (var (_, t) in received.Tensors) t.Dispose();
            (received, sent) = await Transfer(weights, "float32", dataPlane);
        }
        gen2 = GC.CollectionCount(2) - gen2;
        output.WriteLine($"moved {sent.Bytes / 1e6:F1} MB of `small` weights {(dataPlane ? "on the data plane's stream" : "over remoting in 256 KiB chunks")} " +
            $"{Measured} times: {string.Join(", ", rates.Select(r => $"{r:F0}"))} MB/s; gen-2 collections in this process meanwhile: {gen2}");
        Assert.True(sent.Delivered);
        Assert.Equal(connections + (dataPlane ? 1 + Measured : 0), nodes.PlaneB.Connections);   // the bytes took the way the test names
        Assert.Equal(weights.Sum(w => w.Value.numel()) * 4, sent.Bytes);
        Assert.Equal(weights.Select(w => w.Name), received.Tensors.Select(t => t.Name));
        foreach (var ((name, want), (_, got)) in weights.Zip(received.Tensors))
        {
            Assert.True(want.allclose(got, rtol: 0, atol: 0), $"{name} changed on the way");
            got.Dispose();
        }
        // Neither node ever saw the other as unreachable while 4 x 157 MB crossed between them.
        foreach (var watch in new[] { nodes.WatchA, nodes.WatchB })
            Assert.Equal(0, (await watch.Ask<TwoNodes.Count>(new TwoNodes.GetCount(), TimeSpan.FromSeconds(10))).Unreachable);
    }

    [Fact]
    public async Task A_transfer_to_a_receiver_on_the_same_node_is_copied_without_a_connection()
    {
        using var weights = randn(new long[] { 1000, 100 }, generator: new Generator(5));
        var owner = Inbox.Create(nodes.A);
        var receiver = nodes.A.ActorOf(WeightTransfer.Receiver.Props(owner.Receiver, maxBytes: 1L << 30));
        var requester = Inbox.Create(nodes.A);
        var connections = nodes.PlaneA.Connections;
        nodes.A.ActorOf(WeightTransfer.Sender.Props(receiver, requester.Receiver, new WeightTransfer.Tag(WeightTransfer.Kind.Weights, 1), [("w", weights)],
            "float32", 256 * 1024, window: 16));
        var received = (WeightTransfer.Received)await owner.ReceiveAsync(TimeSpan.FromSeconds(30));
        Assert.True(((WeightTransfer.Sent)await requester.ReceiveAsync(TimeSpan.FromSeconds(30))).Delivered);
        Assert.True(weights.allclose(received.Tensors[0].Value, rtol: 0, atol: 0));
        received.Tensors[0].Value.Dispose();
        Assert.Equal(connections, nodes.PlaneA.Connections);
    }

    [Fact]
    public async Task The_data_plane_takes_only_an_expected_transfer_and_exactly_its_bytes()
    {
        var receiver = Inbox.Create(nodes.B);
        var plane = nodes.PlaneB;
        var buffer = new byte[8];
        byte[] bytes = [1, 2, 3, 4, 5, 6, 7, 8];
        var timeout = TimeSpan.FromSeconds(30);

        var connections = plane.Connections;
        // A token nobody registered: the connection is closed and the sender told so.
        var unknown = await Assert.ThrowsAnyAsync<Exception>(() => DataPlane.Send(plane.Host, plane.Port, Guid.NewGuid(), bytes, 8));
        output.WriteLine($"an unknown token: {unknown.GetBaseException().Message}");

        // Nine bytes for a transfer of eight: refused, and its receiver told that it is broken.
        var tooLong = Guid.NewGuid();
        var token = plane.Expect(tooLong, buffer, 8, receiver.Receiver);
        await Assert.ThrowsAnyAsync<Exception>(() => DataPlane.Send(plane.Host, plane.Port, token, [.. bytes, 9], 9));
        Assert.Equal(tooLong, Assert.IsType<DataPlane.Broken>(await receiver.ReceiveAsync(timeout)).Id);

        // Fewer bytes than expected, then the connection ends: broken too.
        var tooShort = Guid.NewGuid();
        token = plane.Expect(tooShort, buffer, 8, receiver.Receiver);
        await Assert.ThrowsAnyAsync<Exception>(() => DataPlane.Send(plane.Host, plane.Port, token, bytes, 5));
        Assert.Equal(tooShort, Assert.IsType<DataPlane.Broken>(await receiver.ReceiveAsync(timeout)).Id);

        // Fuzzed connections (random bytes, from none to a token and more): each is refused and leaves nothing behind.
        var random = new Random(11);
        for (int i = 0; i < 30; i++)
        {
            var junk = new byte[random.Next(0, 64)];
            random.NextBytes(junk);
            var pretended = junk.Length >= 16 ? new Guid(junk.AsSpan(0, 16)) : Guid.NewGuid();
            await Assert.ThrowsAnyAsync<Exception>(() => DataPlane.Send(plane.Host, plane.Port, pretended, junk, junk.Length));
        }

        // Each of them reached the data plane and was refused there (not refused a connection).
        Assert.Equal(connections + 33, plane.Connections);

        // A token is good for one connection: the right bytes arrive once, and the token's second use is refused.
        Array.Clear(buffer);   // the nine bytes' first eight are these bytes too
        var right = Guid.NewGuid();
        token = plane.Expect(right, buffer, 8, receiver.Receiver);
        await DataPlane.Send(plane.Host, plane.Port, token, bytes, 8);
        Assert.Equal(right, Assert.IsType<DataPlane.Arrived>(await receiver.ReceiveAsync(timeout)).Id);
        Assert.Equal(bytes, buffer);
        await Assert.ThrowsAnyAsync<Exception>(() => DataPlane.Send(plane.Host, plane.Port, token, bytes, 8));
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
