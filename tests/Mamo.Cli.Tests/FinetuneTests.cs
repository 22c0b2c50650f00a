using System.Text.Json;
using Mamo.Data;
using Mamo.Data.Datasets;
using Mamo.Data.Kafka;
using Xunit;
using Xunit.Abstractions;
using Model = Mamo.Model;

namespace Mamo.Cli.Tests;

/// <summary>`mamo finetune` and `mamo predict` as a user runs them: separate processes, SIGKILL, Kafka through kcat.</summary>
public class FinetuneTests(ITestOutputHelper output)
{
    const int Batch = 8, Steps = 10, CheckpointEvery = 4;

    static string[] Finetune(string from, string source, string runDir, params string[] more) => FinetuneFor(Steps, from, source, runDir, more);

    static string[] FinetuneFor(int steps, string from, string source, string runDir, params string[] more) =>
    [
        "finetune", "--from", from, "--task", "classify", "--source", source, "--run-dir", runDir, "--plain", "--ledger", "--max-steps", $"{steps}",
        "--set", $"batch-size={Batch}", "--set", $"checkpoint.every-steps={CheckpointEvery}", "--set", "eval.every-steps=0", "--set", "metrics.every-steps=1",
        "--set", "torch-threads=1", "--set", "data.preprocess-parallelism=1", "--set", "optimizer.warmup-steps=2", .. more,
    ];

    /// <summary>A pre-trained checkpoint to start from: a seeded tiny model with its teacher.</summary>
    static string Pretrained(TempFolder folder)
    {
        var dir = folder.File("pretrained");
        using var trainer = new Model.MamoTrainer(Model.MamoConfig.Tiny, new Model.OptimizerConfig(), TorchSharp.torch.CPU, seed: 5);
        trainer.Save(dir);
        return dir;
    }

    sealed record Entry(long Step, double Loss, string[] Ids, string[] Predictions, string[] Labels);

    static List<Entry> Ledger(string runDir) => File.ReadAllLines(Path.Combine(runDir, "ledger.jsonl")).Where(l => l.EndsWith('}'))
        .Select(l => JsonDocument.Parse(l).RootElement)
        .Select(e => new Entry(e.GetProperty("step").GetInt64(), e.GetProperty("loss").GetDouble(), Strings(e, "ids"), Strings(e, "predictions"), Strings(e, "labels")))
        .ToList();

    static string[] Strings(JsonElement e, string name) => e.GetProperty(name).EnumerateArray().Select(x => x.GetString()!).ToArray();

