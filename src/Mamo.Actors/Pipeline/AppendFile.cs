using System.Runtime.InteropServices;
using System.Text;
using Microsoft.Win32.SafeHandles;

namespace Mamo.Actors.Pipeline;

/// <summary>
/// A file that several processes append whole lines to: RUN_DIR/metrics.jsonl gets the coordinator's train lines,
/// the evaluator's and the publisher's, each from its own node. .NET's FileMode.Append is not an append: a stream
/// writes at the end it saw when it opened (dotnet/runtime#53432), so two appenders overwrite each other's lines.
/// This handle is O_APPEND (set with fcntl), and each line goes out in one write, which the kernel places at the
/// file's current end (on Linux, for pwrite too). Elsewhere the end is read before each write, which
/// narrows the race without closing it.
/// </summary>
public sealed class AppendFile : IDisposable
{
    readonly SafeFileHandle handle;
    readonly bool atomic;

    public AppendFile(string path)
    {
        handle = File.OpenHandle(path, FileMode.OpenOrCreate, FileAccess.Write, FileShare.ReadWrite | FileShare.Delete);
        atomic = OAppend is { } flag && SetFlag(handle, flag);
    }

    /// <summary>Appends <paramref name="line"/> and a newline in one write.</summary>
    public void WriteLine(string line)
    {
        var bytes = Encoding.UTF8.GetBytes(line + "\n");
        lock (handle) RandomAccess.Write(handle, bytes, atomic ? 0 : RandomAccess.GetLength(handle));
    }

    /// <summary>Appends one line to <paramref name="path"/>, opening and closing it.</summary>
    public static void AppendLine(string path, string line)
    {
        using var file = new AppendFile(path);
        file.WriteLine(line);
    }

    public void Dispose() => handle.Dispose();

    // Linux's O_APPEND (fcntl is variadic: called with an int on x86-64 and arm64 Linux, where that is the same call).
    static int? OAppend => OperatingSystem.IsLinux() ? 0x400 : null;

    const int GetFlags = 3, SetFlags = 4;

    static bool SetFlag(SafeFileHandle handle, int flag)
    {
        var fd = (int)handle.DangerousGetHandle();
        var flags = Fcntl(fd, GetFlags, 0);
        return flags >= 0 && Fcntl(fd, SetFlags, flags | flag) >= 0;
    }

    [DllImport("libc", EntryPoint = "fcntl", SetLastError = true)]
    static extern int Fcntl(int fd, int command, int argument);
}
