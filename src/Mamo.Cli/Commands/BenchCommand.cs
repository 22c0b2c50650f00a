using System.CommandLine;
using System.Diagnostics;
using Mamo.Model;
using TorchSharp;
using static TorchSharp.torch;

namespace Mamo.Cli.Commands;

/// <summary>`mamo bench step`: the bare training step (student + teacher targets + AdamW + EMA, no actors) on
/// synthetic batches of the preset's shapes, timed step by step. Step time does not depend on the pixels.</summary>
public static class BenchCommand
{
    public static Command Create()
    {
        var preset = new Option<string>("--preset") { Description = "tiny, small or base", DefaultValueFactory = _ => "tiny" };
        preset.AcceptOnlyFromAmong("tiny", "small", "base");
        var batchSize = new Option<int>("--batch-size") { Description = "Pairs per step", DefaultValueFactory = _ => 32 };
        var steps = new Option<int>("--steps") { Description = "Timed steps (0: only count parameters)", DefaultValueFactory = _ => 20 };
        var warmup = new Option<int>("--warmup") { Description = "Untimed steps first", DefaultValueFactory = _ => 3 };
        var threads = new Option<int>("--threads") { Description = "torch intra-op threads (0: one per core)", DefaultValueFactory = _ => 0 };
        var step = new Command("step", "Median time of one MAMO training step") { preset, batchSize, steps, warmup, threads };
        step.SetAction(parse =>
        {
            var output = parse.InvocationConfiguration.Output;
            if (parse.GetValue(threads) > 0) torch.set_num_threads(parse.GetValue(threads));
            var config = MamoConfig.Preset(parse.GetValue(preset)!);
            int b = parse.GetValue(batchSize), n = parse.GetValue(steps);
            using var trainer = new MamoTrainer(config, new OptimizerConfig(), CPU, seed: 1);
            using var images = randn(b, 3, config.ImageSize, config.ImageSize);
            using var tokenIds = randint(1000, config.VocabSize, new long[] { b, config.MaxTextLength });
            using (var cls = tokenIds[.., 0]) cls.fill_(config.ClsTokenId);
            using var attentionMask = ones(b, config.MaxTextLength, int64);
            output.WriteLine($"preset {parse.GetValue(preset)}, {trainer.Student.parameters().Sum(p => p.numel()):N0} parameters, batch {b}, {torch.get_num_threads()} threads, cpu");
            if (n == 0) return 0;
            for (int i = 0; i < parse.GetValue(warmup); i++) trainer.TrainStep(images, tokenIds, attentionMask);
            var times = new double[n];
            for (int i = 0; i < n; i++)
            {
                var clock = Stopwatch.StartNew();
                trainer.TrainStep(images, tokenIds, attentionMask);
                times[i] = clock.Elapsed.TotalMilliseconds;
            }
            Array.Sort(times);
            var median = times[n / 2];
            output.WriteLine($"step ms: median {median:F1}, min {times[0]:F1}, max {times[^1]:F1} over {n} steps; {b * 1000 / median:F1} pairs/s");
            return 0;
        });
        return new Command("bench", "Benchmarks") { step };
    }
}
