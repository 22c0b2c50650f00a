using TorchSharp.Modules;
using static TorchSharp.torch;

namespace Mamo.Model;

/// <summary>Optimiser settings: AdamW with linear warm-up, then a schedule: cosine decay to a floor (a bounded run),
/// constant (a stream that never ends), or warmup-stable-decay (constant, then a linear cool-down to the floor over the
/// run's last CooldownSteps). At each step of RewarmAt the schedule starts again, warm-up first (Ibrahim et al. 2024:
/// re-warm and re-decay for a new stream).</summary>
public sealed record OptimizerConfig
{
    public const string Cosine = "cosine", Constant = "constant", WarmupStableDecay = "wsd";
    public static readonly string[] Schedules = [Cosine, Constant, WarmupStableDecay];

    public double LearningRate { get; init; } = 3e-4;
    public double MinLearningRate { get; init; } = 3e-5;
    public int WarmupSteps { get; init; } = 200;
    public string Schedule { get; init; } = Cosine;
    /// <summary>Steps of cosine decay after warm-up; the rate then stays at the floor.</summary>
    public int DecaySteps { get; init; } = 20000;
    /// <summary>wsd: the steps of the cool-down that ends the run at TotalSteps.</summary>
    public int CooldownSteps { get; init; }
    /// <summary>The step the run ends at; 0: none (wsd then never cools down).</summary>
    public long TotalSteps { get; init; }
    /// <summary>Steps at which the schedule starts again.</summary>
    public IReadOnlyList<long> RewarmAt { get; init; } = [];
    public double WeightDecay { get; init; } = 0.02;
    public double Beta1 { get; init; } = 0.9;
    public double Beta2 { get; init; } = 0.98;
    public double Epsilon { get; init; } = 1e-6;
    /// <summary>Global gradient-norm clip; 0 turns it off.</summary>
    public double ClipNorm { get; init; } = 1.0;

    public double LearningRateAt(long step)
    {
        var start = RewarmAt.Where(s => s <= step).DefaultIfEmpty(0).Max();
        var local = step - start;
        if (local < WarmupSteps) return LearningRate * (local + 1) / WarmupSteps;
        switch (Schedule)
        {
            case Constant:
                return LearningRate;
            case WarmupStableDecay:
                var cooldown = TotalSteps - CooldownSteps;
                if (TotalSteps <= 0 || step < cooldown) return LearningRate;
                return LearningRate + (MinLearningRate - LearningRate) * (step - cooldown + 1) / Math.Max(1, CooldownSteps);
            default:
                var progress = Math.Min(1.0, (double)(local - WarmupSteps) / Math.Max(1, DecaySteps));
                return MinLearningRate + 0.5 * (LearningRate - MinLearningRate) * (1 + Math.Cos(Math.PI * progress));
        }
    }
}

/// <summary>AdamW (decoupled weight decay). Written out so its state is plain named tensors, which the
/// checkpoint stores as safetensors. Weight matrices decay; biases, norms, embeddings, learned tokens and the
/// temperature do not.</summary>
public sealed class AdamW : IDisposable
{
    readonly (string Name, Parameter Param)[] parameters;
    readonly Tensor[] m, v;
    readonly bool[] decays;
    readonly OptimizerConfig config;
    public long Step { get; private set; }

    public AdamW(IEnumerable<(string Name, Parameter Param)> named, OptimizerConfig config)
    {
        this.config = config;
        parameters = named.Where(p => p.Param.requires_grad).ToArray();
        m = parameters.Select(p => zeros_like(p.Param).DetachFromDisposeScope()).ToArray();
        v = parameters.Select(p => zeros_like(p.Param).DetachFromDisposeScope()).ToArray();
        decays = parameters.Select(p => p.Param.dim() >= 2 && !p.Name.Contains("Embedding") && !p.Name.Contains("Token")).ToArray();
    }

    public void ZeroGrad()
    {
        using var scope = NewDisposeScope();   // each .grad access makes a handle
        foreach (var (_, p) in parameters) p.grad?.zero_();
    }

