using System.Globalization;
using System.Runtime.InteropServices;
using Akka.Actor;
using Mamo.Model;
using Serilog;
using static TorchSharp.torch;

namespace Mamo.Actors;

/// <summary>Makes progress durable. Joins the student and teacher halves of a step, writes them into
/// checkpoints/step-N.tmp, fsyncs, renames to checkpoints/step-N (a kill at any moment leaves the previous
/// checkpoint whole), keeps the last K, and only then announces CheckpointDurable, on which sources commit.</summary>
public sealed class Checkpointer : ReceiveActor
{
    /// <summary>Published on the event stream once a checkpoint is on disk.</summary>
    public sealed record CheckpointDurable(long Step, StreamPosition Position, string Path);

    public const string SeedKey = "seed";

    readonly string runDir;
    readonly MamoConfig config;
    readonly int keepLast, seed;
    readonly Dictionary<long, TrainerReplica.StudentSnapshot> students = new();
    readonly Dictionary<long, MomentumTeacher.TeacherSnapshot> teachers = new();

    public Checkpointer(string runDir, MamoConfig config, int keepLast, int seed)
    {
        this.seed = seed;
        this.runDir = runDir;
        this.config = config;
        this.keepLast = keepLast;
        Receive<TrainerReplica.StudentSnapshot>(s => { students[s.Step] = s; TryWrite(s.Step); });
        Receive<MomentumTeacher.TeacherSnapshot>(t => { teachers[t.Step] = t; TryWrite(t.Step); });
    }

    public static Props Props(string runDir, MamoConfig config, int keepLast, int seed) =>
        Akka.Actor.Props.Create(() => new Checkpointer(runDir, config, keepLast, seed)).WithDispatcher(Dispatchers.Io);

    void TryWrite(long step)
    {
        if (!students.Remove(step, out var s)) return;
        if (!teachers.Remove(step, out var t)) { students[step] = s; return; }
        try
        {
            var path = Write(s, t);
            Log.Information("checkpoint at step {Step} written to {Path}", step, path);
            Context.System.EventStream.Publish(new CheckpointDurable(step, s.Position, path));
        }
        finally
        {
            foreach (var (_, v) in s.Student.Concat(s.Optimizer).Concat(t.Weights)) v.Dispose();
        }
    }

    string Write(TrainerReplica.StudentSnapshot s, MomentumTeacher.TeacherSnapshot t)
    {
        var root = Path.Combine(runDir, Checkpoint.RunFolder);
        Directory.CreateDirectory(root);
        var final = Path.Combine(root, Checkpoint.StepFolderName(s.Step));
        if (Directory.Exists(final) && File.Exists(Path.Combine(final, Checkpoint.StateFile))) return final;   // already durable
        var temp = final + ".tmp";
        if (Directory.Exists(temp)) Directory.Delete(temp, recursive: true);
        var state = new Checkpoint.State(s.Step, s.OptimizerStep, t.TeacherStep,
            new Dictionary<string, string>(s.Position.ToExtra()) { [SeedKey] = seed.ToString(CultureInfo.InvariantCulture) });
        Checkpoint.Save(temp, config, s.Student, t.Weights, s.Optimizer, state);
        FsyncDirectory(temp);
        if (Directory.Exists(final)) Directory.Delete(final, recursive: true);   // a leftover without state.json
        Directory.Move(temp, final);
        FsyncDirectory(root);
        Prune(root);
        return final;
    }

    void Prune(string root)
    {
        var complete = Directory.GetDirectories(root, "step-*").Where(d => !d.EndsWith(".tmp")).Order().ToList();
        foreach (var old in complete.Take(Math.Max(0, complete.Count - keepLast))) Directory.Delete(old, recursive: true);
        foreach (var stale in Directory.GetDirectories(root, "step-*.tmp")) Directory.Delete(stale, recursive: true);
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

    protected override void PostStop()
    {
        foreach (var s in students.Values) foreach (var (_, v) in s.Student.Concat(s.Optimizer)) v.Dispose();
        foreach (var t in teachers.Values) foreach (var (_, v) in t.Weights) v.Dispose();
        base.PostStop();
    }
}
