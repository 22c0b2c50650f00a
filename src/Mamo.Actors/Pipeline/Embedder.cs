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
/// One model version, loaded from a checkpoint's teacher weights (the momentum model: the one evaluation scores), or
/// its student's where it keeps no teacher (a fine-tuned classifier), turning items into the unit-length ITC embeddings
/// that retrieval ranks by. The version is the checkpoint's step. A fine-tuned classifier's checkpoint also predicts.
/// </summary>
public sealed class Embedder : IDisposable
{
    public const string Image = "image", Text = "text", Both = "both";
    readonly MamoModel model;
    readonly Device device;
    readonly IReadOnlyList<string> parts;

    public string Version { get; }
    public string Checkpoint { get; }
    public MamoConfig Config { get; }

    Embedder(MamoModel model, MamoConfig config, Device device, long step, string checkpoint, IReadOnlyList<string> parts)
    {
        this.model = model;
        this.parts = parts;
        this.device = device;
        Config = config;
        Version = $"step-{step}";
        Checkpoint = checkpoint;
    }

    public static Embedder Load(string checkpointDir, Device device)
    {
        var config = Mamo.Model.Checkpoint.ReadConfig(checkpointDir);
        var state = Mamo.Model.Checkpoint.ReadState(checkpointDir);
        var parts = Mamo.Model.Checkpoint.Parts(state);
        var model = new MamoModel(config);
        try
        {
            model.to(device);
            Mamo.Model.Checkpoint.LoadModel(checkpointDir,
                parts.Contains(Mamo.Model.Checkpoint.TeacherPart) ? Mamo.Model.Checkpoint.TeacherFile : Mamo.Model.Checkpoint.StudentFile, model);
            model.eval();
            return new Embedder(model, config, device, state.Step, checkpointDir, parts);
        }
        catch
        {
            model.Dispose();
            throw;
        }
    }

    /// <summary>Embeds the items in batches and hands each vector to the sink; modality image, text or both.</summary>
    public int Embed(IReadOnlyList<EmbeddingItem> items, string modality, int batchSize, IEmbeddingSink sink)
    {
        var written = 0;
        int size = Config.ImageSize, length = Config.MaxTextLength;
        for (var start = 0; start < items.Count; start += batchSize)
        {
            var batch = items.Skip(start).Take(batchSize).ToList();
            using var scope = NewDisposeScope();
            using var noGrad = no_grad();
            if (modality is Image or Both)
            {
                var images = tensor(batch.SelectMany(i => i.Pixels).ToArray(), [batch.Count, 3, size, size]).to(device);
                written += Write(batch, Image, model.ImageEmbedding(model.EncodeImage(images)), sink);
            }
            if (modality is Text or Both)
            {
                var ids = tensor(batch.SelectMany(i => i.TokenIds).ToArray(), [batch.Count, length]).to(device);
                var mask = tensor(batch.SelectMany(i => i.AttentionMask).ToArray(), [batch.Count, length]).to(device);
                written += Write(batch, Text, model.TextEmbedding(model.EncodeText(ids, mask)), sink);
            }
        }
        return written;
    }

    int Write(List<EmbeddingItem> batch, string modality, Tensor embeddings, IEmbeddingSink sink)
    {
        var flat = embeddings.cpu().contiguous().data<float>().ToArray();
        var dim = (int)embeddings.shape[1];
        for (var i = 0; i < batch.Count; i++)
            sink.Write(new EmbeddingRecord(batch[i].Id, modality, Version, flat[(i * dim)..((i + 1) * dim)]));
        return batch.Count;
    }

    /// <summary>A fine-tuned classifier's prediction for each item, to the sink; 0 where the checkpoint has no head.</summary>
    public int Predict(IReadOnlyList<EmbeddingItem> items, int batchSize, IEmbeddingSink sink)
    {
        if (!parts.Contains(OnlineClassification.HeadPart)) return 0;
        using var classifier = OnlineClassification.Load(Checkpoint, Config, device);
        if (classifier.Labels.Count == 0) return 0;   // an open label set before its first record: no class yet
        // The head was trained on the student: the embedding model where the checkpoint keeps no teacher.
        using var ownStudent = parts.Contains(Mamo.Model.Checkpoint.TeacherPart) ? new MamoModel(Config) : null;
        if (ownStudent is not null)
        {
            Mamo.Model.Checkpoint.LoadModel(Checkpoint, Mamo.Model.Checkpoint.StudentFile, ownStudent);
            ownStudent.to(device);
        }
        var student = ownStudent ?? model;
        int size = Config.ImageSize, length = Config.MaxTextLength;
        using var scope = NewDisposeScope();
        var images = tensor(items.SelectMany(i => i.Pixels).ToArray(), [items.Count, 3, size, size]);
        var ids = tensor(items.SelectMany(i => i.Prompt?.Ids ?? i.TokenIds).ToArray(), [items.Count, length]);
        var mask = tensor(items.SelectMany(i => i.Prompt?.AttentionMask ?? i.AttentionMask).ToArray(), [items.Count, length]);
        var predicted = classifier.PredictWithProbability(student, images, ids, mask, batchSize);
        for (var i = 0; i < items.Count; i++)
            sink.Write(new PredictionRecord(items[i].Id, FineTuneSettings.Classify, Version, predicted[i].Label, predicted[i].Probability));
        return items.Count;
    }

    public void Dispose() => model.Dispose();
}
