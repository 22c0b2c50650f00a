using TorchSharp;
using Akka.Actor;
using Mamo.Data;
using Mamo.Model;
using Serilog;
using static TorchSharp.torch;

namespace Mamo.Actors.Pipeline;

/// <summary>Measures retrieval (and, when fine-tuning a classifier, accuracy on labelled sets) while training goes
/// on: copies the weights of the model it evaluates (pre-training: the teacher's; fine-tuning: the student's, from the
/// trainer), the only pause it causes their owner, then scores each held-out set on its own thread. Requests that arrive while it is busy collapse into
/// one, served next with the teacher as it then stands (as EmbeddingPublisher does), so evaluations never queue up
/// behind a slow one. A result is labelled with the teacher step it evaluated.</summary>
public sealed class Evaluator : ReceiveActor
{
    /// <summary>Evaluate the teacher as it now stands; Step: where training is.</summary>
    public sealed record EvaluateNow(long Step);
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

    /// <summary>A loaded held-out set, by name.</summary>
    public sealed record NamedSet(string Name, EvalSet Set);
    /// <summary>A loaded labelled set, by name.</summary>
    public sealed record NamedLabelledSet(string Name, LabelledSet Set);

    readonly IActorRef teacher, metrics;
    readonly IReadOnlyList<NamedSet> sets;
    readonly IReadOnlyList<NamedLabelledSet> labelled;
    readonly Func<MamoConfig, IObjective>? classifier;
    readonly MamoModel model;
    readonly int k, batchSize;
    readonly CancellationToken shutdown;
    bool busy, pending;
    IActorRef? drainer;
    long evaluations;

    /// <param name="teacher">the actor that answers GetWeights with the weights to evaluate</param>
    /// <param name="shutdown">cancelled when the run stops, so that an evaluation in progress gives way</param>
    /// <param name="classifier">the objective whose head scores <paramref name="labelled"/> (OnlineClassification)</param>
    public Evaluator(MamoConfig config, Device device, IReadOnlyList<NamedSet> sets, IActorRef teacher, IActorRef metrics, int k, int batchSize,
        CancellationToken shutdown, IReadOnlyList<NamedLabelledSet>? labelled = null, Func<MamoConfig, IObjective>? classifier = null)
    {
        this.labelled = labelled ?? [];
        this.classifier = classifier;
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
            if (sets.Count == 0 && this.labelled.Count == 0) return;
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
        Receive<MomentumTeacher.TeacherSnapshot>(s =>
        {
            try
            {
                Load(s);
                foreach (var (name, set) in sets)
                {
                    var started = DateTime.UtcNow;
                    var (i2t, t2i) = Retrieval.Scores(model, set.Images, set.TokenIds, set.AttentionMask, k, batchSize, shutdown);
                    using (i2t)
                    using (t2i)
                    {
                        var m = Retrieval.Metrics(i2t, t2i, set.TextToImage);
                        var probes = Probes(set, t2i);
                        metrics.Tell(new EvalCompleted(s.TeacherStep, name, set.ImageCount, set.TextCount, m, DateTime.UtcNow - started)
                        {
                            Probes = probes,
                            Thumbnails = probes.SelectMany(p => p.Top.Select(h => h.Image).Append(p.Truth)).Distinct().ToDictionary(i => i, i => set.Thumbnails[i]),
                        });
                    }
                }
                if (this.labelled.Count > 0) Classify(s);
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
                foreach (var (_, v) in s.Weights) v.Dispose();
                evaluations++;
                Self.Tell(new Finished());
            }
        });
    }

    const int ProbeCaptions = 4, ProbeTop = 5;

    /// <summary>The same captions at every evaluation (spread over the set), so the examples show the model changing.</summary>
    static List<RetrievalProbe> Probes(EvalSet set, TorchSharp.torch.Tensor scoresT2I) =>
        Enumerable.Range(0, ProbeCaptions).Select(i => (int)((long)i * set.TextCount / ProbeCaptions)).Distinct()
            .Select(c => new RetrievalProbe(set.Captions[c], set.TextToImage[c],
                Retrieval.Top(scoresT2I, c, ProbeTop).Select(h => new ProbeHit(h.Image, set.ImageIds[h.Image], h.Score)).ToList()))
            .ToList();

    void Request(long step)
    {
        busy = true;
        teacher.Tell(new MomentumTeacher.GetWeights(step));
    }

    public static Props Props(MamoConfig config, Device device, IReadOnlyList<NamedSet> sets, IActorRef teacher, IActorRef metrics, int k, int batchSize,
        CancellationToken shutdown, IReadOnlyList<NamedLabelledSet>? labelled = null, Func<MamoConfig, IObjective>? classifier = null) =>
        Akka.Actor.Props.Create(() => new Evaluator(config, device, sets, teacher, metrics, k, batchSize, shutdown, labelled, classifier)).WithDispatcher(Dispatchers.Model);

    /// <summary>Each labelled set through the snapshot's head, with the label map of its state.</summary>
    void Classify(MomentumTeacher.TeacherSnapshot s)
    {
        using var objective = classifier?.Invoke(model.Config) as OnlineClassification
            ?? throw new InvalidOperationException("labelled sets need the classification objective");
        objective.LoadState(s.State ?? new Dictionary<string, string>());
        if (objective.Labels.Count == 0) return;   // nothing learnt yet: no class to predict
        using (no_grad())
            foreach (var (name, p) in objective.Head.named_parameters()) p.copy_(s.Weights.Single(w => w.Name == $"{OnlineClassification.HeadPart}.{name}").Value);
        objective.Head.to(model.Device);
        foreach (var (name, set) in labelled)
        {
            shutdown.ThrowIfCancellationRequested();
            var started = DateTime.UtcNow;
            var predicted = objective.Predict(model, set.Images, set.TokenIds, set.AttentionMask, batchSize);
            metrics.Tell(new ClassifyCompleted(s.TeacherStep, name, ClassificationReport.Of(set.Labels, predicted), DateTime.UtcNow - started));
        }
    }

    void Load(MomentumTeacher.TeacherSnapshot s)
    {
        var saved = s.Weights.ToDictionary(w => w.Name, w => w.Value);
        using var noGrad = no_grad();
        foreach (var (name, p) in model.named_parameters()) p.copy_(saved[name]);
    }

    protected override void PostStop()
    {
        model.Dispose();   // the sets belong to the run, which outlives restarts
        base.PostStop();
    }
}
