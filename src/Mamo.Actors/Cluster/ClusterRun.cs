using System.Globalization;
using Akka.Actor;
using Akka.Cluster.Tools.Singleton;
using Akka.Configuration;
using Akka.Streams;
using Mamo.Data;
using Mamo.Data.Datasets;
using Mamo.Data.Kafka;
using Serilog;

namespace Mamo.Actors.Cluster;

/// <summary>Where a node listens, whom it joins, its name and its roles (mamo pretrain --cluster ...).</summary>
public sealed record ClusterNodeOptions(string Host, int Port, IReadOnlyList<string> SeedNodes, string Name, IReadOnlyList<string> Roles)
{
    public const string CoordinatorRole = "coordinator", TrainerRole = "trainer";
    /// <summary>A member's name travels as a role with this prefix (Akka members carry roles, not names).</summary>
    public const string NamePrefix = "node:";
    public static readonly string[] AllRoles = [CoordinatorRole, TrainerRole, "evaluator", "publisher"];

    /// <summary>HOST:PORT, with a clear error naming the option.</summary>
    public static (string Host, int Port) ParseAddress(string value, string option)
    {
        var colon = value.LastIndexOf(':');
        if (colon <= 0 || !int.TryParse(value[(colon + 1)..], NumberStyles.None, CultureInfo.InvariantCulture, out var port) || port is < 1 or > 65535)
            throw new SettingsException($"{option} expects HOST:PORT, got '{value}'");
        return (value[..colon], port);
    }
}

/// <summary>One node of a DiLoCo cluster run, for the life of the process: it joins the cluster, hosts the coordinator
/// singleton where it has that role (the oldest such node runs it) and a replica where it has the trainer role, and
/// leaves once the coordinator says the last round is checkpointed. docs/CLUSTER.md.</summary>
public sealed class ClusterRun(MamoSettings settings, ClusterNodeOptions node)
{
    public const string SingletonName = "coordinator";

    /// <summary>Runs until the coordinator finishes the run or `stop`; returns the inner steps each replica took.</summary>
    public async Task<long> RunAsync(CancellationToken stop)
    {
        var s = settings;
        var everyStep = s.Cluster.Sync == ClusterSettings.EveryStep;
        if (everyStep && KafkaSpec.IsKafka(s.Source))
            throw new SettingsException("cluster.sync = every-step trains from file sources (dataset:, manifest:, wds:) so far; use diloco with Kafka");
        if (s.TorchThreads > 0) TorchSharp.torch.set_num_threads(s.TorchThreads);
        var device = PretrainRun.OpenDevice(s.Device);
        Action<string> log = m => Log.Information("{Message}", m);
        var tokenizer = new TextTokenizer(BuiltinDatasets.EnsureVocab(log: log));
        var decodeLimits = new DecodeLimits(s.MaxImageBytes, s.MaxImagePixels);
        using var source = node.Roles.Contains(ClusterNodeOptions.TrainerRole)
            ? PretrainRun.OpenSource(s, decodeLimits, b => Log.Warning("dead letter: {Reason} at {Location}", b.Reason, b.Location), log)
            : null;

        var system = ActorSystem.Create("mamo", Config());
        ReplicaData? data = null;
        try
        {
            if (node.Roles.Contains(ClusterNodeOptions.CoordinatorRole))
                system.ActorOf(ClusterSingletonManager.Props(everyStep ? StepCoordinator.Props(s, device) : Coordinator.Props(s), PoisonPill.Instance,
                    ClusterSingletonManagerSettings.Create(system).WithRole(ClusterNodeOptions.CoordinatorRole).WithSingletonName(SingletonName)), SingletonName);
            var coordinator = CoordinatorProxy(system);
            var finished = new TaskCompletionSource<RoundReplica.Finished>(TaskCreationOptions.RunContinuationsAsynchronously);
            if (source is not null)
            {
                var owner = system.ActorOf(Props.Create(() => new Completion(finished)), "finished");
                var preparer = new SamplePreparer(new ImageTransform(s.TrainImages), tokenizer, s.Model.MaxTextLength, decodeLimits);
                data = new ReplicaData(s, source, preparer, system.Materializer(), node.Name, NodeDir(s.RunDir, node.Name));
                system.ActorOf(everyStep ? StepReplica.Props(s, data, coordinator, owner, node.Name, device)
                    : RoundReplica.Props(s, data, coordinator, owner, node.Name, device), "replica");
            }
            Log.Information("node {Node} ({Roles}) listening on {Host}:{Port}, joining {Seeds}", node.Name, string.Join(",", node.Roles), node.Host, node.Port,
                string.Join(",", node.SeedNodes));
            var done = await Task.WhenAny(finished.Task, Task.Delay(Timeout.Infinite, stop), system.WhenTerminated);
            // On SIGTERM Akka's own shutdown hook may stop the system before `stop` is seen: that is a stop, not a failure.
            if (done == system.WhenTerminated && !stop.IsCancellationRequested && !finished.Task.IsCompleted)
                throw new InvalidOperationException("this node's actor system stopped (downed by the cluster?)");
            var rounds = finished.Task.IsCompleted ? finished.Task.Result.Round : 0;
            Log.Information("node {Node} leaves the cluster after {Unit} {Round}", node.Name, everyStep ? "step" : "round", rounds);
            return everyStep ? rounds : rounds * s.Cluster.InnerSteps;
        }
        finally
        {
            await CoordinatedShutdown.Get(system).Run(CoordinatedShutdown.ClusterLeavingReason.Instance);
            data?.Dispose();
        }
    }

    /// <summary>Reaches the coordinator singleton wherever it runs.</summary>
    public static IActorRef CoordinatorProxy(ActorSystem system) =>
        system.ActorOf(ClusterSingletonProxy.Props($"/user/{SingletonName}",
            ClusterSingletonProxySettings.Create(system).WithRole(ClusterNodeOptions.CoordinatorRole).WithSingletonName(SingletonName)), "coordinator-proxy");

    /// <summary>A node's own log, metrics and ledger go here, beside the run's shared checkpoints.</summary>
    public static string NodeDir(string runDir, string name) => Path.Combine(runDir, "nodes", name);

    Config Config() => NodeConfig(node, settings.Config);

    /// <summary>The node's address, seeds and roles (its name among them) over cluster.conf and the run's settings.</summary>
    public static Config NodeConfig(ClusterNodeOptions node, Config settings)
    {
        string Quote(string v) => "\"" + v.Replace("\\", "\\\\").Replace("\"", "\\\"") + "\"";
        var seeds = node.SeedNodes.Select(a => ClusterNodeOptions.ParseAddress(a, "--seed-nodes")).Select(a => Quote($"akka.tcp://mamo@{a.Host}:{a.Port}"));
        var hocon = $"""
            akka.remote.dot-netty.tcp.hostname = {Quote(node.Host)}
            akka.remote.dot-netty.tcp.port = {node.Port}
            akka.cluster.seed-nodes = [{string.Join(", ", seeds)}]
            akka.cluster.roles = [{string.Join(", ", node.Roles.Append(ClusterNodeOptions.NamePrefix + node.Name).Select(Quote))}]
            """;
        return ConfigurationFactory.ParseString(hocon).WithFallback(ClusterNode.Config(settings));
    }

    sealed class Completion : ReceiveActor
    {
        public Completion(TaskCompletionSource<RoundReplica.Finished> done) => Receive<RoundReplica.Finished>(f => done.TrySetResult(f));
    }
}
