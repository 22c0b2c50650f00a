using System.Globalization;
using Akka.Actor;
using Akka.Cluster.Hosting;
using Akka.Hosting;
using Akka.Streams;
using Mamo.Data;
using Mamo.Data.Datasets;
using Mamo.Data.Kafka;
using Mamo.Actors.Sources;
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
/// and publisher singletons where it has those roles (the oldest such node runs each), and, where it has the trainer
/// role, runs the single-node pipeline as a replica (TrainingRun with ReplicaHooks) under its own supervisor, which
/// restarts it with backoff and ends the node after too many failures. It leaves once the last round is checkpointed,
/// and evaluated and published where the run does those. docs/CLUSTER.md.</summary>
/// <param name="init">the checkpoint a new run starts from (pretrain --init, finetune --from): the coordinator loads it;
/// replicas take θ from the coordinator as always</param>
public sealed class ClusterRun(MamoSettings settings, ClusterNodeOptions node, string? init = null)
{
    public const string SingletonName = "coordinator";

    /// <summary>Runs until the coordinator finishes the run or `stop`; returns the step the run reached.</summary>
    public async Task<long> RunAsync(CancellationToken stop)
    {
        var s = settings;
        var everyStep = s.Cluster.Sync == ClusterSettings.EveryStep;
        if (everyStep && !ITrainingSource.ReadWholeSpec(s.Source))
            throw new SettingsException("cluster.sync = every-step trains from file sources (dataset:, manifest:, wds:) so far; use diloco with Kafka");
        if (s.Sources.Count > 1)
            throw new SettingsException("several --source run on a single node so far: a cluster splits one source between its replicas");
        if (s.Replay.On)
            throw new SettingsException("replay.fraction > 0 runs on a single node so far: a replica's reservoir is in no cluster checkpoint, so a restarted replica would not replay what it should; set replay.fraction = 0 with --cluster");
        // Refused here, not in the coordinator singleton: a node that cannot go on says why and joins nothing.
        if (Model.Checkpoint.Latest(s.RunDir) is { } newest && Coordination.CannotGoOn(s.Cluster, newest, Model.Checkpoint.ReadState(newest)) is { } cannot)
            throw new SettingsException(cannot);
        var task = TrainingTask.Of(s);
        using (var objective = task.Objective(s.Model))
            if (everyStep && objective.NotShardable is { } why)
                throw new SettingsException($"cluster.sync = every-step splits each step's batch between the replicas, which this run cannot: {why}; use diloco, or set finetune.distill-alpha = 0");
        // Every node knows from the settings whether the run evaluates and publishes, and so what to wait for at the end.
        var followers = new List<string>();
        if (task.Evaluates) followers.Add(CheckpointFollower.EvaluatorName);
        if (s.PublishOutput is not null)
        {
            followers.Add(CheckpointFollower.PublisherName);
            // A bad output or producer setting is an error at start, not in a singleton. A file is not opened here: the
            // publisher, on another node of this machine, may hold it.
            if (KafkaSpec.IsKafka(s.PublishOutput)) RunInputs.OpenSink(s).Dispose();
            else if (!s.PublishOutput.StartsWith("jsonl:")) RunInputs.OpenSink(s);
        }
        var trains = node.Roles.Contains(ClusterNodeOptions.TrainerRole);
        var evaluates = followers.Contains(CheckpointFollower.EvaluatorName) && node.Roles.Contains(ClusterNodeOptions.EvaluatorRole);
        var publishes = followers.Contains(CheckpointFollower.PublisherName) && node.Roles.Contains(ClusterNodeOptions.PublisherRole);
        // The source opens once the node is a member: a Kafka consumer of a node that cannot join would hold partitions
        // nobody trains.
        using var inputs = RunInputs.Open(s, task, train: false, evaluate: evaluates, publish: publishes);

        var singletons = new List<Singleton>
        {
            Singleton.Of<CoordinatorKey>(SingletonName, ClusterNodeOptions.CoordinatorRole,
                node.Roles.Contains(ClusterNodeOptions.CoordinatorRole) ? everyStep ? StepCoordinator.Props(s, inputs.Device, init) : RoundCoordinator.Props(s, init) : null,
                Coordination.Stop.Instance),
        };
        if (followers.Contains(CheckpointFollower.EvaluatorName))
            singletons.Add(Singleton.Of<EvaluatorKey>(CheckpointFollower.EvaluatorName, ClusterNodeOptions.EvaluatorRole,
                evaluates ? CheckpointFollower.Evaluating(s, task, inputs.Device, inputs.HeldOut) : null));
        if (followers.Contains(CheckpointFollower.PublisherName))
            singletons.Add(Singleton.Of<PublisherKey>(CheckpointFollower.PublisherName, ClusterNodeOptions.PublisherRole,
                publishes ? CheckpointFollower.Publishing(s, task, inputs.Device, inputs.PublishItems, () => RunInputs.OpenSink(s)) : null));

        using var host = await ClusterNode.StartAsync(node, s.Config, s.Cluster.Tls, builder => { foreach (var singleton in singletons) singleton.Register(builder); });
        var system = host.System();
        var registry = ActorRegistry.For(system);
        // The coordinator, where it runs on this node, checkpoints its work before the node leaves: the singleton's
        // termination message comes only with a hand-over, and there is none when every node stops.
        CoordinatedShutdown.Get(system).AddTask(CoordinatedShutdown.PhaseBeforeServiceUnbind, "checkpoint-coordinator", async () =>
        {
            try
            {
                var coordinator = await system.ActorSelection($"/user/{SingletonName}/{SingletonName}").ResolveOne(TimeSpan.FromSeconds(1));
                await coordinator.Ask<Akka.Done>(Coordination.Stop.Instance, TimeSpan.FromSeconds(50));
            }
            catch (ActorNotFoundException) { }   // it runs on another node
            catch (AskTimeoutException) { Log.Warning("the coordinator did not checkpoint its work within 50 s of its node's stop"); }
            return Akka.Done.Instance;
        });
        if (s.Cluster.DataPlane == ClusterSettings.Stream && s.Cluster.Tls is null) await DataPlane.StartAsync(system, node.Host, s.Cluster.DataPlanePort);
        else Log.Information("weights cross between nodes over remoting{Why}", s.Cluster.Tls is null ? "" : " (TLS: the data plane's stream is not encrypted)");
        var done = false;
        long finalStep;
        try
        {
            Log.Information("node {Node} ({Roles}) listening on {Host}:{Port}, joining {Seeds}", node.Name, string.Join(",", node.Roles), node.Host, node.Port,
                string.Join(",", node.SeedNodes));
            // The run's last step, which a node's followers wait for: the coordinator says it to a replica; a node without
            // one knows it from the settings (and without max-steps it runs until stopped).
            finalStep = s.MaxSteps <= 0 ? -1 : everyStep ? s.MaxSteps : (s.MaxSteps + s.Cluster.InnerSteps - 1) / s.Cluster.InnerSteps * s.Cluster.InnerSteps;
            if (trains)
            {
                var up = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
                Akka.Cluster.Cluster.Get(system).RegisterOnMemberUp(() => up.TrySetResult());
                if (await Task.WhenAny(up.Task, system.WhenTerminated, Task.Delay(Timeout.Infinite, stop)) != up.Task)
                    throw stop.IsCancellationRequested ? new OperationCanceledException(stop) : new InvalidOperationException("this node could not join the cluster");
                inputs.OpenSource(s);
                var hooks = new ReplicaHooks(s, node.Name, registry.Get<CoordinatorKey>(), stop);
                var training = new TrainingRun(s).RunAsync(system, inputs, hooks, stop);
                // A downed node's actor system stops under its pipeline: that is the end of the node, not of the run.
                if (await Task.WhenAny(training, system.WhenTerminated) != training && !stop.IsCancellationRequested)
                    throw new InvalidOperationException("this node's actor system stopped (downed by the cluster?)");
                await training;
                finalStep = hooks.FinalStep;
            }
            else if (finalStep < 0 || followers.Count == 0)
            {
                await Task.WhenAny(Task.Delay(Timeout.Infinite, stop), system.WhenTerminated);
                if (system.WhenTerminated.IsCompleted && !stop.IsCancellationRequested)
                    throw new InvalidOperationException("this node's actor system stopped (downed by the cluster?)");
                finalStep = -1;
            }
            if (finalStep >= 0)   // the node's own work is done: it waits for the followers, a round's time at most where it trained
                foreach (var follower in singletons.Where(x => x.Name != SingletonName))
                    await AwaitFollower(follower.Proxy(registry), follower.Name, follower.Role, finalStep, trains ? s.Cluster.RoundTimeout : null, stop);
            done = finalStep >= 0 && !stop.IsCancellationRequested;
        }
        finally
        {
            await Leave(system, done);
            await host.StopAsync();
        }
        // Stopped (a signal) or run without an end: the step the cluster's checkpoints got to, read once the node has
        // left (a coordinator on it checkpoints its work as it leaves).
        if (finalStep < 0) finalStep = Model.Checkpoint.Latest(s.RunDir) is { } last ? Model.Checkpoint.ReadState(last).Step : 0;
        Log.Information("node {Node} left the cluster at step {Step}", node.Name, finalStep);
        return finalStep;
    }

