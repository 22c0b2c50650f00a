using System.Collections.Concurrent;
using Mamo.Actors.Pipeline;

namespace Mamo.Cli.Serving;

/// <summary>
/// Turns concurrent queries into few forward passes: one thread takes the first query waiting, then whatever else
/// arrives within the latency budget (up to the batch size), and embeds each version's texts and images of that batch
/// in one pass each. The models are touched from this thread only, so a version can be loaded or unloaded (ModelVersions)
/// while requests come in. Queries are prepared (tokenised, decoded) by their request, before they wait here.
/// </summary>
public sealed class QueryBatcher : IDisposable
{
    /// <summary>What one forward pass took: how many queries, of which modality.</summary>
    public sealed record Pass(string Modality, int Queries);

    sealed record Query(ModelVersions.Version Version, (long[] Ids, long[] AttentionMask)? Text, float[]? Pixels)
    {
        public TaskCompletionSource<float[]> Done { get; } = new(TaskCreationOptions.RunContinuationsAsynchronously);
        public string Modality => Text is null ? Embedder.Image : Embedder.Text;
    }

    readonly BlockingCollection<Query> waiting;
    readonly ModelVersions versions;
    readonly int maxBatch;
    readonly TimeSpan budget;
    readonly Action<Pass> passed;
    readonly Thread worker;

    /// <param name="budget">how long the first query of a batch waits for others</param>
    /// <param name="passed">told of each forward pass (metrics)</param>
    public QueryBatcher(ModelVersions versions, int maxBatch, TimeSpan budget, int capacity, Action<Pass> passed)
    {
        this.versions = versions;
        this.maxBatch = maxBatch;
        this.budget = budget;
        this.passed = passed;
        waiting = new BlockingCollection<Query>(capacity);
        worker = new Thread(Run) { IsBackground = true, Name = "mamo-serve-batcher" };
        worker.Start();
    }

    public Task<float[]> EmbedText(ModelVersions.Version version, (long[] Ids, long[] AttentionMask) text) => Enqueue(new Query(version, text, null));

    public Task<float[]> EmbedImage(ModelVersions.Version version, float[] pixels) => Enqueue(new Query(version, null, pixels));

    /// <exception cref="ServiceBusyException">as many queries wait as the queue holds</exception>
    Task<float[]> Enqueue(Query query)
    {
        try
        {
            if (!waiting.TryAdd(query)) throw new ServiceBusyException($"{waiting.BoundedCapacity} queries are waiting already; try again shortly");
        }
        catch (InvalidOperationException) { throw new ServiceBusyException("the service is stopping"); }
        return query.Done.Task;
    }

    void Run()
    {
        foreach (var first in waiting.GetConsumingEnumerable())
        {
            var batch = new List<Query> { first };
            var deadline = DateTime.UtcNow + budget;
            while (batch.Count < maxBatch)
            {
                var left = deadline - DateTime.UtcNow;
                if (!waiting.TryTake(out var next, left > TimeSpan.Zero ? left : TimeSpan.Zero)) break;
                batch.Add(next);
            }
            foreach (var group in batch.GroupBy(q => (q.Version.Step, q.Modality)))
                Answer(group.ToList());
        }
    }

    void Answer(List<Query> group)
    {
        try
        {
            var model = versions.Model(group[0].Version);
            var vectors = group[0].Text is not null
                ? model.EmbedTexts(group.Select(q => q.Text!.Value).ToList())
                : model.EmbedImages(group.Select(q => q.Pixels!).ToList());
            passed(new Pass(group[0].Modality, group.Count));
            for (var i = 0; i < group.Count; i++) group[i].Done.SetResult(vectors[i]);
        }
        catch (Exception e)
        {
            // A version pruned before it loaded, or a model that failed: those queries fail, the service goes on.
            foreach (var q in group) q.Done.TrySetException(e);
        }
    }

    /// <summary>Answers what waits, then stops the thread.</summary>
    public void Dispose()
    {
        waiting.CompleteAdding();
        worker.Join();
        waiting.Dispose();
    }
}

/// <summary>The service cannot take a query now (its queue is full, or it is stopping): 503, try again.</summary>
public sealed class ServiceBusyException(string message) : Exception(message);
