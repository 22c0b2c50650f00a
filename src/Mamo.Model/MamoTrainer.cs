using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace Mamo.Model;

/// <summary>The outcome of one training step, as plain numbers.</summary>
/// <param name="Scores">the objective's running scores after this step's predictions; empty: none</param>
/// <param name="Predictions">each pair's prediction, made before this step's update; null: the objective makes none</param>
public sealed record StepResult(long Step, double Loss, IReadOnlyDictionary<string, double> Terms, double LearningRate, double GradNorm, bool Skipped)
{
    public IReadOnlyDictionary<string, double> Scores { get; init; } = new Dictionary<string, double>();
    public IReadOnlyList<string>? Predictions { get; init; }
}

/// <summary>Student, objective, optimiser (and, in the bare loop, the momentum teacher), and the step that ties them
/// together. Every random choice of step s (masks, ITM negatives) derives from (seed, s), so a resumed run repeats an
/// uninterrupted one.</summary>
public sealed class MamoTrainer : IDisposable
{
    public MamoModel Student { get; }
    public IObjective Objective { get; }
    /// <summary>The momentum teacher, when this trainer owns one (the bare loop); the actor system keeps it in its own actor.</summary>
    public MamoModel Teacher => teacher ?? throw new InvalidOperationException("this trainer has no teacher of its own");
    readonly MamoModel? teacher;
    /// <summary>AdamW over the trained parameters, made on first use: a coordinator that only holds θ makes none.</summary>
    public AdamW Optimizer => adamW ??= new AdamW(Objective.TrainedParameters(Student), OptimizerConfig);
    AdamW? adamW;
    public OptimizerConfig OptimizerConfig { get; }
    public Device Device { get; }
    public int Seed { get; }
    /// <summary>Steps taken so far (the index of the next step).</summary>
    public long Step { get; private set; }

    /// <param name="objective">what a step computes; null: MAMO pre-training with the default settings</param>
    public MamoTrainer(MamoConfig config, OptimizerConfig optimizer, Device device, int seed, bool withTeacher = true, Func<MamoConfig, IObjective>? objective = null)
    {
        Seed = seed;
        Device = device;
        OptimizerConfig = optimizer;
        Student = MamoModel.Seeded(config, seed);
        Student.to(device);
        Objective = objective?.Invoke(config) ?? new MamoPretraining(config, new PretrainingConfig());
        foreach (var part in Objective.Parts.Values) part.to(device);
        if (withTeacher && Objective.TeacherMomentum is not null) teacher = Momentum.CreateTeacher(Student);
    }

    public MamoConfig Config => Student.Config;

    /// <summary>How far the learning-rate schedule moves with each step: 1, but N for one of a cluster's N replicas,
    /// so that warm-up and decay follow the samples the whole cluster has trained, as one node's follow its own.</summary>
    public int ScheduleStride { get; private set; } = 1;
    /// <summary>Where the schedule stood at step scheduleFirst: the steps of one node's batch the run had trained before it.</summary>
    long scheduleFirst, scheduleOrigin;

    /// <summary>The learning rate of a step: one node's schedule at the last of the ScheduleStride steps it stands for,
    /// counted on from where the round started it. A wsd cool-down ends at max-steps of every replica: ScheduleStride
    /// times one node's.</summary>
    public double LearningRateAt(long step) => (ScheduleStride == 1 ? OptimizerConfig : OptimizerConfig with { TotalSteps = OptimizerConfig.TotalSteps * ScheduleStride })
        .LearningRateAt(scheduleOrigin + (step - scheduleFirst + 1) * ScheduleStride - 1);

    /// <summary>Sets the step (and so the learning-rate schedule and the step seeds) to where a cluster round starts: a
    /// replica takes each round's first step from its coordinator, a round given again included, the number of replicas
    /// that train it beside this one (<paramref name="stride"/>), and the steps of one node's batch the cluster has
    /// trained before it (<paramref name="schedule"/>; the samples, not the steps, so that a replica lost or joined moves
    /// the schedule on from where it was).</summary>
    public void StartAt(long step, int stride, long schedule)
    {
        Step = scheduleFirst = step;
        ScheduleStride = stride;
        scheduleOrigin = schedule;
    }

    public int MaskSeed(long step) => Seeds.Mix(Seed, step);

    /// <summary>One complete step of the bare loop: teacher targets, the objective's losses, AdamW, then the EMA update.</summary>
    public StepResult TrainStep(Tensor images, Tensor tokenIds, Tensor attentionMask, Tensor? imageKeys = null)
    {
        using var scope = NewDisposeScope();
        var batch = new StepInput(images, tokenIds, attentionMask, imageKeys);
        TeacherTargets? targets = Objective.NeedsTargets ? Objective.Targets(Teacher, batch) : null;
        var result = StudentStep(batch, targets);
        FollowStudent();   // every step, skipped or not, as the actor pipeline does
        return result;
    }

    /// <summary>The EMA update of this trainer's own teacher towards the student.</summary>
    public void FollowStudent()
    {
        // A step of ScheduleStride steps' samples moves the EMA as that many steps of one node would.
        if (teacher is not null) Momentum.Update(teacher, Student, Math.Pow(Objective.TeacherMomentum!.Value, ScheduleStride));
    }

