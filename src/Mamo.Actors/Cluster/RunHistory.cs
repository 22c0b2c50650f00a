using System.Diagnostics;

namespace Mamo.Actors.Cluster;

/// <summary>The recent past that `mamo cluster status` shows, kept by the coordinator: the last rounds (every-step:
/// steps) with their participants and length, and each recovery with the time until the next committed round. A
/// recovery starts when a replica's node is marked unreachable (the failure detector's pause after a kill), or when
/// the replica leaves, whichever is first; or when the coordinator starts on a checkpoint (after its node died, or
/// in a restarted cluster). It lives in the coordinator's memory: a coordinator that moves starts a new one.</summary>
public sealed class RunHistory
{
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
    }

    public void Committed(long number, IEnumerable<string> participants, TimeSpan took)
    {
        rounds.Enqueue(new Round(number, [.. participants], took.TotalSeconds));
        while (rounds.Count > Kept) rounds.Dequeue();
        for (int i = 0; i < recoveries.Count; i++)
            if (recoveries[i].Recovery.Seconds is null)
                recoveries[i] = (recoveries[i].Recovery with { Seconds = recoveries[i].Clock.Elapsed.TotalSeconds }, recoveries[i].Clock);
    }

    void Add(Recovery r)
    {
        recoveries.Add((r, Stopwatch.StartNew()));
        if (recoveries.Count > Kept) recoveries.RemoveAt(0);
    }
}
