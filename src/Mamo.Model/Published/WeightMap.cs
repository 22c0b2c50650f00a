using static TorchSharp.torch;

namespace Mamo.Model.Published;

/// <summary>
/// How a published model's tensors become a MamoModel's parameters and back. Each entry names one of our parameters
/// and the published tensors it is made of, concatenated along dim 0 (BERT's query, key and value are our one qkv)
/// and reshaped to ours (BERT's [512, W] positions are our [1, 512, W]). Import checks every published shape against
/// the preset's before anything is copied; export splits ours back, so a round trip gives the same bytes.
/// </summary>
public sealed class WeightMap(IReadOnlyList<WeightMap.Entry> entries)
{
    /// <param name="Ours">our parameter's name, as MamoModel.named_parameters spells it</param>
    /// <param name="Theirs">the published tensors' names, concatenated along dim 0</param>
    /// <param name="Shape">each published tensor's shape for this preset</param>
    public sealed record Entry(string Ours, string[] Theirs, long[] Shape);

    public IReadOnlyList<Entry> Entries => entries;

    /// <summary>Our parameters from published tensors (the caller owns the results). <paramref name="resize"/> may
    /// turn a tensor of another shape into the expected one (a ViT's position grid); it returns null where it cannot.</summary>
    public Dictionary<string, Tensor> Import(IReadOnlyDictionary<string, Tensor> published, string source,
        Func<Entry, Tensor, Tensor?>? resize = null)
    {
        var missing = entries.SelectMany(e => e.Theirs).Where(n => !published.ContainsKey(n)).ToList();
        if (missing.Count > 0)
            throw new InvalidDataException($"{source} lacks {missing.Count} tensor(s) the preset needs: {string.Join(", ", missing.Take(8))}{(missing.Count > 8 ? ", ..." : "")}");
        var result = new Dictionary<string, Tensor>();
        using var scope = NewDisposeScope();
        foreach (var e in entries)
        {
            var parts = e.Theirs.Select(n =>
            {
                var t = published[n];
                if (t.shape.SequenceEqual(e.Shape)) return t;
                return resize?.Invoke(e, t) ?? throw new InvalidDataException(
                    $"{source}: '{n}' has shape [{string.Join(", ", t.shape)}], the preset's '{e.Ours}' needs [{string.Join(", ", e.Shape)}]");
            }).ToList();
            var joined = parts.Count == 1 ? parts[0] : cat(parts, 0);
            result[e.Ours] = joined.to(float32).contiguous().clone().MoveToOuterDisposeScope();
        }
        return result;
    }

    /// <summary>Published tensors from our parameters, in the map's order (the caller owns the results).</summary>
    public List<(string Name, Tensor Value)> Export(IReadOnlyDictionary<string, Tensor> ours)
    {
        var result = new List<(string, Tensor)>();
        foreach (var e in entries)
        {
            if (!ours.TryGetValue(e.Ours, out var t)) throw new InvalidDataException($"the checkpoint lacks '{e.Ours}'");
            using var scope = NewDisposeScope();
            var split = t.reshape([e.Theirs.Length, .. e.Shape]);
            for (int i = 0; i < e.Theirs.Length; i++) result.Add((e.Theirs[i], split[i].contiguous().clone().MoveToOuterDisposeScope()));
        }
        return result;
    }

    /// <summary>Copies imported parameters into a model, checking each name and shape; the others keep their values.</summary>
    public static void CopyInto(MamoModel model, IReadOnlyDictionary<string, Tensor> imported)
    {
        var parameters = model.named_parameters().ToDictionary(p => p.name, p => p.parameter);
        using var noGrad = no_grad();
        foreach (var (name, value) in imported)
        {
            if (!parameters.TryGetValue(name, out var p)) throw new InvalidOperationException($"the model has no parameter '{name}'");
            // The published shapes were checked; ours may only add unit dims ([512, W] positions are our [1, 512, W]).
            if (p.numel() != value.numel())
                throw new InvalidDataException($"'{name}' imports as [{string.Join(", ", value.shape)}], the model's is [{string.Join(", ", p.shape)}]");
            p.copy_(value.reshape(p.shape));
        }
    }
}