    /// <summary>Clips the global gradient norm and returns it (before clipping).</summary>
    public double ClipGradients()
    {
        using var scope = NewDisposeScope();
        return nn.utils.clip_grad_norm_(parameters.Select(p => p.Param), config.ClipNorm > 0 ? config.ClipNorm : double.PositiveInfinity);
    }

    /// <summary>A parameter that grew in place (a classifier head's new class) gets zero moments for its new rows.</summary>
    void FollowShapes()
    {
        for (int i = 0; i < parameters.Length; i++)
        {
            var p = parameters[i].Param;
            if (m[i].shape.SequenceEqual(p.shape)) continue;
            m[i] = Grown(m[i], p);
            v[i] = Grown(v[i], p);
        }
    }

    static Tensor Grown(Tensor moment, Tensor param)
    {
        using var noGrad = no_grad();
        var grown = zeros_like(param).DetachFromDisposeScope();
        if (moment.shape[0] > 0) grown[..(int)moment.shape[0]].copy_(moment);
        moment.Dispose();
        return grown;
    }

    public void Apply(double learningRate)
    {
        FollowShapes();
        Step++;
        double bias1 = 1 - Math.Pow(config.Beta1, Step), bias2 = 1 - Math.Pow(config.Beta2, Step);
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        // Explicit scalars that live through the loop (see Momentum.Update: implicit ones can be finalised mid-call).
        using TorchSharp.Scalar decay = 1 - learningRate * config.WeightDecay, beta1 = config.Beta1, oneMinusBeta1 = 1 - config.Beta1,
            beta2 = config.Beta2, oneMinusBeta2 = 1 - config.Beta2, unbias2 = bias2, epsilon = config.Epsilon, stepSize = -learningRate / bias1;
        for (int i = 0; i < parameters.Length; i++)
        {
            var p = parameters[i].Param;
            var g = p.grad;
            if (g is null) continue;
            if (decays[i]) p.mul_(decay);
            m[i].mul_(beta1).add_(g, alpha: oneMinusBeta1);
            v[i].mul_(beta2).addcmul_(g, g, value: oneMinusBeta2);
            var denom = (v[i] / unbias2).sqrt_().add_(epsilon);
            p.addcdiv_(m[i], denom, value: stepSize);
        }
    }

    /// <summary>The optimiser state as named tensors (views, not copies), each of its parameter's current shape.</summary>
    public IEnumerable<(string Name, Tensor Value)> State()
    {
        FollowShapes();
        return parameters.SelectMany((p, i) => new[] { ("m." + p.Name, m[i]), ("v." + p.Name, v[i]) }).ToList();
    }

    /// <summary>Lays each parameter's moments out anew (a classifier head whose classes came in another order): the
    /// map takes a parameter's name and a moment, and gives the moment in the parameter's current layout.</summary>
    public void Remap(Func<string, Tensor, Tensor> map)
    {
        using var noGrad = no_grad();
        for (int i = 0; i < parameters.Length; i++)
        {
            var name = parameters[i].Name;
            (m[i], v[i]) = (Replaced(m[i], map(name, m[i])), Replaced(v[i], map(name, v[i])));
        }
        FollowShapes();
    }

    static Tensor Replaced(Tensor old, Tensor mapped)
    {
        if (ReferenceEquals(old, mapped)) return old;
        old.Dispose();
        return mapped.DetachFromDisposeScope();
    }

    public void LoadState(IReadOnlyDictionary<string, Tensor> state, long step)
    {
        using var noGrad = no_grad();
        FollowShapes();
        var expected = State().ToList();
        var unknown = state.Keys.Except(expected.Select(e => e.Name)).FirstOrDefault();
        if (unknown is not null) throw new InvalidDataException($"optimizer state has '{unknown}', which no parameter matches");
        foreach (var (name, value) in expected)
        {
            if (!state.TryGetValue(name, out var saved)) throw new InvalidDataException($"optimizer state lacks '{name}'");
            if (!saved.shape.SequenceEqual(value.shape))
                throw new InvalidDataException($"optimizer state '{name}' has shape [{string.Join(",", saved.shape)}], the parameter [{string.Join(",", value.shape)}]");
            value.copy_(saved);
        }
        Step = step;
    }

    public void Dispose()
    {
        foreach (var t in m.Concat(v)) t.Dispose();
    }
}
