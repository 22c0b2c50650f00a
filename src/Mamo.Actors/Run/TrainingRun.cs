using System.Diagnostics;
using Akka.Actor;
using Akka.Streams;
using Mamo.Actors.Pipeline;
using Mamo.Actors.Sources;
using Mamo.Data.Kafka;
using Mamo.Model;
using Serilog;

namespace Mamo.Actors.Run;

/// <summary>What makes a run's pipeline a cluster replica (docs/CLUSTER.md): the single-node pipeline, with two hooks
/// around it. Before a round, the replica loads θ (and the teacher) from its coordinator; after it (DiLoCo's H steps,
/// or every-step's one backward), it hands the coordinator its work. Its records come as the coordinator assigns
/// them, and the coordinator acknowledges them to the source once its checkpoint covers them. Cluster/ReplicaHooks is
/// the one implementation.</summary>
public interface IReplica
{
    /// <summary>The node's name, which its dead letters carry.</summary>
    string Node { get; }

    /// <summary>The replica's own folder: its log, metrics, ledger and optimiser checkpoints (RUN_DIR/nodes/NAME).</summary>
    string Dir { get; }

    /// <summary>Seeds its step randomness: a DiLoCo replica's masks differ from the others', an every-step replica's
    /// rows are the global batch's.</summary>
    int Seed { get; }

    /// <summary>The node's source as the coordinator assigns it to a pipeline: each round's records, marked with their
    /// round. Each pipeline gets its own: nothing assigned to an earlier one reaches it.</summary>
    ITrainingSource Assigned(ITrainingSource source);

    /// <summary>The actor that links a pipeline to its coordinator (Cluster/Replica): registers, gives the trainer each
    /// round's weights, hands in the trainer's work, and acknowledges to the source what a cluster checkpoint covers.</summary>
    Props Props(IActorRef trainer, IActorRef metrics);
}

