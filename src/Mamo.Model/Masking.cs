using static TorchSharp.torch;

namespace Mamo.Model;

/// <summary>The joint mask of one batch: which image patches the student sees, and the BERT-masked text.</summary>
public sealed class JointMask : IDisposable
{
    /// <summary>[B, Nv] sorted indices of the visible patches.</summary>
    public required Tensor Visible { get; init; }
    /// <summary>[B, Nm] sorted indices of the masked patches.</summary>
    public required Tensor Masked { get; init; }
    /// <summary>[B, L] token ids after BERT's 80/10/10 replacement.</summary>
    public required Tensor MaskedTokenIds { get; init; }
    /// <summary>[M] flat indices into [B * L] of the masked text positions.</summary>
    public required Tensor MaskedTokenPositions { get; init; }
    /// <summary>[M] the original token at each masked position.</summary>
    public required Tensor MaskedTokenLabels { get; init; }

    public JointMask To(Device device) => new()
    {
        Visible = Visible.to(device), Masked = Masked.to(device), MaskedTokenIds = MaskedTokenIds.to(device),
        MaskedTokenPositions = MaskedTokenPositions.to(device), MaskedTokenLabels = MaskedTokenLabels.to(device),
    };

    public void Dispose()
    {
        Visible.Dispose(); Masked.Dispose(); MaskedTokenIds.Dispose();
        MaskedTokenPositions.Dispose(); MaskedTokenLabels.Dispose();
    }
}

/// <summary>MAMO's joint masking: a random share of image patches and of text tokens in the same pair.
/// Drawn on the host, each row from (seed, its row in the global batch): a seed reproduces the masks exactly on any
/// device, and replicas that split a batch draw the masks one process would draw for the whole of it.</summary>
public static class JointMasking
{
    /// <param name="tokenIds">[B, L] on the CPU</param>
    /// <param name="attentionMask">[B, L] on the CPU</param>
    /// <param name="firstRow">the global batch's row of this batch's first pair (IBatchShard.FirstRow)</param>
    public static JointMask Sample(MamoConfig c, PretrainingConfig objective, Tensor tokenIds, Tensor attentionMask, int seed, long firstRow = 0)
    {
        var (b, l) = ((int)tokenIds.shape[0], (int)tokenIds.shape[1]);
        int n = c.NumPatches, nv = objective.NumVisiblePatches(c);

        var visible = new long[b * nv];
        var masked = new long[b * (n - nv)];
        var order = new int[n];
        var rows = Enumerable.Range(0, b).Select(i => new Random(Seeds.Mix(seed, firstRow + i))).ToArray();
        for (int i = 0; i < b; i++)
        {
            for (int p = 0; p < n; p++) order[p] = p;
            rows[i].Shuffle(order);
            var keep = order[..nv]; Array.Sort(keep);
            var drop = order[nv..]; Array.Sort(drop);
            for (int k = 0; k < nv; k++) visible[i * nv + k] = keep[k];
            for (int k = 0; k < n - nv; k++) masked[i * (n - nv) + k] = drop[k];
        }

        var ids = tokenIds.cpu().data<long>().ToArray();
        var keepMask = attentionMask.cpu().data<long>().ToArray();
        var maskedIds = (long[])ids.Clone();
        var positions = new List<long>();
        var labels = new List<long>();
        var candidates = new List<int>();
        for (int i = 0; i < b; i++)
        {
            var rng = rows[i];
            candidates.Clear();
            for (int t = 0; t < l; t++)
            {
                long id = ids[i * l + t];
                bool special = id == c.ClsTokenId || id == c.SepTokenId || id == c.PadTokenId || keepMask[i * l + t] == 0;
                if (!special) candidates.Add(t);
            }
            if (candidates.Count == 0 || objective.TextMaskRatio == 0) continue;
            int count = Math.Max(1, (int)Math.Round(candidates.Count * objective.TextMaskRatio));
            var chosen = candidates.ToArray();
            rng.Shuffle(chosen);
            foreach (var t in chosen[..count].Order())
            {
                int flat = i * l + t;
                positions.Add(flat);
                labels.Add(ids[flat]);
                double u = rng.NextDouble();   // BERT: 80% [MASK], 10% a random token, 10% unchanged
                if (u < 0.8) maskedIds[flat] = c.MaskTokenId;
                else if (u < 0.9) maskedIds[flat] = rng.Next(c.VocabSize);
            }
        }

        return new JointMask
        {
            Visible = tensor(visible, new long[] { b, nv }),
            Masked = tensor(masked, new long[] { b, n - nv }),
            MaskedTokenIds = tensor(maskedIds, new long[] { b, l }),
            MaskedTokenPositions = tensor(positions.ToArray(), new long[] { positions.Count }),
            MaskedTokenLabels = tensor(labels.ToArray(), new long[] { labels.Count }),
        };
    }
}
