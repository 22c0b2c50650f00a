using System.CommandLine;
using System.Diagnostics;
using System.Globalization;
using System.Text.Json;
using Mamo.Model;
using TorchSharp;
using static TorchSharp.torch;

namespace Mamo.Cli.Commands;

/// <summary>`mamo bench step`: the bare training step (student + teacher targets + AdamW + EMA, no actors) on
/// synthetic batches of the preset's shapes, timed step by step, with its analytic FLOPs and the MFU against a
/// matmul measured in the same run. Step time does not depend on the pixels.
/// `mamo bench export`: one seeded step with every input, random draw and output written out, so that the
/// PyTorch reference (bench/pytorch/mamo_ref.py) can replay it and compare. `mamo bench export-vit`: the same for a
/// ViT imported from timm's names.</summary>
public static class BenchCommand
{
    /// <summary>Memory is compared against the RSS after this many timed steps (allocator and caches settled).</summary>
    const int RssBaselineStep = 100;

    public static Command Create()
    {
        var preset = new Option<string>("--preset") { Description = "tiny, small or base", DefaultValueFactory = _ => "tiny" };
        preset.AcceptOnlyFromAmong("tiny", "small", "base");
        var batchSize = new Option<int>("--batch-size") { Description = "Pairs per step", DefaultValueFactory = _ => 32 };
        var steps = new Option<int>("--steps") { Description = "Timed steps (0: only count parameters)", DefaultValueFactory = _ => 20 };
        var warmup = new Option<int>("--warmup") { Description = "Untimed steps first", DefaultValueFactory = _ => 3 };
        var threads = new Option<int>("--threads") { Description = "torch intra-op threads (0: one per core)", DefaultValueFactory = _ => 0 };
        var peakSeconds = new Option<double>("--peak-seconds") { Description = "How long to time the 1024² fp32 matmul that gives the peak", DefaultValueFactory = _ => 1.0 };
        var json = new Option<bool>("--json") { Description = "Print one JSON object instead of text" };
        var step = new Command("step", "Median time of one MAMO training step, its FLOPs and MFU") { preset, batchSize, steps, warmup, threads, peakSeconds, json };
        step.SetAction(parse =>
        {
            var output = parse.InvocationConfiguration.Output;
            if (parse.GetValue(threads) > 0) torch.set_num_threads(parse.GetValue(threads));
            var name = parse.GetValue(preset)!;
            var config = MamoConfig.Preset(name);
            var pretraining = PretrainingConfig.Preset(name);
            int b = parse.GetValue(batchSize), n = parse.GetValue(steps);
            using var trainer = new MamoTrainer(config, new OptimizerConfig(), CPU, seed: 1, objective: MamoPretraining.With(pretraining));
            // Drawn from a generator of its own: torch's global one is the model constructors' (Seeds.GlobalGenerator).
            using var draws = new Generator(1, CPU);
            using var images = randn(b, 3, config.ImageSize, config.ImageSize, generator: draws);
            using var tokenIds = randint(1000, config.VocabSize, new long[] { b, config.MaxTextLength }, generator: draws);
            using (var cls = tokenIds[.., 0]) cls.fill_(config.ClsTokenId);
            using var attentionMask = ones(b, config.MaxTextLength, int64);
            var parameters = trainer.Student.parameters().Sum(p => p.numel());
            var report = new Dictionary<string, object>
            {
                ["preset"] = name, ["parameters"] = parameters, ["batch"] = b, ["threads"] = torch.get_num_threads(), ["config"] = ReferenceConfig(config, pretraining),
            };
            if (!parse.GetValue(json))
                output.WriteLine($"preset {name}, {parameters:N0} parameters, batch {b}, {torch.get_num_threads()} threads, cpu");
            if (n == 0)
            {
                if (parse.GetValue(json)) output.WriteLine(JsonSerializer.Serialize(report));
                return 0;
            }

            for (int i = 0; i < parse.GetValue(warmup); i++) trainer.TrainStep(images, tokenIds, attentionMask);
            var times = new double[n];
            long rssAt100 = 0;
            for (int i = 0; i < n; i++)
            {
                var clock = Stopwatch.StartNew();
                trainer.TrainStep(images, tokenIds, attentionMask);
                times[i] = clock.Elapsed.TotalMilliseconds;
                if (i + 1 == RssBaselineStep) rssAt100 = Process.GetCurrentProcess().WorkingSet64;   // RSS on Linux
            }
            var rssAtEnd = Process.GetCurrentProcess().WorkingSet64;
            Array.Sort(times);
            var median = times[n / 2];

            long maskedTokens;
            using (var mask = JointMasking.Sample(config, pretraining, tokenIds, attentionMask, seed: 0)) maskedTokens = mask.MaskedTokenPositions.shape[0];
            var flops = StepFlops.Count(config, pretraining, b, config.MaxTextLength, maskedTokens);
            var achieved = flops.Step / (median / 1000) / 1e9;
            var peak = PeakMatmulGflops(parse.GetValue(peakSeconds));
            if (parse.GetValue(json))
            {
                report["steps"] = n;
                report["median_ms"] = median; report["min_ms"] = times[0]; report["max_ms"] = times[^1];
                report["pairs_per_s"] = b * 1000 / median;
                report["teacher_forward_gflop"] = flops.TeacherForward / 1e9;
                report["student_forward_gflop"] = flops.StudentForward / 1e9;
                report["step_gflop"] = flops.Step / 1e9;
                report["achieved_gflops"] = achieved; report["peak_gflops"] = peak; report["mfu"] = achieved / peak;
                if (rssAt100 > 0) { report["rss_mib_at_100"] = rssAt100 >> 20; report["rss_mib_at_end"] = rssAtEnd >> 20; }
                output.WriteLine(JsonSerializer.Serialize(report));
                return 0;
            }
            output.WriteLine($"step ms: median {median:F1}, min {times[0]:F1}, max {times[^1]:F1} over {n} steps; {b * 1000 / median:F1} pairs/s");
            output.WriteLine($"model FLOPs per step {flops.Step / 1e9:F1} GFLOP (teacher forward {flops.TeacherForward / 1e9:F1} + 3 × student forward {flops.StudentForward / 1e9:F1}); achieved {achieved:F1} GFLOP/s");
            output.WriteLine($"peak fp32 matmul (1024², {parse.GetValue(peakSeconds):F1} s) {peak:F1} GFLOP/s; MFU {100 * achieved / peak:F1}%");
            if (rssAt100 > 0)
                output.WriteLine($"RSS after {RssBaselineStep} steps {rssAt100 >> 20} MiB, after {n}: {rssAtEnd >> 20} MiB ({100.0 * (rssAtEnd - rssAt100) / rssAt100:+0.0;-0.0}%)");
            return 0;
        });

        var exportPreset = new Option<string>("--preset") { Description = "tiny, small or base", DefaultValueFactory = _ => "tiny" };
        exportPreset.AcceptOnlyFromAmong("tiny", "small", "base");
        var exportBatch = new Option<int>("--batch-size") { Description = "Pairs in the batch", DefaultValueFactory = _ => 8 };
        var seed = new Option<int>("--seed") { Description = "Seed of the weights, the batch and the step's draws", DefaultValueFactory = _ => 1 };
        var outDir = new Option<string>("--out") { Description = "Folder to write into", Required = true };
        var export = new Command("export", "Write one seeded step (weights, batch, masks, ITM negatives, losses, embeddings, gradients, updated weights) for the PyTorch parity check")
            { exportPreset, exportBatch, seed, outDir };
        export.SetAction(parse =>
        {
            var name = parse.GetValue(exportPreset)!;
            var result = Export(MamoConfig.Preset(name), PretrainingConfig.Preset(name), parse.GetValue(exportBatch), parse.GetValue(seed), parse.GetValue(outDir)!);
            parse.InvocationConfiguration.Output.WriteLine(result);
            return 0;
        });
        var grid = new Option<int>("--grid") { Description = "The timm file's position grid (tiny's is 8; another size is resized on import)", DefaultValueFactory = _ => 4 };
        var vitOut = new Option<string>("--out") { Description = "Folder to write into", Required = true };
        var vitSeed = new Option<int>("--seed") { Description = "Seed of the weights and the images", DefaultValueFactory = _ => 1 };
        var exportVit = new Command("export-vit", "Write a random ViT under timm's names, its import into tiny and the image encoder's output, for `mamo_ref.py timm-vit`")
            { grid, vitSeed, vitOut };
        exportVit.SetAction(parse =>
        {
            parse.InvocationConfiguration.Output.WriteLine(ExportVit(parse.GetValue(grid), parse.GetValue(vitSeed), parse.GetValue(vitOut)!));
            return 0;
        });
        return new Command("bench", "Benchmarks") { step, export, exportVit, BenchKafkaCommand.Create(), BenchAnnCommand.Create() };
    }

