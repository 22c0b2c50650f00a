using TorchSharp;
using static TorchSharp.torch;
using Xunit;

namespace Mamo.Model.Tests;

public class RetrievalTests
{
    static Tensor Matrix(double[,] values) => tensor(values);

    [Fact]
    public void Perfect_scores_give_full_recall()
    {
        using var scope = NewDisposeScope();
        var m = Retrieval.Metrics(eye(4), eye(4), [0, 1, 2, 3]);
        Assert.Equal(new RetrievalMetrics(100, 100, 100, 100, 100, 100), m);
        Assert.Equal(100, m.RMean);
    }

    [Fact]
    public void An_image_ranks_by_its_best_caption_and_a_caption_by_its_one_image()
    {
        using var scope = NewDisposeScope();
        int[] textToImage = [0, 0, 1, 2, 2];
        var i2t = Matrix(new[,]
        {
            { 0.1, 0.9, 0.5, 0.2, 0.3 },   // own captions 0 and 1: caption 1 is first, so rank 0 although caption 0 is last
            { 0.9, 0.8, 0.7, 0.1, 0.0 },   // own caption 2 is third: rank 2
            { 0.9, 0.8, 0.7, 0.6, 0.5 },   // own captions 3 and 4: the best is fourth, rank 3
        });
        var t2i = Matrix(new[,]
        {
            { 0.9, 0.1, 0.2 },   // image 0 first
            { 0.5, 0.6, 0.1 },   // image 0 second
            { 0.1, 0.9, 0.2 },   // image 1 first
            { 0.8, 0.7, 0.6 },   // image 2 third
            { 0.1, 0.2, 0.3 },   // image 2 first
        });
        var m = Retrieval.Metrics(i2t, t2i, textToImage);
        Assert.Equal(100.0 / 3, m.Tr1, 9);
        Assert.Equal(100, m.Tr5);
        Assert.Equal(60, m.Ir1, 9);
        Assert.Equal(100, m.Ir5);
        Assert.Equal((100.0 / 3 + 100 + 100 + 60 + 100 + 100) / 6, m.RMean, 9);
    }

    [Fact]
    public void Recall_at_k_counts_ranks_below_k()
    {
        using var scope = NewDisposeScope();
        // 12 images, one caption each; caption i is ranked i-th by its image, and image i is ranked i-th by its caption.
        const int n = 12;
        var values = new double[n, n];
        for (int i = 0; i < n; i++)
        {
            var order = Enumerable.Range(0, n).Where(j => j != i).ToList();
            order.Insert(i, i);
            for (int r = 0; r < n; r++) values[i, order[r]] = n - r;
        }
        var scores = Matrix(values);
        var m = Retrieval.Metrics(scores, scores, Enumerable.Range(0, n).ToArray());
        Assert.Equal(new[] { 100.0 / n, 500.0 / n, 1000.0 / n, 100.0 / n, 500.0 / n, 1000.0 / n },
            new[] { m.Tr1, m.Tr5, m.Tr10, m.Ir1, m.Ir5, m.Ir10 }, (a, b) => Math.Abs(a - b) < 1e-9);
    }

    [Fact]
    public void Ties_count_against_the_match_but_not_between_own_captions()
    {
        using var scope = NewDisposeScope();
        var flat = Retrieval.Metrics(ones(2, 2), ones(2, 2), [0, 1]);
        Assert.Equal(new RetrievalMetrics(0, 100, 100, 0, 100, 100), flat);

        // Image 0's two captions tie at the top: still rank 0. Image 1's caption ties with one of image 0's: rank 1.
        var i2t = Matrix(new[,] { { 0.9, 0.9, 0.1 }, { 0.2, 0.5, 0.5 } });
        var t2i = Matrix(new[,] { { 0.9, 0.1 }, { 0.9, 0.1 }, { 0.1, 0.9 } });
        var m = Retrieval.Metrics(i2t, t2i, [0, 0, 1]);
        Assert.Equal(50, m.Tr1);
        Assert.Equal(100, m.Ir1);
    }

    [Fact]
    public void A_nan_score_of_the_match_ranks_it_last()
    {
        using var scope = NewDisposeScope();
        var scores = Matrix(new[,] { { double.NaN, 0.1 }, { 0.1, 0.9 } });
        var m = Retrieval.Metrics(scores, scores, [0, 1]);
        Assert.Equal(50, m.Tr1);
        Assert.Equal(50, m.Ir1);
    }

