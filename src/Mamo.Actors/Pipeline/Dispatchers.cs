using System.Runtime.InteropServices;

namespace Mamo.Actors.Pipeline;

/// <summary>Dispatcher ids, defined in hocon/mamo.conf, and the priority of a model actor's thread.</summary>
public static class Dispatchers
{
    /// <summary>A thread of its own per actor: TorchSharp dispose scopes belong to a thread, and model work must
    /// never block the shared dispatcher.</summary>
    public const string Model = "mamo.dispatchers.model";
    /// <summary>Blocking file writes (checkpoints, metrics).</summary>
    public const string Io = "mamo.dispatchers.io";

    /// <summary>The lowest CPU priority there is for the calling thread (Linux: nice 19, which any thread may take for
    /// itself): it gets a core when the threads of normal priority leave one idle, as they do while they wait. Call it
    /// from a Model actor (its own thread); with one torch thread, libtorch's work runs on it too. False where the
    /// system has no such call.</summary>
    public static bool IdlePriority()
    {
        if (!OperatingSystem.IsLinux()) return false;
        try { return setpriority(PriorityOfProcess, (uint)gettid(), Lowest) == 0; }
        catch (EntryPointNotFoundException) { return false; }
    }

    /// <summary>The calling thread's nice value (Linux), for the tests; null elsewhere.</summary>
    public static int? Niceness()
    {
        if (!OperatingSystem.IsLinux()) return null;
        Marshal.SetLastPInvokeError(0);
        var nice = getpriority(PriorityOfProcess, (uint)gettid());
        return nice == -1 && Marshal.GetLastPInvokeError() != 0 ? null : nice;
    }

    // PRIO_PROCESS with a thread id: Linux sets that thread's nice value alone.
    const int PriorityOfProcess = 0, Lowest = 19;
    [DllImport("libc", SetLastError = true)] static extern int setpriority(int which, uint who, int prio);
    [DllImport("libc", SetLastError = true)] static extern int getpriority(int which, uint who);
    [DllImport("libc")] static extern int gettid();
}
