using Akka.Actor;
using Mamo.Actors.Run;
using Mamo.Actors.Sources;
using Mamo.Data;
using Mamo.Model;
using Serilog;
using TorchSharp;
using static TorchSharp.torch;

namespace Mamo.Actors.Pipeline;

/// <summary>The student, the objective and the optimiser, loaded from a checkpoint when the actor starts (so a new
/// incarnation starts from durable state, never from a stale object). Trains on each batch it is sent, hands the
/// teacher (where the objective keeps one) its new weights, and at checkpoint time sends its parts to the
/// checkpointer. Fine-tuning evaluates the student: GetWeights gets a copy of it, its objective's parts and state.
/// A cluster replica's batches come in rounds (docs/CLUSTER.md): the steps of a round wait for its weights
/// (LoadRound), and the round's work goes back to whoever sent them: after its last step the trained weights
/// (DiLoCo), or, where its batch is a shard of a global batch (every-step), the step's gradient.</summary>
public sealed class Trainer : ReceiveActor, IWithUnboundedStash
{
    /// <summary>Train step Step on a batch. Position: the stream records the batch covers. The trainer owns (and
    /// disposes) the batch and the targets. Batch null: the round ended with too few usable pairs for a step.</summary>
    public sealed record Train(long Step, Batch? Batch, TeacherTargets? Targets, StreamPosition Position, Round? Round = null, bool EndsRound = false)
    {
        /// <summary>The reservoir after this batch (its checkpoint saves it); null: no replay.</summary>
        public ReplayBuffer? Replay { get; init; }
        /// <summary>The ids of the batch's replayed records (the last of its Ids).</summary>
        public string[] Replayed { get; init; } = [];
    }
    /// <summary>Reply to Train; Position is where the stream stands after this step. Labels: each pair's, where the
    /// stream has them (the ledger sets them beside the step's predictions). Result null: nothing was trained (a round
    /// end without a batch, or a round that was given up).</summary>
    public sealed record StepCompleted(StepResult? Result, StreamPosition Position, string[] Ids, int NonFiniteInARow, IReadOnlyList<string?>? Labels = null,
        Round? Round = null, string[]? Replayed = null);
    /// <summary>Send a checkpoint's parts now unless the last one covers this step (a replica: hand in the round in
    /// hand); the reply is CheckpointComing.</summary>
    public sealed record CheckpointNow;
    /// <summary>Step: the step whose checkpoint is on its way; null: none is (a replica with no round in hand).</summary>
    public sealed record CheckpointComing(long? Step);

    /// <summary>A round's weights ("student.", "teacher." and the objective's parts, as MamoTrainer.Weights names them)
    /// and the objective's state; Shard: where its batch is a shard of a global batch (every-step), whose weights, where
    /// given, are a MamoTrainer.ReplicaState with AdamW at OptimizerStep, and where not, are the replica's own after the
    /// update of the step before. CheckHash: the round's account carries the hash of the replica state it starts from.
    /// TeacherStep: the updates the teacher's weights hold (null: the round's first step's). The trainer owns the tensors.</summary>
    public sealed record LoadRound(Round Round, IReadOnlyList<(string Name, Tensor Value)> Weights, IReadOnlyDictionary<string, string> State, IBatchShard? Shard,
        long OptimizerStep = 0, bool CheckHash = false, long? TeacherStep = null);
    /// <summary>The round will get no weights (its coordinator gave it up): its steps are dropped.</summary>
    public sealed record GiveUpRound(long Attempt);
    /// <summary>A round's work, to the sender of its LoadRound: the pairs trained, the stream position they reach, the
    /// mean loss and terms of the steps not skipped, what the objective observed, and the tensors: the weights after
    /// its last step (DiLoCo), or the step's gradient (a shard), named as MamoTrainer.Weights names them. Partial: the
    /// round was cut short (the node stops). The receiver owns the tensors.</summary>
    public sealed record RoundTrained(Round Round, long Step, long Samples, StreamPosition Position, double Loss, IReadOnlyDictionary<string, double> Terms,
        IReadOnlyDictionary<string, string> Observations, IReadOnlyList<(string Name, Tensor Value)> Tensors, bool Partial)
    {
        /// <summary>MamoTrainer.ReplicaHash of the state the round started from, where LoadRound asked; "" otherwise.</summary>
        public string Hash { get; init; } = "";
    }
    /// <summary>every-step: the step's gradients, one per replica in node order (this replica's among them), to sum and
    /// apply as the update one process would make; Report: StepApplied tells the sender what the update measured;
    /// ReportState: a StateReport of the state after it follows. The trainer owns the tensors.</summary>
    public sealed record ApplyStep(long Attempt, IReadOnlyList<IReadOnlyList<(string Name, Tensor Value)>> Gradients, bool Report, bool ReportState = false);
    /// <summary>Reply to an ApplyStep that reports: the update's learning rate and gradient norm, or that it skipped.</summary>
    public sealed record StepApplied(long Attempt, double GradNorm, bool Skipped, double LearningRate);
    /// <summary>every-step: a StateReport, tagged Request, of the state after the last update made.</summary>
    public sealed record ReportState(long Request);
    /// <summary>An every-step replica's state after Step steps (copies of MamoTrainer.ReplicaState: θ, the objective's
    /// parts, AdamW's moments), AdamW at OptimizerStep, the objective's State. The teacher, where there is one, sends the
    /// sender its part after folding in that student (Checkpointer.Parts). The receiver owns the tensors.</summary>
    public sealed record StateReport(long Request, long Step, long OptimizerStep, IReadOnlyDictionary<string, string> State, IReadOnlyList<(string Name, Tensor Value)> Tensors);

