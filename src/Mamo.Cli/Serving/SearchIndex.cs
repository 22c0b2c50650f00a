using Cloud.Unum.USearch;

namespace Mamo.Cli.Serving;

/// <summary>
/// One model version's published catalogue, searchable: an approximate-nearest-neighbour index (USearch's HNSW, cosine)
/// per modality, with the ids and vectors beside it. It is built once from a whole version and never changes, so a
/// search sees one version's vectors only. The ANN index proposes the results; each is scored by the exact cosine of
/// the query and the item's vector (the vectors are unit length: their dot product).
/// </summary>
public sealed class SearchIndex : IDisposable
{
    /// <summary>The most results a search returns.</summary>
    public const int MaxK = 100;
    /// <summary>HNSW's graph degree and beam widths. Text queries of image vectors lie far from every item (the modality
    /// gap), where a graph search needs a wide beam: recall@10 of the emoji images with their captions, tiny at step 40,
    /// is 0.955 at 128, 0.974 at 256 and 0.991 at 512, at 0.08, 0.11 and 0.23 ms a query, against 7 ms to embed the
    /// query (`mamo bench ann`, bench/serve.sh; docs/SERVING.md).</summary>
    const int Connectivity = 16, ExpansionAdd = 128, ExpansionSearch = 512;

    sealed class Part(USearchIndex ann, string[] ids, float[][] vectors)
    {
        public readonly USearchIndex Ann = ann;
        public readonly string[] Ids = ids;
        public readonly float[][] Vectors = vectors;
        public bool Disposed;
    }

    readonly Dictionary<string, Part> parts;

    public string Version { get; }
    public long Step { get; }

    SearchIndex(string version, long step, Dictionary<string, Part> parts)
    {
        Version = version;
        Step = step;
        this.parts = parts;
        Items = parts.ToDictionary(p => p.Key, p => p.Value.Ids.Length);
    }

    /// <summary>How many vectors of each modality it holds.</summary>
    public IReadOnlyDictionary<string, int> Items { get; }

    /// <summary>Indexes one version's vectors, (id, modality) once each.</summary>
    /// <exception cref="FormatException">vectors of one modality with different lengths</exception>
    public static SearchIndex Build(string version, long step, IEnumerable<KeyValuePair<(string Id, string Modality), float[]>> vectors)
    {
        var parts = new Dictionary<string, Part>();
        foreach (var modality in vectors.GroupBy(v => v.Key.Modality))
        {
            var items = modality.OrderBy(v => v.Key.Id, StringComparer.Ordinal).ToArray();
            var dim = items[0].Value.Length;
            if (items.FirstOrDefault(v => v.Value.Length != dim) is { Key.Id: not null } odd)
                throw new FormatException($"{version}: {modality.Key} vectors of {dim} and of {odd.Value.Length} values ({odd.Key.Id})");
            var ann = new USearchIndex(MetricKind.Cos, ScalarKind.Float32, (ulong)dim, Connectivity, ExpansionAdd, ExpansionSearch);
            for (var i = 0; i < items.Length; i++) ann.Add((ulong)i, items[i].Value);
            parts[modality.Key] = new Part(ann, items.Select(v => v.Key.Id).ToArray(), items.Select(v => v.Value).ToArray());
        }
        return new SearchIndex(version, step, parts);
    }

    /// <summary>The k items of the modality nearest the query, best first; null where this index was disposed (it was
    /// replaced while the request ran: search the current one).</summary>
    /// <exception cref="KeyNotFoundException">the version published no vectors of that modality</exception>
    /// <exception cref="ArgumentException">a query of another length than the vectors</exception>
    public IReadOnlyList<(string Id, float Score)>? Search(string modality, float[] query, int k)
    {
        if (!parts.TryGetValue(modality, out var part))
            throw new KeyNotFoundException($"{Version} published no {modality} vectors (it has {string.Join(", ", parts.Keys)})");
        if (query.Length != part.Vectors[0].Length)
            throw new ArgumentException($"a query of {query.Length} values against {modality} vectors of {part.Vectors[0].Length}");
        ulong[] keys;
        int found;
        lock (part)   // one search at a time per index, and never one on a disposed index
        {
            if (part.Disposed) return null;
            found = part.Ann.Search(query, Math.Min(k, part.Ids.Length), out keys, out _);
        }
        return keys.Take(found).Select(key => (part.Ids[key], Dot(query, part.Vectors[key])))
            .OrderByDescending(r => r.Item2).ThenBy(r => r.Item1, StringComparer.Ordinal).ToList();
    }

    /// <summary>The exact k nearest, by scoring every vector: what the ANN search is measured against (recall).</summary>
    public IReadOnlyList<(string Id, float Score)> ExactSearch(string modality, float[] query, int k)
    {
        var part = parts[modality];
        return part.Ids.Select((id, i) => (id, Dot(query, part.Vectors[i])))
            .OrderByDescending(r => r.Item2).ThenBy(r => r.id, StringComparer.Ordinal).Take(k).ToList();
    }

    static float Dot(float[] a, float[] b)
    {
        var sum = 0f;
        for (var i = 0; i < a.Length; i++) sum += a[i] * b[i];
        return sum;
    }

    public void Dispose()
    {
        foreach (var part in parts.Values)
            lock (part)
            {
                if (part.Disposed) continue;
                part.Disposed = true;
                part.Ann.Dispose();
            }
    }
}
