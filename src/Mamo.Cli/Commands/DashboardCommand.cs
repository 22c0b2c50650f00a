using System.CommandLine;
using System.Runtime.InteropServices;
using Mamo.Cli.Dashboard;

namespace Mamo.Cli.Commands;

/// <summary>`--dashboard ADDR|off` and `--dashboard-token TOKEN` of the training commands, and the address and token
/// they mean (docs/DASHBOARD.md).</summary>
sealed class DashboardOptions(string listenName, string defaultDescription)
{
    public Option<string?> Listen { get; } = new(listenName) { Description = defaultDescription };
    public Option<string?> Token { get; } = new("--dashboard-token")
    {
        Description = $"Required to listen on a non-loopback address: a bearer token, or open ?token=TOKEN once for a cookie (default: {DashboardServer.TokenVariable}, or none)",
    };

    /// <summary>The address to serve (null: off) and the token; a bad address or a missing token throws FormatException.</summary>
    public (DashboardAddress? Address, string? Token) Resolve(ParseResult parse)
    {
        var name = Listen.Name;
        var address = parse.GetValue(Listen) is { } given ? DashboardAddress.Parse(given, name) : DashboardAddress.Default;
        var token = parse.GetValue(Token) ?? Environment.GetEnvironmentVariable(DashboardServer.TokenVariable);
        if (address is { IsLoopback: false } && string.IsNullOrEmpty(token))
            throw new FormatException($"{name} {address}: a non-loopback address needs --dashboard-token (or {DashboardServer.TokenVariable}); " +
                                      "or keep 127.0.0.1 and put a reverse proxy in front (docs/DASHBOARD.md)");
        return (address, string.IsNullOrEmpty(token) ? null : token);
    }
}

/// <summary>`mamo dashboard RUN_DIR`: the dashboard of a run from its files alone, whether it still runs, stopped or
/// crashed; until Ctrl-C.</summary>
public static class DashboardCommand
{
    public static Command Create()
    {
        var runDir = new Argument<string>("RUN_DIR") { Description = "The run folder (holding metrics.jsonl)" };
        var options = new DashboardOptions("--listen", "HOST:PORT to serve on (default 127.0.0.1:8080, or the next free port)");
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
            DashboardAddress? address;
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