    /// <summary>Too many non-finite losses in a row: the run stops rather than restarts.</summary>
    public sealed class DivergedException(string message) : Exception(message);

    public IStash Stash { get; set; } = null!;

    readonly MamoTrainer trainer;
    readonly IActorRef? teacher;
    readonly IActorRef checkpointer;
    readonly MamoSettings settings;
    readonly Tensor[] studentParameters;
    readonly System.Diagnostics.Stopwatch sinceCheckpoint = System.Diagnostics.Stopwatch.StartNew();
    readonly string? replicaDir;
    readonly HashSet<long> givenUp = [];
    StreamPosition position;
    /// <summary>The reservoir as of the last step trained; null: the run replays nothing.</summary>
    ReplayBuffer? replay;
    long lastCheckpointStep;
    int nonFiniteInARow;
    /// <summary>A replica's round in hand, who sent its weights, and what it has trained so far.</summary>
    (Round Round, IActorRef From, IBatchShard? Shard, RoundWork Work)? round;
    /// <summary>The step a replica's optimiser state stands at (-1: fresh).</summary>
    long optimizerAt = -1;
    /// <summary>every-step: the attempt whose gradient was handed in and whose update (ApplyStep) is still to come.</summary>
    long? awaitingUpdate;
    /// <summary>every-step: the step of the last gradient handed in, whose replicas say how far its update moves the teacher.</summary>
    Round? updated;
    /// <summary>The hash the round in hand hands in (LoadRound.CheckHash).</summary>
    string roundHash = "";

    sealed class RoundWork
    {
        public long Samples, Steps;
        public StreamPosition Position = StreamPosition.None;
        public readonly List<double> Losses = [];
        public readonly Dictionary<string, List<double>> Terms = [];
    }

