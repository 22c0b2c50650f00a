using Mamo.Data;
using Mamo.Model;
using TorchSharp;
using static TorchSharp.torch;

namespace Mamo.Actors.Pipeline;

/// <summary>A held-out set a run is judged on while it trains, and what scoring it means; the run's task
/// (Run/TrainingTask) says which it has. Loaded once per run: it outlives pipeline restarts.</summary>
public abstract class HeldOutSet(string name) : IDisposable
{
    public string Name => name;

    /// <summary>Scores the evaluated model (its weights loaded from <paramref name="weights"/>); the result goes to the
    /// run's metrics, null where there is nothing to score yet.</summary>
    public abstract object? Score(MamoModel model, Evaluator.Weights weights, int k, int batchSize, CancellationToken stop);

    public abstract void Dispose();

    /// <summary>A set's name from its spec: dataset:emoji/test is emoji-test.</summary>
    public static string NameOf(string spec) => spec.Replace("dataset:", "").Replace('/', '-');
}

/// <summary>Zero-shot retrieval (ALBEF's convention): ITC ranks every candidate, ITM re-ranks the top k; with the top
/// images of a few fixed captions, so the dashboard shows the model changing.</summary>
public sealed class RetrievalSet(string name, EvalSet set) : HeldOutSet(name)
{
    const int ProbeCaptions = 4, ProbeTop = 5;

    public EvalSet Set => set;

    public override object Score(MamoModel model, Evaluator.Weights weights, int k, int batchSize, CancellationToken stop)
    {
        var started = DateTime.UtcNow;
        var (i2t, t2i) = Retrieval.Scores(model, set.Images, set.TokenIds, set.AttentionMask, k, batchSize, stop);
        using (i2t)
        using (t2i)
        {
            var probes = Probes(t2i);
            return new Evaluator.EvalCompleted(weights.WeightsStep, Name, set.ImageCount, set.TextCount, Retrieval.Metrics(i2t, t2i, set.TextToImage),
                DateTime.UtcNow - started)
            {
                Probes = probes,
                Thumbnails = probes.SelectMany(p => p.Top.Select(h => h.Image).Append(p.Truth)).Distinct().ToDictionary(i => i, i => set.Thumbnails[i]),
            };
        }
    }

    /// <summary>The same captions at every evaluation (spread over the set).</summary>
    List<Evaluator.RetrievalProbe> Probes(Tensor scoresT2I) =>
        Enumerable.Range(0, ProbeCaptions).Select(i => (int)((long)i * set.TextCount / ProbeCaptions)).Distinct()
            .Select(c => new Evaluator.RetrievalProbe(set.Captions[c], set.TextToImage[c],
                Retrieval.Top(scoresT2I, c, ProbeTop).Select(h => new Evaluator.ProbeHit(h.Image, set.ImageIds[h.Image], h.Score)).ToList()))
            .ToList();

    public override void Dispose() => set.Dispose();
}

/// <summary>A labelled set scored by a fine-tuned classifier: accuracy and macro-F1 of its head, with the label map of
/// the weights' state, on the fused [CLS] of each image and the task's text.</summary>
/// <param name="classifier">a classifier of the run's settings, before its state and head are loaded</param>
public sealed class ClassificationSet(string name, LabelledSet set, Func<MamoConfig, OnlineClassification> classifier) : HeldOutSet(name)
{
    public LabelledSet Set => set;

    public override object? Score(MamoModel model, Evaluator.Weights weights, int k, int batchSize, CancellationToken stop)
    {
        using var objective = classifier(model.Config);
        objective.LoadState(weights.State ?? new Dictionary<string, string>());
        if (objective.Labels.Count == 0) return null;   // nothing learnt yet: no class to predict
        var prefix = OnlineClassification.HeadPart + ".";
        Checkpoint.Load(objective.Head, weights.Tensors.Where(w => w.Name.StartsWith(prefix)).ToDictionary(w => w.Name[prefix.Length..], w => w.Value),
            $"the head of step {weights.WeightsStep}");
        objective.Head.to(model.Device);
        var started = DateTime.UtcNow;
        var predicted = objective.Predict(model, set.Images, set.TokenIds, set.AttentionMask, batchSize);
        return new Evaluator.ClassifyCompleted(weights.WeightsStep, Name, ClassificationReport.Of(set.Labels, predicted), DateTime.UtcNow - started);
    }

    public override void Dispose() => set.Dispose();
}
