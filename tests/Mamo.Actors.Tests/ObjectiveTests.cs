using System.Text.Json;
using System.Text.Json.Nodes;
using Mamo.Data.Datasets;
using Mamo.Model;
using Xunit;
using Mamo.Actors.Run;
using Mamo.Actors.Pipeline;

namespace Mamo.Actors.Tests;

/// <summary>An objective other than pre-training runs through the same pipeline, actors untouched.</summary>
public class ObjectiveTests
{
    static readonly string[] Labels = ["face", "other"];
    const int Steps = 6, CheckpointEvery = 3;

    [Fact]
    public async Task A_linear_probe_trains_through_the_pipeline_checkpoints_its_head_as_a_part_and_resumes_exactly()
    {
        var folder = Directory.CreateTempSubdirectory("mamo-probe-").FullName;
        try
        {
            var manifest = LabelledManifest(folder);
            MamoSettings Settings(string runDir, int maxSteps) => MamoSettings.Load(null, [
                $"run-dir={runDir}", "batch-size=8", $"max-steps={maxSteps}", "eval.every-steps=0", $"checkpoint.every-steps={CheckpointEvery}",
                "checkpoint.keep-last=3", "metrics.every-steps=1", "ledger=on", "optimizer.warmup-steps=1", "optimizer.learning-rate=1e-2", $"source=\"manifest:{manifest}\""]);
            Func<MamoConfig, IObjective> probe = c => new LinearProbe(c, Labels);

            var straight = Path.Combine(folder, "straight");
            Assert.Equal(Steps, await new TrainingRun(Settings(straight, Steps), objective: probe).RunAsync(CancellationToken.None));
            // The other run starts from the same step-0 checkpoint: initialisation draws from the process's generator,
            // which the test classes running beside this one draw from too.
            var resumed = Path.Combine(folder, "resumed");
            var start = Path.Combine(resumed, Checkpoint.RunFolder, Checkpoint.StepFolderName(0));
            Directory.CreateDirectory(start);
            foreach (var file in Directory.GetFiles(Checkpoint.Complete(straight).Last())) File.Copy(file, Path.Combine(start, Path.GetFileName(file)));
            Assert.Equal(CheckpointEvery, await new TrainingRun(Settings(resumed, CheckpointEvery), objective: probe).RunAsync(CancellationToken.None));
            Assert.Equal(Steps, await new TrainingRun(Settings(resumed, Steps), objective: probe).RunAsync(CancellationToken.None));

            // The same steps on the same pairs with the same losses, whether stopped and resumed or not.
            var expected = Ledger(straight);
            Assert.Equal(Enumerable.Range(0, Steps).Select(i => (long)i), expected.Select(e => e.Step));
            var again = Ledger(resumed);
            Assert.Equal(expected.Select(e => (e.Step, e.Ids)), again.Select(e => (e.Step, e.Ids)));
            foreach (var (e, r) in expected.Zip(again))
                Assert.True(Math.Abs(e.Loss - r.Loss) <= 1e-6 * Math.Abs(e.Loss), $"step {e.Step}: loss {r.Loss} after the resume, {e.Loss} straight");

            // The checkpoint holds the head as a part of its own, no teacher, and the same head either way.
            var (a, b) = (Checkpoint.Latest(straight)!, Checkpoint.Latest(resumed)!);
            var state = Checkpoint.ReadState(a);
            Assert.Equal((long)Steps, state.Step);
            Assert.Equal([Checkpoint.StudentPart, Checkpoint.OptimizerPart, LinearProbe.HeadPart], state.Parts);
            Assert.False(File.Exists(Path.Combine(a, Checkpoint.TeacherFile)));
            var headA = SafeTensors.Load(Path.Combine(a, Checkpoint.PartFile(LinearProbe.HeadPart)));
            var headB = SafeTensors.Load(Path.Combine(b, Checkpoint.PartFile(LinearProbe.HeadPart)));
            Assert.Equal(["bias", "weight"], headA.Keys.Order());
            foreach (var (name, t) in headA) Assert.True(t.allclose(headB[name], rtol: 0, atol: 0), $"head.{name} differs after the resume");
            // The backbone stayed frozen: the student part is step 0's.
            var student0 = SafeTensors.Load(Path.Combine(Checkpoint.Complete(straight).Last(), Checkpoint.StudentFile));
            Assert.Equal(Checkpoint.StepFolderName(0), Path.GetFileName(Checkpoint.Complete(straight).Last()));
            var studentN = SafeTensors.Load(Path.Combine(a, Checkpoint.StudentFile));
            Assert.All(studentN, kv => Assert.True(kv.Value.allclose(student0[kv.Key], rtol: 0, atol: 0), kv.Key));
            // ...while the head trained.
            var head0 = SafeTensors.Load(Path.Combine(Checkpoint.Complete(straight).Last(), Checkpoint.PartFile(LinearProbe.HeadPart)));
            Assert.False(head0["weight"].allclose(headA["weight"], rtol: 0, atol: 0), "the head did not change in training");
        }
        finally { Directory.Delete(folder, recursive: true); }
    }

    sealed record Entry(long Step, double Loss, string Ids);

    static List<Entry> Ledger(string runDir) => File.ReadAllLines(Path.Combine(runDir, Metrics.LedgerFile)).Select(l =>
    {
        var e = JsonDocument.Parse(l).RootElement;
        return new Entry(e.GetProperty("step").GetInt64(), e.GetProperty("loss").GetDouble(), e.GetProperty("ids").GetRawText());
    }).ToList();

    /// <summary>The emoji test split with a label per line: whether its first caption names a face.</summary>
    static string LabelledManifest(string folder)
    {
        var source = BuiltinDatasets.Ensure(BuiltinDatasets.Emoji).File(BuiltinDatasets.TestSplit);
        var root = Path.GetDirectoryName(source)!;
        var lines = new List<string>();
        foreach (var line in File.ReadLines(source))
        {
            var json = JsonNode.Parse(line)!.AsObject();
            var image = json["image"]!.GetValue<string>();
            Directory.CreateDirectory(Path.GetDirectoryName(Path.Combine(folder, image))!);
            File.Copy(Path.Combine(root, image), Path.Combine(folder, image));
            var captions = json["captions"]?.AsArray().Select(c => c!.GetValue<string>()).ToList() ?? [json["caption"]!.GetValue<string>()];
            json["label"] = captions[0].Contains("face") ? Labels[0] : Labels[1];
            lines.Add(json.ToJsonString());
        }
        var manifest = Path.Combine(folder, "labelled.jsonl");
        File.WriteAllLines(manifest, lines);
        return manifest;
    }
}
