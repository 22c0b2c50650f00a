using Xunit;
using Mamo.Actors.Pipeline;

namespace Mamo.Actors.Tests;

public class DispatchersTests
{
    /// <summary>The every-step coordinator's copy lowers its own thread, and only it: the replica's trainer on the same
    /// node keeps its priority.</summary>
    [SkippableFact]
    public void Idle_priority_lowers_only_the_calling_thread()
    {
        Skip.IfNot(OperatingSystem.IsLinux(), "thread nice values are Linux's");
        var before = Dispatchers.Niceness();
        Skip.If(before == 19, "this process already runs at the lowest priority");
        (bool Lowered, int? Nice) inThread = default;
        var thread = new Thread(() => inThread = (Dispatchers.IdlePriority(), Dispatchers.Niceness()));
        thread.Start();
        thread.Join();
        Assert.True(inThread.Lowered);
        Assert.Equal(19, inThread.Nice);
        Assert.Equal(before, Dispatchers.Niceness());
    }
}
