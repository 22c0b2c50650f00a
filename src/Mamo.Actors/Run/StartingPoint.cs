using System.Globalization;
using Mamo.Actors.Pipeline;
using Mamo.Actors.Sources;
using Mamo.Model;
using Serilog;
using static TorchSharp.torch;

namespace Mamo.Actors.Run;

/// <summary>Where a run starts: the newest checkpoint of its folder that verifies (a resume: one that does not is
/// skipped with a warning, the one before it is whole), or, for a new run, step 0, written now from the weights of
/// --init (another run's checkpoint, or an import's) or from the seed. Every actor of a pipeline starts from a
/// checkpoint on disk; a coordinator resumes from the same.</summary>
public static class StartingPoint
{
    /// <summary>The newest checkpoint of the run folder these settings can resume; null: none, a new run. A checkpoint
    /// of another seed or architecture is a settings error that says what to do.</summary>
    public static (string Dir, Checkpoint.State State)? Resume(MamoSettings s)
    {
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
            catch (Exception e) when (e is IOException or InvalidDataException or System.Text.Json.JsonException or FormatException)
            {
                Log.Warning("checkpoint {Checkpoint} cannot be loaded ({Error}); trying the one before", dir, e.Message);
            }
        }
        return null;
    }

    /// <summary>The checkpoint a pipeline starts from: the newest to resume, or a new run's step 0, written now.</summary>
    public static (string Dir, Checkpoint.State State) Choose(MamoSettings s, Func<MamoConfig, IObjective> objective, string? init, Device device)
    {
        if (Resume(s) is { } resumed) return resumed;
        using var trainer = new MamoTrainer(s.Model, s.Optimizer, device, s.Seed, withTeacher: true, objective);
        if (init is not null) StartFrom(init, trainer);
        var fresh = new Checkpoint.State(0, 0, 0, trainer.Extra(SeedState(s)));
        // The reservoir comes along from --init: what the model learned before stays replayable in its next stage.
        var replay = s.Replay.On ? init is null ? ReplayBuffer.Empty(s.Replay, s.Seed) : ReplayBuffer.Load(init, s.Replay, s.Seed) : null;
        if (init is not null && replay is { Seen: > 0 }) Log.Information("the replay reservoir of {Init} comes along: {Replay}", init, replay);
        var replayPart = replay?.ToPart();
        string path;
        try { path = Checkpoint.Commit(s.RunDir, s.Model, replayPart is null ? trainer.Parts() : [.. trainer.Parts(), replayPart], fresh, s.KeepLast); }
        finally { foreach (var (_, t) in replayPart?.Tensors ?? []) t.Dispose(); }
        Log.Information("new run in {RunDir}: {Preset} preset, {Parameters:N0} parameters, batch {Batch}, device {Device}{From}",
            s.RunDir, s.Preset, trainer.Student.parameters().Sum(p => p.numel()), s.BatchSize, device, init is null ? "" : $", from {init}");
        return (path, Checkpoint.ReadState(path));
    }

    /// <summary>The state every checkpoint of a run keeps: its seed, which a resume must match.</summary>
    public static Dictionary<string, string> SeedState(MamoSettings s) => new() { [Checkpointer.SeedKey] = s.Seed.ToString(CultureInfo.InvariantCulture) };

    /// <summary>A new run's student (and teacher) take the weights of <paramref name="dir"/>'s student (and teacher,
    /// where it has one, else a copy). The objective's own parts and state come too where <paramref name="dir"/> holds
    /// all of them (fine-tuning a fine-tuned model further: the next domain of a drift stream); the optimiser starts fresh.</summary>
    public static void StartFrom(string dir, MamoTrainer trainer)
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
}
