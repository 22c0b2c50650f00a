using System.CommandLine;
using Mamo.Cli.Commands;

namespace Mamo.Cli;

/// <summary>The `mamo` command and its verbs, in one place so tests invoke exactly what the executable does.</summary>
public static class MamoRoot
{
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
        DevBrokerCommand.Create(),
        ClusterCommand.Create(),
        DashboardCommand.Create(),
        ImportCommand.Create(),
        ExportCommand.Create(),
    };
}