    /// <summary>
    /// The timm import's outside check: a seeded ViT of tiny's width and depth with a <paramref name="grid"/>² position
    /// grid (LayerNorms perturbed, so that none is the identity), written under timm's names as `mamo export --format
    /// timm-vit` writes them, imported into tiny with `mamo import`'s code, and run on seeded images. Files in
    /// <paramref name="dir"/>: timm.safetensors, config.json (the imported MamoConfig), checkpoint/ (the import) and
    /// expected.safetensors (images, features: the image encoder's [B, 1 + N, W]).
    /// </summary>
    static string ExportVit(int grid, int seed, string dir)
    {
        using var scope = NewDisposeScope();
        var tiny = MamoConfig.Tiny;
        var source = tiny with { ImageSize = grid * tiny.PatchSize, ImageNormEps = Mamo.Model.Published.TimmVit.TimmEps };
        using var vit = MamoModel.Seeded(source, seed);
        var parameters = vit.named_parameters().ToDictionary(p => p.name, p => (Tensor)p.parameter);
        using var draws = new Generator((ulong)seed, CPU);
        using (no_grad())
            foreach (var (name, p) in parameters.Where(p => p.Key.Contains(".ln")))
                p.add_(randn(p.shape, generator: draws) * 0.1);
        Directory.CreateDirectory(dir);
        var timm = Path.Combine(dir, "timm.safetensors");
        SafeTensors.Save(timm, Mamo.Model.Published.TimmVit.Map(source).Export(parameters));
        var checkpoint = Path.Combine(dir, "checkpoint");
        if (Directory.Exists(checkpoint)) Directory.Delete(checkpoint, recursive: true);
        var imported = Mamo.Model.Published.WeightImport.Run(null, new(Mamo.Model.Published.WeightSource.TimmVit, timm), tiny, checkpoint, seed);
        var config = Checkpoint.ReadConfig(checkpoint);
        using var model = new MamoModel(config);
        Checkpoint.LoadModel(checkpoint, Checkpoint.StudentFile, model);
        model.eval();
        var images = randn(4, 3, config.ImageSize, config.ImageSize, generator: draws);
        using var noGrad = no_grad();
        var features = model.Image.forward(images, null);
        SafeTensors.Save(Path.Combine(dir, "expected.safetensors"), [("images", images), ("features", features)]);
        File.WriteAllText(Path.Combine(dir, "config.json"), config.ToJson());
        return $"{string.Join("; ", imported)}; wrote {dir}";
    }

