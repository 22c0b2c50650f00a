using System.Text.Json;
using System.Text.Json.Nodes;
using Mamo.Data;
using Mamo.Data.Datasets;
using Mamo.Model;
using Xunit;
using static TorchSharp.torch;
using Mamo.Actors.Run;
using Mamo.Actors.Sources;
using Mamo.Actors.Pipeline;

namespace Mamo.Actors.Tests;

/// <summary>Online fine-tuning for classification through the real pipeline: test, then train; labels admitted or
/// dead-lettered; the head grows with the label set.</summary>
public class FinetuneTests
{
    const int Batch = 8, Steps = 4;

    static MamoSettings Settings(string runDir, string source, params string[] more) => MamoSettings.Load(null, [
        "finetune.task=classify", $"run-dir={runDir}", $"batch-size={Batch}", $"max-steps={Steps}", "eval.every-steps=0", "checkpoint.every-steps=1",
        "checkpoint.keep-last=10", "metrics.every-steps=1", "ledger=on", "optimizer.warmup-steps=1", "optimizer.learning-rate=1e-3",
        "data.preprocess-parallelism=1", $"source=\"{source}\"", .. more]);

    /// <summary>A pre-trained checkpoint to start from: a seeded tiny model with its teacher.</summary>
    static string Pretrained(string folder)
    {
        var dir = Path.Combine(folder, "pretrained");
        using var trainer = new MamoTrainer(MamoConfig.Tiny, new OptimizerConfig(), CPU, seed: 5);
        trainer.Save(dir);
        return dir;
    }

    [Fact]
    public async Task Each_prediction_in_the_ledger_is_made_by_the_weights_before_the_step_that_trains_on_it()
    {
        var folder = Directory.CreateTempSubdirectory("mamo-finetune-").FullName;
        try
        {
            var source = "dataset:emoji-labels/test";
            var s = Settings(Path.Combine(folder, "run"), source);
            Assert.Equal(Steps, await new TrainingRun(s, init: Pretrained(folder)).RunAsync(CancellationToken.None));

            var ledger = File.ReadAllLines(Path.Combine(s.RunDir, Metrics.LedgerFile)).Select(l => JsonDocument.Parse(l).RootElement).ToList();
            Assert.Equal(Enumerable.Range(0, Steps), ledger.Select(e => e.GetProperty("step").GetInt32()));
            var samples = TrainingSamples.Load(source, s.Seed, s.MaxInMemoryBytes, _ => { });
            var preparer = new SamplePreparer(new ImageTransform(s.TrainImages), new TextTokenizer(BuiltinDatasets.EnsureVocab()), s.Model.MaxTextLength);
            var admit = TrainingTask.Of(s).Admit;
            long cursor = 0;
            foreach (var entry in ledger)
            {
                var step = entry.GetProperty("step").GetInt64();
                Assert.Equal(step, entry.GetProperty("predicted_at").GetInt64());
                var last = entry.GetProperty("position").GetProperty(TrainingSamples.CursorPartition).GetInt64();
                // The step's batch, prepared as the graph prepared it (each record's randomness is seeded by its cursor).
                var records = samples.From(cursor).TakeWhile(r => r.Cursor <= last).ToList();
                cursor = last + 1;
                Assert.Equal(entry.GetProperty("ids").EnumerateArray().Select(i => i.GetString()), records.Select(r => r.Sample.Id));
                Assert.Equal(entry.GetProperty("labels").EnumerateArray().Select(i => i.GetString()), records.Select(r => r.Sample.Label));
                var prepared = records.Select(r =>
                {
                    Assert.True(preparer.TryPrepareForTraining(admit(r.Sample).Sample!, TrainingGraph.SampleRandom(s.Seed, new(TrainingSamples.CursorPartition, r.Cursor)), out var p, out _));
                    return p!;
                }).ToList();

                StepResult Replay(long fromStep)
                {
                    var dir = Path.Combine(s.RunDir, Checkpoint.RunFolder, Checkpoint.StepFolderName(fromStep));
                    using var trainer = MamoTrainer.Load(dir, s.Optimizer, CPU, s.Seed, withTeacher: false, s.Model, TrainingTask.Of(s).Objective);
                    using var batch = Collator.Collate(prepared, s.Model.ImageSize);
                    using var keys = tensor(batch.Ids.Select(Seeds.StableHash).ToArray());
                    return trainer.StudentStep(new StepInput(batch.Images, batch.TokenIds, batch.AttentionMask, keys, batch.Labels), null);
                }
                // The weights of checkpoint `step` (before its update) made the predictions and the loss the ledger holds...
                var before = Replay(step);
                Assert.Equal(entry.GetProperty("predictions").EnumerateArray().Select(p => p.GetString()!), before.Predictions!);
                Assert.Equal(entry.GetProperty("loss").GetDouble(), before.Loss, 6);
                // ...and the weights after it would not have: the step trained on these records after predicting them.
                var after = Replay(step + 1);
                Assert.NotEqual(Math.Round(entry.GetProperty("loss").GetDouble(), 6), Math.Round(after.Loss, 6));
            }
            // The prequential scores are in metrics.jsonl: a fraction of the records seen, each way.
            var train = File.ReadAllLines(Path.Combine(s.RunDir, Metrics.MetricsFile)).Select(l => JsonNode.Parse(l)!).Last(n => (string?)n["kind"] == "train");
            var hits = ledger.Sum(e => e.GetProperty("predictions").EnumerateArray().Zip(e.GetProperty("labels").EnumerateArray()).Count(p => p.First.GetString() == p.Second.GetString()));
            Assert.Equal((double)hits / (Steps * Batch), (double)train["preq_acc"]!, 6);
        }
        finally { Directory.Delete(folder, recursive: true); }
    }