    /// <summary>The student's half of a step, given the teacher's targets (which may come from another thread).
    /// A non-finite loss skips the update and leaves the weights untouched.</summary>
    public StepResult StudentStep(StepInput batch, TeacherTargets? targets)
    {
        var (loss, terms) = Backward(batch, targets);
        return Update(loss, terms);
    }

    /// <summary>The forward and backward of the next step, leaving its gradient in the trained parameters (none where
    /// the loss is not finite). Every-step replicas stop here and send the gradient on.</summary>
    public (double Loss, IReadOnlyDictionary<string, double> Terms) Backward(StepInput batch, TeacherTargets? targets)
    {
        using var scope = NewDisposeScope();
        Student.train();
        foreach (var part in Objective.Parts.Values) part.train();
        foreach (var (_, p) in Objective.TrainedParameters(Student)) p.grad?.zero_();
        using var loss = Objective.Loss(Student, batch, targets, MaskSeed(Step));
        var total = loss.Total.ToDouble();
        if (double.IsFinite(total)) loss.Total.backward();
        predictions = (loss.Scores, loss.Predictions);
        return (total, loss.Terms.ToDictionary(t => t.Key, t => t.Value.ToDouble()));
    }

    /// <summary>A data-parallel replica's share of step Step (every-step, docs/CLUSTER.md): the forward and backward of its
    /// shard of the global batch, whose gradient the trained parameters then hold. The update is the coordinator's, so
    /// the step does not advance here.</summary>
    public StepResult Gradient(StepInput shard, TeacherTargets? targets)
    {
        var (loss, terms) = Backward(shard, targets);
        var (scores, predicted) = predictions;
        predictions = default;
        return new StepResult(Step, loss, terms, LearningRateAt(Step), double.NaN, Skipped: !double.IsFinite(loss))
        {
            Scores = scores ?? new Dictionary<string, double>(), Predictions = predicted,
        };
    }

    /// <summary>What the last Backward's objective predicted, for the step result Update makes.</summary>
    (IReadOnlyDictionary<string, double>? Scores, IReadOnlyList<string>? Predictions) predictions;

    /// <summary>Ends the step whose gradient the trained parameters hold: clipping and AdamW, or a skip where the loss
    /// or the gradient is not finite.</summary>
    public StepResult Update(double loss, IReadOnlyDictionary<string, double> terms)
    {
        var step = Step++;
        var lr = LearningRateAt(step);
        var (scores, predicted) = predictions;
        predictions = default;
        StepResult Result(double gradNorm, bool skipped) => new(step, loss, terms, lr, gradNorm, skipped)
        {
            Scores = scores ?? new Dictionary<string, double>(), Predictions = predicted,
        };
        if (!double.IsFinite(loss)) return Result(double.NaN, skipped: true);
        var gradNorm = Optimizer.ClipGradients();
        if (!double.IsFinite(gradNorm))
        {
            Optimizer.ZeroGrad();
            return Result(gradNorm, skipped: true);
        }
        Optimizer.Apply(lr);
        Student.ClampTemperature();
        return Result(gradNorm, skipped: false);
    }

    /// <summary>The checkpoint parts this trainer holds (views, not copies): student, optimizer, the objective's own
    /// parts, and the teacher where it owns one.</summary>
    public IEnumerable<Checkpoint.Part> Parts()
    {
        yield return new(Checkpoint.StudentPart, Checkpoint.Named(Student));
        yield return new(Checkpoint.OptimizerPart, Optimizer.State().ToList());
        foreach (var (name, module) in Objective.Parts) yield return new(name, Checkpoint.Named(module));
        if (teacher is not null) yield return new(Checkpoint.TeacherPart, Checkpoint.Named(teacher));
    }

    public const string StudentPrefix = "student.", TeacherPrefix = "teacher.";

    /// <summary>The weights a cluster round starts from and hands in (views), under names that say whose:
    /// "student.NAME", "PART.NAME" for the objective's own parts, and "teacher.NAME" where this trainer keeps the teacher.</summary>
    public IEnumerable<(string Name, Tensor Value)> Weights()
    {
        foreach (var (name, p) in Student.named_parameters()) yield return (StudentPrefix + name, p);
        foreach (var (part, module) in Objective.Parts)
            foreach (var (name, p) in module.named_parameters()) yield return ($"{part}.{name}", p);
        if (teacher is not null) foreach (var (name, p) in teacher.named_parameters()) yield return (TeacherPrefix + name, p);
    }

    public const string OptimizerPrefix = "optimizer.";

    /// <summary>What an every-step replica holds between steps (views): Weights, and AdamW's moments as "optimizer.NAME".</summary>
    public IEnumerable<(string Name, Tensor Value)> ReplicaState() =>
        Weights().Concat(Optimizer.State().Select(t => (OptimizerPrefix + t.Name, t.Value)));

