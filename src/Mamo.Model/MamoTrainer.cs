using TorchSharp;
using static TorchSharp.torch;

namespace Mamo.Model;

/// <summary>The outcome of one training step, as plain numbers.</summary>
public sealed record StepResult(long Step, double Loss, IReadOnlyDictionary<string, double> Terms, double LearningRate, double GradNorm, bool Skipped);

/// <summary>Student, momentum teacher and optimiser, and the step that ties them together. Every random choice of
/// step s (masks, ITM negatives) derives from (seed, s), so a resumed run repeats an uninterrupted one.</summary>
public sealed class MamoTrainer : IDisposable
{
    public MamoModel Student { get; }
    /// <summary>The momentum teacher, when this trainer owns one (the bare loop); the actor system keeps it in its own actor.</summary>
    public MamoModel Teacher => teacher ?? throw new InvalidOperationException("this trainer has no teacher of its own");
    readonly MamoModel? teacher;
    public AdamW Optimizer { get; }
    public OptimizerConfig OptimizerConfig { get; }
    public Device Device { get; }
    public int Seed { get; }
    /// <summary>Steps taken so far (the index of the next step).</summary>
    public long Step { get; private set; }

    public MamoTrainer(MamoConfig config, OptimizerConfig optimizer, Device device, int seed, bool withTeacher = true)
    {
        Seed = seed;
        Device = device;
        OptimizerConfig = optimizer;
        manual_seed(seed);
        Student = new MamoModel(config);
        Student.to(device);
        if (withTeacher) teacher = Momentum.CreateTeacher(Student);
        Optimizer = new AdamW(Student.named_parameters().Select(p => (p.name, p.parameter)), optimizer);
    }

    public MamoConfig Config => Student.Config;

    public int MaskSeed(long step) => Seeds.Mix(Seed, step);

    /// <summary>One complete step: teacher targets, student losses, AdamW, then the EMA update.</summary>
    public StepResult TrainStep(Tensor images, Tensor tokenIds, Tensor attentionMask, Tensor? imageKeys = null)
    {
        using var scope = NewDisposeScope();
        var w = Config.Weights;
        TeacherTargets? targets = w.Mim > 0 || w.Mrm > 0 ? Teacher.Targets(images.to(Device), tokenIds.to(Device), attentionMask.to(Device)) : null;
        var result = StudentStep(images, tokenIds, attentionMask, targets, imageKeys);
        Momentum.Update(Teacher, Student, Config.MomentumDecay);   // every step, skipped or not, as the actor pipeline does
        return result;
    }

    /// <summary>The student's half of a step, given the teacher's targets (which may come from another thread).
    /// A non-finite loss skips the update and leaves the weights untouched.</summary>
    public StepResult StudentStep(Tensor images, Tensor tokenIds, Tensor attentionMask, TeacherTargets? targets, Tensor? imageKeys = null)
    {
        using var scope = NewDisposeScope();
        var step = Step;
        var lr = OptimizerConfig.LearningRateAt(step);
        using var cpuMask = JointMasking.Sample(Config, tokenIds, attentionMask, MaskSeed(step));
        using var mask = cpuMask.To(Device);
        using var generator = new Generator((ulong)MaskSeed(step), Device);
        Student.train();
        Optimizer.ZeroGrad();
        using var loss = Student.Forward(images.to(Device), tokenIds.to(Device), attentionMask.to(Device), mask, targets, imageKeys?.to(Device), generator);
        var total = loss.Total.ToDouble();
        var terms = loss.Terms.ToDictionary(t => t.Key, t => t.Value.ToDouble());
        Step++;
        if (!double.IsFinite(total)) return new StepResult(step, total, terms, lr, double.NaN, Skipped: true);
        loss.Total.backward();
        var gradNorm = Optimizer.ClipGradients();
        if (!double.IsFinite(gradNorm))
        {
            Optimizer.ZeroGrad();
            return new StepResult(step, total, terms, lr, gradNorm, Skipped: true);
        }
        Optimizer.Apply(lr);
        Student.ClampTemperature();
        return new StepResult(step, total, terms, lr, gradNorm, Skipped: false);
    }

    public void Save(string dir, IReadOnlyDictionary<string, string>? extra = null) =>
        Checkpoint.Save(dir, Config, Checkpoint.Named(Student), Checkpoint.Named(Teacher), Optimizer.State(),
            new Checkpoint.State(Step, Optimizer.Step, Step, extra?.ToDictionary() ?? new()));

    /// <summary>Restores a trainer exactly as it was saved; without a teacher, only the student and optimiser.
    /// A config, if given, must have the checkpoint's architecture; its training settings (loss weights, mask
    /// ratios, momentum) then replace the saved ones.</summary>
    public static MamoTrainer Load(string dir, OptimizerConfig optimizer, Device device, int seed, bool withTeacher = true, MamoConfig? config = null)
    {
        var saved = Checkpoint.ReadConfig(dir);
        if (config is not null && !saved.SameArchitecture(config))
            throw new InvalidDataException($"{dir} holds a model of another architecture than the one configured:\n{saved.ToJson()}");
        var trainer = new MamoTrainer(config ?? saved, optimizer, device, seed, withTeacher);
        Checkpoint.LoadModel(dir, Checkpoint.StudentFile, trainer.Student);
        if (withTeacher) Checkpoint.LoadModel(dir, Checkpoint.TeacherFile, trainer.Teacher);
        Checkpoint.LoadOptimizer(dir, trainer.Optimizer);
        trainer.Step = Checkpoint.ReadState(dir).Step;
        return trainer;
    }

    public void Dispose()
    {
        Optimizer.Dispose();
        Student.Dispose();
        teacher?.Dispose();
    }
}
