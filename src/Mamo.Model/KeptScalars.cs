using TorchSharp;
using static TorchSharp.torch;

namespace Mamo.Model;

/// <summary>Tensor arithmetic whose Scalars outlive the native call. TorchSharp's `a + b` passes libtorch an implicit
/// Scalar(1) as alpha that nothing references during the call, so the GC may finalise it while libtorch reads it:
/// "Expected false to be true" in Scalar::toFloat (a residual add, once in a test run, 2026-12-06), as Momentum.Update
/// met it in toDouble. Used where every step adds many times: the residuals and the embeddings.</summary>
public static class KeptScalars
{
    public static Tensor Add(Tensor x, Tensor y)
    {
        using var one = 1.ToScalar();
        return x.add(y, one);
    }
}