    /// <summary>fp32 GFLOP/s of a 1024 × 1024 matmul, repeated for about <paramref name="seconds"/>: the peak the MFU is taken against.</summary>
    public static double PeakMatmulGflops(double seconds)
    {
        const int size = 1024;
        using var scope = NewDisposeScope();
        using var draws = new Generator(0, CPU);
        var a = randn(size, size, generator: draws);
        var b = randn(size, size, generator: draws);
        for (int i = 0; i < 3; i++) { using var warm = a.matmul(b); }
        long count = 0;
        var clock = Stopwatch.StartNew();
        while (clock.Elapsed.TotalSeconds < seconds || count == 0)
        {
            using var c = a.matmul(b);
            count++;
        }
        return 2.0 * size * size * size * count / clock.Elapsed.TotalSeconds / 1e9;
    }

    /// <summary>
    /// Replays step 0 of a seeded trainer the way MamoTrainer.StudentStep does (same mask seed, same ITM generator),
    /// keeping what the step drew and computed, then takes the real TrainStep. Files in <paramref name="dir"/>:
    /// config.json; student.safetensors and teacher.safetensors (weights before the step); batch.safetensors
    /// (images, token_ids, attention_mask, image_keys); draws.safetensors (the joint mask and the ITM negatives);
    /// expected.safetensors (every loss, the image and text embeddings, the teacher's targets, every gradient);
    /// student_step1/teacher_step1.safetensors (after AdamW and EMA); step.json (optimiser settings, grad norm).
    /// </summary>
    static string Export(MamoConfig config, PretrainingConfig pretraining, int b, int seed, string dir)
    {
        if (b < 2) throw new ArgumentException("the parity batch needs at least 2 pairs (pair 1 repeats pair 0's image)");
        // No warm-up, so step 0 takes the full learning rate and the update is large enough to compare.
        var optimizer = new OptimizerConfig { WarmupSteps = 0 };
        using var trainer = new MamoTrainer(config, optimizer, CPU, seed, objective: MamoPretraining.With(pretraining));
        using var scope = NewDisposeScope();
        var (images, tokenIds, attentionMask, imageKeys) = ParityBatch(config, b, seed);
        Directory.CreateDirectory(dir);
        File.WriteAllText(Path.Combine(dir, "config.json"), ReferenceConfig(config, pretraining).ToJsonString());
        SafeTensors.Save(Path.Combine(dir, "student.safetensors"), Checkpoint.Named(trainer.Student));
        SafeTensors.Save(Path.Combine(dir, "teacher.safetensors"), Checkpoint.Named(trainer.Teacher));
        SafeTensors.Save(Path.Combine(dir, "batch.safetensors"),
            [("images", images), ("token_ids", tokenIds), ("attention_mask", attentionMask), ("image_keys", imageKeys)]);

        var replayTerms = new Dictionary<string, double>();
        using (var replay = NewDisposeScope())
        {
            var student = trainer.Student;
            var targets = trainer.Teacher.Targets(images, tokenIds, attentionMask, pretraining.MrmTopK);
            var mask = JointMasking.Sample(config, pretraining, tokenIds, attentionMask, trainer.MaskSeed(0));
            using var generator = new Generator((ulong)trainer.MaskSeed(0), CPU);
            student.train();
            trainer.Optimizer.ZeroGrad();
            var loss = student.Forward(images, tokenIds, attentionMask, mask, pretraining, targets, imageKeys, generator);
            loss.Total.backward();
            Tensor imageEmbedding, textEmbedding;
            using (no_grad())
            {
                imageEmbedding = student.ImageEmbedding(student.EncodeImage(images));
                textEmbedding = student.TextEmbedding(student.EncodeText(tokenIds, attentionMask));
            }
            SafeTensors.Save(Path.Combine(dir, "draws.safetensors"),
            [
                ("visible", mask.Visible), ("masked", mask.Masked), ("masked_token_ids", mask.MaskedTokenIds),
                ("masked_token_positions", mask.MaskedTokenPositions), ("masked_token_labels", mask.MaskedTokenLabels),
                ("itm_negatives", loss.ItmNegatives ?? throw new InvalidOperationException("the preset has no ITM")),
            ]);
            var expected = new List<(string, Tensor)> { ("loss.total", loss.Total) };
            expected.AddRange(loss.Terms.Select(t => ("loss." + t.Key, t.Value)));
            expected.Add(("image_embedding", imageEmbedding));
            expected.Add(("text_embedding", textEmbedding));
            expected.Add(("teacher.patch_features", targets.PatchFeatures!));
            expected.Add(("teacher.fused_latents", targets.FusedLatents!));
            expected.AddRange(student.named_parameters().Where(p => p.parameter.grad is not null).Select(p => ("grad." + p.name, p.parameter.grad!)));
            SafeTensors.Save(Path.Combine(dir, "expected.safetensors"), expected);
            foreach (var (name, value) in loss.Terms) replayTerms[name] = value.ToDouble();
            trainer.Optimizer.ZeroGrad();
        }

        // The real step draws the same masks and negatives from the same seeds, so its losses repeat the replay's.
        var step = trainer.TrainStep(images, tokenIds, attentionMask, imageKeys);
        var drift = step.Terms.Max(t => Math.Abs(t.Value - replayTerms[t.Key]) / Math.Max(Math.Abs(replayTerms[t.Key]), 1e-12));
        SafeTensors.Save(Path.Combine(dir, "student_step1.safetensors"), Checkpoint.Named(trainer.Student));
        SafeTensors.Save(Path.Combine(dir, "teacher_step1.safetensors"), Checkpoint.Named(trainer.Teacher));
        var info = new Dictionary<string, object>
        {
            ["seed"] = seed, ["batch"] = b, ["threads"] = torch.get_num_threads(),
            ["learning_rate"] = step.LearningRate, ["grad_norm"] = step.GradNorm, ["skipped"] = step.Skipped,
            ["momentum_decay"] = pretraining.MomentumDecay, ["optimizer"] = optimizer,
            ["step_losses"] = step.Terms, ["replay_losses"] = replayTerms, ["replay_max_relative_drift"] = drift,
        };
        File.WriteAllText(Path.Combine(dir, "step.json"), JsonSerializer.Serialize(info, new JsonSerializerOptions { WriteIndented = true }));
        return string.Create(CultureInfo.InvariantCulture,
            $"wrote {dir}: batch {b}, loss {step.Loss:F6} ({string.Join(", ", step.Terms.Select(t => $"{t.Key} {t.Value:F6}"))}), grad norm {step.GradNorm:F6}; replay vs TrainStep max relative drift {drift:G3}");
    }

