using System.CommandLine;
using Mamo.Actors;
using Mamo.Actors.Run;

namespace Mamo.Cli.Commands;

/// <summary>`mamo config show [--run-dir DIR] [--config F] [--set k=v]`: every mamo.* value a run would resolve, each
/// with where it came from (default, the run folder's record, FILE:LINE or --set), and, for a run folder that records a
/// configuration, what a resume there would change of it and whether it would refuse (RunConfig).</summary>
public static class ConfigCommand
{
    public static Command Create()
    {
        var runDir = new Option<string?>("--run-dir") { Description = "A run folder: compare with the configuration it recorded (config.resolved.conf)" };
        var settingsOptions = new SettingsOptions();
        var show = new Command("show", "Print the resolved configuration, each value with its origin") { runDir, settingsOptions.Config, settingsOptions.Set };
        show.SetAction(parse =>
        {
            var (output, error) = (parse.InvocationConfiguration.Output, parse.InvocationConfiguration.Error);
            MamoSettings settings;
            try
            {
                settings = settingsOptions.Load(parse, parse.GetValue(runDir) is { } dir ? [$"run-dir={PretrainCommand.Quote(dir)}"] : null);
            }
            catch (SettingsException e)
            {
                error.WriteLine($"mamo config show: {e.Message}");
                return ExitCodes.Usage;
            }
            var changes = RunConfig.Changes(settings).ToDictionary(c => c.Key);
            var values = RunConfig.Values(settings);
            var width = Math.Min(72, values.Keys.Max(k => k.Length + 3 + values[k].Length));
            foreach (var (key, value) in values)
            {
                var note = changes.TryGetValue(key, out var c)
                    ? $"; recorded {c.Was ?? "unset"}: a resume {(RunConfig.Refusal(c) is { } why ? $"refuses this change ({why})" : "applies this change")}"
                    : "";
                output.WriteLine($"{$"{key} = {value}".PadRight(width)}  # {settings.Origin(key)}{note}");
            }
            foreach (var gone in changes.Values.Where(c => c.Now is null))
                output.WriteLine($"# {gone.Key} = {gone.Was} was recorded and is no longer a setting");
            return ExitCodes.Success;
        });
        return new Command("config", "The configuration of runs") { show };
    }
}
