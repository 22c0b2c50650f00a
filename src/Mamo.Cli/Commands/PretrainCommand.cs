using System.CommandLine;
using System.Runtime.InteropServices;
using Mamo.Actors;
using Mamo.Actors.Cluster;
using Mamo.Cli.Dashboard;
using Mamo.Cli.Web;
using Mamo.Model;
using Microsoft.Extensions.Diagnostics.HealthChecks;
using Serilog;
using Serilog.Events;
using Spectre.Console;
using Mamo.Actors.Run;

namespace Mamo.Cli.Commands;

/// <summary>`mamo pretrain`: continual MAMO pre-training on the actor pipeline. With no options it fetches the
/// built-in emoji data if missing, trains `tiny` on the CPU, evaluates and checkpoints, and runs until stopped.</summary>
public static class PretrainCommand
{
    public static Command Create()
    {
        var defaults = MamoSettings.Load();
        var preset = new Option<string?>("--preset") { Description = $"Model preset: tiny, small, base or minilm (all-MiniLM-L6-v2's BERT text encoder) (default {defaults.Preset})" };
        var run = new RunOptions(defaults);
        var settingsOptions = new SettingsOptions();
        var ledger = new Option<bool>("--ledger") { Description = "Write each step's sample ids and loss to ledger.jsonl (default off)" };
        var cluster = new ClusterOptions();
        var dashboard = Dashboard();
        var init = new Option<string?>("--init")
        {
            Description = "A new run starts from this checkpoint's weights (`mamo import`'s, or another run's newest), in its architecture (default: fresh weights)",
        };
        var command = new Command("pretrain", "Continually pre-train MAMO on an image-text stream") { preset };
        foreach (var option in (Option[])[.. run.All, init, settingsOptions.Config, settingsOptions.Set, ledger, dashboard.Listen, dashboard.Token])
            command.Options.Add(option);
        foreach (var option in cluster.All) command.Options.Add(option);
        command.SetAction(async (parse, _) =>
        {
            var sets = new List<string>();
            void Add(string key, object? value) { if (value is not null) sets.Add($"{key}={Hocon(value)}"); }
            Add("preset", parse.GetValue(preset));
            run.AddSets(parse, Add);
            if (parse.GetValue(ledger)) Add("ledger", "on");

            MamoSettings settings;
            ClusterNodeOptions? node;
            (ListenAddress? Address, string? Token) serve;
            string? start = null;
            try
            {
                if (parse.GetValue(init) is { } initPath)
                {
                    start = Checkpoint.Latest(initPath) ?? throw new SettingsException($"--init {initPath}: no checkpoint there (a folder holding {Checkpoint.ConfigFile}, or a run folder)");
                    var saved = Checkpoint.ReadConfig(start);
                    var savedPreset = MamoConfig.PresetOf(saved) ?? throw new SettingsException($"--init {start} holds a model of no preset's architecture");
                    if (parse.GetValue(preset) is { } asked && asked != savedPreset)
                        throw new SettingsException($"--init {start} holds a {savedPreset} model; --preset {asked} asks for another");
                    Add("preset", savedPreset);
                    settings = settingsOptions.Load(parse, sets);
                    settings = settings with { Model = settings.Model.WithLayoutOf(saved) };
                }
                else settings = settingsOptions.Load(parse, sets);
                // A node that restarts with its cluster's command line keeps --init; the coordinator resumes what the cluster wrote.
                node = cluster.Resolve(parse);
                if (start is not null && node is null && Checkpoint.Complete(settings.RunDir).FirstOrDefault() is { } held)
                    throw new SettingsException($"--init {start}: {Path.GetFullPath(settings.RunDir)} already holds a run (its newest checkpoint is " +
                                                $"{Path.GetFileName(held)}), which a run there resumes. Leave out --init to resume it, or give a new --run-dir to start from {start}");
                if (settings.FineTune.IsFineTuning) throw new SettingsException("'mamo.finetune.task' is set: fine-tune with `mamo finetune --from CHECKPOINT --task ...`");
                serve = dashboard.Resolve(parse);
            }
            catch (Exception e) when (e is SettingsException or FormatException or IOException or System.Text.Json.JsonException)
            {
                Console.Error.WriteLine($"mamo pretrain: {e.Message}");
                return ExitCodes.Usage;
            }
            return await Train("pretrain", settings, parse.GetValue(run.Plain), node, init: start, dashboard: NodeDashboard(node, dashboard, parse, serve));
        });
        return command;
    }

    /// <summary>A cluster node serves a dashboard only when asked (--dashboard ADDR): on one machine, N nodes would each
    /// start a web server beside their heartbeats, and a starved heartbeat reads as a dead node.</summary>
    internal static (ListenAddress? Address, string? Token) NodeDashboard(ClusterNodeOptions? node, ListenOptions dashboard, ParseResult parse,
        (ListenAddress? Address, string? Token) serve) => node is not null && parse.GetValue(dashboard.Listen) is null ? default : serve;

    /// <summary>The training commands' --dashboard and --dashboard-token.</summary>
    internal static ListenOptions Dashboard() =>
        ListenOptions.Dashboard("--dashboard", "HOST:PORT of the run's live dashboard and /metrics, or off (default 127.0.0.1:8080, or the next free port)");

