using System.Text.Json;
using System.Text.RegularExpressions;
using static TorchSharp.torch;

namespace Mamo.Model;

/// <summary>A training checkpoint in one directory: config.json, state.json (step and caller state such as
/// source positions), and student/teacher/optimizer as safetensors. Atomicity (write elsewhere, then rename)
/// belongs to the caller; this class fsyncs every file it writes.</summary>
public static class Checkpoint
{
    public const string ConfigFile = "config.json", StateFile = "state.json";
    public const string StudentFile = "student.safetensors", TeacherFile = "teacher.safetensors", OptimizerFile = "optimizer.safetensors";
    /// <summary>A run directory keeps its checkpoints in this folder, one per step.</summary>
    public const string RunFolder = "checkpoints";
    const int StepDigits = 12;

    /// <summary>The folder name of step <paramref name="step"/>'s checkpoint in a run directory: zero-padded, so names sort by step.</summary>
    public static string StepFolderName(long step) => $"step-{step.ToString($"D{StepDigits}")}";

    static readonly Regex StepFolder = new($"^step-(\\d{{{StepDigits}}})$");

    /// <summary>
    /// A checkpoint folder to load: <paramref name="path"/> itself if it holds a config.json, else the newest complete
    /// checkpoint of the run directory <paramref name="path"/> (complete: its state.json, written last, exists;
    /// unfinished *.tmp folders do not match). Null if there is none.
    /// </summary>
    public static string? Latest(string path) =>
        File.Exists(Path.Combine(path, ConfigFile)) ? Path.GetFullPath(path) : Complete(path).FirstOrDefault();

    /// <summary>The complete checkpoints of a run directory, newest first.</summary>
    public static IEnumerable<string> Complete(string runDir)
    {
        var folder = Path.Combine(runDir, RunFolder);
        if (!Directory.Exists(folder)) return [];
        return Directory.EnumerateDirectories(folder)
            .Select(dir => (dir, match: StepFolder.Match(Path.GetFileName(dir))))
            .Where(d => d.match.Success && File.Exists(Path.Combine(d.dir, StateFile)))
            .OrderByDescending(d => long.Parse(d.match.Groups[1].Value))
            .Select(d => Path.GetFullPath(d.dir))
            .ToList();
    }

    /// <param name="Step">steps the student has taken</param>
    /// <param name="TeacherStep">steps folded into the teacher's EMA (Step - 1 when targets are pipelined)</param>
    /// <param name="Extra">caller state, such as source positions</param>
    public sealed record State(long Step, long OptimizerStep, long TeacherStep, Dictionary<string, string> Extra);

    public static void Save(string dir, MamoConfig config, IEnumerable<(string Name, Tensor Value)> student,
        IEnumerable<(string Name, Tensor Value)> teacher, IEnumerable<(string Name, Tensor Value)> optimizer, State state)
    {
        Directory.CreateDirectory(dir);
        SafeTensors.Save(Path.Combine(dir, StudentFile), student);
        SafeTensors.Save(Path.Combine(dir, TeacherFile), teacher);
        SafeTensors.Save(Path.Combine(dir, OptimizerFile), optimizer);
        WriteDurably(Path.Combine(dir, ConfigFile), config.ToJson());
        WriteDurably(Path.Combine(dir, StateFile), JsonSerializer.Serialize(state));
    }

    public static IEnumerable<(string Name, Tensor Value)> Named(MamoModel model) =>
        model.named_parameters().Select(p => (p.name, (Tensor)p.parameter));

    public static MamoConfig ReadConfig(string dir) => MamoConfig.FromJson(File.ReadAllText(Path.Combine(dir, ConfigFile)));

    public static State ReadState(string dir) =>
        JsonSerializer.Deserialize<State>(File.ReadAllText(Path.Combine(dir, StateFile))) ?? throw new InvalidDataException($"{dir}: empty state.json");

    /// <summary>Copies a saved model's tensors into a model of the same config.</summary>
    public static void LoadModel(string dir, string file, MamoModel model)
    {
        var tensors = SafeTensors.Load(Path.Combine(dir, file));
        try
        {
            using var noGrad = no_grad();
            foreach (var (name, p) in model.named_parameters())
            {
                if (!tensors.TryGetValue(name, out var saved)) throw new InvalidDataException($"{dir}/{file} lacks '{name}'");
                if (!saved.shape.SequenceEqual(p.shape))
                    throw new InvalidDataException($"{dir}/{file}: '{name}' has shape [{string.Join(",", saved.shape)}], the model [{string.Join(",", p.shape)}]");
                p.copy_(saved);
            }
        }
        finally
        {
            foreach (var t in tensors.Values) t.Dispose();
        }
    }

    public static void LoadOptimizer(string dir, AdamW optimizer)
    {
        var tensors = SafeTensors.Load(Path.Combine(dir, OptimizerFile));
        try { optimizer.LoadState(tensors, ReadState(dir).OptimizerStep); }
        finally { foreach (var t in tensors.Values) t.Dispose(); }
    }

    public static void WriteDurably(string path, string text)
    {
        using var file = new FileStream(path, FileMode.Create, FileAccess.Write, FileShare.None);
        using (var writer = new StreamWriter(file, leaveOpen: true)) writer.Write(text);
        file.Flush(flushToDisk: true);
    }
}