    /// <summary>The architecture and the objective in one object, as the PyTorch reference reads a config.</summary>
    static System.Text.Json.Nodes.JsonObject ReferenceConfig(MamoConfig config, PretrainingConfig pretraining)
    {
        var merged = System.Text.Json.Nodes.JsonNode.Parse(config.ToJson())!.AsObject();
        foreach (var (key, value) in System.Text.Json.Nodes.JsonNode.Parse(pretraining.ToJson())!.AsObject().ToList()) merged[key] = value?.DeepClone();
        return merged;
    }

    /// <summary>A batch that exercises every path: captions of different lengths ([CLS] … [SEP], then padding), and
    /// pair 1 showing pair 0's image under the same key, so ITC spreads its positives and ITM must skip it.</summary>
    static (Tensor Images, Tensor TokenIds, Tensor AttentionMask, Tensor ImageKeys) ParityBatch(MamoConfig c, int b, int seed)
    {
        var rng = new Random(seed);
        int l = c.MaxTextLength;
        var ids = new long[b * l];
        var keep = new long[b * l];
        for (int i = 0; i < b; i++)
        {
            int length = rng.Next(4, l + 1);
            ids[i * l] = c.ClsTokenId;
            for (int t = 1; t < length - 1; t++) ids[i * l + t] = rng.Next(1000, c.VocabSize);
            ids[i * l + length - 1] = c.SepTokenId;
            for (int t = 0; t < length; t++) keep[i * l + t] = 1;
        }
        using var draws = new Generator((ulong)seed, CPU);
        var images = randn(b, 3, c.ImageSize, c.ImageSize, generator: draws);
        using (var first = images[0]) using (var second = images[1]) second.copy_(first);
        var keys = Enumerable.Range(0, b).Select(i => i == 1 ? 0L : i).ToArray();
        return (images, tensor(ids, new long[] { b, l }), tensor(keep, new long[] { b, l }), tensor(keys));
    }
}

