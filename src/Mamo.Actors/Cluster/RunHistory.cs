using System.Diagnostics;
using System.Text.Json.Nodes;
using Mamo.Actors.Pipeline;

namespace Mamo.Actors.Cluster;

/// <summary>The recent past that `mamo cluster status` shows, kept by the coordinator: the last rounds (every-step:
/// steps) with their participants and length, and each recovery with the time until the next committed round. A
/// recovery starts when a replica's node is marked unreachable (the failure detector's pause after a kill), or when
/// the replica leaves, whichever is first; or when the coordinator starts on a checkpoint (after its node died, or
/// in a restarted cluster). It lives in the coordinator's memory: a coordinator that moves starts a new one. It also
/// appends each round, recovery and change of members to RUN_DIR/cluster.jsonl, the dashboard's cluster panel
/// (docs/DASHBOARD.md), which outlives any coordinator.</summary>
/// <param name="journal">the cluster.jsonl to append to; null: none</param>
public sealed class RunHistory(string? journal = null)
{
    public const string JournalFile = "cluster.jsonl";

    /// <summary>A committed round: who contributed, and how long it took from start to commit.</summary>
    public sealed record Round(long Number, IReadOnlyList<string> Participants, double Seconds);
    /// <summary>What was lost (a replica's node name, or "coordinator"), its address, when, and the seconds until the
    /// next committed round (null: none yet).</summary>
    public sealed record Recovery(string Lost, string Address, DateTime At, double? Seconds);

    public const int Kept = 10;
    public const string CoordinatorLost = "coordinator";
    readonly Queue<Round> rounds = new();
    readonly List<(Recovery Recovery, Stopwatch Clock)> recoveries = [];

    public IReadOnlyList<Round> Rounds => [.. rounds];
    public IReadOnlyList<Recovery> Recoveries => [.. recoveries.Select(r => r.Recovery)];

    /// <summary>A coordinator started on a checkpoint, on this node: a recovery until its first committed round.</summary>
    public void CoordinatorStarted(Akka.Actor.ActorSystem system) =>
        Lost(CoordinatorLost, ((Akka.Actor.ExtendedActorSystem)system).Provider.DefaultAddress.ToString());

    /// <summary>Starts a recovery, unless one for the same loss is still open.</summary>
    public void Lost(string what, string address)
    {
        if (recoveries.Any(r => r.Recovery.Lost == what && r.Recovery.Seconds is null)) return;
        Add(new Recovery(what, address, DateTime.UtcNow, null));
        Append("recovery", new() { ["lost"] = what, ["address"] = address });
    }

    /// <param name="members">the cluster's members now; a line is written when they differ from the last one's</param>
    public void Committed(long number, IEnumerable<string> participants, TimeSpan took, IReadOnlyList<ClusterStatus.Member>? members = null)
    {
        var round = new Round(number, [.. participants], took.TotalSeconds);
        rounds.Enqueue(round);
        while (rounds.Count > Kept) rounds.Dequeue();
        if (members is not null)
        {
            var list = new JsonArray(members.Select(m => (JsonNode)new JsonObject
            {
                ["name"] = m.Name, ["address"] = m.Address, ["roles"] = new JsonArray(m.Roles.Select(r => (JsonNode)r).ToArray()), ["status"] = m.Status,
            }).ToArray());
            var written = list.ToJsonString();
            if (written != lastMembers) Append("members", new() { ["members"] = list });
            lastMembers = written;
        }
        Append("round", new() { ["round"] = number, ["participants"] = new JsonArray(round.Participants.Select(p => (JsonNode)p).ToArray()), ["seconds"] = Math.Round(round.Seconds, 3) });
        for (int i = 0; i < recoveries.Count; i++)
            if (recoveries[i].Recovery.Seconds is null)
            {
                recoveries[i] = (recoveries[i].Recovery with { Seconds = recoveries[i].Clock.Elapsed.TotalSeconds }, recoveries[i].Clock);
                Append("recovered", new() { ["lost"] = recoveries[i].Recovery.Lost, ["address"] = recoveries[i].Recovery.Address, ["seconds"] = Math.Round(recoveries[i].Recovery.Seconds!.Value, 3) });
            }
    }

    /// <summary>The last members line as written: a new one goes out when the members differ.</summary>
    string? lastMembers;

    void Append(string kind, Dictionary<string, JsonNode?> fields)
    {
        if (journal is null) return;
        try
        {
            var line = new JsonObject { ["kind"] = kind, ["time"] = DateTime.UtcNow.ToString("O", System.Globalization.CultureInfo.InvariantCulture) };
            foreach (var (k, v) in fields) line[k] = v;
            AppendFile.AppendLine(journal, line.ToJsonString());
        }
        catch (IOException e) { Serilog.Log.Warning("{Journal} not written: {Error}", journal, e.Message); }
    }

    void Add(Recovery r)
    {
        recoveries.Add((r, Stopwatch.StartNew()));
        if (recoveries.Count > Kept) recoveries.RemoveAt(0);
    }
}
