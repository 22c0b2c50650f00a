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

namespace Mamo.Actors;

/// <summary>The single-node pipeline of `mamo pretrain`:
/// samples ─► preprocess (parallel) ─► batches ─► teacher targets ─► trainer ─► metrics / evaluator / checkpointer.
/// Every edge is an Akka.Streams edge or a message with backpressure. A failing trainer restarts the whole
/// pipeline from the last checkpoint, with backoff; a stop request finishes the step in hand and checkpoints.</summary>
public sealed class PretrainRun(MamoSettings settings, IProgress<RunProgress>? progress = null)
{
    const int MaxBackoffDoublings = 20;
    /// <summary>Mixed into the run's seed for per-sample randomness (crops, caption picks), apart from the step seeds.</summary>
    const int PreprocessSeedSalt = 0x5eed;

    readonly Stopwatch clock = Stopwatch.StartNew();
    IReadOnlyList<EmbeddingItem> publishItems = [];
    long samplesRead;

    /// <summary>The actor system of the pipeline now running (a new one after each restart).</summary>
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

        var evalTransform = new ImageTransform(new ImageTransformOptions(ImageSize: s.Model.ImageSize));
        var evalSets = new List<Evaluator.NamedSet>();
        try
        {
            if (s.EvalEverySteps > 0)
                foreach (var spec in s.EvalSets)
                {
                    var set = EvalSet.Load(TrainingSamples.EvalManifest(spec, log), evalTransform, tokenizer, s.Model.MaxTextLength, decodeLimits);
                    evalSets.Add(new Evaluator.NamedSet(spec.Replace("dataset:", "").Replace('/', '-'), set));
                    Log.Information("eval set {Spec}: {Images} images, {Texts} captions", spec, set.ImageCount, set.TextCount);
                }

            publishItems = s.PublishOutput is null ? [] : PublishItems(s, new SamplePreparer(evalTransform, tokenizer, s.Model.MaxTextLength, decodeLimits), log);

            var preparer = new SamplePreparer(
                new ImageTransform(s.TrainImages),
                tokenizer, s.Model.MaxTextLength, decodeLimits);

            for (int attempt = 0; ; attempt++)
            {
                var before = Checkpoint.Latest(s.RunDir);
                try
                {
                    return await RunOnceAsync(source, preparer, evalSets, bad, device, stop);
                }
                catch (Exception e) when (e is not TrainerReplica.DivergedException and not SettingsException && !stop.IsCancellationRequested && attempt < s.MaxRestarts)
                {
                    if (Checkpoint.Latest(s.RunDir) != before) attempt = 0;   // it made progress: a fresh failure, not a crash loop
                    var backoff = TimeSpan.FromTicks(Math.Min(s.MaxBackoff.Ticks, s.MinBackoff.Ticks << Math.Min(attempt, MaxBackoffDoublings)));
                    Log.Error(e, "the pipeline failed; restarting from the last checkpoint in {Backoff} (restart {Attempt} of {Max})", backoff, attempt + 1, s.MaxRestarts);
                    try { await Task.Delay(backoff, stop); }
                    catch (OperationCanceledException) { return Checkpoint.Latest(s.RunDir) is { } c ? Checkpoint.ReadState(c).Step : 0; }
                }
            }
        }
        finally
        {
            foreach (var set in evalSets) set.Set.Dispose();
        }
    }

    /// <summary>kafka://... streams from Kafka; dataset:, manifest: and wds: sources are read into memory.</summary>
    static ITrainingSource OpenSource(MamoSettings s, DecodeLimits decodeLimits, Action<BadInput> onBad, Action<string> log)
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
        var samples = TrainingSamples.Load(s.Source, s.Seed, s.MaxInMemoryBytes, decodeLimits, onBad, log);
        Log.Information("training on {Count} samples from {Source}", samples.Count, samples.Name);
        return samples;
    }

    /// <summary>The set whose embeddings go out after each checkpoint, prepared once.</summary>
    static List<EmbeddingItem> PublishItems(MamoSettings s, SamplePreparer preparer, Action<string> log)
    {
        var (samples, bad) = ManifestSource.ReadAll(TrainingSamples.EvalManifest(s.PublishInput, log));
        var items = EmbeddingItem.PrepareAll(samples, preparer, bad);
        foreach (var b in bad) Log.Warning("publish set: skipped {Location}: {Reason}", b.Location, b.Reason);
        if (items.Count == 0) throw new SettingsException($"'mamo.publish.input' {s.PublishInput} has no usable item");
        Log.Information("publishing embeddings of {Count} items ({Modality}) to {Output} after each checkpoint", items.Count, s.PublishModality, s.PublishOutput);
        return items;
    }

    async Task<long> RunOnceAsync(ITrainingSource source, SamplePreparer preparer, IReadOnlyList<Evaluator.NamedSet> evalSets,
        List<BadInput> loadBad, Device device, CancellationToken stop)
    {
        var s = settings;
        MamoTrainer trainer;
        MamoModel teacherModel;
        long teacherStep;
        StreamPosition position;
        if (Resume(device) is { } resumed) (trainer, teacherModel, teacherStep, position) = resumed;
        else
        {
            trainer = new MamoTrainer(s.Model, s.Optimizer, device, s.Seed, withTeacher: false);
            teacherModel = Momentum.CreateTeacher(trainer.Student);
            teacherStep = 0;
            position = StreamPosition.None;
            Log.Information("new run in {RunDir}: {Preset} preset, {Parameters:N0} parameters, batch {Batch}, device {Device}",
                s.RunDir, s.Preset, trainer.Student.parameters().Sum(p => p.numel()), s.BatchSize, device);
        }

        var system = ActorSystem.Create("mamo", s.Config);
        System = system;
        using var stopping = new CancellationTokenSource();
        try
        {
            var startStep = trainer.Step;
            var metrics = system.ActorOf(Metrics.Props(s.RunDir, s.MetricsEverySteps, s.Ledger, progress, step => Remaining(step, startStep)), "metrics");
            foreach (var b in loadBad) metrics.Tell(new Metrics.DeadLetter(b));
            loadBad.Clear();   // reported once, not again after a restart
            var checkpointer = system.ActorOf(Checkpointer.Props(s.RunDir, trainer.Config, s.KeepLast, s.Seed), "checkpointer");
            var teacher = system.ActorOf(MomentumTeacher.Props(teacherModel, teacherStep, s.TeacherPipelined), "teacher");
            if (teacherStep < trainer.Step)
                teacher.Tell(new MomentumTeacher.StudentUpdated(trainer.Step,
                    trainer.Student.parameters().Select(p => Tensors.Copy(p)).ToArray()));
            var trainerActor = system.ActorOf(TrainerReplica.Props(trainer, position, teacher, checkpointer, s), "trainer");
            var evaluator = system.ActorOf(Evaluator.Props(trainer.Config, device, evalSets, teacher, metrics, s.EvalK, s.EvalBatchSize, stopping.Token), "evaluator");
            var durable = Inbox.Create(system);
            system.EventStream.Subscribe(durable.Receiver, typeof(Checkpointer.CheckpointDurable));
            var committer = system.ActorOf(Props.Create(() => new SourceCommitter(source)), "source-committer");
            if (s.PublishOutput is { } output)
            {
                IEmbeddingSink sink;
                try { sink = EmbeddingSinks.Open(output, s.KafkaProducer); }
                catch (FormatException e) { throw new SettingsException($"'mamo.publish.output': {e.Message}"); }
                catch (ArgumentException e) { throw new SettingsException($"'mamo.kafka.producer': {e.Message}"); }
                system.ActorOf(EmbeddingPublisher.Props(publishItems, sink, s.PublishModality, s.PublishBatchSize, device), "publisher");
            }

            var remainingSteps = s.MaxSteps > 0 ? s.MaxSteps - startStep : long.MaxValue;
            if (remainingSteps > 0)
            {
                var (killSwitch, done) = Build(source, preparer, position, startStep, remainingSteps, teacher, trainerActor, metrics, evaluator)
                    .Run(system.Materializer());
                using var onStop = stop.Register(killSwitch.Shutdown);
                var left = s.TimeBudget - clock.Elapsed;
                using var budget = s.TimeBudget > TimeSpan.Zero ? new Timer(_ => killSwitch.Shutdown(), null, left < TimeSpan.Zero ? TimeSpan.Zero : left, Timeout.InfiniteTimeSpan) : null;
                // An actor that dies (its supervisor stops it on any exception) fails the run, which then restarts
                // from the last checkpoint: a restarted actor would carry stale state.
                var died = Task.WhenAny(trainerActor.WatchAsync(), teacher.WatchAsync(), checkpointer.WatchAsync());
                if (await Task.WhenAny(done, died) != done)
                {
                    killSwitch.Abort(new InvalidOperationException("an actor of the pipeline stopped"));
                    throw new InvalidOperationException("an actor of the pipeline (trainer, teacher or checkpointer) stopped; see the log for its exception");
                }
                await done;
            }

            var finalStep = await trainerActor.Ask<long>(new TrainerReplica.CheckpointNow(), s.CheckpointWriteTimeout);
            while (Checkpoint.Latest(s.RunDir) is not { } c || Checkpoint.ReadState(c).Step != finalStep)
            {
                var message = await durable.ReceiveAsync(s.CheckpointWriteTimeout);
                if (message is Checkpointer.CheckpointDurable d && d.Step == finalStep) break;
            }
            // The committer may not have seen the last announcement before the system stops: acknowledge it here too.
            source.Commit(StreamPosition.FromExtra(Checkpoint.ReadState(Checkpoint.Latest(s.RunDir)!).Extra));
            Log.Information("stopped at step {Step} after {Elapsed}", finalStep, clock.Elapsed);
            return finalStep;
        }
        finally
        {
            await stopping.CancelAsync();
            await system.Terminate();
            trainer.Dispose();
            teacherModel.Dispose();
        }
    }

    /// <summary>The student, teacher and stream position of the newest checkpoint that loads; an unreadable one is
    /// skipped with a warning (the one before it is whole). Null for a new run.</summary>
    (MamoTrainer Trainer, MamoModel Teacher, long TeacherStep, StreamPosition Position)? Resume(Device device)
    {
        var s = settings;
        foreach (var dir in Checkpoint.Complete(s.RunDir))
        {
            MamoTrainer? trainer = null;
            try
            {
                var state = Checkpoint.ReadState(dir);
                if (state.Extra.TryGetValue(Checkpointer.SeedKey, out var seed) && seed != s.Seed.ToString(CultureInfo.InvariantCulture))
                    throw new SettingsException($"the run in {s.RunDir} was started with seed {seed}, not {s.Seed}; resume with --set seed={seed} or use another --run-dir");
                trainer = MamoTrainer.Load(dir, s.Optimizer, device, s.Seed, withTeacher: false, config: s.Model);
                var teacher = Momentum.CreateTeacher(trainer.Student);
                Checkpoint.LoadModel(dir, Checkpoint.TeacherFile, teacher);
                var position = StreamPosition.FromExtra(state.Extra);
                Log.Information("resuming from {Checkpoint}: step {Step}, stream position {Position}", dir, trainer.Step, position);
                return (trainer, teacher, state.TeacherStep, position);
            }
            catch (InvalidDataException e) when (e.Message.Contains("another architecture"))
            {
                trainer?.Dispose();
                throw new SettingsException($"cannot resume: {e.Message}; use another --run-dir or the same --preset");
            }
            catch (Exception e) when (e is IOException or InvalidDataException or global::System.Text.Json.JsonException or FormatException)
            {
                trainer?.Dispose();
                Log.Warning("checkpoint {Checkpoint} cannot be loaded ({Error}); trying the one before", dir, e.Message);
            }
        }
        return null;
    }

    TimeSpan? Remaining(long step, long startStep)
    {
        var s = settings;
        var done = step - startStep;
        TimeSpan? bySteps = s.MaxSteps > 0 && done > 0 ? clock.Elapsed / done * (s.MaxSteps - step) : null;
        TimeSpan? byTime = s.TimeBudget > TimeSpan.Zero ? s.TimeBudget - clock.Elapsed : null;
        return bySteps is null ? byTime : byTime is null ? bySteps : bySteps < byTime ? bySteps : byTime;
    }

    sealed record Prepared(Positioned Record, PreparedSample? Sample, BadInput? Bad);
    sealed record Collated(long Step, Batch Batch, StreamPosition Position);
    sealed record WithTargets(Collated Input, TeacherTargets? Targets);

    IRunnableGraph<(UniqueKillSwitch, Task<Akka.Done>)> Build(ITrainingSource source, SamplePreparer preparer, StreamPosition resume, long startStep, long steps,
        IActorRef teacher, IActorRef trainer, IActorRef metrics, IActorRef evaluator)
    {
        var s = settings;
        var needsTargets = s.Model.Weights.Mim > 0 || s.Model.Weights.Mrm > 0;
        var stepOffset = startStep;

        var batches = source.Open(resume)
            .Select(x => { Interlocked.Increment(ref samplesRead); return x; })
            .SelectAsync(s.PreprocessParallelism, x => Task.Run(() =>
            {
                if (x.Item is not SampleItem { Sample: var sample }) return new Prepared(x, null, ((BadItem)x.Item).Bad);
                // Crops and caption picks repeat on resume: seeded by the record's place in its stream.
                var random = new Random(Seeds.Mix(s.Seed ^ PreprocessSeedSalt ^ Seeds.StableHash(x.Partition), x.Offset));
                return preparer.TryPrepareForTraining(sample, random, out var p, out var bad)
                    ? new Prepared(x, p, null) : new Prepared(x, null, bad);
            }))
            // A batch's position covers every record since the previous batch, dead letters included, so a
            // checkpoint acknowledges those too.
            .StatefulSelectMany<Prepared, (List<PreparedSample> Samples, StreamPosition Position), NotUsed>(() =>
            {
                var group = new List<PreparedSample>(s.BatchSize);
                var position = StreamPosition.None;
                return p =>
                {
                    position = position.Advance(p.Record.Partition, p.Record.Offset);
                    if (p.Bad is not null)
                    {
                        metrics.Tell(new Metrics.DeadLetter(p.Bad));
                        source.DeadLetter(p.Record, p.Bad);
                        return [];
                    }
                    group.Add(p.Sample!);
                    if (group.Count < s.BatchSize) return [];
                    var full = (group, position);
                    (group, position) = (new List<PreparedSample>(s.BatchSize), StreamPosition.None);
                    return [full];
                };
            })
            .Take(steps)
            .Select(g => new Collated(stepOffset++, Collator.Collate(g.Samples, s.Model.ImageSize), g.Position))
            .Buffer(s.BufferedBatches, OverflowStrategy.Backpressure)
            .ViaMaterialized(KillSwitches.Single<Collated>(), Keep.Right);

        // Two async stages: while the trainer works on step t, the teacher already computes the targets of t+1.
        var withTargets = s.TeacherPipelined || !needsTargets
            ? batches.SelectAsync(1, async c => new WithTargets(c, needsTargets ? await Targets(teacher, c) : null))
                     .SelectAsync(1, w => Train(trainer, w))
            : batches.SelectAsync(1, async c => await Train(trainer, new WithTargets(c, await Targets(teacher, c))));

        return withTargets
            .Select(done =>
            {
                metrics.Tell(done);
                var stepsDone = done.Result.Step + 1;
                if (s.EvalEverySteps > 0 && stepsDone % s.EvalEverySteps == 0) evaluator.Tell(new Evaluator.EvaluateNow(stepsDone));
                return done;
            })
            .ToMaterialized(Sink.Ignore<TrainerReplica.StepCompleted>(), Keep.Both);
    }

    static async Task<TeacherTargets> Targets(IActorRef teacher, Collated c)
    {
        var b = c.Batch;
        var ready = await teacher.Ask<MomentumTeacher.TargetsReady>(
            new MomentumTeacher.ComputeTargets(c.Step, Tensors.Copy(b.Images), Tensors.Copy(b.TokenIds), Tensors.Copy(b.AttentionMask)));
        return ready.Targets;
    }

    static Task<TrainerReplica.StepCompleted> Train(IActorRef trainer, WithTargets w) =>
        trainer.Ask<TrainerReplica.StepCompleted>(new TrainerReplica.Train(w.Input.Step, w.Input.Batch, w.Targets, w.Input.Position));

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
            throw new SettingsException($"device '{name}' asked for, but CUDA is not available (this build uses libtorch-cpu; install libtorch-cuda)");
        try { return torch.device(name); }
        catch (Exception e) { throw new SettingsException($"bad device '{name}': {e.Message}"); }
    }
}
