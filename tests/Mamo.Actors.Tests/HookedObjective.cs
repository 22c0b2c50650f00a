using Mamo.Model;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;
using static TorchSharp.torch.nn;

namespace Mamo.Actors.Tests;

/// <summary>A product objective with a hook before each step's loss, on the trainer's thread: a test holds the trainer at
/// a known step there, where timing alone would let it run on. Everything else is the inner objective's.</summary>
sealed class HookedObjective(IObjective inner, Action beforeLoss) : IObjective
{
    public double? TeacherMomentum => inner.TeacherMomentum;
    public bool NeedsTargets => inner.NeedsTargets;
    public IReadOnlyDictionary<string, Module> Parts => inner.Parts;
    public IEnumerable<(string Name, Parameter Parameter)> TrainedParameters(MamoModel student) => inner.TrainedParameters(student);
    public TeacherTargets Targets(MamoModel teacher, StepInput batch) => inner.Targets(teacher, batch);

    public MamoLoss Loss(MamoModel student, StepInput batch, TeacherTargets? targets, int seed)
    {
        beforeLoss();
        return inner.Loss(student, batch, targets, seed);
    }

    public IReadOnlyDictionary<string, string> SaveState() => inner.SaveState();
    public void LoadState(IReadOnlyDictionary<string, string> state) => inner.LoadState(state);
    public IReadOnlyDictionary<string, double> Scores() => inner.Scores();
    public string? NotShardable => inner.NotShardable;
    public void StartObserving() => inner.StartObserving();
    public IReadOnlyDictionary<string, string> Observations() => inner.Observations();
    public void Replay(IReadOnlyDictionary<string, string> observations) => inner.Replay(observations);
    public Tensor Align(string name, Tensor value, IReadOnlyDictionary<string, string> observations) => inner.Align(name, value, observations);
    public void Dispose() => inner.Dispose();
}
