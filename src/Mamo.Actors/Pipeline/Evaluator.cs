using TorchSharp;
using Akka.Actor;
using Mamo.Data;
using Mamo.Model;
using Serilog;
using static TorchSharp.torch;

namespace Mamo.Actors.Pipeline;

/// <summary>Measures the model while training goes on, on the run's held-out sets (each says what scoring it means:
/// retrieval R@K, or a classifier's accuracy): copies the weights of the model it evaluates (pre-training: the
/// teacher's; fine-tuning: the student's, from the trainer), the only pause it causes their owner, then scores each
/// set on its own thread. Requests that arrive while it is busy collapse into one, served next with the weights as
/// they then stand (as EmbeddingPublisher does), so evaluations never queue up behind a slow one. A result is labelled
/// with the step of the weights it evaluated.</summary>
public sealed class Evaluator : ReceiveActor
{
    /// <summary>Evaluate the model as it now stands; Step: where training is.</summary>
    public sealed record EvaluateNow(long Step);
    /// <summary>Asks the owner of the evaluated model for a copy of its weights (Weights).</summary>
    public sealed record GetWeights(long Step);
    /// <summary>A copy of the evaluated model's weights after WeightsStep updates (a teacher's EMA updates, or a
    /// student's steps), labelled with the Step asked about; the receiver owns the tensors. The weights of the
    /// objective's own parts are named "PART.NAME".</summary>
    /// <param name="State">the objective's state where the weights are a fine-tuned student's (its label map); null: none</param>
    public sealed record Weights(long Step, long WeightsStep, (string Name, Tensor Value)[] Tensors, IReadOnlyDictionary<string, string>? State = null);
    /// <summary>One held-out set's result; Step: the teacher step evaluated (the updates its EMA holds).</summary>
    public sealed record EvalCompleted(long Step, string Set, int Images, int Texts, RetrievalMetrics Metrics, TimeSpan Took)
    {
        /// <summary>Fixed captions of the set and the images they retrieved, best first.</summary>
        public IReadOnlyList<RetrievalProbe> Probes { get; init; } = [];
        /// <summary>PNG thumbnails of the images in <see cref="Probes"/>, by image index.</summary>
        public IReadOnlyDictionary<int, byte[]> Thumbnails { get; init; } = new Dictionary<int, byte[]>();
    }
    /// <summary>One probe caption (Truth: the index of its own image) and its top images.</summary>
    public sealed record RetrievalProbe(string Caption, int Truth, IReadOnlyList<ProbeHit> Top);
    public sealed record ProbeHit(int Image, string Id, double Score);
    /// <summary>One labelled set's classification result; Step: the student step evaluated.</summary>
    public sealed record ClassifyCompleted(long Step, string Set, ClassificationReport Report, TimeSpan Took);
    /// <summary>Asks for a Status.</summary>
    public sealed record GetStatus;
    /// <summary>Evaluations finished so far, whether one runs now, and whether a request waits for it.</summary>
    public sealed record Status(long Evaluations, bool Busy, bool Pending);
    sealed record Finished;
    /// <summary>Reply Drained once no evaluation runs or waits: a stopping run lets its last one finish.</summary>
    public sealed record Drain;
    public sealed record Drained;

    /// <summary>To the metrics target after every set of an evaluation is scored; Step: the weights' step.</summary>
    public sealed record EvaluationDone(long Step);

    readonly IActorRef owner, metrics;
    readonly IReadOnlyList<HeldOutSet> sets;
    readonly MamoModel model;
    readonly int k, batchSize;
    readonly CancellationToken shutdown;
    bool busy, pending;
    IActorRef? drainer;
    long evaluations;

    /// <param name="owner">the actor that answers GetWeights with the weights to evaluate (the teacher, or the trainer)</param>
    /// <param name="shutdown">cancelled when the run stops, so that an evaluation in progress gives way</param>
    public Evaluator(MamoConfig config, Device device, IReadOnlyList<HeldOutSet> sets, IActorRef owner, IActorRef metrics, int k, int batchSize,
        CancellationToken shutdown)
    {
        this.shutdown = shutdown;
        this.owner = owner;
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
        Receive<Drain>(_ =>
        {
            if (busy || pending) drainer = Sender;
            else Sender.Tell(new Drained());
        });
        // Sent to itself after an evaluation: it queues behind the requests that came in meanwhile, which thus collapse.
        Receive<Finished>(_ =>
        {
            busy = false;
            if (!pending)
            {
                drainer?.Tell(new Drained());
                drainer = null;
                return;
            }
            pending = false;
            Request(-1);
        });
        Receive<Weights>(w =>
        {
            try
            {
                Checkpoint.Load(model, w.Tensors.ToDictionary(t => t.Name, t => t.Value), $"the weights of step {w.WeightsStep}");
                foreach (var set in sets)
                {
                    shutdown.ThrowIfCancellationRequested();
                    if (set.Score(model, w, k, batchSize, shutdown) is { } result) metrics.Tell(result);
                }
                metrics.Tell(new EvaluationDone(w.WeightsStep));
            }
            catch (OperationCanceledException)
            {
                Log.Information("evaluation at step {Step} cancelled: the run is stopping", w.Step);
            }
            catch (Exception ex)
            {
                Log.Error(ex, "evaluation at step {Step} failed", w.Step);
            }
            finally
            {
                foreach (var (_, v) in w.Tensors) v.Dispose();
                evaluations++;
                Self.Tell(new Finished());
            }
        });
    }

    void Request(long step)
    {
        busy = true;
        owner.Tell(new GetWeights(step));
    }

    public static Props Props(MamoConfig config, Device device, IReadOnlyList<HeldOutSet> sets, IActorRef owner, IActorRef metrics, int k, int batchSize,
        CancellationToken shutdown) =>
        Akka.Actor.Props.Create(() => new Evaluator(config, device, sets, owner, metrics, k, batchSize, shutdown)).WithDispatcher(Dispatchers.Model);

    protected override void PostStop()
    {
        model.Dispose();   // the sets belong to the run, which outlives restarts
        base.PostStop();
    }
}
