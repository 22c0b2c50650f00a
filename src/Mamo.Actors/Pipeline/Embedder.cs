using Mamo.Data;
using Mamo.Data.Kafka;
using Mamo.Model;
using TorchSharp;
using static TorchSharp.torch;
using Mamo.Actors.Run;

namespace Mamo.Actors.Pipeline;

/// <summary>An item to embed: its id, the prepared image (eval transform) and its first caption, tokenised; for a
/// classifier trained on a fixed prompt, also that prompt, tokenised (Prompt), which it pairs the image with.</summary>
public sealed record EmbeddingItem(string Id, float[] Pixels, long[] TokenIds, long[] AttentionMask, (long[] Ids, long[] AttentionMask)? Prompt = null)
{
    /// <summary>Prepares a sample, or says why it cannot be embedded.</summary>
    public static EmbeddingItem? Prepare(ImageTextSample sample, SamplePreparer preparer, out BadInput? bad) =>
        preparer.TryPrepareForEvaluation(sample, out var pixels, out var captions, out bad)
            ? new EmbeddingItem(sample.Id, pixels, captions[0].Ids, captions[0].AttentionMask)
            : null;

    /// <summary>Prepares every sample; the ones that cannot be embedded are added to <paramref name="bad"/>.</summary>
    public static List<EmbeddingItem> PrepareAll(IEnumerable<ImageTextSample> samples, SamplePreparer preparer, List<BadInput> bad)
    {
        var items = new List<EmbeddingItem>();
        foreach (var sample in samples)
            if (Prepare(sample, preparer, out var why) is { } item) items.Add(item);
            else bad.Add(why!);
        return items;
    }
}

/// <summary>
/// One model version, loaded from a checkpoint for inference (its momentum teacher, the model evaluation scores, or its
/// student where it keeps no teacher), turning items into the unit-length ITC embeddings that retrieval ranks by. The
/// version is the checkpoint's step.
/// </summary>
public sealed class Embedder : IDisposable
{
    public const string Image = "image", Text = "text", Both = "both";
    readonly MamoModel model;
    readonly Device device;

    public string Version { get; }
    public long Step { get; }
    public string Checkpoint { get; }
    public MamoConfig Config => model.Config;

    Embedder(MamoModel model, Device device, long step, string checkpoint)
    {
        this.model = model;
        this.device = device;
        Version = VersionOf(step);
        Step = step;
        Checkpoint = checkpoint;
    }

    /// <summary>The version name of a checkpoint's step.</summary>
    public static string VersionOf(long step) => $"step-{step}";

    public static Embedder Load(string checkpointDir, Device device) =>
        new(Mamo.Model.Checkpoint.LoadInference(checkpointDir, device), device, Mamo.Model.Checkpoint.ReadState(checkpointDir).Step, checkpointDir);

    /// <summary>Embeds the items in batches and hands each vector to the sink; modality image, text or both.</summary>
    public int Embed(IReadOnlyList<EmbeddingItem> items, string modality, int batchSize, IEmbeddingSink sink)
    {
        var written = 0;
        for (var start = 0; start < items.Count; start += batchSize)
        {
            var batch = items.Skip(start).Take(batchSize).ToList();
            if (modality is Image or Both) written += Write(batch, Image, EmbedImages(batch.Select(i => i.Pixels).ToList()), sink);
            if (modality is Text or Both) written += Write(batch, Text, EmbedTexts(batch.Select(i => (i.TokenIds, i.AttentionMask)).ToList()), sink);
        }
        return written;
    }

    /// <summary>The embedding of each image (pixels prepared with the eval transform), in one forward pass.</summary>
    public float[][] EmbedImages(IReadOnlyList<float[]> pixels)
    {
        var size = Config.ImageSize;
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var images = tensor(pixels.SelectMany(p => p).ToArray(), [pixels.Count, 3, size, size]).to(device);
        return Rows(model.ImageEmbedding(model.EncodeImage(images)));
    }

    /// <summary>The embedding of each text (token ids and attention mask, MaxTextLength long), in one forward pass.</summary>
    public float[][] EmbedTexts(IReadOnlyList<(long[] Ids, long[] AttentionMask)> texts)
    {
        var length = Config.MaxTextLength;
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var ids = tensor(texts.SelectMany(t => t.Ids).ToArray(), [texts.Count, length]).to(device);
        var mask = tensor(texts.SelectMany(t => t.AttentionMask).ToArray(), [texts.Count, length]).to(device);
        return Rows(model.TextEmbedding(model.EncodeText(ids, mask)));
    }

    static float[][] Rows(Tensor embeddings)
    {
        var flat = embeddings.cpu().contiguous().data<float>().ToArray();
        var dim = (int)embeddings.shape[1];
        return Enumerable.Range(0, (int)embeddings.shape[0]).Select(i => flat[(i * dim)..((i + 1) * dim)]).ToArray();
    }

    int Write(List<EmbeddingItem> batch, string modality, float[][] embeddings, IEmbeddingSink sink)
    {
        for (var i = 0; i < batch.Count; i++) sink.Write(new EmbeddingRecord(batch[i].Id, modality, Version, embeddings[i]));
        return batch.Count;
    }

    public void Dispose() => model.Dispose();
}

/// <summary>What a publisher sends beside a version's embeddings; the run's task says which (Run/TrainingTask).</summary>
public interface IPredictionPublisher
{
    /// <summary>Writes the checkpoint's output for each item to the sink; returns how many it wrote.</summary>
    int Publish(string checkpoint, IReadOnlyList<EmbeddingItem> items, int batchSize, IEmbeddingSink sink, Device device);
}

/// <summary>A fine-tuned classifier's prediction of each item, with its head's probability: the head was trained on
/// the student, so the student predicts.</summary>
public sealed class ClassifierPredictions : IPredictionPublisher
{
    public int Publish(string checkpoint, IReadOnlyList<EmbeddingItem> items, int batchSize, IEmbeddingSink sink, Device device)
    {
        var config = Checkpoint.ReadConfig(checkpoint);
        using var classifier = OnlineClassification.Load(checkpoint, config, device);
        if (classifier.Labels.Count == 0) return 0;   // an open label set before its first record: no class yet
        using var student = Checkpoint.LoadInference(checkpoint, device, Checkpoint.StudentPart);
        int size = config.ImageSize, length = config.MaxTextLength;
        using var scope = NewDisposeScope();
        var images = tensor(items.SelectMany(i => i.Pixels).ToArray(), [items.Count, 3, size, size]);
        var ids = tensor(items.SelectMany(i => i.Prompt?.Ids ?? i.TokenIds).ToArray(), [items.Count, length]);
        var mask = tensor(items.SelectMany(i => i.Prompt?.AttentionMask ?? i.AttentionMask).ToArray(), [items.Count, length]);
        var predicted = classifier.PredictWithProbability(student, images, ids, mask, batchSize);
        var version = Embedder.VersionOf(Checkpoint.ReadState(checkpoint).Step);
        for (var i = 0; i < items.Count; i++)
            sink.Write(new PredictionRecord(items[i].Id, FineTuneSettings.Classify, version, predicted[i].Label, predicted[i].Probability));
        return items.Count;
    }
}
