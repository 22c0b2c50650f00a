using Mamo.Data;
using Mamo.Data.Kafka;
using Mamo.Model;
using TorchSharp;
using static TorchSharp.torch;

namespace Mamo.Actors;

/// <summary>An item to embed: its id, the prepared image (eval transform) and its first caption, tokenised.</summary>
public sealed record EmbeddingItem(string Id, float[] Pixels, long[] TokenIds, long[] AttentionMask)
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
/// One model version, loaded from a checkpoint's teacher weights (the momentum model: the one evaluation scores),
/// turning items into the unit-length ITC embeddings that retrieval ranks by. The version is the checkpoint's step.
/// </summary>
public sealed class Embedder : IDisposable
{
    public const string Image = "image", Text = "text", Both = "both";
    readonly MamoModel model;
    readonly Device device;

    public string Version { get; }
    public string Checkpoint { get; }
    public MamoConfig Config { get; }

    Embedder(MamoModel model, MamoConfig config, Device device, long step, string checkpoint)
    {
        this.model = model;
        this.device = device;
        Config = config;
        Version = $"step-{step}";
        Checkpoint = checkpoint;
    }

    public static Embedder Load(string checkpointDir, Device device)
    {
        var config = Mamo.Model.Checkpoint.ReadConfig(checkpointDir);
        var step = Mamo.Model.Checkpoint.ReadState(checkpointDir).Step;
        var model = new MamoModel(config);
        try
        {
            model.to(device);
            Mamo.Model.Checkpoint.LoadModel(checkpointDir, Mamo.Model.Checkpoint.TeacherFile, model);
            model.eval();
            return new Embedder(model, config, device, step, checkpointDir);
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

    public void Dispose() => model.Dispose();
}
