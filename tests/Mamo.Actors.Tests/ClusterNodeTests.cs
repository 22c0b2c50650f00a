using Mamo.Actors.Cluster;
using Mamo.Actors.Run;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;
using Xunit;

namespace Mamo.Actors.Tests;

/// <summary>A cluster node's process, as ClusterRun starts and ends it.</summary>
public class ClusterNodeTests
{
    [Fact]
    public async Task A_node_that_leaves_when_its_run_is_done_keeps_exit_code_0()
    {
        // Akka.Hosting's hook, run when the system ends, sets Environment.ExitCode to -1 for Akka's leaving and downing
        // reasons, then stops the host: a three-node test saw a node that had done its work exit 255. The hook has run
        // once the host is stopping (nothing else stops it here).
        var before = Environment.ExitCode;
        var node = new ClusterNodeOptions("127.0.0.1", 0, ["127.0.0.1:1"], "n0", [ClusterNodeOptions.TrainerRole]);
        using var host = await ClusterNode.StartAsync(node, MamoSettings.Defaults(), tls: null);
        var hooked = new TaskCompletionSource();
        host.Services.GetRequiredService<IHostApplicationLifetime>().ApplicationStopping.Register(() => hooked.TrySetResult());
        try
        {
            await ClusterRun.Leave(host.System());
            await hooked.Task.WaitAsync(TimeSpan.FromSeconds(60));
            Assert.Equal(0, Environment.ExitCode);
        }
        finally
        {
            Environment.ExitCode = before;
            await host.StopAsync();
        }
    }
}