/// <summary>The lifecycle of a training run: it holds an ActorSystem for the run's whole life, and (re)starts the
/// pipeline under the RunSupervisor from the newest durable checkpoint (a new run first writes step 0's), with backoff
/// after a failure. It ends the pipeline on max-steps, the time budget or `stop`, and then has the supervisor flush a
/// final checkpoint. The stream itself is TrainingGraph; what a step computes, what is admitted and how the run is
/// judged is its task's (TrainingTask: MAMO pre-training, or a fine-tuning task). A cluster replica is this same
/// lifecycle in its node's actor system, with the hooks of IReplica.</summary>
/// <param name="objective">what a step computes, where not the task's (an objective written outside the product)</param>
/// <param name="init">the checkpoint whose student (and teacher) a new run starts from; null: random weights</param>
public sealed class TrainingRun(MamoSettings settings, IProgress<RunProgress>? progress = null, Func<MamoConfig, IObjective>? objective = null,
    string? init = null)
{
    const int MaxBackoffDoublings = 20;
    /// <summary>Path of the supervisor under /user: the pipeline's actors are /user/run/NAME.</summary>
    public const string SupervisorName = "run";

    readonly TrainingTask task = TrainingTask.Of(settings);
    readonly Func<MamoConfig, IObjective> objective = objective ?? TrainingTask.Of(settings).Objective;
    readonly Stopwatch clock = Stopwatch.StartNew();
    RunStatus? status;
    long samplesRead;

    /// <summary>The run's actor system, alive from start to end whatever the pipeline restarts.</summary>
    public ActorSystem? System { get; private set; }

    /// <summary>Samples taken from the source so far: with backpressure, never far ahead of what the trainer consumed.</summary>
    public long SamplesRead => Interlocked.Read(ref samplesRead);

    /// <summary>A single node: opens its inputs and an actor system of its own, and trains until max-steps, the time
    /// budget or `stop`; returns the step of the final checkpoint.</summary>
    public async Task<long> RunAsync(CancellationToken stop)
    {
        var s = settings;
        Directory.CreateDirectory(s.RunDir);
        var changes = RunConfig.Resume(s, Environment.GetCommandLineArgs().Skip(1));
        if (changes.Count > 0)
        {
            foreach (var c in changes) Log.Warning("the resumed run applies a changed setting: {Key} was {Was}, now {Now}", c.Key, c.Was ?? "unset", c.Now ?? "unset");
            Metrics.AppendLine(s.RunDir, new ConfigLine(changes));
        }
        using var inputs = RunInputs.Open(s, task);
        if (s.EvalEverySteps > 0 && !task.HeldOut.Any())
            Log.Warning("this run evaluates nothing: no held-out set is named for a {Source} source (name them with --set eval.sets=[\"manifest:PATH\"])", s.Source);
        var system = System = ActorSystem.Create("mamo", s.Config);
        string? failure = null;
        try { return await RunAsync(system, inputs, replica: null, stop); }
        catch (Exception e)
        {
            failure = e.Message;
            throw;
        }
        finally
        {
            await system.Terminate();
            // Every actor has stopped: nothing else writes metrics.jsonl now.
            WriteState(s.RunDir, "stopped", failure);
        }
    }

    /// <summary>The pipeline's restart loop in an actor system that outlives it (a cluster node's keeps its membership),
    /// as a single node or as a cluster replica; returns the last step it trained or checkpointed.</summary>
    public async Task<long> RunAsync(ActorSystem system, RunInputs inputs, IReplica? replica, CancellationToken stop)
    {
        var s = settings;
        System ??= system;
        var dir = replica?.Dir ?? s.RunDir;
        Directory.CreateDirectory(dir);
        status = new RunStatus(s.Preset, inputs.Source!, () => SamplesRead);
        var preparer = inputs.TrainingPreparer(s);
        var supervisor = system.ActorOf(RunSupervisor.Props(), SupervisorName);
        try
        {
            for (int attempt = 0; ; attempt++)
            {
                var before = Checkpoint.Latest(dir);
                try
                {
                    return await RunOnceAsync(supervisor, replica?.Assigned(inputs.Source!) ?? inputs.Source!, preparer, inputs, replica, stop);
                }
                catch (RestartRequested e)
                {
                    Log.Information("the pipeline restarts: {Why}", e.Message);
                    attempt--;   // asked for, not a failure
                }
                catch (Exception e) when (e is not Trainer.DivergedException and not SettingsException && !stop.IsCancellationRequested && attempt < s.MaxRestarts)
                {
                    if (Checkpoint.Latest(dir) != before) attempt = 0;   // it made progress: a fresh failure, not a crash loop
                    var backoff = TimeSpan.FromTicks(Math.Min(s.MaxBackoff.Ticks, s.MinBackoff.Ticks << Math.Min(attempt, MaxBackoffDoublings)));
                    Log.Error(e, "the pipeline failed; restarting from the last checkpoint in {Backoff} (restart {Attempt} of {Max})", backoff, attempt + 1, s.MaxRestarts);
                    status.Restarted();
                    WriteState(dir, "restarting", e.Message);
                    try { await Task.Delay(backoff, stop); }
                    catch (OperationCanceledException) { return Checkpoint.Latest(dir) is { } c ? Checkpoint.ReadState(c).Step : 0; }
                }
            }
        }
        finally
        {
            await supervisor.GracefulStop(s.CheckpointWriteTimeout);
        }
    }

    /// <summary>A state line in a run folder's metrics.jsonl while no Metrics actor writes there (between and after pipelines).</summary>
    void WriteState(string dir, string state, string? reason)
    {
        try { Metrics.AppendLine(dir, new StateLine(state, status?.Restarts ?? 0, reason)); }
        catch (IOException e) { Log.Warning("the {State} state was not written: {Error}", state, e.Message); }
    }

    /// <summary>A child of the pipeline asked for a fresh start (RunSupervisor.RestartPipeline).</summary>
    sealed class RestartRequested(string why) : Exception(why);

    async Task<long> RunOnceAsync(IActorRef supervisor, ITrainingSource source, Data.SamplePreparer preparer, RunInputs inputs, IReplica? replica,
        CancellationToken stop)
    {
        var s = settings;
        var device = inputs.Device;
        // A single node's actors start from its checkpoint; a replica's from fresh weights, which each round replaces.
        var (from, state) = replica is null ? StartingPoint.Choose(s, objective, init, device) : ReplicaStart(replica.Dir);
        var position = replica is null ? StreamPosition.FromExtra(state.Extra) : StreamPosition.None;
        var startStep = replica is null ? state.Step : 0;
        bool needsTargets, keepsTeacher;
        using (var probe = objective(s.Model)) (needsTargets, keepsTeacher) = (probe.NeedsTargets, probe.TeacherMomentum is not null);
        var usesTeacher = replica is null ? Checkpoint.Parts(state).Contains(Checkpoint.TeacherPart) : keepsTeacher;
        // The reservoir goes on from the checkpoint's (a run that turns replay on starts an empty one).
        var replay = replica is null && s.Replay.On ? ReplayBuffer.Load(from, s.Replay, s.Seed) : null;
        if (replay is not null) Log.Information("replaying {Fraction:P0} of each batch from a reservoir of {Replay}", s.Replay.Fraction, replay);
        IReadOnlyCollection<string> parts = replica is not null ? [Checkpoint.OptimizerPart]
            : [.. Checkpoint.Parts(state).Where(p => p != ReplayBuffer.Part), .. replay is null ? Array.Empty<string>() : [ReplayBuffer.Part]];
        using var stopping = new CancellationTokenSource();

        RunSupervisor.Pipeline Create(IUntypedActorContext context)
        {
            // A replica's metrics and ledger are its own; dead letters go to the run's one file, whichever node read them.
            var metrics = context.ActorOf(Metrics.Props(dir: replica?.Dir ?? s.RunDir, deadLetterDir: s.RunDir, s.MetricsEverySteps, s.Ledger, progress,
                step => Remaining(step, startStep), status, s.MetricsSampleEvery, replica?.Node), "metrics");
            foreach (var b in inputs.LoadBad) metrics.Tell(new Metrics.DeadLetter(b));
            inputs.LoadBad.Clear();   // reported once, not again after a restart
            var publisher = replica is null && inputs.PublishItems.Count > 0
                ? context.ActorOf(EmbeddingPublisher.Props(inputs.PublishItems, RunInputs.OpenSink(s), s.PublishModality, s.PublishBatchSize, device, startStep,
                    task.Predictions, s.RunDir), "publisher")
                : null;
            var committer = replica is null ? context.ActorOf(Props.Create(() => new SourceCommitter(source)), "source-committer") : null;
            // A replica checkpoints only its own optimiser state; the cluster checkpoint is its coordinator's.
            var checkpointer = context.ActorOf(Checkpointer.Props(replica?.Dir ?? s.RunDir, s.Model, parts, s.KeepLast, s.Seed,
                new[] { context.Self, metrics, committer, publisher }.OfType<IActorRef>().ToList()), "checkpointer");
            var teacher = usesTeacher
                ? context.ActorOf(MomentumTeacher.Props(s.Model, objective, replica is null ? from : null, device, s.TeacherPipelined ? 1 : 0), "teacher")
                : null;
            var trainer = context.ActorOf(Trainer.Props(s, objective, replica is null ? from : null, device, teacher, checkpointer, replica?.Seed ?? s.Seed, replica?.Dir),
                "trainer");
            // A cluster evaluates on its checkpoints (Cluster/CheckpointFollower), not in its replicas.
            var evaluated = task.EvaluatesStudent ? trainer : teacher;
            var evaluator = replica is null && evaluated is not null && inputs.HeldOut.Count > 0
                ? context.ActorOf(Evaluator.Props(s.Model, device, inputs.HeldOut, evaluated, metrics, s.EvalK, s.EvalBatchSize, stopping.Token), "evaluator")
                : null;
            var link = replica is null ? null : context.ActorOf(replica.Props(trainer, metrics), "replica");
            return new RunSupervisor.Pipeline(trainer, teacher, metrics, evaluator, publisher, link);
        }

        var pipeline = await supervisor.Ask<RunSupervisor.Pipeline>(
            new RunSupervisor.Start(Create, new Checkpointer.CheckpointDurable(startStep, position, from)), s.CheckpointWriteTimeout);
        try
        {
            var remainingSteps = replica is null && s.MaxSteps > 0 ? s.MaxSteps - startStep : long.MaxValue;
            // Fine-tuning scores the starting model first, the baseline that forgetting is measured against: the trainer
            // hands the evaluator its weights before the graph sends it a batch.
            if (task.EvaluatesStudent && startStep == 0 && pipeline.Evaluator is { } first) pipeline.Trainer.Tell(new Evaluator.GetWeights(0), first);
            if (remainingSteps > 0)
            {
                var graph = TrainingGraph.Build(s, new TrainingGraph.Stages(source, preparer, position, startStep, remainingSteps, needsTargets,
                    pipeline.Teacher, pipeline.Trainer, pipeline.Metrics, pipeline.Evaluator, () => Interlocked.Increment(ref samplesRead), task.Admit, replay));
                var (killSwitch, done) = graph.Run(System!.Materializer());
                using var onStop = stop.Register(killSwitch.Shutdown);
                var left = s.TimeBudget - clock.Elapsed;
                using var budget = replica is null && s.TimeBudget > TimeSpan.Zero
                    ? new Timer(_ => killSwitch.Shutdown(), null, left < TimeSpan.Zero ? TimeSpan.Zero : left, Timeout.InfiniteTimeSpan) : null;
                var failed = supervisor.Ask<RunSupervisor.PipelineFailed>(new RunSupervisor.AwaitFailure(), stopping.Token);
                if (await Task.WhenAny(done, failed) == failed)
                {
                    var f = await failed;
                    killSwitch.Abort(new InvalidOperationException($"actor {f.Child} of the pipeline stopped"));
                    if (f.Requested) throw new RestartRequested(f.Cause!.Message);
                    throw new InvalidOperationException($"actor {f.Child} of the pipeline stopped{(f.Cause is null ? "" : ": " + f.Cause.Message)}", f.Cause);
                }
                await done;
            }

            var flushed = await supervisor.Ask<RunSupervisor.Flushed>(new RunSupervisor.Flush(), s.CheckpointWriteTimeout);
            if (pipeline.Evaluator is { } evaluator && !stop.IsCancellationRequested)
            {
                // The evaluation of the last steps is the one a run is judged by: let it finish (Ctrl-C does not wait).
                try { await evaluator.Ask<Evaluator.Drained>(new Evaluator.Drain(), s.CheckpointWriteTimeout); }
                catch (AskTimeoutException) { Log.Warning("the last evaluation did not finish within {Timeout}", s.CheckpointWriteTimeout); }
            }
            // The committer may not have seen the last announcement before its pipeline stops: acknowledge it here too.
            if (replica is null) source.Commit(flushed.Position);
            if (pipeline.Publisher is { } publisher)
            {
                // Downstream gets the model the run ends with, not the one a checkpoint before it.
                Log.Information("publishing the embeddings of step {Step} before stopping", flushed.Step);
                try { await publisher.Ask<EmbeddingPublisher.Drained>(new EmbeddingPublisher.Drain(flushed.Step), s.CheckpointWriteTimeout); }
                catch (AskTimeoutException) { Log.Warning("the embeddings of step {Step} were not published within {Timeout}", flushed.Step, s.CheckpointWriteTimeout); }
            }
            if (pipeline.Replica is { } link)
            {
                // A replica that stops hands in the work it did: its coordinator applies it, and nobody trains it again.
                try { await link.Ask<Cluster.Replica.Drained>(new Cluster.Replica.Drain(), s.CheckpointWriteTimeout); }
                catch (AskTimeoutException) { Log.Warning("the last work of this replica was not handed in within {Timeout}", s.CheckpointWriteTimeout); }
            }
            Log.Information("stopped at step {Step} after {Elapsed}", flushed.Step, clock.Elapsed);
            return flushed.Step;
        }
        finally
        {
            await stopping.CancelAsync();
            await supervisor.Ask<RunSupervisor.Stopped>(new RunSupervisor.StopPipeline(), s.CheckpointWriteTimeout);
        }
    }

    /// <summary>A replica's starting point: its newest own checkpoint (its optimiser state), or none.</summary>
    static (string Dir, Checkpoint.State State) ReplicaStart(string dir) =>
        Checkpoint.Complete(dir).FirstOrDefault() is { } newest ? (newest, Checkpoint.ReadState(newest)) : ("", new Checkpoint.State(0, 0, 0, []));

    TimeSpan? Remaining(long step, long startStep)
    {
        var s = settings;
        var done = step - startStep;
        TimeSpan? bySteps = s.MaxSteps > 0 && done > 0 ? clock.Elapsed / done * (s.MaxSteps - step) : null;
        TimeSpan? byTime = s.TimeBudget > TimeSpan.Zero ? s.TimeBudget - clock.Elapsed : null;
        return bySteps is null ? byTime : byTime is null ? bySteps : bySteps < byTime ? bySteps : byTime;
    }

    /// <summary>Acknowledges to the source what each durable checkpoint covers.</summary>
    sealed class SourceCommitter : ReceiveActor
    {
        public SourceCommitter(ITrainingSource source) => Receive<Checkpointer.CheckpointDurable>(d => source.Commit(d.Position));
    }
}
