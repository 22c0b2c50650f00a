using System.CommandLine;
using Mamo.Cli.Commands;

namespace Mamo.Cli;

/// <summary>The `mamo` command and its verbs, in one place so tests invoke exactly what the executable does.</summary>
public static class MamoRoot
{
    /// <summary>Runs `mamo ARGS`; a command line that does not parse (an unknown option, a missing value) exits
    /// ExitCodes.Usage after its errors and help, where System.CommandLine would give 1, the code of a failed run.</summary>
    public static int Run(string[] args, InvocationConfiguration? configuration = null)
    {
        var parse = Create().Parse(args);
        var code = configuration is null ? parse.Invoke() : parse.Invoke(configuration);
        return parse.Errors.Count > 0 ? ExitCodes.Usage : code;
    }

    public static RootCommand Create() => new("mamo: continual MAMO vision-language pre-training on image-text streams")
    {
        PretrainCommand.Create(),
        DatasetsCommand.Create(),
        EvalCommand.Create(),
        FinetuneCommand.Create(),
        PredictCommand.Create(),
        GroundCommand.Create(),
        PlotCommand.Create(),
        BenchCommand.Create(),
        IngestCommand.Create(),
        EmbedCommand.Create(),
        ServeCommand.Create(),
        DevBrokerCommand.Create(),
        ClusterCommand.Create(),
        DashboardCommand.Create(),
        ImportCommand.Create(),
        ExportCommand.Create(),
        ConfigCommand.Create(),
    };
}
