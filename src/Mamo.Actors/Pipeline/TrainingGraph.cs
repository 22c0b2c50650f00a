using Akka;
using Akka.Actor;
using Akka.Streams;
using Akka.Streams.Dsl;
using Mamo.Data;
using Mamo.Model;
using Mamo.Actors.Sources;
using Mamo.Actors.Run;

namespace Mamo.Actors.Pipeline;

/// <summary>The training stream: source ─► preprocess (parallel) ─► batches ─► teacher targets ─► step ─► metrics and
/// evaluator. Every edge backpressures, so a slow trainer slows the readers. It knows nothing of resume, restarts,
/// stop or budget: the run's lifecycle (TrainingRun) gives it a start and a step count, and stops it with the kill
/// switch it materialises.</summary>
public static class TrainingGraph
{
    /// <summary>Mixed into the run's seed for per-sample randomness (crops, caption picks), apart from the step seeds.</summary>
    const int PreprocessSeedSalt = 0x5eed;

    /// <summary>Where the graph starts and what it talks to.</summary>
    /// <param name="Teacher">asked for targets when NeedsTargets; null when the objective has no teacher</param>
    /// <param name="Evaluator">told EvaluateNow every eval.every-steps; null: none</param>
    /// <param name="OnRead">called for every record taken from the source</param>
    /// <summary>The randomness of one record's preprocessing (crop, caption pick): seeded by its place in its stream,
    /// so it repeats on resume and on any node.</summary>
    public static Random SampleRandom(int seed, string partition, long offset) =>
        new(Seeds.Mix(seed ^ PreprocessSeedSalt ^ Seeds.StableHash(partition), offset));

    /// <param name="Admit">a task's check of each record before it is prepared (FineTuning.Admission): the sample to
    /// prepare, or why the record is a dead letter; null: every record is prepared as it is</param>
    public sealed record Stages(ITrainingSource Source, SamplePreparer Preparer, StreamPosition Resume, long StartStep, long Steps, bool NeedsTargets,
        IActorRef? Teacher, IActorRef Trainer, IActorRef Metrics, IActorRef? Evaluator, Action OnRead,
        Func<ImageTextSample, (ImageTextSample? Sample, string? Reason)>? Admit = null);

    sealed record Prepared(Positioned Record, PreparedSample? Sample, BadInput? Bad);
    sealed record Collated(long Step, Batch Batch, StreamPosition Position);
    sealed record WithTargets(Collated Input, TeacherTargets? Targets);

    public static IRunnableGraph<(UniqueKillSwitch, Task<Done>)> Build(MamoSettings s, Stages g)
    {
        var stepOffset = g.StartStep;
        var batches = g.Source.Open(g.Resume)
            .Select(x => { g.OnRead(); return x; })
            .SelectAsync(s.PreprocessParallelism, x => Task.Run(() =>
            {
                if (x.Item is not SampleItem { Sample: var sample }) return new Prepared(x, null, ((BadItem)x.Item).Bad);
                if (g.Admit is not null)
                {
                    var (admitted, reason) = g.Admit(sample);
                    if (admitted is null) return new Prepared(x, null, new BadInput(reason!, sample.Location, sample.Position));
                    sample = admitted;
                }
                return g.Preparer.TryPrepareForTraining(sample, SampleRandom(s.Seed, x.Partition, x.Offset), out var p, out var bad)
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
                        g.Metrics.Tell(new Metrics.DeadLetter(p.Bad));
                        g.Source.DeadLetter(p.Record, p.Bad);
                        return [];
                    }
                    group.Add(p.Sample!);
                    if (group.Count < s.BatchSize) return [];
                    var full = (group, position);
                    (group, position) = (new List<PreparedSample>(s.BatchSize), StreamPosition.None);
                    return [full];
                };
            })
            .Take(g.Steps)
            .Select(b => new Collated(stepOffset++, Collator.Collate(b.Samples, s.Model.ImageSize), b.Position))
            .Buffer(s.BufferedBatches, OverflowStrategy.Backpressure)
            .ViaMaterialized(KillSwitches.Single<Collated>(), Keep.Right);

        var teacher = g.NeedsTargets ? g.Teacher ?? throw new ArgumentException("the objective needs targets but the run has no teacher") : null;
        // Two async stages: while the trainer works on step t, the teacher already computes the targets of t+1.
        var trained = s.TeacherPipelined || teacher is null
            ? batches.SelectAsync(1, async c => new WithTargets(c, teacher is null ? null : await Targets(teacher, c)))
                     .SelectAsync(1, w => Train(g.Trainer, w))
            : batches.SelectAsync(1, async c => await Train(g.Trainer, new WithTargets(c, await Targets(teacher, c))));

        return trained
            .Select(done =>
            {
                g.Metrics.Tell(done);
                var stepsDone = done.Result.Step + 1;
                if (g.Evaluator is not null && s.EvalEverySteps > 0 && stepsDone % s.EvalEverySteps == 0) g.Evaluator.Tell(new Evaluator.EvaluateNow(stepsDone));
                return done;
            })
            .ToMaterialized(Sink.Ignore<Trainer.StepCompleted>(), Keep.Both);
    }

    static async Task<TeacherTargets> Targets(IActorRef teacher, Collated c)
    {
        var b = c.Batch;
        var ready = await teacher.Ask<MomentumTeacher.TargetsReady>(
            new MomentumTeacher.ComputeTargets(c.Step, Tensors.Copy(b.Images), Tensors.Copy(b.TokenIds), Tensors.Copy(b.AttentionMask)));
        return ready.Targets;
    }

    static Task<Trainer.StepCompleted> Train(IActorRef trainer, WithTargets w) =>
        trainer.Ask<Trainer.StepCompleted>(new Trainer.Train(w.Input.Step, w.Input.Batch, w.Targets, w.Input.Position));
}
