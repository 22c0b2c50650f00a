using System.Diagnostics;
using System.Globalization;
using Akka;
using Akka.Actor;
using Akka.Streams;
using Akka.Streams.Dsl;
using Mamo.Data;
using Mamo.Data.Datasets;
using Mamo.Data.Kafka;
using Mamo.Model;
using Serilog;
using TorchSharp;
using static TorchSharp.torch;
using Mamo.Actors.Sources;
using Mamo.Actors.Pipeline;

namespace Mamo.Actors.Run;

/// <summary>The lifecycle of a training run: it opens the source, holds one ActorSystem for the run's whole life,
/// and (re)starts the pipeline under the RunSupervisor from the newest durable checkpoint (a new run first writes
/// step 0's), with backoff after a failure. It ends the pipeline on max-steps, the time budget or `stop`, and then
/// has the supervisor flush a final checkpoint. The stream itself is TrainingGraph; what a step computes is the
/// objective (from the settings: MAMO pre-training, or a fine-tuning task, unless another is given). Fine-tuning
/// runs the same pipeline: its new run starts from <c>init</c>'s weights, its records pass the task's admission, and
/// its evaluator scores the student (from the trainer), also before the first step.</summary>
/// <param name="init">the checkpoint whose student (and teacher) a new run starts from; null: random weights</param>
public sealed class TrainingRun(MamoSettings settings, IProgress<RunProgress>? progress = null, Func<MamoConfig, IObjective>? objective = null,
    string? init = null)
{
    const int MaxBackoffDoublings = 20;
    /// <summary>Path of the supervisor under /user: the pipeline's actors are /user/run/NAME.</summary>
    public const string SupervisorName = "run";

    readonly Func<MamoConfig, IObjective> objective = objective ?? FineTuning.Objective(settings);
    readonly Stopwatch clock = Stopwatch.StartNew();
    IReadOnlyList<EmbeddingItem> publishItems = [];
    RunStatus? status;
    long samplesRead;

    /// <summary>The run's actor system, alive from start to end whatever the pipeline restarts.</summary>
    public ActorSystem? System { get; private set; }

    /// <summary>Samples taken from the source so far: with backpressure, never far ahead of what the trainer consumed.</summary>
    public long SamplesRead => Interlocked.Read(ref samplesRead);

    /// <summary>Trains until max-steps, the time budget or `stop`; returns the step of the final checkpoint.</summary>
    public async Task<long> RunAsync(CancellationToken stop)
    {
        var s = settings;
        if (s.TorchThreads > 0) torch.set_num_threads(s.TorchThreads);
        var device = OpenDevice(s.Device);
        Directory.CreateDirectory(s.RunDir);
        Action<string> log = m => Log.Information("{Message}", m);

        var tokenizer = new TextTokenizer(BuiltinDatasets.EnsureVocab(log: log));
        var decodeLimits = new DecodeLimits(s.MaxImageBytes, s.MaxImagePixels);
        var bad = new List<BadInput>();
        using var source = OpenSource(s, decodeLimits, bad.Add, log);
        status = new RunStatus(s.Preset, source, () => SamplesRead);
        string? failure = null;

        var evalSets = new List<Evaluator.NamedSet>();
        var labelledSets = new List<Evaluator.NamedLabelledSet>();
        var system = System = ActorSystem.Create("mamo", s.Config);
        try
        {
            if (s.EvalEverySteps > 0 && s.FineTune.Task == FineTuneSettings.Classify)
            {
                LoadLabelledSets(s, tokenizer, decodeLimits, labelledSets, log);
                LoadEvalSets(s, s.FineTune.ForgettingSets, tokenizer, decodeLimits, evalSets, log);
            }
            else if (s.EvalEverySteps > 0) LoadEvalSets(s, s.EvalSets.Concat(s.FineTune.IsFineTuning ? s.FineTune.ForgettingSets : []), tokenizer, decodeLimits, evalSets, log);
            publishItems = s.PublishOutput is null ? [] : PublishItems(s, tokenizer, decodeLimits, log);

            var preparer = new SamplePreparer(
                new ImageTransform(s.TrainImages),
                tokenizer, s.Model.MaxTextLength, decodeLimits);
            var supervisor = system.ActorOf(RunSupervisor.Props(), SupervisorName);

            for (int attempt = 0; ; attempt++)
            {
                var before = Checkpoint.Latest(s.RunDir);
                try
                {
                    return await RunOnceAsync(supervisor, source, preparer, evalSets, labelledSets, bad, device, stop);
                }
                catch (Exception e) when (e is not Trainer.DivergedException and not SettingsException && !stop.IsCancellationRequested && attempt < s.MaxRestarts)
                {
                    if (Checkpoint.Latest(s.RunDir) != before) attempt = 0;   // it made progress: a fresh failure, not a crash loop
                    var backoff = TimeSpan.FromTicks(Math.Min(s.MaxBackoff.Ticks, s.MinBackoff.Ticks << Math.Min(attempt, MaxBackoffDoublings)));
                    Log.Error(e, "the pipeline failed; restarting from the last checkpoint in {Backoff} (restart {Attempt} of {Max})", backoff, attempt + 1, s.MaxRestarts);
                    status!.Restarted();
                    Metrics.AppendLine(s.RunDir, Metrics.State("restarting", status.Restarts, e.Message));
                    try { await Task.Delay(backoff, stop); }
                    catch (OperationCanceledException) { return Checkpoint.Latest(s.RunDir) is { } c ? Checkpoint.ReadState(c).Step : 0; }
                }
            }
        }
        catch (Exception e)
        {
            failure = e.Message;
            throw;
        }
        finally
        {
            await system.Terminate();
            // Every actor has stopped: nothing else writes metrics.jsonl now.
            try { Metrics.AppendLine(s.RunDir, Metrics.State("stopped", status!.Restarts, failure)); }
            catch (IOException e) { Log.Warning("the stopped state was not written: {Error}", e.Message); }
            foreach (var set in evalSets) set.Set.Dispose();
            foreach (var set in labelledSets) set.Set.Dispose();
        }
    }

    /// <summary>kafka://... streams from Kafka; dataset:, manifest: and wds: sources are read into memory.</summary>
    internal static ITrainingSource OpenSource(MamoSettings s, DecodeLimits decodeLimits, Action<BadInput> onBad, Action<string> log)
    {
        if (KafkaSpec.IsKafka(s.Source))
        {
            KafkaSpec spec;
            try { spec = KafkaSpec.Parse(s.Source); }
            catch (FormatException e) { throw new SettingsException($"'mamo.source': {e.Message}"); }
            Log.Information("training from Kafka {Source}", spec);
            try
            {
                return new KafkaTrainingSource(spec, s.KafkaConsumer, s.KafkaProducer, s.DeadLetterTopic,
                    SourceLimits.Default with { MaxImageBytes = s.MaxImageBytes });
            }
            catch (ArgumentException e) { throw new SettingsException($"'mamo.kafka': {e.Message}"); }
        }
        var samples = TrainingSamples.Load(s.Source, s.Seed, s.MaxInMemoryBytes, decodeLimits, onBad, log, s.FineTune.LabelField);
        Log.Information("training on {Count} samples from {Source}", samples.Count, samples.Name);
        return samples;
    }

    /// <summary>`publish.output`, with clear errors for a bad address or producer setting.</summary>
    internal static IEmbeddingSink OpenSink(MamoSettings s)
    {
        try { return EmbeddingSinks.Open(s.PublishOutput!, s.KafkaProducer); }
        catch (FormatException e) { throw new SettingsException($"'mamo.publish.output': {e.Message}"); }
        catch (ArgumentException e) { throw new SettingsException($"'mamo.kafka.producer': {e.Message}"); }
    }

    /// <summary>The held-out retrieval sets of <paramref name="specs"/>, into <paramref name="sets"/> (the caller disposes
    /// them, also when one fails to load).</summary>
    internal static void LoadEvalSets(MamoSettings s, IEnumerable<string> specs, TextTokenizer tokenizer, DecodeLimits decodeLimits, List<Evaluator.NamedSet> sets,
        Action<string> log)
    {
        var transform = new ImageTransform(new ImageTransformOptions(ImageSize: s.Model.ImageSize));
        foreach (var spec in specs.Distinct())
        {
            var set = EvalSet.Load(TrainingSamples.EvalManifest(spec, log), transform, tokenizer, s.Model.MaxTextLength, decodeLimits);
            sets.Add(new Evaluator.NamedSet(SetName(spec), set));
            Log.Information("eval set {Spec}: {Images} images, {Texts} captions", spec, set.ImageCount, set.TextCount);
        }
    }

    static string SetName(string spec) => spec.Replace("dataset:", "").Replace('/', '-');

    /// <summary>Classify: the labelled sets of `eval.sets`, with the task's text.</summary>
    static void LoadLabelledSets(MamoSettings s, TextTokenizer tokenizer, DecodeLimits decodeLimits, List<Evaluator.NamedLabelledSet> sets, Action<string> log)
    {
        var transform = new ImageTransform(new ImageTransformOptions(ImageSize: s.Model.ImageSize));
        foreach (var spec in s.EvalSets.Distinct())
        {
            LabelledSet set;
            try { set = LabelledSet.Load(TrainingSamples.EvalManifest(spec, log), transform, tokenizer, s.Model.MaxTextLength, s.FineTune.Prompt, s.FineTune.LabelField, decodeLimits); }
            catch (Exception e) when (e is InvalidDataException or FileNotFoundException) { throw new SettingsException($"'mamo.eval.sets' {spec}: {e.Message}"); }
            sets.Add(new Evaluator.NamedLabelledSet(SetName(spec), set));
            Log.Information("labelled eval set {Spec}: {Count} images ({Skipped} skipped)", spec, set.Count, set.Bad.Count);
        }
    }

    /// <summary>The set whose embeddings go out after each checkpoint, prepared once.</summary>
    internal static List<EmbeddingItem> PublishItems(MamoSettings s, TextTokenizer tokenizer, DecodeLimits decodeLimits, Action<string> log)
    {
        var preparer = new SamplePreparer(new ImageTransform(new ImageTransformOptions(ImageSize: s.Model.ImageSize)), tokenizer, s.Model.MaxTextLength, decodeLimits);
        var (samples, bad) = ManifestSource.ReadAll(TrainingSamples.EvalManifest(s.PublishInput, log));
        var items = EmbeddingItem.PrepareAll(samples, preparer, bad);
        // A classifier trained on a fixed prompt predicts each image paired with that prompt.
        if (s.FineTune.Task == FineTuneSettings.Classify && s.FineTune.Prompt is { } prompt)
        {
            var encoded = tokenizer.Encode(prompt, s.Model.MaxTextLength);
            items = items.Select(i => i with { Prompt = encoded }).ToList();
        }
        foreach (var b in bad) Log.Warning("publish set: skipped {Location}: {Reason}", b.Location, b.Reason);
        if (items.Count == 0) throw new SettingsException($"'mamo.publish.input' {s.PublishInput} has no usable item");
        Log.Information("publishing embeddings of {Count} items ({Modality}) to {Output} after each checkpoint", items.Count, s.PublishModality, s.PublishOutput);
        return items;
    }

    async Task<long> RunOnceAsync(IActorRef supervisor, ITrainingSource source, SamplePreparer preparer, IReadOnlyList<Evaluator.NamedSet> evalSets,
        IReadOnlyList<Evaluator.NamedLabelledSet> labelledSets, List<BadInput> loadBad, Device device, CancellationToken stop)
    {
        var s = settings;
        var (from, state) = StartingCheckpoint(device);
        var position = StreamPosition.FromExtra(state.Extra);
        var startStep = state.Step;
        var usesTeacher = Checkpoint.Parts(state).Contains(Checkpoint.TeacherPart);
        bool needsTargets;
        using (var probe = objective(s.Model)) needsTargets = probe.NeedsTargets;
        using var stopping = new CancellationTokenSource();
        IEmbeddingSink? sink = null;
        if (s.PublishOutput is not null) sink = OpenSink(s);

        RunSupervisor.Pipeline Create(IUntypedActorContext context)
        {
            var metrics = context.ActorOf(Metrics.Props(s.RunDir, s.MetricsEverySteps, s.Ledger, progress, step => Remaining(step, startStep),
                status, s.MetricsSampleEvery), "metrics");
            foreach (var b in loadBad) metrics.Tell(new Metrics.DeadLetter(b));
            loadBad.Clear();   // reported once, not again after a restart
            var checkpointer = context.ActorOf(Checkpointer.Props(s.RunDir, s.Model, Checkpoint.Parts(state), s.KeepLast, s.Seed), "checkpointer");
            var teacher = usesTeacher ? context.ActorOf(MomentumTeacher.Props(s.Model, objective, from, device, s.TeacherPipelined), "teacher") : null;
            var trainer = context.ActorOf(Trainer.Props(s, objective, from, device, teacher, checkpointer), "trainer");
            // Pre-training evaluates the teacher; fine-tuning, the student it trains.
            var evaluated = s.FineTune.IsFineTuning ? trainer : teacher;
            var evaluator = evaluated is not null && evalSets.Count + labelledSets.Count > 0
                ? context.ActorOf(Evaluator.Props(s.Model, device, evalSets, evaluated, metrics, s.EvalK, s.EvalBatchSize, stopping.Token, labelledSets, objective), "evaluator")
                : null;
            context.ActorOf(Props.Create(() => new SourceCommitter(source)), "source-committer");
            var publisher = sink is null ? null
                : context.ActorOf(EmbeddingPublisher.Props(publishItems, sink, s.PublishModality, s.PublishBatchSize, device, startStep), "publisher");
            return new RunSupervisor.Pipeline(trainer, teacher, metrics, evaluator, publisher);
        }

        var pipeline = await supervisor.Ask<RunSupervisor.Pipeline>(
            new RunSupervisor.Start(Create, new Checkpointer.CheckpointDurable(startStep, position, from)), s.CheckpointWriteTimeout);
        try
        {
            var remainingSteps = s.MaxSteps > 0 ? s.MaxSteps - startStep : long.MaxValue;
            // Fine-tuning scores the starting model first, the baseline that forgetting is measured against: the trainer
            // hands the evaluator its weights before the graph sends it a batch.
            if (s.FineTune.IsFineTuning && startStep == 0 && pipeline.Evaluator is { } first) pipeline.Trainer.Tell(new MomentumTeacher.GetWeights(0), first);
            if (remainingSteps > 0)
            {
                var graph = TrainingGraph.Build(s, new TrainingGraph.Stages(source, preparer, position, startStep, remainingSteps, needsTargets,
                    pipeline.Teacher, pipeline.Trainer, pipeline.Metrics, pipeline.Evaluator, () => Interlocked.Increment(ref samplesRead),
                    FineTuning.Admission(s.FineTune)));
                var (killSwitch, done) = graph.Run(System!.Materializer());
                using var onStop = stop.Register(killSwitch.Shutdown);
                var left = s.TimeBudget - clock.Elapsed;
                using var budget = s.TimeBudget > TimeSpan.Zero ? new Timer(_ => killSwitch.Shutdown(), null, left < TimeSpan.Zero ? TimeSpan.Zero : left, Timeout.InfiniteTimeSpan) : null;
                var failed = supervisor.Ask<RunSupervisor.PipelineFailed>(new RunSupervisor.AwaitFailure(), stopping.Token);
                if (await Task.WhenAny(done, failed) == failed)
                {
                    var f = await failed;
                    killSwitch.Abort(new InvalidOperationException($"actor {f.Child} of the pipeline stopped"));
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
            source.Commit(flushed.Position);
            if (pipeline.Publisher is { } publisher)
            {
                // Downstream gets the model the run ends with, not the one a checkpoint before it.
                Log.Information("publishing the embeddings of step {Step} before stopping", flushed.Step);
                try { await publisher.Ask<EmbeddingPublisher.Drained>(new EmbeddingPublisher.Drain(flushed.Step), s.CheckpointWriteTimeout); }
                catch (AskTimeoutException) { Log.Warning("the embeddings of step {Step} were not published within {Timeout}", flushed.Step, s.CheckpointWriteTimeout); }
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

    /// <summary>The newest checkpoint that verifies (an unreadable one is skipped with a warning: the one before it is
    /// whole), or, for a new run, step 0's, written now: every actor of the pipeline starts from a checkpoint.</summary>
    (string Dir, Checkpoint.State State) StartingCheckpoint(Device device)
    {
        var s = settings;
        foreach (var dir in Checkpoint.Complete(s.RunDir))
        {
            try
            {
                var state = Checkpoint.Verify(dir);
                if (state.Extra.TryGetValue(Checkpointer.SeedKey, out var seed) && seed != s.Seed.ToString(CultureInfo.InvariantCulture))
                    throw new SettingsException($"the run in {s.RunDir} was started with seed {seed}, not {s.Seed}; resume with --set seed={seed} or use another --run-dir");
                var saved = Checkpoint.ReadConfig(dir);
                if (!saved.SameArchitecture(s.Model))
                    throw new SettingsException($"cannot resume: {dir} holds a model of another architecture than the one configured:\n{saved.ToJson()}\nuse another --run-dir or the same --preset");
                Log.Information("resuming from {Checkpoint}: step {Step}, stream position {Position}", dir, state.Step, StreamPosition.FromExtra(state.Extra));
                return (dir, state);
            }
            catch (Exception e) when (e is IOException or InvalidDataException or global::System.Text.Json.JsonException or FormatException)
            {
                Log.Warning("checkpoint {Checkpoint} cannot be loaded ({Error}); trying the one before", dir, e.Message);
            }
        }
        using var trainer = new MamoTrainer(s.Model, s.Optimizer, device, s.Seed, withTeacher: true, objective);
        if (init is not null) StartFrom(init, trainer);
        var fresh = new Checkpoint.State(0, 0, 0, trainer.Extra(new Dictionary<string, string> { [Checkpointer.SeedKey] = s.Seed.ToString(CultureInfo.InvariantCulture) }));
        var path = Checkpoint.Commit(s.RunDir, s.Model, trainer.Parts(), fresh, s.KeepLast);
        Log.Information("new run in {RunDir}: {Preset} preset, {Parameters:N0} parameters, batch {Batch}, device {Device}{From}",
            s.RunDir, s.Preset, trainer.Student.parameters().Sum(p => p.numel()), s.BatchSize, device, init is null ? "" : $", from {init}");
        return (path, Checkpoint.ReadState(path));
    }

    /// <summary>A new run's student (and teacher) take the weights of <paramref name="dir"/>'s student (and teacher,
    /// where it has one, else a copy). The objective's own parts and state come too where <paramref name="dir"/> holds all of them
    /// (fine-tuning a fine-tuned model further: the next domain of a drift stream); the optimiser starts fresh.</summary>
    static void StartFrom(string dir, MamoTrainer trainer)
    {
        var saved = Checkpoint.ReadConfig(dir);
        if (!saved.SameArchitecture(trainer.Config))
            throw new SettingsException($"{dir} holds a model of another architecture than the one configured:\n{saved.ToJson()}");
        var state = Checkpoint.ReadState(dir);
        Checkpoint.LoadStart(dir, trainer.Student, trainer.Objective.TeacherMomentum is null ? null : trainer.Teacher);
        if (trainer.Objective.Parts.Count > 0 && trainer.Objective.Parts.Keys.All(Checkpoint.Parts(state).Contains))
        {
            trainer.Objective.LoadState(state.Extra);
            foreach (var (name, module) in trainer.Objective.Parts) Checkpoint.LoadModel(dir, Checkpoint.PartFile(name), module);
        }
    }

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
        protected override void PreStart() => Context.System.EventStream.Subscribe(Self, typeof(Checkpointer.CheckpointDurable));
    }

    /// <summary>cpu, cuda or cuda:N, with a clear error where CUDA is absent.</summary>
    public static Device OpenDevice(string name)
    {
        if (name.StartsWith("cuda") && !torch.cuda.is_available())
            throw new SettingsException($"device '{name}' asked for, but CUDA is not available: " +
                (TorchBackend.IsCuda ? "this build uses TorchSharp-cuda-linux, but no CUDA device or driver was found" : "this build uses libtorch-cpu; build with `dotnet build -p:TorchBackend=cuda` (TorchSharp-cuda-linux) on a machine with CUDA"));
        try { return torch.device(name); }
        catch (Exception e) { throw new SettingsException($"bad device '{name}': {e.Message}"); }
    }
}
