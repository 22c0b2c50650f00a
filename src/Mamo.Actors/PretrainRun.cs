using System.Diagnostics;
using System.Globalization;
using Akka.Actor;
using Akka.Streams;
using Akka.Streams.Dsl;
using Mamo.Data;
using Mamo.Data.Datasets;
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
    long samplesRead;

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
        var samples = TrainingSamples.Load(s.Source, s.Seed, s.MaxInMemoryBytes, decodeLimits, bad.Add, log);
        Log.Information("training on {Count} samples from {Source} ({Bad} left out as dead letters)", samples.Count, samples.Name, bad.Count);

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

            var preparer = new SamplePreparer(
                new ImageTransform(new ImageTransformOptions(ImageSize: s.Model.ImageSize, MinCropScale: s.CropMinScale, MaxCropScale: s.CropMaxScale, HorizontalFlip: s.HorizontalFlip)),
                tokenizer, s.Model.MaxTextLength, decodeLimits);

            for (int attempt = 0; ; attempt++)
            {
                var before = Checkpoint.Latest(s.RunDir);
                try
                {
                    return await RunOnceAsync(samples, preparer, evalSets, bad, device, stop);
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

    async Task<long> RunOnceAsync(TrainingSamples samples, SamplePreparer preparer, IReadOnlyList<Evaluator.NamedSet> evalSets,
        List<BadInput> loadBad, Device device, CancellationToken stop)
    {
        var s = settings;
        MamoTrainer trainer;
        MamoModel teacherModel;
        long teacherStep, cursor;
        if (Resume(device) is { } resumed) (trainer, teacherModel, teacherStep, cursor) = resumed;
        else
        {
            trainer = new MamoTrainer(s.Model, s.Optimizer, device, s.Seed, withTeacher: false);
            teacherModel = Momentum.CreateTeacher(trainer.Student);
            teacherStep = 0;
            cursor = -1;
            Log.Information("new run in {RunDir}: {Preset} preset, {Parameters:N0} parameters, batch {Batch}, device {Device}",
                s.RunDir, s.Preset, trainer.Student.parameters().Sum(p => p.numel()), s.BatchSize, device);
        }

        var system = ActorSystem.Create("mamo", s.Config);
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
            var trainerActor = system.ActorOf(TrainerReplica.Props(trainer, cursor, teacher, checkpointer, s), "trainer");
            var evaluator = system.ActorOf(Evaluator.Props(trainer.Config, device, evalSets, teacher, metrics, s.EvalK, s.EvalBatchSize, stopping.Token), "evaluator");
            var durable = Inbox.Create(system);
            system.EventStream.Subscribe(durable.Receiver, typeof(Checkpointer.CheckpointDurable));

            var remainingSteps = s.MaxSteps > 0 ? s.MaxSteps - startStep : long.MaxValue;
            if (remainingSteps > 0)
            {
                var (killSwitch, done) = Build(samples, preparer, cursor + 1, startStep, remainingSteps, teacher, trainerActor, metrics, evaluator)
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
    (MamoTrainer Trainer, MamoModel Teacher, long TeacherStep, long Cursor)? Resume(Device device)
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
                var cursor = state.Extra.TryGetValue(Checkpointer.CursorKey, out var c) ? long.Parse(c, CultureInfo.InvariantCulture) : -1;
                Log.Information("resuming from {Checkpoint}: step {Step}, stream cursor {Cursor}", dir, trainer.Step, cursor);
                return (trainer, teacher, state.TeacherStep, cursor);
            }
            catch (InvalidDataException e) when (e.Message.Contains("another architecture"))
            {
                trainer?.Dispose();
                throw new SettingsException($"cannot resume: {e.Message}; use another --run-dir or the same --preset");
            }
            catch (Exception e) when (e is IOException or InvalidDataException or System.Text.Json.JsonException or FormatException)
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

    sealed record Prepared(long Cursor, PreparedSample? Sample, BadInput? Bad);
    sealed record Collated(long Step, Batch Batch, long Cursor);
    sealed record WithTargets(Collated Input, TeacherTargets? Targets);

    IRunnableGraph<(UniqueKillSwitch, Task<Akka.Done>)> Build(TrainingSamples samples, SamplePreparer preparer, long firstCursor, long startStep, long steps,
        IActorRef teacher, IActorRef trainer, IActorRef metrics, IActorRef evaluator)
    {
        var s = settings;
        var needsTargets = s.Model.Weights.Mim > 0 || s.Model.Weights.Mrm > 0;
        var stepOffset = startStep;

        var batches = Source.From(samples.From(firstCursor).Select(x => { Interlocked.Increment(ref samplesRead); return x; }))
            .SelectAsync(s.PreprocessParallelism, x => Task.Run(() =>
            {
                var random = new Random(Seeds.Mix(s.Seed ^ PreprocessSeedSalt, x.Cursor));   // crops and caption picks repeat on resume
                return preparer.TryPrepareForTraining(x.Sample, random, out var p, out var bad)
                    ? new Prepared(x.Cursor, p, null) : new Prepared(x.Cursor, null, bad);
            }))
            .Where(p =>
            {
                if (p.Bad is not null) metrics.Tell(new Metrics.DeadLetter(p.Bad));
                return p.Sample is not null;
            })
            .Grouped(s.BatchSize)
            .Take(steps)
            .Select(group =>
            {
                var list = group.ToList();
                return new Collated(stepOffset++, Collator.Collate(list.Select(p => p.Sample!).ToList(), s.Model.ImageSize), list[^1].Cursor);
            })
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
        trainer.Ask<TrainerReplica.StepCompleted>(new TrainerReplica.Train(w.Input.Step, w.Input.Batch, w.Targets, w.Input.Cursor));

    /// <summary>cpu, cuda or cuda:N, with a clear error where CUDA is absent.</summary>
    public static Device OpenDevice(string name)
    {
        if (name.StartsWith("cuda") && !torch.cuda.is_available())
            throw new SettingsException($"device '{name}' asked for, but CUDA is not available (this build uses libtorch-cpu; install libtorch-cuda)");
        try { return torch.device(name); }
        catch (Exception e) { throw new SettingsException($"bad device '{name}': {e.Message}"); }
    }
}
