using static TorchSharp.torch;

namespace Mamo.Actors.Pipeline;

static class Tensors
{
    /// <summary>A detached copy that belongs to no dispose scope: how a tensor crosses an actor boundary.</summary>
    public static Tensor Copy(Tensor t)
    {
        using var scope = NewDisposeScope();
        return t.detach().clone().DetachFromDisposeScope();
    }
}
