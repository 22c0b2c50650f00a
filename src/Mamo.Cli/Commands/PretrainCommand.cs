using System.CommandLine;
using System.Runtime.InteropServices;
using Mamo.Actors;
using Serilog;
using Serilog.Events;
using Spectre.Console;

namespace Mamo.Cli.Commands;

/// <summary>`mamo pretrain`: continual MAMO pre-training on the actor pipeline. With no options it fetches the
/// built-in emoji data if missing, trains `tiny` on the CPU, evaluates and checkpoints, and runs until stopped.</summary>
public static class PretrainCommand
{
    const int SettingsError = 2, RunFailed = 1;

    public static Command Create()
    {
        var preset = new Option<string?>("--preset") { Description = "Model preset: tiny, small or base" };
        var source = new Option<string?>("--source") { Description = "dataset:NAME, manifest:PATH or wds:GLOB (default dataset:emoji)" };
        var runDir = new Option<string?>("--run-dir") { Description = "Checkpoints, metrics and logs go here; a run resumes from its last checkpoint" };
        var maxSteps = new Option<long?>("--max-steps") { Description = "Stop after this many steps in total" };
        var timeBudget = new Option<string?>("--time-budget") { Description = "Stop after this much wall time, e.g. 20m or 1h" };
        var device = new Option<string?>("--device") { Description = "cpu, or cuda where libtorch-cuda is installed" };
        var settingsOptions = new SettingsOptions();
        var ledger = new Option<bool>("--ledger") { Description = "Write each step's sample ids and loss to ledger.jsonl" };
        var plain = new Option<bool>("--plain") { Description = "Log lines instead of the live progress display" };
        var command = new Command("pretrain", "Continually pre-train MAMO on an image-text stream")
        {
            preset, source, runDir, maxSteps, timeBudget, device, settingsOptions.Config, settingsOptions.Set, ledger, plain,
        };
        command.SetAction(async (parse, _) =>
        {
            var sets = new List<string>();
            void Add(string key, object? value) { if (value is not null) sets.Add($"{key}={Quote(value.ToString()!)}"); }
            Add("preset", parse.GetValue(preset));
            Add("source", parse.GetValue(source));
            Add("run-dir", parse.GetValue(runDir));
            Add("max-steps", parse.GetValue(maxSteps));
            Add("time-budget", parse.GetValue(timeBudget));
            Add("device", parse.GetValue(device));
            if (parse.GetValue(ledger)) Add("ledger", "on");

            MamoSettings settings;
            try { settings = settingsOptions.Load(parse, sets); }
            catch (SettingsException e)
            {
                Console.Error.WriteLine($"mamo pretrain: {e.Message}");
                return SettingsError;
            }
            var live = !parse.GetValue(plain) && !Console.IsOutputRedirected && AnsiConsole.Profile.Capabilities.Interactive;
            Directory.CreateDirectory(settings.RunDir);
            Log.Logger = new LoggerConfiguration()
                .MinimumLevel.Information()
                .WriteTo.Console(restrictedToMinimumLevel: live ? LogEventLevel.Warning : LogEventLevel.Information, standardErrorFromLevel: LogEventLevel.Verbose)
                .WriteTo.File(Path.Combine(settings.RunDir, "mamo.log"))
                .CreateLogger();
            using var stop = new CancellationTokenSource();
            using var sigint = PosixSignalRegistration.Create(PosixSignal.SIGINT, c => Stop(c, stop));
            using var sigterm = PosixSignalRegistration.Create(PosixSignal.SIGTERM, c => Stop(c, stop));
            try
            {
                var display = live ? new ProgressDisplay() : null;
                var run = new PretrainRun(settings, display);
                var step = display is null ? await run.RunAsync(stop.Token) : await display.ShowWhile(() => run.RunAsync(stop.Token));
                Console.WriteLine($"checkpoint at step {step} in {Path.GetFullPath(settings.RunDir)}");
                return 0;
            }
            catch (SettingsException e)
            {
                Log.Error("{Message}", e.Message);
                Console.Error.WriteLine($"mamo pretrain: {e.Message}");
                return SettingsError;
            }
            catch (Exception e) when (e is not OperationCanceledException)
            {
                Log.Fatal(e, "the run stopped");
                Console.Error.WriteLine($"mamo pretrain: {e.Message}");
                return RunFailed;
            }
            finally
            {
                await Log.CloseAndFlushAsync();
            }
        });
        return command;
    }

    /// <summary>The first signal finishes the step in hand and checkpoints; a second one exits at once.</summary>
    static void Stop(PosixSignalContext context, CancellationTokenSource stop)
    {
        if (stop.IsCancellationRequested) Environment.Exit(130);
        context.Cancel = true;
        Console.Error.WriteLine("stopping: finishing the current step and writing a checkpoint (again to force)");
        stop.Cancel();
    }

    static string Quote(string value) => value.All(c => char.IsLetterOrDigit(c) || c is '-' or '_' or '.') ? value : "\"" + value.Replace("\\", "\\\\").Replace("\"", "\\\"") + "\"";
}