    /// <param name="checkpoint">the checkpoint to start from (a new run's is step 0); null: a replica's fresh trainer,
    /// which takes its weights from each round</param>
    /// <param name="teacher">the momentum teacher; null when the objective keeps none</param>
    /// <param name="seed">the seed of its step randomness (a DiLoCo replica's mixes in its node)</param>
    /// <param name="replicaDir">a replica's own run folder, whose checkpoints keep its optimiser state; null: a single node</param>
    public Trainer(MamoSettings settings, Func<MamoConfig, IObjective> objective, string? checkpoint, Device device, IActorRef? teacher, IActorRef checkpointer,
        int seed, string? replicaDir = null)
    {
        trainer = checkpoint is null
            ? new MamoTrainer(settings.Model, settings.Optimizer, device, seed, withTeacher: false, objective)
            : MamoTrainer.Load(checkpoint, settings.Optimizer, device, seed, withTeacher: false, config: settings.Model, objective);
        var state = checkpoint is null ? null : Checkpoint.ReadState(checkpoint);
        position = state is null ? StreamPosition.None : StreamPosition.FromExtra(state.Extra);
        lastCheckpointStep = trainer.Step;
        if (checkpoint is not null && replicaDir is not null) optimizerAt = trainer.Step;
        this.teacher = teacher;
        this.checkpointer = checkpointer;
        this.settings = settings;
        this.replicaDir = replicaDir;
        studentParameters = trainer.Student.parameters().Select(p => (Tensor)p).ToArray();
        // A pipelined teacher's checkpoint is one update behind the student's: hand it the update it lacks.
        if (state is not null && replicaDir is null && state.TeacherStep < trainer.Step) teacher?.Tell(new MomentumTeacher.StudentUpdated(trainer.Step, CopyStudent()));

        Receive<Train>(t =>
        {
            if (t.Round is { } r && givenUp.Contains(r.Attempt))
            {
                Dispose(t);
                Sender.Tell(new StepCompleted(null, t.Position, [], nonFiniteInARow, Round: r));
                return;
            }
            if (t.Round is { } next && round?.Round.Attempt != next.Attempt)
            {
                Stash.Stash();   // its round's weights are on their way
                return;
            }
            try { Sender.Tell(TrainStep(t)); }
            catch (Exception e) when (Dropped(e))
            {
                Log.Information("step {Step} of round {Round} dropped: its coordinator gave it up, or this node stops", t.Step, t.Round?.Number);
                // Its update is never made: the every-step steps given after it are given up as they load, so that a
                // node that stops drains the steps in flight and leaves. (A Train reaches here only with its round in hand.)
                if (round is { Shard: not null } held)
                {
                    round = null;
                    GiveUp(held.Round.Attempt);
                    Stash.UnstashAll();
                }
                Sender.Tell(new StepCompleted(null, t.Position, [], nonFiniteInARow, Round: t.Round));
            }
            catch (Exception e) { Sender.Tell(new Status.Failure(e)); }   // the stream fails: the pipeline restarts from durable state
            finally { Dispose(t); }
        });
        Receive<LoadRound>(OnLoadRound);
        Receive<ApplyStep>(OnApplyStep);
        Receive<ReportState>(r => Report(r.Request));
        Receive<GiveUpRound>(g =>
        {
            GiveUp(g.Attempt);
            Stash.UnstashAll();
        });
        Receive<Evaluator.GetWeights>(g => Sender.Tell(new Evaluator.Weights(g.Step, trainer.Step,
            trainer.Parts().Where(p => p.Name != Checkpoint.OptimizerPart)
                .SelectMany(p => p.Tensors.Select(t => (p.Name == Checkpoint.StudentPart ? t.Name : $"{p.Name}.{t.Name}", Tensors.Copy(t.Value))))
                .ToArray(),
            trainer.Objective.SaveState())));
        Receive<CheckpointNow>(_ =>
        {
            if (replicaDir is not null)
            {
                // A replica that stops hands in the round in hand: its steps are not lost.
                Sender.Tell(new CheckpointComing(round is { Work.Steps: > 0 } r ? HandIn(r.Round, partial: true) : null));
                return;
            }
            if (trainer.Step != lastCheckpointStep) SendParts();
            Sender.Tell(new CheckpointComing(trainer.Step));
        });
    }

    public static Props Props(MamoSettings settings, Func<MamoConfig, IObjective> objective, string? checkpoint, Device device, IActorRef? teacher,
        IActorRef checkpointer, int seed, string? replicaDir = null) =>
        Akka.Actor.Props.Create(() => new Trainer(settings, objective, checkpoint, device, teacher, checkpointer, seed, replicaDir)).WithDispatcher(Dispatchers.Model);

    void GiveUp(long attempt)
    {
        givenUp.Add(attempt);
        if (awaitingUpdate == attempt) awaitingUpdate = null;
        teacher?.Tell(new MomentumTeacher.GiveUpRound(attempt));   // after: its null targets reach a trainer that drops them
    }

    static bool Dropped(Exception e) =>
        e is OperationCanceledException || e is AggregateException a && a.Flatten().InnerExceptions.All(x => x is OperationCanceledException);

