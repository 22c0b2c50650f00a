using Mamo.Actors.Pipeline;
using Mamo.Data;
using Mamo.Model;
using static TorchSharp.torch;

namespace Mamo.Cli.Serving;

/// <summary>A version a request named that the service cannot answer with: never in the run folder, or pruned from
/// it and no longer loaded.</summary>
public sealed class UnknownVersionException(string message) : Exception(message);

/// <summary>
/// The model versions `mamo serve` answers with: each complete checkpoint of the run folder is one (step-N), found as
/// the run writes it (Refresh), and the newest is the default. At most <c>keep</c> are loaded at once: a version is
/// loaded when a request first needs it, and the one used longest ago goes when another must come in. A version stays
/// known while it is loaded, even after the run prunes its checkpoint. The models are used only from the batcher's
/// thread (Model); everything else may be called from any.
/// </summary>
public sealed class ModelVersions(string runDir, int keep, Device device, TextTokenizer tokenizer, DecodeLimits limits) : IDisposable
{
    public const int DefaultKeep = 3;

    /// <summary>A version as requests see it: its name and step, and how its queries are prepared (the image size
    /// and text length of its model).</summary>
    public sealed record Version(string Name, long Step, string Checkpoint, SamplePreparer Preparer);

    readonly object gate = new();
    readonly SortedDictionary<long, Version> onDisk = new();
    readonly LinkedList<(Version Version, Embedder Model)> loaded = new();   // most recently used first
    int loadedCount;

    /// <summary>How many versions are loaded now.</summary>
    public int Loaded => Volatile.Read(ref loadedCount);

    /// <summary>Reads the run folder again; returns the versions it found that were not known before.</summary>
    public IReadOnlyList<Version> Refresh()
    {
        var found = new List<Version>();
        var present = Checkpoint.Complete(runDir).ToList();
        lock (gate)
        {
            var steps = new HashSet<long>();
            var known = onDisk.Values.ToDictionary(v => v.Checkpoint, v => v.Step);
            foreach (var dir in present)
            {
                if (known.TryGetValue(dir, out var seen))   // read once: a checkpoint folder never changes
                {
                    steps.Add(seen);
                    continue;
                }
                long step;
                MamoConfig config;
                try { (step, config) = (Checkpoint.ReadState(dir).Step, Checkpoint.ReadConfig(dir)); }
                catch (IOException) { continue; }   // pruned while we looked: gone at the next refresh
                if (!steps.Add(step) || onDisk.ContainsKey(step)) continue;
                var preparer = SamplePreparer.ForEvaluation(config.ImageSize, config.MaxTextLength, tokenizer, limits);
                found.Add(onDisk[step] = new Version(Embedder.VersionOf(step), step, dir, preparer));
            }
            foreach (var pruned in onDisk.Keys.Where(s => !steps.Contains(s)).ToList()) onDisk.Remove(pruned);
        }
        return found;
    }

    /// <summary>Every version it can answer with, newest first, and whether each is loaded.</summary>
    public IReadOnlyList<(Version Version, bool Loaded)> List()
    {
        lock (gate)
        {
            var inMemory = loaded.Select(l => l.Version).ToDictionary(v => v.Step);
            return onDisk.Values.Concat(inMemory.Values.Where(v => !onDisk.ContainsKey(v.Step)))
                .OrderByDescending(v => v.Step).Select(v => (v, inMemory.ContainsKey(v.Step))).ToList();
        }
    }

    /// <summary>The newest version; null: the run has no checkpoint yet.</summary>
    public Version? Newest => List().FirstOrDefault().Version;

    /// <summary>The version a request names (step-N), or the newest where it names none.</summary>
    /// <exception cref="UnknownVersionException">no such version, or none at all</exception>
    public Version Resolve(string? name)
    {
        if (name is null) return Newest ?? throw new UnknownVersionException($"{runDir} has no checkpoint yet");
        return List().Select(l => l.Version).FirstOrDefault(v => v.Name == name)
            ?? throw new UnknownVersionException($"no version {name}: the versions are {string.Join(", ", List().Select(l => l.Version.Name))}");
    }

    /// <summary>The version's model, loaded if it is not; the batcher's thread only.</summary>
    /// <exception cref="UnknownVersionException">its checkpoint was pruned before it could be loaded</exception>
    public Embedder Model(Version version)
    {
        lock (gate)
        {
            for (var node = loaded.First; node is not null; node = node.Next)
                if (node.Value.Version.Step == version.Step)
                {
                    loaded.Remove(node);
                    loaded.AddFirst(node);
                    return node.Value.Model;
                }
        }
        Embedder model;
        try { model = Embedder.Load(version.Checkpoint, device); }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new UnknownVersionException($"version {version.Name} is gone: its checkpoint was pruned before it was loaded ({e.Message})");
        }
        lock (gate)
        {
            loaded.AddFirst((version, model));
            while (loaded.Count > keep)
            {
                loaded.Last!.Value.Model.Dispose();
                loaded.RemoveLast();
            }
            Volatile.Write(ref loadedCount, loaded.Count);
        }
        return model;
    }

    public void Dispose()
    {
        lock (gate)
        {
            foreach (var (_, model) in loaded) model.Dispose();
            loaded.Clear();
        }
    }
}