    [Fact]
    public async Task A_record_without_a_label_or_with_one_a_closed_set_lacks_is_a_dead_letter_and_an_open_set_grows_the_head()
    {
        var folder = Directory.CreateTempSubdirectory("mamo-finetune-").FullName;
        try
        {
            var manifest = Manifest(folder);
            var init = Pretrained(folder);

            var closed = Settings(Path.Combine(folder, "closed"), "manifest:" + manifest, "finetune.labels=[a, b]", "max-steps=2");
            Assert.Equal(2, await new TrainingRun(closed, init: init).RunAsync(CancellationToken.None));
            var reasons = File.ReadAllLines(Path.Combine(closed.RunDir, Metrics.DeadLetterFile)).Select(l => JsonNode.Parse(l)!["reason"]!.GetValue<string>()).ToList();
            // Two steps of 8 take the records round more than once: each epoch reports each bad record again.
            Assert.Equal(["no label", "unknown label 'zebra'"], reasons.Select(r => r.StartsWith("no label") ? "no label" : r[..21]).Distinct().Order());
            var closedState = Checkpoint.ReadState(Checkpoint.Latest(closed.RunDir)!);
            Assert.Equal("[\"a\",\"b\"]", closedState.Extra[OnlineClassification.LabelsKey]);

            // Open: zebra is a class of its own, added when it first came; the head has a row per class.
            var open = Settings(Path.Combine(folder, "open"), "manifest:" + manifest, "max-steps=3");
            Assert.Equal(3, await new TrainingRun(open, init: init).RunAsync(CancellationToken.None));
            Assert.All(File.ReadAllLines(Path.Combine(open.RunDir, Metrics.DeadLetterFile)), l => Assert.Contains("no label", l));
            Assert.NotEmpty(File.ReadAllLines(Path.Combine(open.RunDir, Metrics.DeadLetterFile)));
            var dir = Checkpoint.Latest(open.RunDir)!;
            var labels = JsonSerializer.Deserialize<string[]>(Checkpoint.ReadState(dir).Extra[OnlineClassification.LabelsKey])!;
            var firstSeen = File.ReadAllLines(Path.Combine(open.RunDir, Metrics.LedgerFile))
                .SelectMany(l => JsonDocument.Parse(l).RootElement.GetProperty("labels").EnumerateArray().Select(x => x.GetString()!)).Distinct();
            Assert.Equal(firstSeen, labels);
            Assert.Contains("zebra", labels);
            var head = SafeTensors.Load(Path.Combine(dir, Checkpoint.PartFile(OnlineClassification.HeadPart)));
            Assert.Equal([labels.Length, MamoConfig.Tiny.Width], head["weight"].shape);
            // The step-0 checkpoint of an open set holds a head with no class yet.
            var zero = SafeTensors.Load(Path.Combine(Checkpoint.Complete(open.RunDir).Last(), Checkpoint.PartFile(OnlineClassification.HeadPart)));
            Assert.Equal(0, zero["weight"].shape[0]);
        }
        finally { Directory.Delete(folder, recursive: true); }
    }

    /// <summary>Eleven labelled records (a, b and one zebra) and one without a label, from the emoji-labels test split.</summary>
    static string Manifest(string folder)
    {
        var source = BuiltinDatasets.Ensure(BuiltinDatasets.EmojiLabels).File(BuiltinDatasets.TestSplit);
        var root = Path.GetDirectoryName(source)!;
        var lines = new List<string>();
        foreach (var (line, i) in File.ReadLines(source).Take(12).Select((l, i) => (l, i)))
        {
            var json = JsonNode.Parse(line)!.AsObject();
            var image = json["image"]!.GetValue<string>();
            Directory.CreateDirectory(Path.GetDirectoryName(Path.Combine(folder, image))!);
            File.Copy(Path.Combine(root, image), Path.Combine(folder, image));
            json.Remove("label");
            if (i < 10) json["label"] = i % 2 == 0 ? "a" : "b";
            else if (i == 10) json["label"] = "zebra";
            lines.Add(json.ToJsonString());
        }
        var manifest = Path.Combine(folder, "labelled.jsonl");
        File.WriteAllLines(manifest, lines);
        return manifest;
    }
}
