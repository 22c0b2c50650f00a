using System.Runtime.InteropServices;
using System.Text.Json;
using System.Text.RegularExpressions;
using TorchSharp;
using static TorchSharp.torch;

namespace Mamo.Model;

/// <summary>A training checkpoint in one directory: config.json, state.json (step, the names of its parts, and
/// caller state such as source positions), and one safetensors file per named part: student, teacher, optimizer,
/// a task head, an outer optimizer... Commit writes one durably: into step-N.tmp, fsynced, renamed, the parent
/// fsynced, so a kill at any moment leaves the previous checkpoint whole.</summary>
public static class Checkpoint
{
    public const string ConfigFile = "config.json", StateFile = "state.json";
    public const string StudentPart = "student", TeacherPart = "teacher", OptimizerPart = "optimizer";
    public static readonly string StudentFile = PartFile(StudentPart), TeacherFile = PartFile(TeacherPart), OptimizerFile = PartFile(OptimizerPart);
    /// <summary>A run directory keeps its checkpoints in this folder, one per step.</summary>
    public const string RunFolder = "checkpoints";
    const int StepDigits = 12;

    /// <summary>One named part: its tensors by name (views; Save reads them).</summary>
    public sealed record Part(string Name, IReadOnlyList<(string Name, Tensor Value)> Tensors);

    public static string PartFile(string part) => part + ".safetensors";

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
    /// <param name="Parts">the parts saved; null in checkpoints written before parts were named (student, teacher, optimizer)</param>
    public sealed record State(long Step, long OptimizerStep, long TeacherStep, Dictionary<string, string> Extra, IReadOnlyList<string>? Parts = null);

    static readonly string[] FirstParts = [StudentPart, TeacherPart, OptimizerPart];

    /// <summary>The parts a checkpoint holds.</summary>
    public static IReadOnlyList<string> Parts(State state) => state.Parts ?? FirstParts;

    public static void Save(string dir, MamoConfig config, IEnumerable<Part> parts, State state)
    {
        Directory.CreateDirectory(dir);
        var names = new List<string>();
        foreach (var part in parts)
        {
            SafeTensors.Save(Path.Combine(dir, PartFile(part.Name)), part.Tensors);
            names.Add(part.Name);
        }
        WriteDurably(Path.Combine(dir, ConfigFile), config.ToJson());
        WriteDurably(Path.Combine(dir, StateFile), JsonSerializer.Serialize(state with { Parts = names }));
    }

    /// <summary>Writes step <paramref name="state"/>.Step's checkpoint into a run directory durably, then keeps the
    /// newest <paramref name="keepLast"/>; returns its folder. A checkpoint already complete there is kept as it is.</summary>
    public static string Commit(string runDir, MamoConfig config, IEnumerable<Part> parts, State state, int keepLast)
    {
        var root = Path.Combine(runDir, RunFolder);
        Directory.CreateDirectory(root);
        var final = Path.Combine(root, StepFolderName(state.Step));
        if (Directory.Exists(final) && File.Exists(Path.Combine(final, StateFile))) return final;   // already durable
        var temp = final + ".tmp";
        if (Directory.Exists(temp)) Directory.Delete(temp, recursive: true);
        Save(temp, config, parts, state);
        FsyncDirectory(temp);
        if (Directory.Exists(final)) Directory.Delete(final, recursive: true);   // a leftover without state.json
        Directory.Move(temp, final);
        FsyncDirectory(root);
        var complete = Directory.GetDirectories(root, "step-*").Where(d => !d.EndsWith(".tmp")).Order().ToList();
        foreach (var old in complete.Take(Math.Max(0, complete.Count - keepLast))) Directory.Delete(old, recursive: true);
        foreach (var stale in Directory.GetDirectories(root, "step-*.tmp")) Directory.Delete(stale, recursive: true);
        return final;
    }

    /// <summary>A rename is durable only once its directory is flushed.</summary>
    static void FsyncDirectory(string dir)
    {
        if (!OperatingSystem.IsLinux()) return;
        int fd = open(dir, 0 /* O_RDONLY */);
        if (fd < 0) throw new IOException($"cannot open {dir} to flush it (errno {Marshal.GetLastPInvokeError()})");
        try { if (fsync(fd) != 0) throw new IOException($"fsync of {dir} failed (errno {Marshal.GetLastPInvokeError()})"); }
        finally { close(fd); }
    }

    [DllImport("libc", SetLastError = true)] static extern int open([MarshalAs(UnmanagedType.LPUTF8Str)] string path, int flags);
    [DllImport("libc", SetLastError = true)] static extern int fsync(int fd);
    [DllImport("libc")] static extern int close(int fd);