    [Fact]
    public void Metrics_match_albef_argsort_ranking_on_random_scores()
    {
        var rng = new Random(7);
        for (int trial = 0; trial < 50; trial++)
        {
            using var scope = NewDisposeScope();
            int ni = rng.Next(1, 20);
            var textToImage = Enumerable.Range(0, ni).SelectMany(i => Enumerable.Repeat(i, rng.Next(1, 4))).ToArray();
            int nt = textToImage.Length;
            var i2t = Random2D(rng, ni, nt);
            var t2i = Random2D(rng, nt, ni);

            // ALBEF's itm_eval: rank = position in the descending sort; an image takes the best of its captions.
            var imageRanks = Enumerable.Range(0, ni).Select(i =>
            {
                var order = Enumerable.Range(0, nt).OrderByDescending(j => i2t[i, j]).ToList();
                return Enumerable.Range(0, nt).Where(j => textToImage[j] == i).Min(j => order.IndexOf(j));
            }).ToArray();
            var textRanks = Enumerable.Range(0, nt).Select(t =>
                Enumerable.Range(0, ni).OrderByDescending(i => t2i[t, i]).ToList().IndexOf(textToImage[t])).ToArray();
            double R(int[] ranks, int k) => 100.0 * ranks.Count(r => r < k) / ranks.Length;

            var m = Retrieval.Metrics(Matrix(i2t), Matrix(t2i), textToImage);
            Assert.Equal(R(imageRanks, 1), m.Tr1, 9);
            Assert.Equal(R(imageRanks, 5), m.Tr5, 9);
            Assert.Equal(R(imageRanks, 10), m.Tr10, 9);
            Assert.Equal(R(textRanks, 1), m.Ir1, 9);
            Assert.Equal(R(textRanks, 5), m.Ir5, 9);
            Assert.Equal(R(textRanks, 10), m.Ir10, 9);
            Assert.True(m.Tr1 <= m.Tr5 && m.Tr5 <= m.Tr10 && m.Ir1 <= m.Ir5 && m.Ir5 <= m.Ir10);
        }
    }

    static double[,] Random2D(Random rng, int rows, int cols)
    {
        var a = new double[rows, cols];
        for (int i = 0; i < rows; i++)
            for (int j = 0; j < cols; j++) a[i, j] = rng.NextDouble();
        return a;
    }

    [Fact]
    public void Mismatched_shapes_are_refused()
    {
        using var scope = NewDisposeScope();
        Assert.Throws<ArgumentException>(() => Retrieval.Metrics(zeros(2, 3), zeros(3, 2), [0, 1]));
        Assert.Throws<ArgumentException>(() => Retrieval.Metrics(zeros(2, 2), zeros(2, 2), [0, 2]));
    }

    [Fact]
    public void Itm_reranking_can_change_the_top_1_but_only_within_the_top_k()
    {
        using var scope = NewDisposeScope();
        var sims = Matrix(new[,] { { 0.9, 0.8, 0.1, 0.0 }, { 0.0, 0.1, 0.2, 0.3 } });
        var asked = new List<(long Query, long Candidate)>();
        Tensor Probability(Tensor query, Tensor candidate)
        {
            var q = query.data<long>().ToArray();
            var c = candidate.data<long>().ToArray();
            asked.AddRange(q.Zip(c));
            // ITM is sure about candidates 1 and 3 (3 is outside row 0's top 2, so it must not be asked for).
            return tensor(c.Select(x => x is 1 or 3 ? 1.0 : 0.0).ToArray());
        }
        var scores = Retrieval.Rerank(sims, 2, Probability);
        Assert.Equal(new[] { (0L, 0L), (0L, 1L), (1L, 3L), (1L, 2L) }.Order(), asked.Order());
        Assert.Equal(new long[] { 1, 0, 2, 3 }, scores[0].argsort(descending: true).data<long>().ToArray());
        Assert.Equal(new long[] { 3, 2, 1, 0 }, scores[1].argsort(descending: true).data<long>().ToArray());
        Assert.Equal(1.8, scores[0, 1].ToDouble(), 9);

        var itcOnly = Retrieval.Metrics(sims[.., ..2], sims[.., ..2].t(), [0, 1]);
        var reranked = Retrieval.Metrics(scores[.., ..2], scores[.., ..2].t(), [0, 1]);
        Assert.Equal(100, itcOnly.Tr1);
        Assert.Equal(50, reranked.Tr1);
    }