/// <summary>
/// Matmul FLOPs of a training step, counted from the shapes: 2·m·n·k for every linear layer, the patch-embedding
/// convolution and both attention products; norms, softmax, GELU, losses and the optimiser are left out. A block
/// over T tokens of width W and MLP ratio r costs (8 + 4r)·T·W² (qkv 6, proj 2, MLP 4r) + 4·T²·W (QKᵀ and AV).
/// A step is the teacher's forward (no autograd) plus the student's forward and backward, the backward
/// counted as twice the forward: Step = TeacherForward + 3 × StudentForward.
/// </summary>
public sealed record StepFlops(double TeacherForward, double StudentForward)
{
    public double Step => TeacherForward + 3 * StudentForward;

    /// <param name="textLength">L, the token positions per caption</param>
    /// <param name="maskedTokens">M, the masked text positions of the whole batch (the MLM rows)</param>
    public static StepFlops Count(MamoConfig c, PretrainingConfig p, long batch, long textLength, long maskedTokens)
    {
        double w = c.Width, b = batch, l = textLength, n = c.NumPatches, nv = p.NumVisiblePatches(c);
        double Blocks(int layers, double pairs, double tokens) =>
            layers * ((8 + 4 * c.MlpRatio) * pairs * tokens * w * w + 4 * pairs * tokens * tokens * w);
        var patchEmbed = 2 * b * n * w * 3 * c.PatchSize * c.PatchSize;
        var lw = p.Weights;

        double student = patchEmbed + Blocks(c.ImageLayers, b, 1 + nv);
        if (lw.Itc > 0 || lw.Itm > 0)
        {
            var imageTokens = 1 + nv;
            if (!p.AlignOnVisiblePatches) { student += patchEmbed + Blocks(c.ImageLayers, b, 1 + n); imageTokens = 1 + n; }
            student += Blocks(c.TextLayers, b, l);
            student += 2 * (2 * b * w * c.EmbedDim) + 2 * b * b * c.EmbedDim;              // projections, similarities
            if (lw.Itm > 0) student += Blocks(c.FusionLayers, 3 * b, imageTokens + l) + 2 * 3 * b * w * 2;
        }
        if (lw.Mlm > 0 || lw.Mim > 0 || lw.Mrm > 0)
        {
            student += Blocks(c.TextLayers, b, l) + Blocks(c.FusionLayers, b, 1 + n + l);   // masked text, fusion
            if (lw.Mlm > 0) student += 2 * maskedTokens * w * w + 2 * maskedTokens * w * c.VocabSize;
            if (lw.Mim > 0) student += Blocks(c.DecoderLayers, b, n) + 2 * b * n * w * w;
            if (lw.Mrm > 0) student += 2 * b * (1 + n + l) * w * w;
        }
        double teacher = lw.Mim > 0 || lw.Mrm > 0
            ? patchEmbed + Blocks(c.ImageLayers, b, 1 + n) + Blocks(c.TextLayers, b, l) + Blocks(c.FusionLayers, b, 1 + n + l)
            : 0;
        return new StepFlops(teacher, student);
    }
}
