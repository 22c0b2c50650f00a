using System.Text.Json;
using Mamo.Actors.Pipeline;
using Mamo.Actors.Run;
using Mamo.Actors.Sources;
using Mamo.Data.Datasets;
using Mamo.Model;
using TorchSharp.Modules;
using Xunit;
using static TorchSharp.torch;
using static TorchSharp.torch.nn;

namespace Mamo.Actors.Tests;

public class MixedSourceTests
{
    [Theory]
    [InlineData("manifest:a.jsonl", "manifest:a.jsonl", 1.0)]
    [InlineData("manifest:a.jsonl?weight=0.9", "manifest:a.jsonl", 0.9)]
    [InlineData("kafka://h:9092/t?weight=2&group=g", "kafka://h:9092/t?group=g", 2.0)]
    [InlineData("kafka://h:9092/t?group=g&weight=1e-1", "kafka://h:9092/t?group=g", 0.1)]
    [InlineData("kafka://h:9092/t?a=1&weight=3&b=2", "kafka://h:9092/t?a=1&b=2", 3.0)]
    public void A_weight_is_taken_out_of_the_spec_and_the_rest_of_its_query_stays(string given, string spec, double weight) =>
        Assert.Equal(new WeightedSource(spec, weight), WeightedSource.Parse(given));

    [Theory]
    [InlineData("manifest:a.jsonl?weight=0")]
    [InlineData("manifest:a.jsonl?weight=-1")]
    [InlineData("manifest:a.jsonl?weight=heavy")]
    [InlineData("manifest:a.jsonl?weight=NaN")]
    public void A_weight_that_is_no_positive_number_is_a_settings_error(string given)
    {
        var e = Assert.Throws<SettingsException>(() => MamoSettings.Load(null, [$"source=[\"dataset:emoji\", \"{given}\"]"]));
        Assert.Contains("'mamo.source'", e.Message);
        Assert.Contains("weight must be a positive number", e.Message);
    }

    const int Batch = 4, Steps = 1_000, Half = 500;

    [Fact]
    public async Task Two_sources_weighted_9_to_1_give_their_shares_of_1000_steps_and_a_resume_draws_as_the_run_went_on()
    {
        var folder = Directory.CreateTempSubdirectory("mamo-mix-").FullName;
        try
        {
            var (a, b) = Manifests(folder);
            MamoSettings Settings(string runDir, int maxSteps) => MamoSettings.Load(null, [
                $"run-dir={runDir}", $"batch-size={Batch}", $"max-steps={maxSteps}", "eval.every-steps=0", $"checkpoint.every-steps={Half}",
                "ledger=on", "data.preprocess-parallelism=2", $"source=[\"manifest:{a}?weight=0.9\", \"manifest:{b}?weight=0.1\"]"]);
            Func<MamoConfig, IObjective> objective = _ => new MeanPixel();

            var straight = Path.Combine(folder, "straight");
            Assert.Equal(Steps, await new TrainingRun(Settings(straight, Steps), objective: objective).RunAsync(CancellationToken.None));
            var ledger = Ledger(straight);
            Assert.Equal(Enumerable.Range(0, Steps).Select(i => (long)i), ledger.Select(e => e.Step));

            // 4,000 draws: source a's count is Binomial(4,000, 0.9), 3,600 ± 19 (one standard deviation).
            var ids = ledger.SelectMany(e => e.Ids).ToList();
            var fromA = ids.Count(id => id.StartsWith("a-"));
            var sd = Math.Sqrt(ids.Count * 0.9 * 0.1);
            Assert.Equal(Steps * Batch, ids.Count);
            Assert.InRange(fromA, ids.Count * 0.9 - 3 * sd, ids.Count * 0.9 + 3 * sd);
            // Each source has its own positions in the checkpoint, and the mix its counts of each.
            var position = StreamPosition.FromExtra(Checkpoint.ReadState(Checkpoint.Latest(straight)!).Extra);
            Assert.Equal(["0:cursor", "1:cursor", "mix:0", "mix:1"], position.Offsets.Keys);
            Assert.Equal(fromA - 1, position["0:cursor"]);
            Assert.Equal(fromA - 1, position["mix:0"]);
            Assert.Equal(ids.Count - fromA - 1, position["1:cursor"]);

            // Stopped at its checkpoint of step 500 and resumed, a run trains the same records in the same steps.
            var resumed = Path.Combine(folder, "resumed");
            Assert.Equal(Half, await new TrainingRun(Settings(resumed, Half), objective: objective).RunAsync(CancellationToken.None));
            Assert.Equal(Steps, await new TrainingRun(Settings(resumed, Steps), objective: objective).RunAsync(CancellationToken.None));
            Assert.Equal(ledger.Select(e => (e.Step, string.Join(",", e.Ids))), Ledger(resumed).Select(e => (e.Step, string.Join(",", e.Ids))));
        }
        finally { Directory.Delete(folder, recursive: true); }
    }

