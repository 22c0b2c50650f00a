using Akka.Configuration;

namespace Mamo.Actors.Cluster;

/// <summary>What makes an ActorSystem a cluster node: hocon/cluster.conf (embedded) over mamo's defaults.</summary>
public static class ClusterNode
{
    /// <summary>cluster.conf over <paramref name="settings"/> (mamo.conf's defaults when null).</summary>
    public static Config Config(Config? settings = null)
    {
        using var stream = typeof(ClusterNode).Assembly.GetManifestResourceStream("cluster.conf")
            ?? throw new InvalidOperationException("cluster.conf is not embedded");
        using var reader = new StreamReader(stream);
        return ConfigurationFactory.ParseString(reader.ReadToEnd()).WithFallback(settings ?? MamoSettings.Defaults());
    }
}
