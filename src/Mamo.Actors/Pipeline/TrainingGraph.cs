using Akka;
using Akka.Actor;
using Akka.Streams;
using Akka.Streams.Dsl;
using Mamo.Actors.Run;
using Mamo.Actors.Sources;
using Mamo.Data;
using Mamo.Model;

namespace Mamo.Actors.Pipeline;

/// <summary>The training stream: source ─► preprocess (parallel) ─► batches ─► teacher targets ─► step ─► metrics and
/// evaluator. Every edge backpressures, so a slow trainer slows the readers. It knows nothing of resume, restarts,
/// stop or budget: the run's lifecycle (TrainingRun) gives it a start and a step count, and stops it with the kill
/// switch it materialises. A cluster replica's source marks rounds on its records: a batch never spans two, and a
/// round's last record ends its last batch, however few pairs that holds.</summary>
public static class TrainingGraph
{
    /// <summary>Mixed into the run's seed for per-sample randomness (crops, caption picks), apart from the step seeds.</summary>
    const int PreprocessSeedSalt = 0x5eed;

    /// <summary>The randomness of one record's preprocessing (crop, caption pick): seeded by its place in its stream,
    /// so it repeats on resume and on any node.</summary>
    public static Random SampleRandom(int seed, SourcePosition at) => new(Seeds.Mix(seed ^ PreprocessSeedSalt ^ Seeds.StableHash(at.Source), at.Offset));

    /// <summary>Where the graph starts and what it talks to.</summary>
    /// <param name="Teacher">asked for targets when NeedsTargets; null when the objective has no teacher</param>
    /// <param name="Evaluator">told EvaluateNow every eval.every-steps; null: none</param>
    /// <param name="OnRead">called for every record taken from the source</param>
    /// <param name="Admit">the task's check of each record before it is prepared: the sample to prepare, or why the
    /// record is a dead letter</param>
    /// <param name="Replay">the reservoir the run replays from, as of StartStep; null: no replay</param>
    public sealed record Stages(ITrainingSource Source, SamplePreparer Preparer, StreamPosition Resume, long StartStep, long Steps, bool NeedsTargets,
        IActorRef? Teacher, IActorRef Trainer, IActorRef Metrics, IActorRef? Evaluator, Action OnRead,
        Func<ImageTextSample, (ImageTextSample? Sample, string? Reason)> Admit, ReplayBuffer? Replay = null);

    /// <summary>A record after the preprocess stage: its sample (and the admitted record it was prepared from), or why
    /// it is a dead letter.</summary>
    sealed record Prepared(Positioned Record, (PreparedSample Sample, ImageTextSample Admitted)? Good, BadInput? Bad);

    public static IRunnableGraph<(UniqueKillSwitch, Task<Done>)> Build(MamoSettings s, Stages g)
    {
        var batches = g.Source.Open(g.Resume)
            .Select(x => { g.OnRead(); return x; })
            .SelectAsync(s.PreprocessParallelism, x => Task.Run(() => Prepare(s, g, x)))
            .StatefulSelectMany(() => Batcher(s, g))
            .Take(g.Steps)
            .Buffer(s.BufferedBatches, OverflowStrategy.Backpressure)
            .ViaMaterialized(KillSwitches.Single<Trainer.Train>(), Keep.Right);

        var teacher = g.NeedsTargets ? g.Teacher ?? throw new ArgumentException("the objective needs targets but the run has no teacher") : null;
        // Two async stages: while the trainer works on step t, the teacher already computes the targets of t+1.
        var trained = s.TeacherPipelined || teacher is null
            ? batches.SelectAsync(1, t => Targets(teacher, t)).SelectAsync(1, t => g.Trainer.Ask<Trainer.StepCompleted>(t))
            : batches.SelectAsync(1, async t => await g.Trainer.Ask<Trainer.StepCompleted>(await Targets(teacher, t)));

        return trained
            .Select(done =>
            {
                if (done.Result is not { } result) return done;
                g.Metrics.Tell(done);
                var stepsDone = result.Step + 1;
                if (g.Evaluator is not null && s.EvalEverySteps > 0 && stepsDone % s.EvalEverySteps == 0) g.Evaluator.Tell(new Evaluator.EvaluateNow(stepsDone));
                return done;
            })
            .ToMaterialized(Sink.Ignore<Trainer.StepCompleted>(), Keep.Both);
    }

    static Prepared Prepare(MamoSettings s, Stages g, Positioned x)
    {
        if (x.Item is not SampleItem { Sample: var sample }) return new Prepared(x, null, ((BadItem)x.Item).Bad);
        var (admitted, reason) = g.Admit(sample);
        if (admitted is null) return new Prepared(x, null, new BadInput(reason!, sample.Location, sample.Position));
        return g.Preparer.TryPrepareForTraining(admitted, SampleRandom(s.Seed, x.At), out var p, out var bad)
            ? new Prepared(x, (p!, admitted), null) : new Prepared(x, null, bad);
    }