    StepCompleted TrainStep(Train t)
    {
        if (t.Step != trainer.Step) throw new InvalidOperationException($"batch for step {t.Step} reached a trainer at step {trainer.Step}");
        if (settings.FailAtStep is { } fail && t.Step == fail && FaultInjected.TryClaim())
            throw new InvalidOperationException($"supervision.fail-at-step: the fault injected at step {t.Step}");
        var b = t.Batch;
        var shard = round?.Shard;
        StepResult? result = null;
        // One pair is no step for ITC and ITM unless the rest of the global batch is elsewhere. The batcher adds a round's
        // last pair to the batch before it; only a round of one owned pair leaves it alone.
        if (b is { Size: < 2 } && shard is null)
            Log.Warning("step {Step}: {Id} is a round's only pair, and one pair is no step for ITC and ITM: it is not trained", t.Step, b.Ids[0]);
        else if (b is not null)
            using (var scope = NewDisposeScope())
            {
                var keys = tensor(b.Ids.Select(Seeds.StableHash).ToArray());
                var input = new StepInput(b.Images, b.TokenIds, b.AttentionMask, keys, b.Labels, shard);
                result = shard is null ? trainer.StudentStep(input, t.Targets) : trainer.Gradient(input, t.Targets);
            }
        position = position.Merge(t.Position);
        replay = t.Replay ?? replay;
        if (result is not null)
        {
            nonFiniteInARow = result.Skipped ? nonFiniteInARow + 1 : 0;
            if (nonFiniteInARow >= settings.MaxNonFiniteSteps)
                throw new DivergedException($"{nonFiniteInARow} non-finite losses in a row (last at step {result.Step}): the run diverged; lower optimizer.learning-rate or check the data");
        }
        if (round is { } r)
        {
            r.Work.Position = r.Work.Position.Merge(t.Position);
            if (result is not null) Count(r.Work, result, b!.Size);
            if (t.EndsRound || shard is not null) HandIn(r.Round, partial: false);
            else if (result is not null) teacher?.Tell(new MomentumTeacher.StudentUpdated(trainer.Step, CopyStudent(), Round: r.Round));
        }
        else if (result is not null)
        {
            var due = settings.CheckpointEverySteps > 0 && trainer.Step % settings.CheckpointEverySteps == 0
                   || settings.CheckpointEvery > TimeSpan.Zero && sinceCheckpoint.Elapsed >= settings.CheckpointEvery;
            if (due) SendParts();
            else teacher?.Tell(new MomentumTeacher.StudentUpdated(trainer.Step, CopyStudent()));
        }
        return new StepCompleted(result, position, b?.Ids ?? [], nonFiniteInARow, b?.Labels, t.Round, t.Replayed);
    }

    static void Count(RoundWork work, StepResult result, int pairs)
    {
        work.Steps++;
        work.Samples += pairs;
        if (result.Skipped) return;
        work.Losses.Add(result.Loss);
        foreach (var (name, value) in result.Terms) (work.Terms.TryGetValue(name, out var l) ? l : work.Terms[name] = []).Add(value);
    }

