using TorchSharp;
using static TorchSharp.torch;

namespace Mamo.Model;

/// <summary>Image-text retrieval recall, in percent: text retrieval (TR, image to text) and image retrieval (IR, text to image).</summary>
public sealed record RetrievalMetrics(double Tr1, double Tr5, double Tr10, double Ir1, double Ir5, double Ir10)
{
    /// <summary>The mean of the six recalls, as ALBEF reports it.</summary>
    public double RMean => (Tr1 + Tr5 + Tr10 + Ir1 + Ir5 + Ir10) / 6;
}

/// <summary>Zero-shot retrieval as in ALBEF's evaluation: ITC similarity ranks every candidate, ITM re-ranks the top k.</summary>
public static class Retrieval
{
    static readonly int[] RecallAt = [1, 5, 10];
    const double Percent = 100;

    /// <summary>
    /// R@1/5/10 both ways. Image to text: an image's rank is that of its best-ranked own caption. Text to image:
    /// each caption has exactly one image. A tie counts against the match (every wrong candidate scoring at
    /// least as high is ranked above it), so a model that scores everything alike is not rewarded.
    /// </summary>
    /// <param name="scoresI2T">[Ni, Nt]</param>
    /// <param name="scoresT2I">[Nt, Ni]</param>
    /// <param name="textToImage">[Nt] the image index of each caption</param>
    public static RetrievalMetrics Metrics(Tensor scoresI2T, Tensor scoresT2I, int[] textToImage)
    {
        long ni = scoresI2T.shape[0], nt = textToImage.Length;
        if (scoresI2T.ndim != 2 || scoresI2T.shape[1] != nt || !scoresT2I.shape.SequenceEqual(new[] { nt, ni }))
            throw new ArgumentException($"scores must be [Ni, Nt] and [Nt, Ni] with Nt = {nt} captions; got [{string.Join(",", scoresI2T.shape)}] and [{string.Join(",", scoresT2I.shape)}]");
        if (textToImage.Any(i => i < 0 || i >= ni)) throw new ArgumentException($"every caption's image index must lie in [0, {ni})");
        using var scope = NewDisposeScope();
        var captionImage = tensor(textToImage.Select(i => (long)i).ToArray());                           // [Nt]
        var own = captionImage.unsqueeze(0).eq(arange(ni).unsqueeze(1));                                   // [Ni, Nt]

        // NaN compares false to everything and would rank first; make it rank last instead.
        var i2t = scoresI2T.cpu().to(float64).nan_to_num(double.NegativeInfinity);
        var bestOwn = i2t.masked_fill(own.logical_not(), double.NegativeInfinity).max(1, keepdim: true).values;   // [Ni, 1]
        var imageRanks = i2t.ge(bestOwn).logical_and(own.logical_not()).sum(1);                                   // [Ni]

        var t2i = scoresT2I.cpu().to(float64).nan_to_num(double.NegativeInfinity);
        var truth = t2i.gather(1, captionImage.unsqueeze(1));                                                    // [Nt, 1]
        var textRanks = t2i.ge(truth).logical_and(own.t().logical_not()).sum(1);                                 // [Nt]

        double Recall(Tensor ranks, int k) => Percent * ranks.lt(k).to(float64).mean().ToDouble();
        var tr = RecallAt.Select(k => Recall(imageRanks, k)).ToArray();
        var ir = RecallAt.Select(k => Recall(textRanks, k)).ToArray();
        return new RetrievalMetrics(tr[0], tr[1], tr[2], ir[0], ir[1], ir[2]);
    }