    [Fact]
    public void A_killed_finetune_resumes_exactly_and_predict_reports_what_its_checkpoint_predicts()
    {
        using var folder = new TempFolder();
        var init = Pretrained(folder);
        var test = BuiltinDatasets.Ensure(BuiltinDatasets.EmojiLabels).File(BuiltinDatasets.TestSplit);
        var source = "manifest:" + test;

        var reference = folder.File("reference");
        var (code, log) = MamoProcess.Run(Finetune(init, source, reference));
        Assert.True(code == 0, log);
        var expected = Ledger(reference);
        Assert.Equal(Enumerable.Range(0, Steps).Select(i => (long)i), expected.Select(e => e.Step));

        var killed = folder.File("killed");
        MamoProcess.KillAfter(Finetune(init, source, killed), killed, stepsDone: CheckpointEvery + 2, checkpointAtLeast: CheckpointEvery);
        var beforeKill = Ledger(killed);
        var lastCheckpoint = MamoProcess.LastCheckpoint(killed);
        output.WriteLine($"killed after {beforeKill.Count} steps; last checkpoint at step {lastCheckpoint}");
        Assert.True(lastCheckpoint >= CheckpointEvery, $"the kill came before the checkpoint of step {CheckpointEvery}");
        (code, log) = MamoProcess.Run(Finetune(init, source, killed));
        Assert.True(code == 0, log);
        var resumed = Ledger(killed).Skip(beforeKill.Count).ToList();
        Assert.Equal(lastCheckpoint, resumed[0].Step);
        // The resumed steps are the uninterrupted run's: the same records, labels, predictions and losses (the head,
        // its label map and the optimiser's moments came back from the checkpoint).
        foreach (var r in resumed)
        {
            var e = expected[(int)r.Step];
            Assert.Equal(e.Ids, r.Ids);
            Assert.Equal(e.Labels, r.Labels);
            Assert.Equal(e.Predictions, r.Predictions);
            Assert.True(e.Loss == r.Loss, $"step {r.Step}: loss {r.Loss} after resume, {e.Loss} uninterrupted");   // bitwise
        }

        // predict: accuracy and macro-F1 of the final checkpoint, and the predictions it wrote, which agree.
        var predictions = folder.File("predictions.jsonl");
        var (exit, stdout, stderr) = Cli.Run("predict", "--checkpoint", reference, "--manifest", test, "--json", "--out", predictions);
        Assert.True(exit == 0, stderr);
        var report = JsonDocument.Parse(stdout).RootElement;
        var lines = File.ReadAllLines(predictions).Select(l => JsonDocument.Parse(l).RootElement).ToList();
        Assert.Equal(ManifestSource.ReadAll(test).Samples.Count, lines.Count);
        Assert.Equal(lines.Count, report.GetProperty("examples").GetInt32());
        var hits = lines.Count(l => l.GetProperty("label").GetString() == l.GetProperty("predicted").GetString());
        Assert.Equal((double)hits / lines.Count, report.GetProperty("accuracy").GetDouble(), 12);
        var perClass = report.GetProperty("per_class");
        Assert.Equal(lines.Select(l => l.GetProperty("label").GetString()!).Distinct().Order(StringComparer.Ordinal), perClass.EnumerateObject().Select(p => p.Name));
        Assert.Equal(perClass.EnumerateObject().Average(p => p.Value.GetProperty("f1").GetDouble()), report.GetProperty("macro_f1").GetDouble(), 12);

        // A pre-training checkpoint has no head to predict with, but it can rank one prompt per label (the zero-shot
        // baseline), by ITM or by ITC; a template without {label} and a missing --from are named.
        (exit, _, stderr) = Cli.Run("predict", "--checkpoint", init, "--manifest", test, "--out", predictions);
        Assert.Equal(2, exit);
        Assert.Contains("holds no classifier head", stderr);
        var labels = lines.Select(l => l.GetProperty("label").GetString()).ToHashSet();
        foreach (var score in new[] { "itm", "itc" })
        {
            (exit, stdout, stderr) = Cli.Run("predict", "--checkpoint", init, "--manifest", test, "--zero-shot", "an emoji of the group {label}",
                "--score", score, "--json", "--out", predictions);
            Assert.True(exit == 0, stderr);
            var zeroShot = File.ReadAllLines(predictions).Select(l => JsonDocument.Parse(l).RootElement).ToList();
            Assert.All(zeroShot, l => Assert.Contains(l.GetProperty("predicted").GetString(), labels));
            Assert.Equal((double)zeroShot.Count(l => l.GetProperty("label").GetString() == l.GetProperty("predicted").GetString()) / zeroShot.Count,
                JsonDocument.Parse(stdout).RootElement.GetProperty("accuracy").GetDouble(), 12);
        }
        (exit, _, stderr) = Cli.Run("predict", "--checkpoint", init, "--manifest", test, "--zero-shot", "an emoji", "--out", predictions);
        Assert.Equal(2, exit);
        Assert.Contains("must contain {label}", stderr);
        (exit, _, stderr) = Cli.Run("finetune", "--from", folder.File("nothing"), "--task", "classify");
        Assert.Equal(2, exit);
        Assert.Contains("no checkpoint at", stderr);
    }

