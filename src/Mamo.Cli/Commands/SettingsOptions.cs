using System.CommandLine;
using Mamo.Actors;
using Mamo.Actors.Run;

namespace Mamo.Cli.Commands;

/// <summary>`--config FILE` and `--set key=value`, HOCON over hocon/mamo.conf, for each command that reads settings
/// (pretrain; embed and ingest for the librdkafka properties under mamo.kafka; cluster status for mamo.cluster.tls).</summary>
sealed class SettingsOptions
{
    public Option<string?> Config { get; } = new("--config") { Description = "A HOCON file layered over hocon/mamo.conf" };
    public Option<string[]> Set { get; } = new("--set") { Description = "Override one key, e.g. --set batch-size=16 (repeatable)", AllowMultipleArgumentsPerToken = false };

    /// <summary>The settings, with <paramref name="first"/> under the user's --set; a bad key or value throws SettingsException.</summary>
    public MamoSettings Load(ParseResult parse, IEnumerable<string>? first = null) =>
        MamoSettings.Load(parse.GetValue(Config), [.. first ?? [], .. parse.GetValue(Set) ?? []]);
}
