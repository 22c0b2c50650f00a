using TorchSharp;
using static TorchSharp.torch;
using Xunit;

namespace Mamo.Model.Tests;

/// <summary>Every-step data parallelism at the model: replicas that each take a shard of a batch, with their features
/// all-gathered between threads, sum to the gradient of one process's step on the whole batch.</summary>
public class ShardTests
{
    static readonly MamoConfig Tiny = MamoConfig.Tiny;

    /// <summary>An all-gather between threads of one process: each shard leaves copies of its tensors, and every shard
    /// concatenates all of them once all have arrived.</summary>
    sealed class ThreadGather(int replicas) : IDisposable
    {
        readonly Barrier arrived = new(replicas), read = new(replicas);
        readonly IReadOnlyList<Tensor>[] given = new IReadOnlyList<Tensor>[replicas];

        public IBatchShard Shard(int index, long firstRow) => new One(this, index, firstRow);

        sealed class One(ThreadGather all, int index, long firstRow) : IBatchShard
        {
            public long FirstRow => firstRow;
            public int Index => index;
            public IReadOnlyList<Tensor> AllGather(IReadOnlyList<Tensor> local)
            {
                all.given[index] = local.Select(t => t.detach().clone().DetachFromDisposeScope()).ToList();
                all.arrived.SignalAndWait();
                var result = Enumerable.Range(0, local.Count).Select(i => cat(all.given.Select(g => g[i]).ToArray(), 0)).ToList();
                all.read.SignalAndWait();
                return result;
            }
        }

        public void Dispose()
        {
            foreach (var g in given) if (g is not null) foreach (var t in g) t.Dispose();
            arrived.Dispose();
            read.Dispose();
        }
    }

    sealed record Outcome(double Loss, IReadOnlyDictionary<string, double> Terms, Dictionary<string, Tensor> Gradients, Tensor Negatives);

    /// <summary>One replica's step: its own copy of the student (same seed, same weights), the teacher's targets of
    /// its own pairs, then the forward and backward of its share.</summary>
    static Outcome Step(PretrainingConfig pretraining, StepInput batch, int seed)
    {
        using var scope = NewDisposeScope();
        var student = MamoModel.Seeded(Tiny, 7);
        var teacher = Momentum.CreateTeacher(student);
        using var objective = new MamoPretraining(Tiny, pretraining);
        using var targets = objective.Targets(teacher, batch);
        using var loss = objective.Loss(student, batch, targets, seed);
        loss.Total.backward();
        var gradients = student.named_parameters().Where(p => p.parameter.grad is not null)
            .ToDictionary(p => p.name, p => p.parameter.grad!.clone().DetachFromDisposeScope());
        return new Outcome(loss.Total.ToDouble(), loss.Terms.ToDictionary(t => t.Key, t => t.Value.ToDouble()), gradients,
            loss.ItmNegatives!.clone().DetachFromDisposeScope());
    }

    static StepInput Rows(StepInput whole, int from, int to, IBatchShard shard) =>
        new(whole.Images[from..to], whole.TokenIds[from..to], whole.AttentionMask[from..to], whole.ImageKeys![from..to], Shard: shard);

    [Fact]
    public void Two_shards_of_a_batch_sum_to_the_gradient_of_the_whole_batch()
    {
        using var scope = NewDisposeScope();
        const int half = 4;
        var (images, ids, attn) = Pairs.Make(Tiny, 2 * half, seed: 21);
        // Pair 5 shows pair 1's image: ITC's positives and ITM's negatives must see the duplicate across the shards.
        images[5] = images[1];
        var keys = tensor(new long[] { 0, 1, 2, 3, 4, 1, 6, 7 });
        var whole = new StepInput(images, ids, attn, keys);
        // ITM's negatives come from each replica's own pairs; the single process draws them from each half.
        var pretraining = new PretrainingConfig { ItmNegativeGroup = half };
        const int seed = 1234;

        var single = Step(pretraining, whole, seed);
        using var gather = new ThreadGather(2);
        var outcomes = new Outcome[2];
        var threads = new[] { (0, 0, half), (1, half, 2 * half) }
            .Select(s => new Thread(() => outcomes[s.Item1] = Step(pretraining, Rows(whole, s.Item2, s.Item3, gather.Shard(s.Item1, s.Item2)), seed))).ToList();
        threads.ForEach(t => t.Start());
        threads.ForEach(t => t.Join());
        var (a, b) = (outcomes[0], outcomes[1]);

        Assert.Equal(single.Loss, a.Loss + b.Loss, 1e-5 * single.Loss);
        foreach (var (term, value) in single.Terms) Assert.Equal(value, a.Terms[term] + b.Terms[term], 1e-5 * value);
        // The same hard negatives: the second shard's, in its own rows, are the single process's second half.
        Assert.True(Pairs.Same(single.Negatives[.., ..half], a.Negatives));
        Assert.True(Pairs.Same(single.Negatives[.., half..] - half, b.Negatives));
        Assert.Equal(single.Gradients.Keys.Order(), a.Gradients.Keys.Order());
        var worst = single.Gradients.Max(g => (a.Gradients[g.Key] + b.Gradients[g.Key] - g.Value).norm().ToDouble() / g.Value.norm().ToDouble());
        Assert.True(worst < 1e-5, $"worst relative gradient difference {worst:E2}");
    }

    [Fact]
    public void A_shard_that_is_the_whole_batch_is_the_unsharded_step()
    {
        using var scope = NewDisposeScope();
        var (images, ids, attn) = Pairs.Make(Tiny, 6, seed: 22);
        var whole = new StepInput(images, ids, attn, arange(6L));
        using var gather = new ThreadGather(1);
        var single = Step(new PretrainingConfig(), whole, seed: 9);
        var sharded = Step(new PretrainingConfig(), Rows(whole, 0, 6, gather.Shard(0, 0)), seed: 9);
        Assert.Equal(single.Loss, sharded.Loss, 1e-6 * single.Loss);
        Assert.True(Pairs.Same(single.Negatives, sharded.Negatives));
        foreach (var (name, g) in single.Gradients) Assert.True((sharded.Gradients[name] - g).abs().max().ToDouble() <= 1e-6 * g.abs().max().ToDouble() + 1e-12, name);
    }
}
