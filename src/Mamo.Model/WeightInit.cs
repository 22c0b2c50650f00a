using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;
using static TorchSharp.torch.nn;

namespace Mamo.Model;

/// <summary>How a new model's weights start (model.weight-init). "bert", as BERT and nanoGPT initialise: every Linear
/// normal(0, 0.02) with zero bias, and each projection that adds to a residual stream normal(0, 0.02 / sqrt(2 *
/// layers)) with layers the depth of its stack, so the stream's variance does not grow with depth. "torch": each
/// Linear keeps TorchSharp's default (Kaiming-uniform). Embeddings, tokens and position tables are normal(0.02)
/// either way; LayerNorms start at 1 and 0. The default is "torch": at 250 equal steps on the built-in data it
/// reached a lower loss and twice the retrieval of "bert" (docs/LEARNING.md).</summary>
public static class WeightInit
{
    public const string Bert = "bert", Torch = "torch";
    const double Std = 0.02;

    public static void Apply(Module model, string policy)
    {
        if (policy == Torch) return;
        if (policy != Bert) throw new ArgumentException($"unknown weight init '{policy}' ({Bert}, {Torch})");
        using var noGrad = no_grad();
        foreach (var linear in model.modules().OfType<Linear>())
        {
            init.normal_(linear.weight!, std: Std);
            if (linear.bias is { } bias) init.zeros_(bias);
        }
        foreach (var stack in model.modules().OfType<BlockStack>())
            foreach (var proj in stack.Blocks.SelectMany(b => b.ResidualProjections))
                init.normal_(proj.weight!, std: Std / Math.Sqrt(2.0 * stack.Count));
    }
}