    /// <summary>
    /// Retrieval scores of every image against every caption. The model runs in eval mode under no_grad, on its
    /// own device; inputs may live anywhere and are moved there batch by batch.
    /// </summary>
    /// <param name="images">[Ni, 3, S, S]</param>
    /// <param name="tokenIds">[Nt, L]</param>
    /// <param name="attentionMask">[Nt, L]</param>
    /// <param name="k">candidates per query re-ranked by ITM; 0: ITC only</param>
    /// <param name="batchSize">images, captions or pairs per forward pass</param>
    /// <param name="ct">checked between batches, so a shutdown need not wait for a whole evaluation</param>
    /// <returns>([Ni, Nt], [Nt, Ni]) float32 on the CPU, owned by the caller</returns>
    public static (Tensor ScoresI2T, Tensor ScoresT2I) Scores(MamoModel model, Tensor images, Tensor tokenIds, Tensor attentionMask, int k, int batchSize,
        CancellationToken ct = default)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(k);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(batchSize);
        if (images.shape[0] == 0 || tokenIds.shape[0] == 0) throw new ArgumentException("retrieval needs at least one image and one caption");
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var wasTraining = model.training;
        model.eval();
        try
        {
            var device = model.parameters().First().device;
            var mask = attentionMask.to(device);
            var imageTokens = InBatches(images.shape[0], batchSize, ct, r => model.EncodeImage(images[r].to(device)));              // [Ni, 1 + N, W]
            var textTokens = InBatches(tokenIds.shape[0], batchSize, ct, r => model.EncodeText(tokenIds[r].to(device), mask[r]));  // [Nt, L, W]
            var sims = model.ImageEmbedding(imageTokens).matmul(model.TextEmbedding(textTokens).t());                          // [Ni, Nt]

            Tensor Match(Tensor imageIndex, Tensor textIndex) => InBatches(imageIndex.shape[0], batchSize, ct, r =>
                model.MatchProbability(imageTokens.index_select(0, imageIndex[r]), textTokens.index_select(0, textIndex[r]), mask.index_select(0, textIndex[r])));
            var i2t = Rerank(sims, k, Match);
            var t2i = Rerank(sims.t(), k, (text, image) => Match(image, text));
            return (i2t.cpu().to(float32).MoveToOuterDisposeScope(), t2i.cpu().to(float32).MoveToOuterDisposeScope());
        }
        finally
        {
            model.train(wasTraining);
        }
    }

    /// <summary>
    /// ALBEF's re-ranking: each query's top k candidates by similarity score ITM probability + similarity; the rest
    /// keep their similarity. A probability is never negative, so the top k still outrank the rest: only the order
    /// within each top k can change. (ALBEF adds the ITM logit instead, so it must push the rest down to -100.)
    /// </summary>
    /// <param name="sims">[Nq, Nc] ITC similarities of queries to candidates</param>
    /// <param name="matchProbability">([P] query index, [P] candidate index) → [P] ITM probability of each pair</param>
    /// <returns>[Nq, Nc]</returns>
    public static Tensor Rerank(Tensor sims, int k, Func<Tensor, Tensor, Tensor> matchProbability)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(k);
        long nq = sims.shape[0];
        k = (int)Math.Min(k, sims.shape[1]);
        if (k == 0) return sims.clone();
        using var scope = NewDisposeScope();
        var (topSims, topIndex) = sims.topk(k, dim: 1);                                                      // [Nq, k]
        var query = arange(nq, device: sims.device).unsqueeze(1).expand(nq, k).reshape(-1);                  // [Nq * k]
        var probability = matchProbability(query, topIndex.reshape(-1)).reshape(nq, k).to(sims.dtype);
        return sims.clone().scatter_(1, topIndex, topSims + probability).MoveToOuterDisposeScope();
    }

    /// <summary>Retrieval metrics of a model on an evaluation set: <see cref="Scores"/>, then <see cref="Metrics"/>.</summary>
    /// <summary>The <paramref name="k"/> best-scored images of one caption, best first: (image index, score).</summary>
    /// <param name="scoresT2I">[Nt, Ni]</param>
    public static IReadOnlyList<(int Image, double Score)> Top(Tensor scoresT2I, int caption, int k)
    {
        using var scope = NewDisposeScope();
        var (values, indices) = scoresT2I[caption].to(float64).nan_to_num(double.NegativeInfinity).topk((int)Math.Min(k, scoresT2I.shape[1]));
        var v = values.data<double>().ToArray();
        var i = indices.data<long>().ToArray();
        return [.. i.Select((index, r) => ((int)index, v[r]))];
    }

    public static RetrievalMetrics Evaluate(MamoModel model, Tensor images, Tensor tokenIds, Tensor attentionMask, int[] textToImage, int k, int batchSize,
        CancellationToken ct = default)
    {
        var (i2t, t2i) = Scores(model, images, tokenIds, attentionMask, k, batchSize, ct);
        using (i2t) using (t2i) return Metrics(i2t, t2i, textToImage);
    }

    /// <summary>Runs <paramref name="forward"/> on consecutive slices of at most <paramref name="batchSize"/> rows and concatenates the results.
    /// Each slice has its own dispose scope, so its activations are freed before the next one, not at the end.</summary>
    static Tensor InBatches(long count, int batchSize, CancellationToken ct, Func<TensorIndex, Tensor> forward)
    {
        var parts = new List<Tensor>();
        for (long start = 0; start < count; start += batchSize)
        {
            ct.ThrowIfCancellationRequested();
            using var scope = NewDisposeScope();
            parts.Add(forward(TensorIndex.Slice(start, Math.Min(start + batchSize, count))).MoveToOuterDisposeScope());
        }
        return cat(parts, 0);
    }
}
