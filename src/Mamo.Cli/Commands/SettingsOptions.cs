using System.CommandLine;
using Mamo.Actors;
using Mamo.Actors.Run;
using Mamo.Data;
using TorchSharp;

namespace Mamo.Cli.Commands;

/// <summary>`--config FILE` and `--set key=value`, HOCON over hocon/mamo.conf, for each command that reads settings
/// (pretrain; embed and ingest for the librdkafka properties under mamo.kafka; cluster status for mamo.cluster.tls;
/// eval, ground and predict for what inference honours).</summary>
sealed class SettingsOptions
{
    public Option<string?> Config { get; } = new("--config") { Description = "A HOCON file layered over hocon/mamo.conf (default: none; `mamo config show` lists every key)" };
    public Option<string[]> Set { get; } = new("--set") { Description = "Override one key, e.g. --set batch-size=16 (repeatable; default: none)", AllowMultipleArgumentsPerToken = false };

    /// <summary>The settings, with <paramref name="first"/> under the user's --set; a bad key or value throws SettingsException.</summary>
    public MamoSettings Load(ParseResult parse, IEnumerable<string>? first = null) =>
        MamoSettings.Load(parse.GetValue(Config), [.. first ?? [], .. parse.GetValue(Set) ?? []]);

    /// <summary>What a command that loads a model for inference honours of the settings (eval, ground, predict):
    /// torch-threads (set here), the device where the command's --device is left out, and the image decode limits of
    /// training (data.max-image-bytes and -pixels), so that an image a run would refuse is refused here too. A bad
    /// setting or device throws SettingsException.</summary>
    public (torch.Device Device, DecodeLimits Limits) LoadInference(ParseResult parse, string? device)
    {
        var s = Load(parse);
        if (s.TorchThreads > 0) torch.set_num_threads(s.TorchThreads);
        return (RunInputs.OpenDevice(device ?? s.Device), new DecodeLimits(s.MaxImageBytes, s.MaxImagePixels));
    }

    /// <summary>--device for an inference command: left out, mamo.device decides.</summary>
    public static Option<string?> DeviceOption()
    {
        var device = new Option<string?>("--device") { Description = "Where the model runs: cpu or cuda (default: mamo.device, cpu unless --config or --set says)" };
        device.AcceptOnlyFromAmong("cpu", "cuda");
        return device;
    }
}

/// <summary>The options `pretrain` and `finetune` share, each described with the default it takes (hocon/mamo.conf, and
/// the task's layers for finetune), so that the help says what a run does when the option is left out.</summary>
sealed class RunOptions(MamoSettings defaults)
{
    public const string SourceKinds = "dataset:NAME[/SPLIT], manifest:PATH, 'wds:GLOB' (quoted, e.g. 'wds:shards/{000..099}.tar') or kafka://HOST:PORT/TOPIC[,TOPIC][?group=G]";

    public Option<string[]> Source { get; } = new("--source")
    {
        Description = $"{SourceKinds} (default {defaults.Source}); given more than once, the sources are mixed, each SPEC?weight=W",
        AllowMultipleArgumentsPerToken = false,
    };
    public Option<string?> RunDir { get; } = new("--run-dir") { Description = $"Checkpoints, metrics and logs go here; a run resumes from its last checkpoint (default {defaults.RunDir})" };
    public Option<long?> MaxSteps { get; } = new("--max-steps")
    {
        Description = $"Stop after this many steps in total (default {(defaults.MaxSteps > 0 ? defaults.MaxSteps : "none: until stopped")})",
    };
    public Option<string?> TimeBudget { get; } = new("--time-budget")
    {
        Description = $"Stop after this much wall time, e.g. 20m or 1h (default {(defaults.TimeBudget > TimeSpan.Zero ? defaults.TimeBudget : "none")})",
    };
    public Option<string?> Device { get; } = new("--device") { Description = $"cpu, or cuda where libtorch-cuda is installed (default {defaults.Device})" };
    public Option<bool> Plain { get; } = new("--plain") { Description = "Log lines instead of the live progress display (default: the display, on a terminal)" };

    public IEnumerable<Option> All => [Source, RunDir, MaxSteps, TimeBudget, Device, Plain];

    /// <summary>The --set lines of the options given.</summary>
    public void AddSets(ParseResult parse, Action<string, object?> add)
    {
        add("source", parse.GetValue(Source) switch { null or [] => null, [var one] => one, var several => several });
        add("run-dir", parse.GetValue(RunDir));
        add("max-steps", parse.GetValue(MaxSteps));
        add("time-budget", parse.GetValue(TimeBudget));
        add("device", parse.GetValue(Device));
    }
}