    /// <summary>A round's weights, state and (where they changed) optimiser state: the replica's side of "load θ".</summary>
    void OnLoadRound(LoadRound l)
    {
        var goesOn = l.Shard is not null && l.Weights.Count == 0;
        if (goesOn && (round is not null || awaitingUpdate is not null) && !givenUp.Contains(l.Round.Attempt))
        {
            Stash.Stash();   // the step before, given ahead of this one, and its update come first
            return;
        }
        try
        {
            if (givenUp.Contains(l.Round.Attempt)) return;
            // What this replica's objective admitted in its last round: how its moments are laid out now (a DiLoCo round
            // lays them out as its own; every-step's replicas hold the coordinator's layout all along).
            var observed = l.Shard is null ? trainer.Objective.Observations() : null;
            if (goesOn && trainer.Step < l.Round.FirstStep)
            {
                // The step before was given up without its update: its coordinator drops every step in flight at once.
                Log.Information("step {Step} given up with the step before it", l.Round.FirstStep);
                GiveUp(l.Round.Attempt);
                return;
            }
            if (goesOn && trainer.Step != l.Round.FirstStep)
                throw new InvalidOperationException($"step {l.Round.FirstStep} reached an every-step replica at step {trainer.Step}");
            if (!goesOn)
            {
                var weights = l.Weights.ToDictionary(w => w.Name, w => w.Value);
                trainer.Objective.LoadState(l.State);
                if (l.Shard is null) trainer.LoadWeights(weights);
                else
                {
                    trainer.LoadReplicaState(weights, l.OptimizerStep);
                    awaitingUpdate = null;   // the state given replaces the update of the step before
                }
                foreach (var part in trainer.Objective.Parts.Values) part.to(trainer.Device);
            }
            trainer.StartAt(l.Round.FirstStep, l.Round.Replicas, l.Round.Schedule);
            // The optimiser goes on from the step the round starts at: from memory after the round before, else from this
            // replica's checkpoint of that step (a restart, a round given again), else fresh; its moments follow the
            // objective's parts into the round's layout (a head's rows in the coordinator's order of its classes).
            if (l.Shard is null)
            {
                if (optimizerAt == l.Round.FirstStep) trainer.Optimizer.Remap((name, moment) => trainer.Objective.Align(name, moment, observed!));
                else LoadOptimizer(l.Round.FirstStep);
            }
            trainer.Objective.StartObserving();
            var teacherWeights = l.Weights.Where(w => w.Name.StartsWith(MamoTrainer.TeacherPrefix))
                .Select(w => (w.Name[MamoTrainer.TeacherPrefix.Length..], Tensors.Copy(w.Value))).ToArray();
            if (teacherWeights.Length > 0) teacher?.Tell(new MomentumTeacher.Reset(l.Round, teacherWeights, l.TeacherStep ?? l.Round.FirstStep));
            // Every-step's teacher gets the student it holds (the update of the step before) and folds it in as its lag
            // says; already folded where the round brought a teacher of this step.
            teacher?.Tell(new MomentumTeacher.StudentUpdated(l.Round.FirstStep, CopyStudent(), Round: l.Round));
            round = (l.Round, Sender, l.Shard, new RoundWork());
            roundHash = l.CheckHash ? trainer.ReplicaHash() : "";
            position = StreamPosition.None;
        }
        finally
        {
            foreach (var (_, t) in l.Weights) t.Dispose();
        }
        Stash.UnstashAll();
    }

    /// <summary>every-step: the step's update from every replica's gradient, summed in node order so that every replica
    /// adds the same numbers in the same order and makes the same update, bit for bit.</summary>
    void OnApplyStep(ApplyStep a)
    {
        try
        {
            if (awaitingUpdate != a.Attempt) return;   // its round was given up
            awaitingUpdate = null;
            using var scope = NewDisposeScope();
            var sum = new Dictionary<string, Tensor>();
            // In place, into the first replica's tensors (each is this step's own: its bytes went out when it was sent):
            // the same bits as s + g, without a fresh copy of the model's size each step.
            foreach (var gradient in a.Gradients)
                foreach (var (name, g) in gradient)
                    if (sum.TryGetValue(name, out var s)) s.add_(g);
                    else sum[name] = g;
            trainer.SetGradients(sum);
            // The step's loss is the coordinator's to report; a non-finite one came as a NaN gradient, which skips here.
            var result = trainer.Update(0, new Dictionary<string, double>());
            if (a.Report) Sender.Tell(new StepApplied(a.Attempt, result.GradNorm, result.Skipped, result.LearningRate));
            if (a.ReportState) Report(a.Attempt);
        }
        finally
        {
            foreach (var gradient in a.Gradients) foreach (var (_, g) in gradient) g.Dispose();
            Stash.UnstashAll();
        }
    }

    /// <summary>every-step: the state after the last update, to the sender; the teacher folds that student in first
    /// (a no-op where the step that followed brought it) and sends its part there too.</summary>
    void Report(long request)
    {
        var state = trainer.ReplicaState().Select(w => (w.Name, Tensors.Copy(w.Value))).ToList();
        teacher?.Tell(new MomentumTeacher.StudentUpdated(trainer.Step, CopyStudent(), SnapshotTo: Sender, Round: updated));
        Sender.Tell(new StateReport(request, trainer.Step, trainer.Optimizer.Step, trainer.Objective.SaveState(), state));
    }