    [Fact]
    public void Reranking_keeps_the_top_k_set_and_the_order_of_the_rest()
    {
        var rng = new Random(11);
        var g = new Generator(11);
        for (int trial = 0; trial < 20; trial++)
        {
            using var scope = NewDisposeScope();
            int nq = rng.Next(1, 6), nc = rng.Next(1, 12), k = rng.Next(0, 14);
            var sims = Matrix(Random2D(rng, nq, nc)) * 2 - 1;
            var scores = Retrieval.Rerank(sims, k, (q, c) => rand(new long[] { q.shape[0] }, float64, generator: g));
            int top = Math.Min(k, nc);
            for (int i = 0; i < nq; i++)
            {
                var before = sims[i].argsort(descending: true).data<long>().ToArray();
                var after = scores[i].argsort(descending: true).data<long>().ToArray();
                Assert.Equal(before[..top].Order(), after[..top].Order());
                Assert.Equal(before[top..], after[top..]);
            }
        }
    }

    [Fact]
    public void Scores_rerank_with_the_model_itm_and_do_not_depend_on_the_batch_size()
    {
        using var scope = NewDisposeScope();
        var config = MamoConfig.Tiny;
        using var model = new MamoModel(config);
        const int n = 7, k = 3;
        var (images, ids, attn) = Pairs.Make(config, n, seed: 5);

        var (itc, itcT) = Retrieval.Scores(model, images, ids, attn, k: 0, batchSize: 3);
        var (i2t, t2i) = Retrieval.Scores(model, images, ids, attn, k, batchSize: 3);
        var (i2tWhole, _) = Retrieval.Scores(model, images, ids, attn, k, batchSize: 64);
        Assert.True(model.training);
        Assert.Equal(new long[] { n, n }, i2t.shape);
        Assert.True(itc.allclose(itcT.t()));
        Assert.True(i2t.allclose(i2tWhole, rtol: 1e-4, atol: 1e-5));

        using (no_grad())
        {
            model.eval();
            var imageTokens = model.EncodeImage(images);
            var textTokens = model.EncodeText(ids, attn);
            var sims = model.ImageEmbedding(imageTokens).matmul(model.TextEmbedding(textTokens).t());
            Assert.True(itc.allclose(sims, atol: 1e-5));
            // Image 0 against its top k captions, and caption 0 against its top k images.
            var texts = sims[0].topk(k).indexes;
            var expected = sims[0].index_select(0, texts) + model.MatchProbability(imageTokens[0].expand(k, -1, -1), textTokens.index_select(0, texts), attn.index_select(0, texts));
            Assert.True(i2t[0].index_select(0, texts).allclose(expected, atol: 1e-5));
            var imgs = sims[.., 0].topk(k).indexes;
            expected = sims[.., 0].index_select(0, imgs) + model.MatchProbability(imageTokens.index_select(0, imgs), textTokens[0].expand(k, -1, -1), attn[0].expand(k, -1));
            Assert.True(t2i[0].index_select(0, imgs).allclose(expected, atol: 1e-5));
        }
    }

    [Fact]
    public void A_random_model_scores_near_chance()
    {
        using var scope = NewDisposeScope();
        var config = MamoConfig.Tiny;
        using var model = MamoModel.Seeded(config, 4);
        const int images = 32;
        var (pixels, ids, attn) = Pairs.Make(config, images, seed: 6);
        var m = Retrieval.Evaluate(model, pixels, ids, attn, Enumerable.Range(0, images).ToArray(), k: 4, batchSize: 8);
        // A model that cannot tell the pairs apart finds each query's match first by chance: 1 hit of 32 expected, and 6
        // or more with probability below 0.1 % (binomial, p = 1/32). An evaluation that leaked the match would find most.
        Assert.True(m.Tr1 <= 5 * 100.0 / images && m.Ir1 <= 5 * 100.0 / images, $"TR@1 {m.Tr1}, IR@1 {m.Ir1}");
        Assert.True(double.IsFinite(m.RMean));
    }
}
