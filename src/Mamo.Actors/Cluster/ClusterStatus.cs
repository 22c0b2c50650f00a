using Akka.Actor;
using Akka.Cluster;
using Akka.Cluster.Hosting;
using Akka.Hosting;
using Mamo.Actors.Run;

namespace Mamo.Actors.Cluster;

/// <summary>What `mamo cluster status` reports: each member (its name, address, roles, and Akka's member status or
/// "unreachable"; a replica the coordinator lost that is no longer a member: "removed"), the coordinator's round, the
/// last durable cluster checkpoint, the recent rounds and the recoveries (RunHistory).</summary>
public sealed record ClusterStatus(IReadOnlyList<ClusterStatus.Member> Members, long? Round, string? LastCheckpoint,
    IReadOnlyList<RunHistory.Round> Recent, IReadOnlyList<RunHistory.Recovery> Recoveries)
{
    public sealed record Member(string Name, string Address, IReadOnlyList<string> Roles, string Status);

    public const string StatusRole = "status";

    /// <summary>Joins the cluster at <paramref name="seeds"/> for as long as it takes to look (as a member of role
    /// "status", left out of the report), then leaves.</summary>
    /// <param name="settings">the run's settings: the cluster's TLS, if it uses it</param>
    public static async Task<ClusterStatus> QueryAsync(IReadOnlyList<string> seeds, TimeSpan timeout, MamoSettings settings)
    {
        var options = new ClusterNodeOptions("127.0.0.1", 0, seeds, "status-" + Environment.ProcessId, [StatusRole]);
        // Quiet: stdout carries the report (one JSON object with --json), and nothing else.
        var quiet = Akka.Configuration.ConfigurationFactory.ParseString("akka { loglevel = ERROR, stdout-loglevel = OFF, log-dead-letters = off }");
        using var host = await ClusterNode.StartAsync(options, quiet.WithFallback(settings.Config), settings.Cluster.Tls,
            builder => builder.WithSingletonProxy<ClusterRun.CoordinatorKey>(ClusterRun.SingletonName,
                new ClusterSingletonOptions { Role = ClusterNodeOptions.CoordinatorRole }));
        var system = host.System();
        try
        {
            var cluster = Akka.Cluster.Cluster.Get(system);
            var up = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
            cluster.RegisterOnMemberUp(() => up.TrySetResult());
            if (await Task.WhenAny(up.Task, Task.Delay(timeout)) != up.Task)
                throw new TimeoutException($"could not join the cluster at {string.Join(",", seeds)} within {timeout.TotalSeconds:F0} s");
            RoundCoordinator.Progress? progress = null;
            try { progress = await ActorRegistry.For(system).Get<ClusterRun.CoordinatorKey>().Ask<RoundCoordinator.Progress>(new RoundCoordinator.GetProgress(), timeout); }
            catch (Exception e) when (e is AskTimeoutException or TaskCanceledException) { }   // no coordinator yet: the report says so with nulls
            var members = MembersOf(cluster).Where(m => m.Address != HostPort(cluster.SelfAddress.ToString())).ToList();
            var recoveries = progress?.Recoveries ?? [];
            var removed = recoveries.Where(r => r.Lost != RunHistory.CoordinatorLost && members.All(m => m.Name != r.Lost))
                .GroupBy(r => r.Lost).Select(g => new Member(g.Key, HostPort(g.Last().Address), [], "removed"));
            members = [.. members.Concat(removed).OrderBy(m => m.Name, StringComparer.Ordinal)];
            return new ClusterStatus(members, progress?.Round, progress?.LastCheckpoint is { Length: > 0 } last ? last : null,
                progress?.Recent ?? [], recoveries);
        }
        finally
        {
            await host.StopAsync();
        }
    }

    /// <summary>The cluster's members as this node sees them: name, HOST:PORT, roles, and status.</summary>
    public static List<Member> MembersOf(Akka.Cluster.Cluster cluster)
    {
        var state = cluster.State;
        return state.Members.Select(m => new Member(
                m.Roles.FirstOrDefault(r => r.StartsWith(ClusterNodeOptions.NamePrefix))?[ClusterNodeOptions.NamePrefix.Length..] ?? m.Address.ToString(),
                HostPort(m.Address.ToString()),
                m.Roles.Where(r => !r.StartsWith(ClusterNodeOptions.NamePrefix)).Order().ToList(),
                state.Unreachable.Contains(m) ? "unreachable" : m.Status.ToString().ToLowerInvariant()))
            .OrderBy(m => m.Name, StringComparer.Ordinal).ToList();
    }

    static string HostPort(string address) => Address.Parse(address) is { Host: { } host, Port: { } port } ? $"{host}:{port}" : address;
}