    /// <summary>Groups prepared records into batches of batch-size pairs. A batch's position covers every record since
    /// the previous batch, dead letters included, so a checkpoint acknowledges those too. A round's steps are numbered
    /// from its first step; a single node's from where the run starts. Within a round each full batch waits for the
    /// next: a round that ends one pair after it (records dropped as not owned, a short share) puts that pair in it,
    /// since one pair alone is no step for ITC and ITM and would be acknowledged untrained. With replay, a batch's
    /// fresh records leave room for the ones it replays, and then enter the reservoir.</summary>
    static Func<Prepared, IEnumerable<Trainer.Train>> Batcher(MamoSettings s, Stages g)
    {
        var group = new List<(PreparedSample Sample, ImageTextSample Admitted)>(s.BatchSize);
        var position = StreamPosition.None;
        (List<(PreparedSample, ImageTextSample)> Group, StreamPosition Position)? held = null;
        var step = g.StartStep;
        Round? round = null;
        var replay = g.Replay;
        var fresh = s.BatchSize - (replay?.ToReplay(s.BatchSize) ?? 0);
        Trainer.Train Batch(List<(PreparedSample Sample, ImageTextSample Admitted)> records, StreamPosition at, bool ends)
        {
            var samples = records.Select(r => r.Sample).ToList();
            string[] replayed = [];
            if (replay is not null)
            {
                (var more, replayed) = Replayed(s, g.Preparer, replay, step, records.Select(r => r.Admitted.Id).ToHashSet());
                samples.AddRange(more);
                replay = replay.Offer(records.Select(r => r.Admitted));
                fresh = s.BatchSize - replay.ToReplay(s.BatchSize);
            }
            return new(step++, samples.Count == 0 ? null : Collator.Collate(samples, s.Model.ImageSize), null, at, round, ends)
            {
                Replay = replay, Replayed = replayed,
            };
        }
        return p =>
        {
            var record = p.Record;
            if (record.Round is { } r && r.Attempt != round?.Attempt) (round, step, held) = (r, r.FirstStep, null);
            // Read before a rebalance moved its partition to another member, which reads it again: not ours to train.
            if (g.Source.Take(record))
            {
                position = position.Advance(record.At);
                if (record.Mix is { } drawn) position = position.Advance(drawn);
                if (p.Bad is not null)
                {
                    if (g.Source.DeadLetter(record, p.Bad)) g.Metrics.Tell(new Metrics.DeadLetter(p.Bad));
                }
                else group.Add(p.Good!.Value);
            }
            if (group.Count < fresh && !record.EndsRound) return [];
            var batches = new List<Trainer.Train>(2);
            if (record.EndsRound && group.Count == 1 && held is { } last)
            {
                batches.Add(Batch([.. last.Group, .. group], last.Position.Merge(position), ends: true));
                held = null;
            }
            else
            {
                if (held is { } h) batches.Add(Batch(h.Group, h.Position, ends: false));
                held = null;
                if (record.Round is not null && !record.EndsRound) held = (group, position);
                else batches.Add(Batch(group, position, record.EndsRound));
            }
            (group, position) = (new(s.BatchSize), StreamPosition.None);
            return batches;
        };
    }

    /// <summary>Step <paramref name="step"/>'s replayed records, prepared (in parallel, as the preprocess stage does),
    /// and their ids. One that can no longer be prepared (tighter decode limits since) is left out.</summary>
    static (IEnumerable<PreparedSample> Samples, string[] Ids) Replayed(MamoSettings s, SamplePreparer preparer, ReplayBuffer replay, long step,
        IReadOnlySet<string> inBatch)
    {
        var drawn = replay.Draw(step, replay.ToReplay(s.BatchSize), inBatch);
        var prepared = new PreparedSample?[drawn.Count];
        Parallel.For(0, drawn.Count, new ParallelOptions { MaxDegreeOfParallelism = s.PreprocessParallelism },
            i => prepared[i] = preparer.TryPrepareForTraining(drawn[i], replay.PrepareRandom(step, i), out var p, out _) ? p : null);
        return (prepared.OfType<PreparedSample>(), drawn.Where((_, i) => prepared[i] is not null).Select(r => r.Id).ToArray());
    }

    static async Task<Trainer.Train> Targets(IActorRef? teacher, Trainer.Train t)
    {
        if (teacher is null || t.Batch is not { } b) return t;
        var ready = await teacher.Ask<MomentumTeacher.TargetsReady>(
            new MomentumTeacher.ComputeTargets(t.Step, Tensors.Copy(b.Images), Tensors.Copy(b.TokenIds), Tensors.Copy(b.AttentionMask), t.Round));
        return t with { Targets = ready.Targets };
    }
}
