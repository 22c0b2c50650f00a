using System.Globalization;
using Akka.Actor;
using Mamo.Model;
using Serilog;
using Mamo.Actors.Sources;

namespace Mamo.Actors.Pipeline;

/// <summary>Makes progress durable. Joins the named parts of a step as the actors that own them send them (the
/// trainer: student, optimizer and the objective's own parts; the teacher: its EMA weights), writes the checkpoint
/// once every declared part of that step is in (Checkpoint.Commit: a kill at any moment leaves the previous one
/// whole), keeps the last K, and only then announces CheckpointDurable to its listeners, on which sources commit.
/// The one writer of checkpoints: a single node's, a cluster replica's own, and a coordinator's.</summary>
public sealed class Checkpointer : ReceiveActor
{
    /// <summary>Some parts of step Step's checkpoint, from the actor that owns them, with the state only it knows;
    /// the checkpointer owns (and disposes) the tensors.</summary>
    /// <param name="Extra">state of the objective's own (MamoTrainer.Extra: a label map), saved in state.json</param>
    public sealed record Parts(long Step, IReadOnlyList<Checkpoint.Part> Tensors, StreamPosition? Position = null, long? OptimizerStep = null,
        long? TeacherStep = null, IReadOnlyDictionary<string, string>? Extra = null);

    /// <summary>To the listeners once a checkpoint is on disk.</summary>
    public sealed record CheckpointDurable(long Step, StreamPosition Position, string Path);

    public const string SeedKey = "seed";

    readonly string runDir;
    readonly MamoConfig config;
    readonly IReadOnlySet<string> declared;
    readonly int keepLast, seed;
    readonly Dictionary<long, List<Parts>> pending = new();
    readonly IReadOnlyList<IActorRef> listeners;

    /// <param name="parts">the names of the parts every checkpoint of this run holds</param>
    /// <param name="listeners">told CheckpointDurable, in this order</param>
    public Checkpointer(string runDir, MamoConfig config, IReadOnlyCollection<string> parts, int keepLast, int seed, IReadOnlyList<IActorRef> listeners)
    {
        this.listeners = listeners;
        this.seed = seed;
        this.runDir = runDir;
        this.config = config;
        this.keepLast = keepLast;
        declared = parts.ToHashSet();
        Receive<Parts>(OnParts);
    }

    public static Props Props(string runDir, MamoConfig config, IReadOnlyCollection<string> parts, int keepLast, int seed, IReadOnlyList<IActorRef> listeners) =>
        Akka.Actor.Props.Create(() => new Checkpointer(runDir, config, parts, keepLast, seed, listeners)).WithDispatcher(Dispatchers.Io);

    void OnParts(Parts p)
    {
        var unknown = p.Tensors.Select(t => t.Name).FirstOrDefault(n => !declared.Contains(n));
        if (unknown is not null)
        {
            Dispose(p);
            throw new InvalidOperationException($"checkpoint part '{unknown}' was not declared (declared: {string.Join(", ", declared)})");
        }
        if (!pending.TryGetValue(p.Step, out var arrived)) pending[p.Step] = arrived = [];
        arrived.Add(p);
        var names = arrived.SelectMany(a => a.Tensors).Select(t => t.Name).ToHashSet();
        if (!declared.IsSubsetOf(names)) return;
        pending.Remove(p.Step);
        try
        {
            var position = arrived.Select(a => a.Position).FirstOrDefault(x => x is not null) ?? StreamPosition.None;
            var extra = new Dictionary<string, string>(position.ToExtra()) { [SeedKey] = seed.ToString(CultureInfo.InvariantCulture) };
            foreach (var (k, v) in arrived.SelectMany(a => a.Extra ?? new Dictionary<string, string>())) extra[k] = v;
            var state = new Checkpoint.State(p.Step,
                arrived.Select(a => a.OptimizerStep).FirstOrDefault(x => x is not null) ?? 0,
                arrived.Select(a => a.TeacherStep).FirstOrDefault(x => x is not null) ?? p.Step,
                extra);
            var path = Checkpoint.Commit(runDir, config, arrived.SelectMany(a => a.Tensors), state, keepLast);
            Log.Information("checkpoint at step {Step} written to {Path}", p.Step, path);
            var durable = new CheckpointDurable(p.Step, position, path);
            foreach (var listener in listeners) listener.Tell(durable);
        }
        finally
        {
            foreach (var a in arrived) Dispose(a);
        }
    }

    static void Dispose(Parts p)
    {
        foreach (var part in p.Tensors) foreach (var (_, v) in part.Tensors) v.Dispose();
    }

    protected override void PostStop()
    {
        foreach (var a in pending.Values.SelectMany(x => x)) Dispose(a);
        base.PostStop();
    }
}