    /// <summary>Why a node's actor system ends when its run does. Not Akka's ClusterLeavingReason: Akka.Hosting (1.5.74)
    /// sets the process's exit code to -1 when a system ends for that reason (or a downing), and a node that had done
    /// its work exited 255 whenever that hook ran after Main had returned.</summary>
    public sealed class RunDone : CoordinatedShutdown.Reason
    {
        public static readonly RunDone Instance = new();
        public override int ExitCode => 0;
        public override string ToString() => "the node's run is done";
    }

    /// <summary>Leaves the cluster (CoordinatedShutdown's phases, the cluster-leave one among them) and ends the system.
    /// First it waits (at most LeavingWait) for the members on their way out to be removed, and, where the run is done
    /// (every node leaves), for the younger members too, so that the oldest leaves last: its singleton manager hands
    /// its singletons to the next oldest even where that one is leaving, and then waits out the cluster-exiting phase
    /// (10 s) for a hand-over that never comes (Akka.Cluster.Tools 1.5.74). The last node of every finished run did.</summary>
    public static async Task Leave(ActorSystem system, bool runDone = false)
    {
        var cluster = Akka.Cluster.Cluster.Get(system);
        bool Before(Akka.Cluster.Member m) => !m.UniqueAddress.Equals(cluster.SelfUniqueAddress)
            && (m.Status is Akka.Cluster.MemberStatus.Leaving or Akka.Cluster.MemberStatus.Exiting || runDone && cluster.SelfMember.IsOlderThan(m));
        var waited = System.Diagnostics.Stopwatch.StartNew();
        while (waited.Elapsed < LeavingWait && cluster.State.Members.Any(Before)) await Task.Delay(50);
        await CoordinatedShutdown.Get(system).Run(RunDone.Instance);
    }

    static readonly TimeSpan LeavingWait = TimeSpan.FromSeconds(10);

    /// <summary>Registry keys of the singletons' proxies.</summary>
    public sealed class CoordinatorKey;
    sealed class EvaluatorKey;
    sealed class PublisherKey;

    /// <summary>One of the run's singletons: a node with the role hosts it (the oldest such node runs it), every node
    /// reaches it through a proxy in the ActorRegistry.</summary>
    sealed record Singleton(string Name, string Role, Action<AkkaConfigurationBuilder> Register, Func<IActorRegistry, IActorRef> Proxy)
    {
        /// <param name="termination">what the singleton is told when its node leaves or hands it over (it then stops itself)</param>
        public static Singleton Of<TKey>(string name, string role, Props? props, object? termination = null)
        {
            var options = new ClusterSingletonOptions { Role = role, TerminationMessage = termination ?? PoisonPill.Instance };
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

    /// <summary>A node's own log, metrics, ledger and replica checkpoints go here, beside the run's shared checkpoints.</summary>
    public static string NodeDir(string runDir, string name) => Path.Combine(runDir, "nodes", name);
}
