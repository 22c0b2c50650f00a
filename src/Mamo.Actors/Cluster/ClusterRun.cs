using System.Globalization;
using Akka.Actor;
using Akka.Cluster.Hosting;
using Akka.Hosting;
using Akka.Streams;
using Mamo.Data;
using Mamo.Data.Datasets;
using Mamo.Data.Kafka;
using Serilog;
using Mamo.Actors.Run;
using Mamo.Actors.Pipeline;

namespace Mamo.Actors.Cluster;

/// <summary>Where a node listens, whom it joins, its name and its roles (mamo pretrain --cluster ...).</summary>
public sealed record ClusterNodeOptions(string Host, int Port, IReadOnlyList<string> SeedNodes, string Name, IReadOnlyList<string> Roles)
{
    public const string CoordinatorRole = "coordinator", TrainerRole = "trainer", EvaluatorRole = "evaluator", PublisherRole = "publisher";
    /// <summary>A member's name travels as a role with this prefix (Akka members carry roles, not names).</summary>
    public const string NamePrefix = "node:";
    public static readonly string[] AllRoles = [CoordinatorRole, TrainerRole, EvaluatorRole, PublisherRole];

    /// <summary>HOST:PORT, with a clear error naming the option.</summary>
    public static (string Host, int Port) ParseAddress(string value, string option)
    {
        var colon = value.LastIndexOf(':');
        if (colon <= 0 || !int.TryParse(value[(colon + 1)..], NumberStyles.None, CultureInfo.InvariantCulture, out var port) || port is < 1 or > 65535)
            throw new SettingsException($"{option} expects HOST:PORT, got '{value}'");
        return (value[..colon], port);
    }
}

