namespace Mamo.Model;

/// <summary>Which libtorch this binary was built against (the TorchBackend build property).</summary>
public static class TorchBackend
{
#if TORCH_CUDA
    public static bool IsCuda => true;
#else
    public static bool IsCuda => false;
#endif
}
