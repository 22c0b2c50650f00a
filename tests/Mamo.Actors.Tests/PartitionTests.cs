using System.Diagnostics;
using Akka.Actor;
using Akka.Cluster;
using Akka.Configuration;
using Akka.Remote;
using Akka.Remote.Transport;
using Mamo.Actors.Cluster;
using Xunit;
using Xunit.Abstractions;

namespace Mamo.Actors.Tests;

/// <summary>A network partition, made with Akka's throttler transport: three real cluster nodes (ActorSystems with
/// hocon/cluster.conf, remoting on 127.0.0.1) in this process, and the two others blackhole every message to and from
/// the third. The Split Brain Resolver's keep-majority decides (docs/CLUSTER.md). A downed `mamo` node's process then
/// exits 1 (ClusterRun), which the process tests check. It runs alone: a starved heartbeat elsewhere would be a
/// second partition.</summary>
[Collection(HeartbeatCollection.Name)]
public sealed class PartitionTests(ITestOutputHelper output)
{    static readonly Config Throttled = ConfigurationFactory.ParseString("akka.remote.dot-netty.tcp.applied-adapters = [trttl]");

    [Fact]
    public async Task A_node_cut_off_from_the_other_two_downs_itself_and_the_majority_stays_up_without_it()
    {
        var nodes = Enumerable.Range(0, 3).Select(_ => ActorSystem.Create("mamo", Throttled.WithFallback(ClusterNode.Config()))).ToList();
        try
        {
            var addresses = nodes.Select(n => Akka.Cluster.Cluster.Get(n).SelfAddress).ToList();
            foreach (var n in nodes) Akka.Cluster.Cluster.Get(n).Join(addresses[0]);
            await Until(() => nodes.All(n => Up(n).Count == 3), TimeSpan.FromSeconds(60), "the three nodes did not form a cluster");

            var (majority, cutOff) = (nodes.Take(2).ToList(), nodes[2]);
            foreach (var n in majority)
                Assert.True(await ((IRemoteActorRefProvider)((ExtendedActorSystem)n).Provider).Transport.ManagementCommand(
                    new SetThrottle(addresses[2], ThrottleTransportAdapter.Direction.Both, Blackhole.Instance)));
            var clock = Stopwatch.StartNew();

            // The cut-off node is the minority: it downs itself, and its actor system stops for the downing.
            Assert.True(await Task.WhenAny(cutOff.WhenTerminated, Task.Delay(TimeSpan.FromSeconds(90))) == cutOff.WhenTerminated,
                "the cut-off node did not down itself");
            Assert.IsType<CoordinatedShutdown.ClusterDowningReason>(CoordinatedShutdown.Get(cutOff).ShutdownReason);
            var downed = clock.Elapsed;
            // The majority stays up, with the two of them as the whole cluster.
            await Until(() => majority.All(n => Up(n).SequenceEqual(addresses.Take(2).OrderBy(a => a.Port)) && Akka.Cluster.Cluster.Get(n).State.Members.Count == 2),
                TimeSpan.FromSeconds(60), "the majority did not remove the cut-off node");
            Assert.All(majority, n => Assert.False(n.WhenTerminated.IsCompleted));
            output.WriteLine($"cut-off node downed itself {downed.TotalSeconds:F1} s after the partition; majority of 2 up after {clock.Elapsed.TotalSeconds:F1} s");
        }
        finally
        {
            await Task.WhenAll(nodes.Select(n => n.Terminate()));
        }
    }

    static List<Address> Up(ActorSystem node) =>
        [.. Akka.Cluster.Cluster.Get(node).State.Members.Where(m => m.Status == MemberStatus.Up).Select(m => m.Address).OrderBy(a => a.Port)];

    static async Task Until(Func<bool> condition, TimeSpan patience, string what)
    {
        var clock = Stopwatch.StartNew();
        while (!condition())
        {
            Assert.True(clock.Elapsed < patience, what);
            await Task.Delay(100);
        }
    }
}

/// <summary>Tests that judge reachability run alone: beside torch tests on two cores, a starved heartbeat reads as an
/// unreachable node.</summary>
[CollectionDefinition(Name, DisableParallelization = true)]
public sealed class HeartbeatCollection
{
    public const string Name = "heartbeats";
}
