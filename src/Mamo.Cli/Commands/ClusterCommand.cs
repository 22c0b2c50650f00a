using System.CommandLine;
using System.Text.Json;
using Mamo.Actors;
using Mamo.Actors.Cluster;
using Mamo.Actors.Run;

namespace Mamo.Cli.Commands;

/// <summary>`mamo cluster status --seed-nodes HOST:PORT[,...] [--json] [--timeout 20s] [--config F] [--set k=v]`: the members of a running
/// cluster with their roles and reachability, the current round, and the last durable checkpoint.</summary>
public static class ClusterCommand
{
    public static Command Create()
    {
        var seeds = new Option<string>("--seed-nodes") { Description = "HOST:PORT[,HOST:PORT...] of the cluster's seed nodes", Required = true };
        var json = new Option<bool>("--json")
        {
            Description = "Print one JSON object: {members: [{name, address, roles, status}], round, last_checkpoint, recent_rounds: [{round, participants, seconds}], recoveries: [{lost, address, at, seconds}]}",
        };
        var timeout = new Option<int>("--timeout") { Description = "Seconds to wait for the cluster", DefaultValueFactory = _ => 20 };
        var settingsOptions = new SettingsOptions();   // mamo.cluster.tls: a cluster over TLS is looked at with a certificate of its CA
        var status = new Command("status", "Members, roles and reachability of a running cluster; its round and last checkpoint")
        {
            seeds, json, timeout, settingsOptions.Config, settingsOptions.Set,
        };
        status.SetAction(async (parse, _) =>
        {
            var (output, error) = (parse.InvocationConfiguration.Output, parse.InvocationConfiguration.Error);
            var list = parse.GetValue(seeds)!.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
            ClusterStatus report;
            try
            {
                foreach (var seed in list) ClusterNodeOptions.ParseAddress(seed, "--seed-nodes");
                report = await ClusterStatus.QueryAsync(list, TimeSpan.FromSeconds(parse.GetValue(timeout)), settingsOptions.Load(parse));
            }
            catch (SettingsException e)
            {
                error.WriteLine($"mamo cluster status: {e.Message}");
                return ExitCodes.Usage;
            }
            catch (TimeoutException e)
            {
                error.WriteLine($"mamo cluster status: {e.Message}");
                return ExitCodes.Failed;
            }
            if (parse.GetValue(json))
            {
                output.WriteLine(JsonSerializer.Serialize(new
                {
                    members = report.Members.Select(m => new { name = m.Name, address = m.Address, roles = m.Roles, status = m.Status }),
                    round = report.Round,
                    last_checkpoint = report.LastCheckpoint,
                    recent_rounds = report.Recent.Select(r => new { round = r.Number, participants = r.Participants, seconds = r.Seconds }),
                    recoveries = report.Recoveries.Select(r => new { lost = r.Lost, address = r.Address, at = r.At, seconds = r.Seconds }),
                }));
                return 0;
            }
            foreach (var m in report.Members) output.WriteLine($"{m.Name,-16} {m.Address,-22} {m.Status,-12} {string.Join(",", m.Roles)}");
            output.WriteLine($"round {report.Round?.ToString() ?? "(no coordinator)"}, last checkpoint {report.LastCheckpoint ?? "(none yet)"}");
            foreach (var r in report.Recent) output.WriteLine($"  round {r.Number}: {r.Seconds:F1} s, {string.Join(",", r.Participants)}");
            foreach (var r in report.Recoveries)
                output.WriteLine($"  lost {r.Lost} ({r.Address}) at {r.At:HH:mm:ss}: " + (r.Seconds is { } t ? $"next round committed {t:F1} s later" : "no round committed since"));
            return 0;
        });
        return new Command("cluster", "Inspect a running cluster") { status };
    }
}
