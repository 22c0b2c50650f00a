using System.CommandLine;
using System.Diagnostics;
using Mamo.Actors.Pipeline;
using Mamo.Cli.Serving;
using Mamo.Data;
using Mamo.Data.Datasets;
using Mamo.Model;

namespace Mamo.Cli.Commands;

/// <summary>`mamo bench ann [--checkpoint DIR] [--synthetic N] [--k 10]`: the search index's recall@k against exact
/// search, and the time of each, on the catalogue `mamo serve --index` would hold: every emoji image embedded by the
/// checkpoint, searched with every caption (across the modality gap: queries far from every item, the hard case for a
/// graph index) and with every image; and on N random unit vectors, the hardest case for a graph index (no
/// structure to follow), searched with random queries.</summary>
public static class BenchAnnCommand
{
    public static Command Create()
    {
        var checkpoint = new Option<string?>("--checkpoint") { Description = "A checkpoint or run folder whose model embeds the emoji catalogue (default: none)" };
        var synthetic = new Option<int>("--synthetic") { Description = "Random unit vectors in a second catalogue (0: none)", DefaultValueFactory = _ => 50_000 };
        var queries = new Option<int>("--queries") { Description = "Queries against the synthetic catalogue", DefaultValueFactory = _ => 500 };
        var k = new Option<int>("--k") { Description = "Results per query", DefaultValueFactory = _ => 10 };
        var command = new Command("ann", "Recall@k and time of the search index (USearch HNSW) against exact search") { checkpoint, synthetic, queries, k };
        command.SetAction(parse =>
        {
            var output = parse.InvocationConfiguration.Output;
            var top = parse.GetValue(k);
            if (parse.GetValue(checkpoint) is { } path)
            {
                if (Checkpoint.Latest(path) is not { } dir)
                {
                    parse.InvocationConfiguration.Error.WriteLine($"mamo bench ann: no checkpoint at {path}");
                    return ExitCodes.Usage;
                }
                using var embedder = Embedder.Load(dir, TorchSharp.torch.CPU);
                var preparer = SamplePreparer.ForEvaluation(embedder.Config.ImageSize, embedder.Config.MaxTextLength, new TextTokenizer(BuiltinDatasets.EnsureVocab()));
                var emoji = BuiltinDatasets.Ensure(BuiltinDatasets.Emoji);
                var items = EmbeddingItem.PrepareAll(new[] { BuiltinDatasets.TrainSplit, BuiltinDatasets.TestSplit }
                    .SelectMany(split => ManifestSource.ReadAll(emoji.File(split)).Samples), preparer, []);
                var images = items.Chunk(64).SelectMany(b => embedder.EmbedImages(b.Select(i => i.Pixels).ToList())).ToArray();
                var texts = items.Chunk(64).SelectMany(b => embedder.EmbedTexts(b.Select(i => (i.TokenIds, i.AttentionMask)).ToList())).ToArray();
                var ids = items.Select(i => i.Id).ToArray();
                output.WriteLine(Measure($"emoji images searched with their captions ({embedder.Version} of {dir})", ids, images, texts, top));
                output.WriteLine(Measure($"emoji images searched with the images", ids, images, images, top));
            }
            if (parse.GetValue(synthetic) is > 0 and var n)
            {
                var random = new Random(1);
                output.WriteLine(Measure($"random unit vectors, dim 128", Enumerable.Range(0, n).Select(i => $"v{i}").ToArray(),
                    Enumerable.Range(0, n).Select(_ => Unit(random, 128)).ToArray(),
                    Enumerable.Range(0, parse.GetValue(queries)).Select(_ => Unit(random, 128)).ToArray(), top));
            }
            return 0;
        });
        return command;
    }

    static string Measure(string what, string[] ids, float[][] catalogue, float[][] queries, int k)
    {
        var clock = Stopwatch.StartNew();
        using var index = SearchIndex.Build("bench", 0, ids.Zip(catalogue).Select(p => KeyValuePair.Create((p.First, "image"), p.Second)));
        var build = clock.Elapsed.TotalSeconds;
        clock.Restart();
        var found = queries.Select(q => index.Search("image", q, k)!.Select(r => r.Id).ToHashSet()).ToList();
        var ann = clock.Elapsed.TotalMilliseconds / queries.Length;
        clock.Restart();
        var exact = queries.Select(q => index.ExactSearch("image", q, k).Select(r => r.Id).ToList()).ToList();
        var brute = clock.Elapsed.TotalMilliseconds / queries.Length;
        var recall = found.Zip(exact).Average(p => p.Second.Count(p.First.Contains) / (double)p.Second.Count);
        return $"{what}: {catalogue.Length} vectors, {queries.Length} queries: recall@{k} {recall:F4}; HNSW {ann:F3} ms a query " +
               $"(built in {build:F1} s), exact {brute:F3} ms a query";
    }

    static float[] Unit(Random random, int dim)
    {
        // Gaussian coordinates (Box-Muller) give directions uniform on the sphere.
        var v = Enumerable.Range(0, dim).Select(_ => (float)(Math.Sqrt(-2 * Math.Log(1 - random.NextDouble())) * Math.Cos(2 * Math.PI * random.NextDouble()))).ToArray();
        var norm = MathF.Sqrt(v.Sum(x => x * x));
        return v.Select(x => x / norm).ToArray();
    }
}