    /// <summary>Two manifests of 40 emoji each, with the ids prefixed by their source.</summary>
    static (string A, string B) Manifests(string folder)
    {
        var source = BuiltinDatasets.Ensure(BuiltinDatasets.Emoji).File(BuiltinDatasets.TestSplit);
        var root = Path.GetDirectoryName(source)!;
        var lines = File.ReadLines(source).Take(80).ToList();
        string Write(string name, IEnumerable<string> part)
        {
            var written = part.Select(line =>
            {
                var json = System.Text.Json.Nodes.JsonNode.Parse(line)!.AsObject();
                var image = json["image"]!.GetValue<string>();
                var copy = Path.Combine(folder, image);
                Directory.CreateDirectory(Path.GetDirectoryName(copy)!);
                if (!File.Exists(copy)) File.Copy(Path.Combine(root, image), copy);
                json["id"] = $"{name}-{json["id"]!.GetValue<string>()}";
                return json.ToJsonString();
            });
            var manifest = Path.Combine(folder, name + ".jsonl");
            File.WriteAllLines(manifest, written);
            return manifest;
        }
        return (Write("a", lines.Take(40)), Write("b", lines.Skip(40)));
    }

    sealed record Entry(long Step, string[] Ids);

    static List<Entry> Ledger(string runDir) => File.ReadAllLines(Path.Combine(runDir, Metrics.LedgerFile)).Select(l =>
    {
        var e = JsonDocument.Parse(l).RootElement;
        return new Entry(e.GetProperty("step").GetInt64(), e.GetProperty("ids").EnumerateArray().Select(x => x.GetString()!).ToArray());
    }).ToList();

    /// <summary>An objective that costs next to nothing, so that a test can run a thousand steps of the real pipeline:
    /// one weight learns the batch's mean pixel.</summary>
    sealed class MeanPixel : IObjective
    {
        readonly Linear weight;

        public MeanPixel()
        {
            lock (Seeds.GlobalGenerator) weight = Linear(1, 1, hasBias: false);
            using (no_grad()) weight.weight!.zero_();
            Parts = new Dictionary<string, Module> { ["mean"] = weight };
        }

        public double? TeacherMomentum => null;
        public bool NeedsTargets => false;
        public TeacherTargets Targets(MamoModel teacher, StepInput batch) => throw new InvalidOperationException("no teacher");
        public IReadOnlyDictionary<string, Module> Parts { get; }
        public IEnumerable<(string Name, Parameter Parameter)> TrainedParameters(MamoModel student) =>
            weight.named_parameters().Select(p => ("mean." + p.name, p.parameter));

        public MamoLoss Loss(MamoModel student, StepInput batch, TeacherTargets? targets, int seed)
        {
            using var scope = NewDisposeScope();
            var loss = (batch.Images.mean() - weight.weight!.squeeze()).square();
            return new MamoLoss { Total = loss.clone().MoveToOuterDisposeScope(), Terms = new Dictionary<string, Tensor> { ["mean"] = loss.MoveToOuterDisposeScope() } };
        }

        public void Dispose() => weight.Dispose();
    }
}