    /// <summary>Loads a ReplicaState, AdamW at <paramref name="optimizerStep"/> (the teacher's weights are left to whoever keeps it).</summary>
    public void LoadReplicaState(IReadOnlyDictionary<string, Tensor> state, long optimizerStep)
    {
        LoadWeights(state);
        Optimizer.LoadState(state.Where(s => s.Key.StartsWith(OptimizerPrefix)).ToDictionary(s => s.Key[OptimizerPrefix.Length..], s => s.Value), optimizerStep);
    }

    /// <summary>The hash of what every-step's replicas must hold bit for bit alike: the student, the objective's parts and
    /// AdamW's moments (ReplicaState without the teacher).</summary>
    public string ReplicaHash() => Checkpoint.WeightHash(ReplicaState().Where(w => !w.Name.StartsWith(TeacherPrefix)));

    /// <summary>Loads weights named as Weights names them: every student and part parameter must be there, and the
    /// teacher's where this trainer keeps one; a part's tensor of another shape takes its place (a head with the classes
    /// of another replica).</summary>
    public void LoadWeights(IReadOnlyDictionary<string, Tensor> weights)
    {
        using var noGrad = no_grad();
        foreach (var (name, p) in Weights())
        {
            if (!weights.TryGetValue(name, out var given)) throw new InvalidDataException($"the weights lack '{name}'");
            if (given.shape.SequenceEqual(p.shape)) p.copy_(given);
            else if (!name.StartsWith(StudentPrefix) && !name.StartsWith(TeacherPrefix)) p.set_(given.to(p.device).clone());
            else throw new InvalidDataException($"'{name}' has shape [{string.Join(",", given.shape)}], the model [{string.Join(",", p.shape)}]");
        }
    }

    /// <summary>The gradient the last Backward left in each trained parameter (copies on the CPU), named as Weights names them.</summary>
    public List<(string Name, Tensor Value)> Gradients()
    {
        // The scope holds each temporary (grad, detach, cpu) until the copies are made: one that nothing references may
        // be finalised by the GC while libtorch still reads it.
        using var scope = NewDisposeScope();
        var trained = Objective.TrainedParameters(Student).Select(p => p.Parameter).ToHashSet(ReferenceEqualityComparer.Instance);
        return Weights().Where(w => trained.Contains(w.Value) && w.Value.grad is not null)
            .Select(w => (w.Name, w.Value.grad!.detach().cpu().clone().DetachFromDisposeScope())).ToList();
    }

    /// <summary>Sets each trained parameter's gradient from tensors named as Weights names them (none where absent).</summary>
    public void SetGradients(IReadOnlyDictionary<string, Tensor> gradients)
    {
        var trained = Objective.TrainedParameters(Student).Select(p => p.Parameter).ToHashSet(ReferenceEqualityComparer.Instance);
        using var noGrad = no_grad();
        foreach (var (name, p) in Weights())
            if (trained.Contains(p)) ((Parameter)p).grad = gradients.TryGetValue(name, out var g) ? g.to(p.device) : null;
    }

    public void Save(string dir, IReadOnlyDictionary<string, string>? extra = null) =>
        Checkpoint.Save(dir, Config, Parts(), new Checkpoint.State(Step, Optimizer.Step, Step, Extra(extra)));

    /// <summary>The checkpoint's caller state: <paramref name="extra"/> and the objective's own.</summary>
    public Dictionary<string, string> Extra(IReadOnlyDictionary<string, string>? extra = null)
    {
        var all = extra?.ToDictionary() ?? new();
        foreach (var (k, v) in Objective.SaveState()) all[k] = v;
        return all;
    }

    /// <summary>Restores a trainer exactly as it was saved; without a teacher, only the student, the objective's parts
    /// and the optimiser. A config, if given, must have the checkpoint's architecture; its training settings (loss
    /// weights, mask ratios, momentum) then replace the saved ones.</summary>
    public static MamoTrainer Load(string dir, OptimizerConfig optimizer, Device device, int seed, bool withTeacher = true, MamoConfig? config = null,
        Func<MamoConfig, IObjective>? objective = null)
    {
        var saved = Checkpoint.ReadConfig(dir);
        if (config is not null && !saved.SameArchitecture(config))
            throw new InvalidDataException($"{dir} holds a model of another architecture than the one configured:\n{saved.ToJson()}");
        var trainer = new MamoTrainer(config ?? saved, optimizer, device, seed, withTeacher, objective);
        try
        {
            trainer.Objective.LoadState(Checkpoint.ReadState(dir).Extra);
            Checkpoint.LoadModel(dir, Checkpoint.StudentFile, trainer.Student);
            foreach (var (name, module) in trainer.Objective.Parts) Checkpoint.LoadModel(dir, Checkpoint.PartFile(name), module);
            if (trainer.teacher is not null) Checkpoint.LoadModel(dir, Checkpoint.TeacherFile, trainer.teacher);
            Checkpoint.LoadOptimizer(dir, trainer.Optimizer);
            trainer.Step = Checkpoint.ReadState(dir).Step;
            return trainer;
        }
        catch
        {
            trainer.Dispose();
            throw;
        }
    }

    public void Dispose()
    {
        adamW?.Dispose();
        Student.Dispose();
        Objective.Dispose();
        teacher?.Dispose();
    }
}