    void LoadOptimizer(long step)
    {
        // This replica's own checkpoint of the step, else the run's where a synchronous run (every-step, one node) wrote
        // it: a DiLoCo run that goes on from one starts with its AdamW, as that run would have gone on.
        var dir = new[] { replicaDir!, settings.RunDir }.Select(d => Path.Combine(d, Checkpoint.RunFolder, Checkpoint.StepFolderName(step)))
            .FirstOrDefault(d => File.Exists(Path.Combine(d, Checkpoint.StateFile)) && File.Exists(Path.Combine(d, Checkpoint.OptimizerFile)));
        if (dir is not null)
        {
            var state = Checkpoint.ReadState(dir);
            var saved = Checkpoint.LoadPart(Path.Combine(dir, Checkpoint.OptimizerFile));
            try
            {
                // Saved in the layout of the round that ended there, with what it observed: laid out as this round's.
                using var scope = NewDisposeScope();
                var aligned = saved.ToDictionary(kv => kv.Key, kv => trainer.Objective.Align(kv.Key[2..], kv.Value, state.Extra));
                trainer.Optimizer.LoadState(aligned, state.OptimizerStep);
            }
            finally { foreach (var t in saved.Values) t.Dispose(); }
            Log.Information("optimizer state of step {Step} loaded from {Checkpoint}", step, dir);
        }
        else if (optimizerAt >= 0) Log.Information("no optimizer state of step {Step} in {Dir}: the one of step {At} goes on", step, replicaDir, optimizerAt);
        optimizerAt = step;
    }

    /// <summary>The round's work to whoever sent its weights; the teacher sends its part there too (DiLoCo), and the
    /// optimiser state goes to this replica's own checkpoint. Returns the step it hands in at.</summary>
    long HandIn(Round r, bool partial)
    {
        var (_, from, shard, work) = round!.Value;
        round = null;
        var tensors = shard is null ? trainer.Weights().Select(w => (w.Name, Tensors.Copy(w.Value))).ToList() : trainer.Gradients();
        // A shard with no finite loss sends NaN: every replica's sum is then NaN and each skips the step, as one process would.
        if (shard is not null && work.Losses.Count == 0)
        {
            using TorchSharp.Scalar nan = double.NaN;   // explicit: an implicit Scalar may be finalised during the call
            foreach (var (_, g) in tensors) g.fill_(nan);
        }
        var step = trainer.Step;
        from.Tell(new RoundTrained(r, step, work.Samples, work.Position, work.Losses.Count == 0 ? double.NaN : work.Losses.Average(),
            work.Terms.ToDictionary(t => t.Key, t => t.Value.Average()), trainer.Objective.Observations(), tensors, partial) { Hash = roundHash });
        if (shard is not null)
        {
            awaitingUpdate = r.Attempt;
            updated = r;
            return step;
        }
        teacher?.Tell(new MomentumTeacher.StudentUpdated(step, CopyStudent(), SnapshotTo: from, Round: r, FoldAll: true));
        optimizerAt = step;
        // With what the objective observed in the round: the layout of the moments of its parts.
        checkpointer.Tell(new Checkpointer.Parts(step, [new Checkpoint.Part(Checkpoint.OptimizerPart, trainer.Optimizer.State().Select(t => (t.Name, Tensors.Copy(t.Value))).ToArray())],
            work.Position, trainer.Optimizer.Step, Extra: trainer.Objective.Observations()));
        return step;
    }

    /// <summary>The new student goes to the teacher (which then sends its own part) and this trainer's parts to the
    /// checkpointer; all carry the same step.</summary>
    void SendParts()
    {
        sinceCheckpoint.Restart();
        lastCheckpointStep = trainer.Step;
        teacher?.Tell(new MomentumTeacher.StudentUpdated(trainer.Step, CopyStudent(), SnapshotTo: checkpointer));
        var parts = trainer.Parts().Select(p => new Checkpoint.Part(p.Name, p.Tensors.Select(t => (t.Name, Tensors.Copy(t.Value))).ToArray()))
            .Concat(replay is null ? [] : [replay.ToPart()]).ToArray();
        checkpointer.Tell(new Checkpointer.Parts(trainer.Step, parts, position, trainer.Optimizer.Step, Extra: trainer.Objective.SaveState()));
    }

    Tensor[] CopyStudent() => studentParameters.Select(Tensors.Copy).ToArray();

    static void Dispose(Train t)
    {
        t.Batch?.Dispose();
        t.Targets?.Dispose();
    }

    protected override void PostStop()
    {
        trainer.Dispose();
        base.PostStop();
    }
}

/// <summary>supervision.fail-at-step fires once per process: the restarted pipeline then gets past that step.</summary>
static class FaultInjected
{
    static int claimed;
    public static bool TryClaim() => Interlocked.Exchange(ref claimed, 1) == 0;
}
