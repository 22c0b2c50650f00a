using System.CommandLine;
using System.Runtime.InteropServices;
using Mamo.Cli.Dashboard;
using Mamo.Cli.Web;

namespace Mamo.Cli.Commands;

/// <summary>An address option and its token option, and the address and token they mean: `--dashboard ADDR|off` and
/// `--dashboard-token` of the training commands (docs/DASHBOARD.md), `--listen` and `--token` of `mamo serve`.</summary>
sealed class ListenOptions(string listenName, string listenDescription, ListenAddress defaultAddress, string tokenName, string tokenVariable, string docs)
{
    public Option<string?> Listen { get; } = new(listenName) { Description = listenDescription };
    public Option<string?> Token { get; } = new(tokenName)
    {
        Description = $"Required to listen on a non-loopback address: a bearer token (default: {tokenVariable}, or none)",
    };

    /// <summary>The dashboard's: a bearer token, or open ?token=TOKEN once for a cookie.</summary>
    public static ListenOptions Dashboard(string listenName, string listenDescription) =>
        new(listenName, listenDescription, DashboardServer.DefaultAddress, "--dashboard-token", DashboardServer.TokenVariable, "docs/DASHBOARD.md");

    /// <summary>The address to serve (null: off) and the token; a bad address or a missing token throws FormatException.</summary>
    public (ListenAddress? Address, string? Token) Resolve(ParseResult parse)
    {
        var name = Listen.Name;
        var address = parse.GetValue(Listen) is { } given ? ListenAddress.Parse(given, name) : defaultAddress;
        var token = parse.GetValue(Token) ?? Environment.GetEnvironmentVariable(tokenVariable);
        if (address is { IsLoopback: false } && string.IsNullOrEmpty(token))
            throw new FormatException($"{name} {address}: a non-loopback address needs {tokenName} (or {tokenVariable}); " +
                                      $"or keep 127.0.0.1 and put a reverse proxy in front ({docs})");
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