    /// <summary>SHA-256 over the tensors' names and bytes in ordinal name order: the same weights give the same hash on
    /// any node, so a log line can show which θ a replica started from.</summary>
    public static string WeightHash(IEnumerable<(string Name, Tensor Value)> tensors)
    {
        using var sha = System.Security.Cryptography.IncrementalHash.CreateHash(System.Security.Cryptography.HashAlgorithmName.SHA256);
        foreach (var (name, value) in tensors.OrderBy(t => t.Name, StringComparer.Ordinal))
        {
            using var scope = NewDisposeScope();
            sha.AppendData(System.Text.Encoding.UTF8.GetBytes(name));
            sha.AppendData(value.detach().cpu().contiguous().bytes);
        }
        return Convert.ToHexString(sha.GetHashAndReset())[..16].ToLowerInvariant();
    }

    public static IReadOnlyList<(string Name, Tensor Value)> Named(nn.Module module) =>
        module.named_parameters().Select(p => (p.name, (Tensor)p.parameter)).ToList();

    /// <summary>Reads the state and config and checks every part's header against its file, without loading a tensor:
    /// what can be known of a checkpoint before its owners load it. Throws IOException, InvalidDataException or
    /// JsonException.</summary>
    public static State Verify(string dir)
    {
        var state = ReadState(dir);
        ReadConfig(dir);
        foreach (var part in Parts(state)) SafeTensors.Check(Path.Combine(dir, PartFile(part)));
        return state;
    }

    public static MamoConfig ReadConfig(string dir) => MamoConfig.FromJson(File.ReadAllText(Path.Combine(dir, ConfigFile)));

    public static State ReadState(string dir) =>
        JsonSerializer.Deserialize<State>(File.ReadAllText(Path.Combine(dir, StateFile))) ?? throw new InvalidDataException($"{dir}: empty state.json");

    /// <summary>Parameter names as checkpoints written before the MLPs were named modules spell them, and today's.</summary>
    static readonly (string Old, string New)[] Renamed =
        [(".mlp.0.", ".mlp.fc."), (".mlp.2.", ".mlp.proj."), ("mlmTransform.0.", "mlmTransform.dense."), ("mlmTransform.2.", "mlmTransform.norm.")];

    /// <summary>A part's tensors under today's parameter names, whichever version wrote them.</summary>
    public static Dictionary<string, Tensor> LoadPart(string path) =>
        SafeTensors.Load(path).ToDictionary(kv => Renamed.Aggregate(kv.Key, (name, r) => name.Replace(r.Old, r.New)), kv => kv.Value);

    /// <summary>Copies a saved part's tensors into a module of the same shape.</summary>
    public static void LoadModel(string dir, string file, nn.Module model)
    {
        var tensors = LoadPart(Path.Combine(dir, file));
        try { Load(model, tensors, $"{dir}/{file}"); }
        finally
        {
            foreach (var t in tensors.Values) t.Dispose();
        }
    }

    /// <summary>Copies named tensors into a module's parameters of the same names and shapes; <paramref name="origin"/>
    /// names them in an error.</summary>
    public static void Load(nn.Module model, IReadOnlyDictionary<string, Tensor> tensors, string origin)
    {
        using var noGrad = no_grad();
        foreach (var (name, p) in model.named_parameters())
        {
            if (!tensors.TryGetValue(name, out var saved)) throw new InvalidDataException($"{origin} lacks '{name}'");
            if (!saved.shape.SequenceEqual(p.shape))
                throw new InvalidDataException($"{origin}: '{name}' has shape [{string.Join(",", saved.shape)}], the model [{string.Join(",", p.shape)}]");
            p.copy_(saved);
        }
    }

    /// <summary>Which of a checkpoint's models inference uses unless told: its momentum teacher where it keeps one (the
    /// model pre-training evaluates and publishes), else its student (a fine-tuned classifier keeps no teacher).</summary>
    public static string InferencePart(string dir) => Parts(ReadState(dir)).Contains(TeacherPart) ? TeacherPart : StudentPart;

    /// <summary>A checkpoint's model for inference, on <paramref name="device"/> in eval mode: <paramref name="part"/>
    /// (student or teacher), by default InferencePart's.</summary>
    public static MamoModel LoadInference(string dir, Device device, string? part = null)
    {
        var model = new MamoModel(ReadConfig(dir));
        try
        {
            model.to(device);
            LoadModel(dir, PartFile(part ?? InferencePart(dir)), model);
            model.eval();
            return model;
        }
        catch
        {
            model.Dispose();
            throw;
        }
    }

    /// <summary>A new run's weights from another run's (or an import's) checkpoint: its student, and its teacher where
    /// it saved one, else a copy of the student.</summary>
    public static void LoadStart(string dir, MamoModel student, MamoModel? teacher)
    {
        LoadModel(dir, StudentFile, student);
        if (teacher is null) return;
        if (Parts(ReadState(dir)).Contains(TeacherPart)) LoadModel(dir, TeacherFile, teacher);
        else Momentum.CopyWeights(student, teacher);
    }

    public static void LoadOptimizer(string dir, AdamW optimizer)
    {
        var tensors = LoadPart(Path.Combine(dir, OptimizerFile));
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
