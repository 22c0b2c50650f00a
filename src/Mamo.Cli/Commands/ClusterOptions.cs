using System.CommandLine;
using Mamo.Actors.Cluster;
using Mamo.Actors.Run;

namespace Mamo.Cli.Commands;

/// <summary>`--cluster HOST:PORT --seed-nodes ... [--node-name] [--roles]`, for each training command: the same product
/// on one node or on a cluster (docs/CLUSTER.md).</summary>
sealed class ClusterOptions
{
    public Option<string?> Cluster { get; } = new("--cluster") { Description = "Run as a cluster node listening on HOST:PORT (docs/CLUSTER.md) (default: one process, no cluster)" };
    public Option<string?> SeedNodes { get; } = new("--seed-nodes") { Description = "HOST:PORT[,HOST:PORT...] of the nodes to join (with --cluster) (default: this node, which starts the cluster)" };
    public Option<string?> NodeName { get; } = new("--node-name") { Description = "This node's name; its log and ledger go to RUN_DIR/nodes/NAME (default: HOST-PORT)" };
    public Option<string?> Roles { get; } = new("--roles") { Description = "coordinator,trainer,evaluator,publisher (default: all)" };

    public IEnumerable<Option> All => [Cluster, SeedNodes, NodeName, Roles];

    /// <summary>The node's options, or null without --cluster (a single node); a bad one throws SettingsException.</summary>
    public ClusterNodeOptions? Resolve(ParseResult parse)
    {
        var (cluster, seeds, name, roles) = (parse.GetValue(Cluster), parse.GetValue(SeedNodes), parse.GetValue(NodeName), parse.GetValue(Roles));
        if (cluster is null)
        {
            if (seeds is not null || name is not null || roles is not null) throw new SettingsException("--seed-nodes, --node-name and --roles need --cluster HOST:PORT");
            return null;
        }
        var (host, port) = ClusterNodeOptions.ParseAddress(cluster, "--cluster");
        var seedList = (seeds ?? cluster).Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
        foreach (var seed in seedList) ClusterNodeOptions.ParseAddress(seed, "--seed-nodes");
        var roleList = roles is null ? ClusterNodeOptions.AllRoles : roles.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
        if (roleList.FirstOrDefault(r => !ClusterNodeOptions.AllRoles.Contains(r)) is { } unknown)
            throw new SettingsException($"--roles: unknown role '{unknown}' ({string.Join(", ", ClusterNodeOptions.AllRoles)})");
        var nodeName = name ?? $"{host}-{port}";
        if (nodeName.Length == 0 || nodeName.Any(c => !(char.IsLetterOrDigit(c) || c is '-' or '_' or '.')) || nodeName.StartsWith('.'))
            throw new SettingsException($"--node-name '{nodeName}': use letters, digits, '-', '_' and '.' (it names a folder)");
        return new ClusterNodeOptions(host, port, seedList, nodeName, roleList);
    }
}
