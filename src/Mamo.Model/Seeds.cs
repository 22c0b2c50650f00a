using static TorchSharp.torch;

namespace Mamo.Model;

/// <summary>Process-independent seeds and hashes. (HashCode.Combine and string.GetHashCode are randomised per
/// process, which would make a resumed run draw different masks than the run it continues.)</summary>
public static class Seeds
{
    /// <summary>SplitMix64 of (seed, index), folded to an int seed.</summary>
    public static int Mix(long seed, long index)
    {
        unchecked
        {
            ulong z = (ulong)seed * 0x9E3779B97F4A7C15UL + (ulong)index + 0x632BE59BD9B4E019UL;
            z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9UL;
            z = (z ^ (z >> 27)) * 0x94D049BB133111EBUL;
            z ^= z >> 31;
            return (int)(z ^ (z >> 32));
        }
    }

    /// <summary>64-bit FNV-1a of a string's UTF-16 code units.</summary>
    public static long StableHash(string text)
    {
        unchecked
        {
            ulong h = 14695981039346656037UL;
            foreach (var ch in text) { h ^= ch; h *= 1099511628211UL; }
            return (long)h;
        }
    }

    /// <summary>Guards torch's one global generator, which module constructors (Linear's default init) draw from.
    /// Every use of it goes under this lock: a draw on another thread while a model is built would change that
    /// model's weights, so a seed would not give the same model in every process (or every test run).</summary>
    public static readonly object GlobalGenerator = new();

    /// <summary>Runs <paramref name="draw"/> on torch's global generator seeded with <paramref name="seed"/>, under
    /// <see cref="GlobalGenerator"/>.</summary>
    public static T FromGlobal<T>(int seed, Func<T> draw)
    {
        lock (GlobalGenerator)
        {
            manual_seed(seed);
            return draw();
        }
    }
}
