using TorchSharp;
using static TorchSharp.torch;

namespace Mamo.Model;

/// <summary>DiLoCo's outer optimiser settings (Douillard et al. 2023): SGD with Nesterov momentum at lr 0.7, momentum 0.9.</summary>
public sealed record OuterOptimizerConfig(double LearningRate = 0.7, double Momentum = 0.9, bool Nesterov = true);

/// <summary>DiLoCo's outer step. Each replica runs H inner AdamW steps from the global θ and reports its delta
/// θ − θᵢ; the average delta, weighted by the samples each replica trained on, is the outer gradient g, and
/// SGD with momentum applies it as PyTorch's SGD does: v ← μ·v + g; θ ← θ − lr·(g + μ·v) with Nesterov, θ − lr·v
/// without. The momentum buffers are the state a cluster checkpoint keeps (the "outer-optimizer" part).</summary>
public sealed class OuterOptimizer : IDisposable
{
    readonly OuterOptimizerConfig config;
    readonly (string Name, Tensor Value)[] momentum;

    /// <param name="theta">the global parameters, by name, in a fixed order</param>
    public OuterOptimizer(IEnumerable<(string Name, Tensor Value)> theta, OuterOptimizerConfig config)
    {
        this.config = config;
        momentum = theta.Select(p => (p.Name, zeros_like(p.Value).DetachFromDisposeScope())).ToArray();
    }

    /// <summary>Outer steps taken.</summary>
    public long Step { get; private set; }

    /// <summary>The samples-weighted mean of the replicas' deltas (θ − θᵢ): the outer gradient. Each delta in θ's order.</summary>
    public static Tensor[] OuterGradient(IReadOnlyList<(IReadOnlyList<Tensor> Delta, long Samples)> replicas)
    {
        if (replicas.Count == 0) throw new ArgumentException("an outer step needs at least one replica's delta");
        double total = replicas.Sum(r => (double)r.Samples);
        if (total <= 0) throw new ArgumentException("the replicas trained on no samples");
        var n = replicas[0].Delta.Count;
        if (replicas.Any(r => r.Delta.Count != n)) throw new ArgumentException("the replicas' deltas have different parameter counts");
        using var noGrad = no_grad();
        return Enumerable.Range(0, n).Select(i =>
        {
            using var scope = NewDisposeScope();
            var sum = zeros_like(replicas[0].Delta[i], dtype: float32);
            foreach (var (delta, samples) in replicas) sum.add_(delta[i].to(float32), alpha: samples / total);
            return sum.MoveToOuterDisposeScope();
        }).ToArray();
    }

    /// <summary>Applies one outer step to θ in place. A tensor of θ that grew rows (a classifier head's new class) gets
    /// zero momentum for them.</summary>
    public void Apply(IReadOnlyList<Tensor> theta, IReadOnlyList<Tensor> outerGradient)
    {
        if (theta.Count != momentum.Length || outerGradient.Count != momentum.Length)
            throw new ArgumentException($"the outer step expects {momentum.Length} tensors, got θ {theta.Count} and g {outerGradient.Count}");
        FollowShapes(theta);
        using var noGrad = no_grad();
        using var scope = NewDisposeScope();
        for (int i = 0; i < momentum.Length; i++)
        {
            var (v, g) = (momentum[i].Value, outerGradient[i].to(theta[i].dtype));
            v.mul_(config.Momentum).add_(g);
            var update = config.Nesterov ? g + config.Momentum * v : v;
            theta[i].add_(update, alpha: -config.LearningRate);
        }
        Step++;
    }

    void FollowShapes(IReadOnlyList<Tensor> theta)
    {
        using var noGrad = no_grad();
        for (int i = 0; i < momentum.Length; i++)
        {
            var (name, v) = momentum[i];
            if (v.shape.SequenceEqual(theta[i].shape)) continue;
            var grown = zeros_like(theta[i]).DetachFromDisposeScope();
            if (v.shape[0] > 0) grown[..(int)v.shape[0]].copy_(v);
            v.Dispose();
            momentum[i] = (name, grown);
        }
    }

    /// <summary>The momentum buffers by parameter name (views, not copies).</summary>
    public IReadOnlyList<(string Name, Tensor Value)> State() => momentum;

    public void LoadState(IReadOnlyDictionary<string, Tensor> state, long step)
    {
        using var noGrad = no_grad();
        foreach (var (name, v) in momentum)
        {
            if (!state.TryGetValue(name, out var saved)) throw new InvalidDataException($"outer optimizer state lacks '{name}'");
            if (!saved.shape.SequenceEqual(v.shape)) throw new InvalidDataException($"outer optimizer state '{name}' has shape [{string.Join(",", saved.shape)}], θ [{string.Join(",", v.shape)}]");
            v.copy_(saved);
        }
        Step = step;
    }

    public void Dispose()
    {
        foreach (var (_, v) in momentum) v.Dispose();
    }
}
