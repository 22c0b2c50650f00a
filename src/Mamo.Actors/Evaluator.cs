using TorchSharp;
using Akka.Actor;
using Mamo.Data;
using Mamo.Model;
using Serilog;
using static TorchSharp.torch;

namespace Mamo.Actors;

/// <summary>Measures retrieval while training goes on: copies the teacher's weights (the only pause it causes the
/// teacher), then ranks each held-out set on its own thread. Requests that arrive while it is busy collapse into
/// one, served next with the teacher as it then stands (as EmbeddingPublisher does), so evaluations never queue up
/// behind a slow one. A result is labelled with the teacher step it evaluated.</summary>
public sealed class Evaluator : ReceiveActor
{
    /// <summary>Evaluate the teacher as it now stands; Step: where training is.</summary>
    public sealed record EvaluateNow(long Step);
    /// <summary>One held-out set's result; Step: the teacher step evaluated (the updates its EMA holds).</summary>
    public sealed record EvalCompleted(long Step, string Set, int Images, int Texts, RetrievalMetrics Metrics, TimeSpan Took);
    /// <summary>Asks for a Status.</summary>
    public sealed record GetStatus;
    /// <summary>Evaluations finished so far, whether one runs now, and whether a request waits for it.</summary>
    public sealed record Status(long Evaluations, bool Busy, bool Pending);
    sealed record Finished;

    /// <summary>A loaded held-out set, by name.</summary>
    public sealed record NamedSet(string Name, EvalSet Set);

    readonly IActorRef teacher, metrics;
    readonly IReadOnlyList<NamedSet> sets;
    readonly MamoModel model;
    readonly int k, batchSize;
    readonly CancellationToken shutdown;
    bool busy, pending;
    long evaluations;

    /// <param name="shutdown">cancelled when the run stops, so that an evaluation in progress gives way</param>
    public Evaluator(MamoConfig config, Device device, IReadOnlyList<NamedSet> sets, IActorRef teacher, IActorRef metrics, int k, int batchSize,
        CancellationToken shutdown)
    {
        this.shutdown = shutdown;
        this.teacher = teacher;
        this.metrics = metrics;
        this.sets = sets;
        this.k = k;
        this.batchSize = batchSize;
        model = new MamoModel(config);
        model.to(device);
        model.eval();

        Receive<EvaluateNow>(e =>
        {
            if (sets.Count == 0) return;
            if (busy) pending = true;
            else Request(e.Step);
        });
        Receive<GetStatus>(_ => Sender.Tell(new Status(evaluations, busy, pending)));
        // Sent to itself after an evaluation: it queues behind the requests that came in meanwhile, which thus collapse.
        Receive<Finished>(_ =>
        {
            busy = false;
            if (!pending) return;
            pending = false;
            Request(-1);
        });
        Receive<MomentumTeacher.TeacherSnapshot>(s =>
        {
            try
            {
                Load(s);
                foreach (var (name, set) in sets)
                {
                    var started = DateTime.UtcNow;
                    var m = Retrieval.Evaluate(model, set.Images, set.TokenIds, set.AttentionMask, set.TextToImage, k, batchSize, shutdown);
                    metrics.Tell(new EvalCompleted(s.TeacherStep, name, set.ImageCount, set.TextCount, m, DateTime.UtcNow - started));
                }
            }
            catch (OperationCanceledException)
            {
                Log.Information("evaluation at step {Step} cancelled: the run is stopping", s.Step);
            }
            catch (Exception ex)
            {
                Log.Error(ex, "evaluation at step {Step} failed", s.Step);
            }
            finally
            {
                evaluations++;
                Self.Tell(new Finished());
            }
        });
    }

    void Request(long step)
    {
        busy = true;
        teacher.Tell(new MomentumTeacher.GetWeights(step));
    }

    public static Props Props(MamoConfig config, Device device, IReadOnlyList<NamedSet> sets, IActorRef teacher, IActorRef metrics, int k, int batchSize,
        CancellationToken shutdown) =>
        Akka.Actor.Props.Create(() => new Evaluator(config, device, sets, teacher, metrics, k, batchSize, shutdown)).WithDispatcher(Dispatchers.Model);

    void Load(MomentumTeacher.TeacherSnapshot s)
    {
        try
        {
            var saved = s.Weights.ToDictionary(w => w.Name, w => w.Value);
            using var noGrad = no_grad();
            foreach (var (name, p) in model.named_parameters()) p.copy_(saved[name]);
        }
        finally
        {
            foreach (var (_, v) in s.Weights) v.Dispose();
        }
    }

    protected override void PostStop()
    {
        model.Dispose();   // the sets belong to the run, which outlives restarts
        base.PostStop();
    }
}