/// <summary>One node of a cluster run, for the life of the process: it joins the cluster, hosts the coordinator, evaluator
/// and publisher singletons where it has those roles (the oldest such node runs each), and a replica where it has the
/// trainer role. It leaves once the last round is checkpointed, and evaluated and published where the run does
/// those. docs/CLUSTER.md.</summary>
/// <param name="init">the checkpoint a new run starts from (pretrain --init): the coordinator loads it; replicas take θ
/// from the coordinator as always</param>
public sealed class ClusterRun(MamoSettings settings, ClusterNodeOptions node, string? init = null)
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
        var device = TrainingRun.OpenDevice(s.Device);
        Action<string> log = m => Log.Information("{Message}", m);
        var tokenizer = new TextTokenizer(BuiltinDatasets.EnsureVocab(log: log));
        var decodeLimits = new DecodeLimits(s.MaxImageBytes, s.MaxImagePixels);
        using var source = node.Roles.Contains(ClusterNodeOptions.TrainerRole)
            ? TrainingRun.OpenSource(s, decodeLimits, b => Log.Warning("dead letter: {Reason} at {Location}", b.Reason, b.Location), log)
            : null;
        // Every node knows from the settings whether the run evaluates and publishes, and so what to wait for at the end.
        var followers = new List<string>();
        if (s.EvalEverySteps > 0 && s.EvalSets.Count > 0) followers.Add(CheckpointFollower.EvaluatorName);
        if (s.PublishOutput is not null)
        {
            followers.Add(CheckpointFollower.PublisherName);
            // A bad output or producer setting is an error at start, not in a singleton. A file is not opened here: the
            // publisher, on another node of this machine, may hold it.
            if (KafkaSpec.IsKafka(s.PublishOutput)) TrainingRun.OpenSink(s).Dispose();
            else if (!s.PublishOutput.StartsWith("jsonl:")) TrainingRun.OpenSink(s);
        }
        var evalSets = new List<Evaluator.NamedSet>();
        if (followers.Contains(CheckpointFollower.EvaluatorName) && node.Roles.Contains(ClusterNodeOptions.EvaluatorRole))
            TrainingRun.LoadEvalSets(s, s.EvalSets, tokenizer, decodeLimits, evalSets, log);
        var publishItems = followers.Contains(CheckpointFollower.PublisherName) && node.Roles.Contains(ClusterNodeOptions.PublisherRole)
            ? TrainingRun.PublishItems(s, tokenizer, decodeLimits, log) : null;

        var singletons = new List<Singleton>
        {
            Singleton.Of<CoordinatorKey>(SingletonName, ClusterNodeOptions.CoordinatorRole,
                node.Roles.Contains(ClusterNodeOptions.CoordinatorRole) ? everyStep ? StepCoordinator.Props(s, device, init) : RoundCoordinator.Props(s, init) : null),
        };
        if (followers.Contains(CheckpointFollower.EvaluatorName))
            singletons.Add(Singleton.Of<EvaluatorKey>(CheckpointFollower.EvaluatorName, ClusterNodeOptions.EvaluatorRole,
                evalSets.Count > 0 ? CheckpointFollower.Evaluating(s, device, evalSets) : null));
        if (followers.Contains(CheckpointFollower.PublisherName))
            singletons.Add(Singleton.Of<PublisherKey>(CheckpointFollower.PublisherName, ClusterNodeOptions.PublisherRole,
                publishItems is not null ? CheckpointFollower.Publishing(s, device, publishItems, () => TrainingRun.OpenSink(s)) : null));

        using var host = await ClusterNode.StartAsync(node, s.Config, s.Cluster.Tls, builder => { foreach (var singleton in singletons) singleton.Register(builder); });
        var system = host.System();
        var registry = ActorRegistry.For(system);
        ReplicaData? data = null;
        try
        {
            var coordinator = registry.Get<CoordinatorKey>();
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
            // A node without a replica ends with the run's last step, which the settings tell; else it runs until stopped.
            var lastStep = everyStep ? s.MaxSteps : (s.MaxSteps + s.Cluster.InnerSteps - 1) / s.Cluster.InnerSteps * s.Cluster.InnerSteps;
            if (source is null && s.MaxSteps > 0 && followers.Count > 0)
                finished.SetResult(new RoundReplica.Finished(everyStep ? lastStep : lastStep / s.Cluster.InnerSteps));
            var done = await Task.WhenAny(finished.Task, Task.Delay(Timeout.Infinite, stop), system.WhenTerminated);
            // On SIGTERM Akka's own shutdown hook may stop the system before `stop` is seen: that is a stop, not a failure.
            if (done == system.WhenTerminated && !stop.IsCancellationRequested && !finished.Task.IsCompleted)
                throw new InvalidOperationException("this node's actor system stopped (downed by the cluster?)");
            var rounds = finished.Task.IsCompleted ? finished.Task.Result.Round : 0;
            var steps = everyStep ? rounds : rounds * s.Cluster.InnerSteps;
            if (finished.Task.IsCompleted)   // a replica's node has its own work done: it waits a round's time at most
                foreach (var follower in singletons.Where(x => x.Name != SingletonName))
                    await AwaitFollower(follower.Proxy(registry), follower.Name, follower.Role, steps, source is null ? null : s.Cluster.RoundTimeout, stop);
            Log.Information("node {Node} leaves the cluster after {Unit} {Round}", node.Name, everyStep ? "step" : "round", rounds);
            return steps;
        }
        finally
        {
            await CoordinatedShutdown.Get(system).Run(CoordinatedShutdown.ClusterLeavingReason.Instance);
            await host.StopAsync();
            data?.Dispose();
            foreach (var set in evalSets) set.Set.Dispose();
        }
    }

    /// <summary>Registry keys of the singletons' proxies.</summary>
    public sealed class CoordinatorKey;
    sealed class EvaluatorKey;
    sealed class PublisherKey;

    /// <summary>One of the run's singletons: a node with the role hosts it (the oldest such node runs it), every node
    /// reaches it through a proxy in the ActorRegistry.</summary>
    sealed record Singleton(string Name, string Role, Action<AkkaConfigurationBuilder> Register, Func<IActorRegistry, IActorRef> Proxy)
    {
        public static Singleton Of<TKey>(string name, string role, Props? props)
        {
            var options = new ClusterSingletonOptions { Role = role, TerminationMessage = PoisonPill.Instance };
            return new(name, role, builder =>
            {
                if (props is not null) builder.WithSingleton<TKey>(name, props, options);
                else builder.WithSingletonProxy<TKey>(name, options);
            }, registry => registry.Get<TKey>());
        }
    }

    /// <summary>Waits until the evaluator or publisher, wherever it runs, has done its work on the last checkpoint:
    /// the node that hosts it must not leave before that.</summary>
    async Task AwaitFollower(IActorRef proxy, string name, string role, long step, TimeSpan? timeout, CancellationToken stop)
    {
        Log.Information("node {Node} waits for the {Follower} to finish step {Step}", node.Name, name, step);
        try { await proxy.Ask<CheckpointFollower.Followed>(new CheckpointFollower.AwaitStep(step), timeout, stop); }
        catch (AskTimeoutException)
        {
            Log.Warning("the {Follower} did not finish step {Step} within {Timeout} (is there a node with the {Role} role?)", name, step, timeout, role);
        }
        catch (OperationCanceledException) { }   // stopped: leave now
    }

    /// <summary>A node's own log, metrics and ledger go here, beside the run's shared checkpoints.</summary>
    public static string NodeDir(string runDir, string name) => Path.Combine(runDir, "nodes", name);

    sealed class Completion : ReceiveActor
    {
        public Completion(TaskCompletionSource<RoundReplica.Finished> done) => Receive<RoundReplica.Finished>(f => done.TrySetResult(f));
    }
}