    /// <summary>A training run of `pretrain` or `finetune` to its end: logging to RUN_DIR/mamo.log, the live display
    /// (or log lines), SIGINT/SIGTERM as a clean stop with a final checkpoint, and exit codes for settings errors and
    /// failed runs.</summary>
    /// <param name="init">the checkpoint a new run (pre-training with --init, or fine-tuning) starts from</param>
    /// <param name="dashboard">where to serve the run's dashboard; no address: none</param>
    internal static async Task<int> Train(string name, MamoSettings settings, bool plain, ClusterNodeOptions? node = null, string? init = null,
        (ListenAddress? Address, string? Token) dashboard = default)
    {
        var live = node is null && !plain && !Console.IsOutputRedirected && AnsiConsole.Profile.Capabilities.Interactive;
        var logDir = node is null ? settings.RunDir : ClusterRun.NodeDir(settings.RunDir, node.Name);
        Directory.CreateDirectory(logDir);
        Log.Logger = new LoggerConfiguration()
            .MinimumLevel.Information()
            .WriteTo.Console(restrictedToMinimumLevel: live ? LogEventLevel.Warning : LogEventLevel.Information, standardErrorFromLevel: LogEventLevel.Verbose)
            .WriteTo.File(Path.Combine(logDir, "mamo.log"))
            .CreateLogger();
        using var stop = new CancellationTokenSource();
        var interrupted = false;
        using var sigint = PosixSignalRegistration.Create(PosixSignal.SIGINT, c => { interrupted = true; Stop(c, stop); });
        using var sigterm = PosixSignalRegistration.Create(PosixSignal.SIGTERM, c => Stop(c, stop));
        // SIGTERM is how an orchestrator stops a service: a clean stop, 0. Ctrl-C is the shell's interrupt: 130 (README).
        int Stopped() => interrupted ? ExitCodes.Interrupted : ExitCodes.Success;
        try
        {
            if (node is not null)
            {
                // A node serves the run's folder (shared by the nodes): evaluations, checkpoints and the cluster's rounds.
                await using var nodeServer = dashboard.Address is { } at ? await ServeDashboard(null, settings.RunDir, at, dashboard.Token) : null;
                var steps = await new ClusterRun(settings, node, init).RunAsync(stop.Token);
                Console.WriteLine($"node {node.Name}: the run reached step {steps}; checkpoints in {Path.GetFullPath(Path.Combine(settings.RunDir, Mamo.Model.Checkpoint.RunFolder))}");
                return Stopped();
            }
            var display = live ? new ProgressDisplay() : null;
            var run = new TrainingRun(settings, display, init: init);
            await using var server = dashboard.Address is { } address ? await ServeDashboard(run, settings.RunDir, address, dashboard.Token) : null;
            var step = display is null ? await run.RunAsync(stop.Token) : await display.ShowWhile(() => run.RunAsync(stop.Token));
            Console.WriteLine($"checkpoint at step {step} in {Path.GetFullPath(settings.RunDir)}");
            return Stopped();
        }
        catch (SettingsException e)
        {
            Log.Error("{Message}", e.Message);
            Console.Error.WriteLine($"mamo {name}: {e.Message}");
            return ExitCodes.Usage;
        }
        catch (Exception e) when (e is not OperationCanceledException)
        {
            Log.Fatal(e, "the run stopped");
            Console.Error.WriteLine($"mamo {name}: {e.Message}");
            return ExitCodes.Failed;
        }
        finally
        {
            await Log.CloseAndFlushAsync();
        }
    }

    /// <summary>The run's dashboard over its folder; live while the run's actor system is, ready while it trains (a
    /// cluster node, <paramref name="run"/> null: the dashboard's own checks). A default dashboard that cannot bind is
    /// reported, and the run goes on without it; an address the user named and cannot have stops the run before it starts.</summary>
    static async Task<DashboardServer?> ServeDashboard(TrainingRun? run, string runDir, ListenAddress address, string? token)
    {
        var history = new RunFiles(runDir);
        try
        {
            var server = run is null ? await DashboardServer.StartAsync(history, address, token) : await DashboardServer.StartAsync(history, address, token,
                live: () => run.System is { WhenTerminated.IsCompleted: true } ? HealthCheckResult.Unhealthy("the run's actor system has terminated") : HealthCheckResult.Healthy(),
                ready: () => history.State is "running" ? HealthCheckResult.Healthy("training")
                    : HealthCheckResult.Unhealthy(history.State is null ? "starting" : $"{history.State}{(history.StateReason is { } r ? ": " + r : "")}"));
            Console.WriteLine($"dashboard: {server.Address}");
            Log.Information("dashboard at {Address}", server.Address);
            return server;
        }
        catch (AddressInUseError e) when (!address.FallsForward)
        {
            throw new SettingsException($"--dashboard {e.Message}: name a free address, or leave --dashboard out to take the next free port after {DashboardServer.DefaultAddress}");
        }
        catch (IOException e)
        {
            Log.Warning("the dashboard could not listen at {Address} or the ports after it ({Error}); the run goes on without it", address, e.Message);
            Console.Error.WriteLine($"mamo: no dashboard: {e.Message}");
            return null;
        }
    }

    /// <summary>The first signal finishes the step in hand and checkpoints; a second one exits at once.</summary>
    static void Stop(PosixSignalContext context, CancellationTokenSource stop)
    {
        if (stop.IsCancellationRequested) Environment.Exit(ExitCodes.Interrupted);
        context.Cancel = true;
        Console.Error.WriteLine("stopping: finishing the current step and writing a checkpoint (again to force)");
        stop.Cancel();
    }

    /// <summary>An option's value as a --set value: a list (the --source given more than once) as a HOCON list.</summary>
    internal static string Hocon(object value) =>
        value is string[] list ? "[" + string.Join(", ", list.Select(Quote)) + "]" : Quote(value.ToString()!);

    internal static string Quote(string value) => value.All(c => char.IsLetterOrDigit(c) || c is '-' or '_' or '.') ? value : "\"" + value.Replace("\\", "\\\\").Replace("\"", "\\\"") + "\"";
}
