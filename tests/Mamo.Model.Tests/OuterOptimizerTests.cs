using static TorchSharp.torch;
using Xunit;

namespace Mamo.Model.Tests;

public class OuterOptimizerTests
{
    [Fact]
    public void The_outer_nesterov_step_on_known_deltas_gives_the_hand_computed_theta()
    {
        using var theta = tensor(new[] { 1f, -2f });
        using var optimizer = new OuterOptimizer([("w", theta)], new OuterOptimizerConfig(LearningRate: 0.5, Momentum: 0.9, Nesterov: true));

        // Round 1: replica A trained 3 samples and moved by δ = θ − θA = [0.4, 0], B trained 1 and moved by [0, 0.8].
        using var a1 = tensor(new[] { 0.4f, 0f });
        using var b1 = tensor(new[] { 0f, 0.8f });
        var g1 = OuterOptimizer.OuterGradient([([a1], 3), ([b1], 1)]);
        // g = (3·[0.4, 0] + 1·[0, 0.8]) / 4 = [0.3, 0.2]
        Assert.Equal([0.3f, 0.2f], g1[0].data<float>().ToArray(), new Close());
        optimizer.Apply([theta], g1);
        // v = g = [0.3, 0.2]; update = g + 0.9·v = [0.57, 0.38]; θ = [1, -2] − 0.5·update = [0.715, -2.19]
        Assert.Equal([0.715f, -2.19f], theta.data<float>().ToArray(), new Close());

        // Round 2, one replica: g = [0.1, -0.1]; v = 0.9·[0.3, 0.2] + g = [0.37, 0.08]; update = g + 0.9·v = [0.433, -0.028]
        using var a2 = tensor(new[] { 0.1f, -0.1f });
        optimizer.Apply([theta], OuterOptimizer.OuterGradient([([a2], 5)]));
        Assert.Equal([0.715f - 0.5f * 0.433f, -2.19f + 0.5f * 0.028f], theta.data<float>().ToArray(), new Close());
        Assert.Equal([0.37f, 0.08f], optimizer.State()[0].Value.data<float>().ToArray(), new Close());
        Assert.Equal(2, optimizer.Step);
    }

    [Fact]
    public void Without_nesterov_the_step_is_plain_momentum_and_lr_1_momentum_0_is_averaging()
    {
        // DiLoCo with outer lr 1 and no momentum is federated averaging: θ becomes the replicas' mean.
        using var theta = tensor(new[] { 2f });
        using var optimizer = new OuterOptimizer([("w", theta)], new OuterOptimizerConfig(LearningRate: 1, Momentum: 0, Nesterov: false));
        using var a = tensor(new[] { 2f - 1f });   // replica A ended at 1
        using var b = tensor(new[] { 2f - 4f });   // replica B ended at 4
        optimizer.Apply([theta], OuterOptimizer.OuterGradient([([a], 1), ([b], 1)]));
        Assert.Equal(2.5f, theta.data<float>()[0], 6);
    }

    [Fact]
    public void Bad_inputs_are_refused_with_a_reason()
    {
        Assert.Throws<ArgumentException>(() => OuterOptimizer.OuterGradient([]));
        using var d = tensor(new[] { 1f });
        Assert.Throws<ArgumentException>(() => OuterOptimizer.OuterGradient([([d], 0)]));
    }

    sealed class Close : IEqualityComparer<float>
    {
        public bool Equals(float x, float y) => Math.Abs(x - y) <= 1e-6f * Math.Max(1, Math.Abs(x));
        public int GetHashCode(float obj) => 0;
    }
}
