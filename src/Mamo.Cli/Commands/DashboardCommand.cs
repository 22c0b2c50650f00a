using System.CommandLine;
using System.Runtime.InteropServices;
using Mamo.Cli.Dashboard;
using Mamo.Cli.Web;

namespace Mamo.Cli.Commands;

/// <summary>`mamo dashboard RUN_DIR`: the dashboard of a run from its files alone, whether it still runs, stopped or
/// crashed; until Ctrl-C.</summary>
public static class DashboardCommand
{
    public static Command Create()
    {
        var runDir = new Argument<string>("RUN_DIR") { Description = "The run folder (holding metrics.jsonl)" };
        var options = ListenOptions.Dashboard("--listen", "HOST:PORT to serve on (default 127.0.0.1:8080, or the next free port)");
        var command = new Command("dashboard", "Serve a run's dashboard and /metrics from its folder") { runDir, options.Listen, options.Token };
        command.SetAction(async (parse, ct) =>
        {
            var error = parse.InvocationConfiguration.Error;
            var dir = parse.GetValue(runDir)!;
            if (!Directory.Exists(dir))
            {
                error.WriteLine($"mamo dashboard: no run folder at {dir}");
                return ExitCodes.Usage;
            }
            ListenAddress? address;
            string? token;
            try { (address, token) = options.Resolve(parse); }
            catch (FormatException e)
            {
                error.WriteLine($"mamo dashboard: {e.Message}");
                return ExitCodes.Usage;
            }
            if (address is null)
            {
                error.WriteLine("mamo dashboard: --listen off leaves nothing to do");
                return ExitCodes.Usage;
            }
            if (!File.Exists(Path.Combine(dir, RunFiles.MetricsFile)))
                error.WriteLine($"mamo dashboard: {dir} has no {RunFiles.MetricsFile} yet; the page fills in when the run writes it");
            using var stop = CancellationTokenSource.CreateLinkedTokenSource(ct);
            using var sigterm = PosixSignalRegistration.Create(PosixSignal.SIGTERM, c => { c.Cancel = true; stop.Cancel(); });
            DashboardServer server;
            try { server = await DashboardServer.StartAsync(new RunFiles(dir), address, token); }
            catch (AddressInUseError e)
            {
                error.WriteLine($"mamo dashboard: {e.Message}");
                return ExitCodes.Usage;
            }
            await using var served = server;
            parse.InvocationConfiguration.Output.WriteLine($"dashboard: {server.Address}");
            try { await Task.Delay(Timeout.Infinite, stop.Token); }
            catch (OperationCanceledException) { }
            return 0;
        });
        return command;
    }
}