    [Fact]
    public void Kcat_labelled_records_train_the_classifier_and_an_unlabelled_one_goes_to_the_dead_letter_topic()
    {
        using var cluster = new KafkaMockCluster();
        cluster.CreateTopic("labelled", partitions: 1);
        var test = BuiltinDatasets.Ensure(BuiltinDatasets.EmojiLabels).File(BuiltinDatasets.TestSplit);
        var root = Path.GetDirectoryName(test)!;
        var samples = ManifestSource.ReadAll(test).Samples.Take(2 * Batch + 1).ToList();
        var unlabelled = samples[3].Id;
        foreach (var s in samples)
        {
            string[] label = s.Id == unlabelled ? [] : ["-H", $"label={s.Label}"];
            var (kcatCode, kcatLog) = KafkaTests.Kcat(["-P", "-b", cluster.BootstrapServers, "-t", "labelled", "-k", s.Id, "-H", $"caption={s.Captions[0]}",
                .. label, Path.Combine(root, "images", "noto", s.Id + ".png")]);
            Assert.True(kcatCode == 0, kcatLog);
        }
        using var folder = new TempFolder();
        var run = folder.File("run");
        var (code, log) = MamoProcess.Run(FinetuneFor(2, Pretrained(folder), $"kafka://{cluster.BootstrapServers}/labelled", run, "--set", "checkpoint.every-steps=2",
            "--set", $"publish.output=kafka://{cluster.BootstrapServers}/outputs", "--set", $"publish.input=manifest:{test}", "--set", "publish.modality=image"));
        Assert.True(code == 0, log);

        var ledger = Ledger(run);
        var labelOf = samples.ToDictionary(s => s.Id, s => s.Label);
        Assert.Equal(samples.Where(s => s.Id != unlabelled).Select(s => s.Id).Order(), ledger.SelectMany(e => e.Ids).Order());
        Assert.All(ledger, e => Assert.Equal(e.Ids.Select(i => labelOf[i]), e.Labels));
        var dead = Assert.Single(KafkaTests.ReadTopic(cluster, "labelled.dlq"));
        Assert.Equal(unlabelled, dead.Id);
        Assert.StartsWith("no label", dead.Headers[KafkaRecords.ErrorHeader]);
        // The final checkpoint covers every record, the dead letter too, and only then were the offsets committed.
        Assert.Equal(samples.Count, KafkaTests.Committed(cluster, "labelled", 1, "mamo")["labelled/0"]);

        // Each checkpoint's model version (step 0's, then step 2's) published a prediction per publish-set item, with
        // the task and version in headers and a label of the classifier's label map in the value.
        var outputs = KafkaTests.ReadTopic(cluster, "outputs");
        var predictions = outputs.Where(o => o.Headers.ContainsKey(EmbeddingSinks.TaskHeader)).ToList();
        var items = ManifestSource.ReadAll(test).Samples.Count;
        Assert.Equal(items, predictions.Count(p => p.Headers[EmbeddingSinks.ModelVersionHeader] == "step-2"));
        Assert.All(predictions, p => Assert.Equal("classify", p.Headers[EmbeddingSinks.TaskHeader]));
        Assert.Equal(items, outputs.Count(o => o.Headers.GetValueOrDefault(EmbeddingSinks.ModalityHeader) == "image" && o.Headers[EmbeddingSinks.ModelVersionHeader] == "step-2"));
        var (listCode, listing) = KafkaTests.Kcat(["-C", "-b", cluster.BootstrapServers, "-t", "outputs", "-e", "-f", "%k\t%h\t%s\n"]);
        Assert.True(listCode == 0, listing);
        var known = samples.Where(s => s.Id != unlabelled).Select(s => s.Label).ToHashSet();
        var values = listing.Split('\n').Select(l => l.Split('\t')).Where(p => p.Length == 3 && p[2].StartsWith("{\"label\"")).ToList();
        Assert.Equal(predictions.Count, values.Count);
        Assert.All(values, v => Assert.Contains(JsonDocument.Parse(v[2]).RootElement.GetProperty("label").GetString(), known));
        // The final version's predictions are what `mamo predict` says its checkpoint predicts, item by item.
        var predictFile = folder.File("predictions.jsonl");
        var (predictCode, _, predictErr) = Cli.Run("predict", "--checkpoint", run, "--manifest", test, "--out", predictFile);
        Assert.True(predictCode == 0, predictErr);
        var predicted = File.ReadAllLines(predictFile).Select(l => JsonDocument.Parse(l).RootElement)
            .ToDictionary(e => e.GetProperty("id").GetString()!, e => e.GetProperty("predicted").GetString());
        var published = values.Where(v => v[1].Contains($"{EmbeddingSinks.ModelVersionHeader}=step-2"))
            .ToDictionary(v => v[0], v => JsonDocument.Parse(v[2]).RootElement.GetProperty("label").GetString());
        Assert.Equal(predicted.OrderBy(kv => kv.Key), published.OrderBy(kv => kv.Key));
    }
}
