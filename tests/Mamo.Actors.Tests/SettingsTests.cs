using Xunit;
using Mamo.Actors.Run;

namespace Mamo.Actors.Tests;

public class SettingsTests
{
    [Fact]
    public void Defaults_load_and_sets_override_them()
    {
        var d = MamoSettings.Load();
        Assert.Equal("tiny", d.Preset);
        Assert.Equal("dataset:emoji", d.Source);
        Assert.Equal(0.75, d.Pretraining.ImageMaskRatio);
        Assert.Equal(TimeSpan.FromMinutes(10), d.CheckpointEvery);
        Assert.Equal((64, 0, 7), (d.TrainImages.ImageSize, d.TrainImages.AugmentOps, d.TrainImages.AugmentMagnitude));
        var s = MamoSettings.Load(null, ["batch-size=8", "mamo.loss-weights.mim=0", "time-budget=20m", "eval.sets=[\"manifest:/x.jsonl\"]",
            "data.random-augment.ops=2"]);
        Assert.Equal(2, s.TrainImages.AugmentOps);
        Assert.Equal(8, s.BatchSize);
        Assert.Equal(0, s.Pretraining.Weights.Mim);
        Assert.Equal(TimeSpan.FromMinutes(20), s.TimeBudget);
        Assert.Equal(["manifest:/x.jsonl"], s.EvalSets);
    }

    [Fact]
    public void A_config_file_is_layered_under_the_sets()
    {
        var file = Path.GetTempFileName();
        try
        {
            File.WriteAllText(file, "mamo { batch-size = 12, optimizer.learning-rate = 1e-3 }");
            var s = MamoSettings.Load(file, ["batch-size=6"]);
            Assert.Equal(6, s.BatchSize);
            Assert.Equal(1e-3, s.Optimizer.LearningRate);
        }
        finally { File.Delete(file); }
    }

    [Theory]
    [InlineData("batch-sise=8", "mamo.batch-sise")]
    [InlineData("optimizer.lr=1", "mamo.optimizer.lr")]
    [InlineData("batch-size=eight", "mamo.batch-size")]
    [InlineData("batch-size=1", "mamo.batch-size")]
    [InlineData("model.image-mask-ratio=1.5", "mamo.model.image-mask-ratio")]
    [InlineData("preset=huge", "mamo.preset")]
    [InlineData("time-budget=soon", "mamo.time-budget")]
    [InlineData("optimizer=3", "mamo.optimizer")]
    [InlineData("model.mrm-top-k=5", "mrm top-k")]
    [InlineData("data.random-augment.magnitude=11", "mamo.data.random-augment.magnitude")]
    [InlineData("data.random-augment.ops=-1", "mamo.data.random-augment.ops")]
    public void A_bad_key_or_value_is_an_error_naming_it(string set, string named)
    {
        var e = Assert.Throws<SettingsException>(() => MamoSettings.Load(null, [set]));
        Assert.Contains(named, e.Message);
    }

    [Theory]
    // An unclosed brace, which Akka's parser accepts and trains on: the innermost block that never closes.
    [InlineData("mamo {\n  batch-size = 4\n  optimizer {\n    learning-rate = 1e-3\n", ":3: the '{' opened here is never closed (nor 1 more around it)")]
    [InlineData("mamo {\n  batch-size = 4\n}\n}\n", ":4: '}' closes no block")]
    [InlineData("mamo {\n  eval.sets = [\"a\"\n}\n", ":3: '}' closes the '[' of line 2")]
    // Braces in strings and comments are not blocks.
    [InlineData("mamo {\n  # a { in a comment\n  source = \"manifest:{x}.jsonl\" // and }\n  batch-size = lots\n}\n", ":4: 'mamo.batch-size' has a bad value 'lots'")]
    // A value or key Akka's settings reject, at its line.
    [InlineData("mamo {\n  optimizer {\n    learnig-rate = 1e-3\n  }\n}\n", ":3: unknown configuration key 'mamo.optimizer.learnig-rate'")]
    [InlineData("mamo.batch-size = 4\nmamo.time-budget = soon\n", ":2: 'mamo.time-budget' has a bad value 'soon'")]
    // What Akka's parser would never return from (found by the fuzz test below).
    [InlineData("mamo {\n  eval.sets = [\"a\":]\n}\n", ":2: ':' in the '[' of line 2: quote a value that holds it")]
    [InlineData("mamo {\n  eval.sets = [\n    $\"a\"]\n}\n", ":3: '$' in the '[' of line 2")]
    // What Akka's parser rejects, at the first line it rejects; YAML gets a hint.
    [InlineData("mamo:\n  batch-size: 4\n", ":2: Could not parse an unquoted text value")]
    [InlineData("mamo:\n  batch-size: 4\n", "mamo reads HOCON, not YAML")]
    public void A_config_file_error_names_its_line(string text, string expected)
    {
        var file = Path.Combine(Directory.CreateTempSubdirectory("mamo-conf-").FullName, "run.conf");
        try
        {
            File.WriteAllText(file, text);
            var e = Assert.Throws<SettingsException>(() => MamoSettings.Load(file));
            Assert.True(e.Message.Contains(expected.StartsWith(':') ? file + expected : expected), e.Message);
        }
        finally { Directory.Delete(Path.GetDirectoryName(file)!, recursive: true); }
    }

    [Fact]
    public void Config_files_cut_and_spliced_at_random_load_or_fail_with_a_settings_error()
    {
        const string valid = "mamo {\n  batch-size = 8\n  optimizer { learning-rate = 1e-3 }\n  eval.sets = [\"manifest:/x.jsonl\"]  # held out\n  source = \"dataset:emoji\"\n}\n";
        const string pieces = "{}[]\"#/=:,\n$ ab.";
        var random = new Random(29);
        var dir = Directory.CreateTempSubdirectory("mamo-conf-fuzz-").FullName;
        var file = Path.Combine(dir, "fuzz.conf");
        int loaded = 0, refused = 0;
        try
        {
            for (var n = 0; n < 1000; n++)
            {
                var text = new System.Text.StringBuilder(valid);
                for (var edits = random.Next(1, 4); edits > 0; edits--)
                {
                    var at = random.Next(text.Length);
                    if (random.Next(2) == 0) text.Remove(at, 1);
                    else text.Insert(at, pieces[random.Next(pieces.Length)]);
                }
                File.WriteAllText(file, text.ToString());
                try { MamoSettings.Load(file); loaded++; }
                catch (SettingsException e) { refused++; Assert.StartsWith(file, e.Message); }
            }
        }
        finally { Directory.Delete(dir, recursive: true); }
        // Both outcomes happen: a scan that refused every file, or none, would not be tested by this.
        Assert.True(loaded > 20 && refused > 20, $"{loaded} loaded, {refused} refused");
    }

    [Fact]
    public void A_bad_value_from_a_set_names_the_set_even_where_the_file_has_the_key()
    {
        var file = Path.GetTempFileName();
        try
        {
            File.WriteAllText(file, "mamo {\n  batch-size = 8\n}\n");
            var e = Assert.Throws<SettingsException>(() => MamoSettings.Load(file, ["batch-size=1"]));
            Assert.StartsWith("--set batch-size=1: 'mamo.batch-size' = 1", e.Message);
        }
        finally { File.Delete(file); }
    }

    [Fact]
    public void Only_a_built_in_dataset_run_evaluates_and_publishes_on_the_built_in_sets_by_default()
    {
        var demo = MamoSettings.Load(null, ["source=\"dataset:emoji\""]);
        Assert.Equal(["dataset:emoji/test", "dataset:emoji-openmoji/test"], demo.EvalSets);
        var stream = MamoSettings.Load(null, ["source=\"manifest:/data/train.jsonl\""]);
        Assert.Empty(stream.EvalSets);
        Assert.Equal(["manifest:/data/test.jsonl"], MamoSettings.Load(null, ["source=\"manifest:/data/train.jsonl\"", "eval.sets=[\"manifest:/data/test.jsonl\"]"]).EvalSets);
        var layered = MamoSettings.Load(null, ["source=\"kafka://127.0.0.1:9092/labelled\""], layers: TrainingTask.ConfigLayers("classify"));
        Assert.Empty(layered.EvalSets);
        var publish = Assert.Throws<SettingsException>(() => MamoSettings.Load(null, ["source=\"kafka://127.0.0.1:9092/pairs\"", "publish.output=\"jsonl:/tmp/out.jsonl\""]));
        Assert.Contains("'mamo.publish.input' is not: name the items to embed", publish.Message);
    }

    [Fact]
    public void The_recorded_configuration_keeps_no_secret()
    {
        var values = RunConfig.Values(MamoSettings.Load(null, ["kafka.consumer.\"sasl.password\"=hunter2", "cluster.tls.password=s3cret",
            "kafka.consumer.\"sasl.username\"=mamo"]));
        Assert.Equal("\"(redacted)\"", values["mamo.kafka.consumer.\"sasl.password\""]);
        Assert.Equal("\"(redacted)\"", values["mamo.cluster.tls.password"]);
        Assert.Equal("\"mamo\"", values["mamo.kafka.consumer.\"sasl.username\""]);
        Assert.DoesNotContain(values.Values, v => v.Contains("hunter2") || v.Contains("s3cret"));
    }

    [Fact]
    public void A_resume_goes_on_with_the_recorded_settings_and_changes_only_what_is_given_again()
    {
        var run = Directory.CreateTempSubdirectory("mamo-record-").FullName;
        try
        {
            string[] first = [$"run-dir={run}", "batch-size=12", "optimizer.learning-rate=1e-3", "kafka.consumer.\"sasl.password\"=hunter2",
                "kafka.consumer.\"sasl.username\"=mamo"];
            RunConfig.Resume(MamoSettings.Load(null, first), ["pretrain"]);
            File.AppendAllText(Path.Combine(run, RunConfig.File), "mamo.no-longer-a-setting = \"1\"\n");

            // No checkpoint yet: a new run, so the record binds nothing.
            Assert.Equal(32, MamoSettings.Load(null, [$"run-dir={run}"]).BatchSize);

            var step = Path.Combine(run, Mamo.Model.Checkpoint.RunFolder, Mamo.Model.Checkpoint.StepFolderName(1));
            Directory.CreateDirectory(step);
            File.WriteAllText(Path.Combine(step, Mamo.Model.Checkpoint.StateFile), "{}");
            var resumed = MamoSettings.Load(null, [$"run-dir={run}", "batch-size=16"]);
            Assert.Equal(16, resumed.BatchSize);                          // given again: changed
            Assert.Equal(1e-3, resumed.Optimizer.LearningRate);            // not given: as recorded
            Assert.Equal("mamo", resumed.KafkaConsumer["sasl.username"]);
            Assert.False(resumed.KafkaConsumer.ContainsKey("sasl.password"));   // recorded redacted: not taken back
            var line = File.ReadLines(Path.Combine(run, RunConfig.File)).ToList().FindIndex(l => l.StartsWith("mamo.optimizer.learning-rate = ")) + 1;
            Assert.Equal($"run folder, {Path.Combine(run, RunConfig.File)}:{line}", resumed.Origin("mamo.optimizer.learning-rate"));
            Assert.Equal("--set batch-size=16", resumed.Origin("mamo.batch-size"));
            // The secret is the user's to give again (from the file it came from): without it, it is a change.
            Assert.Equal([new RunConfig.Change("mamo.batch-size", "\"12\"", "\"16\""),
                          new RunConfig.Change("mamo.kafka.consumer.\"sasl.password\"", "\"(redacted)\"", null),
                          new RunConfig.Change("mamo.no-longer-a-setting", "\"1\"", null)], RunConfig.Changes(resumed));
        }
        finally { Directory.Delete(run, recursive: true); }
    }

    [Fact]
    public void The_text_layout_is_the_presets_unless_set()
    {
        Assert.Equal(Mamo.Model.TextLayouts.PreLn, MamoSettings.Load(null, ["preset=tiny"]).Model.TextLayout);
        Assert.Equal(Mamo.Model.TextLayouts.Bert, MamoSettings.Load(null, ["preset=minilm"]).Model.TextLayout);
        Assert.Equal(384, MamoSettings.Load(null, ["preset=minilm"]).Model.Width);
        Assert.Equal(Mamo.Model.TextLayouts.Bert, MamoSettings.Load(null, ["preset=tiny", "model.text-layout=bert"]).Model.TextLayout);
        var e = Assert.Throws<SettingsException>(() => MamoSettings.Load(null, ["model.text-layout=post-ln"]));
        Assert.Contains("must be pre-ln, bert or preset", e.Message);
    }

    [Fact]
    public void A_missing_config_file_is_a_clear_error()
    {
        var e = Assert.Throws<SettingsException>(() => MamoSettings.Load("/nonexistent/mamo.conf"));
        Assert.Contains("/nonexistent/mamo.conf", e.Message);
    }

    [Fact]
    public void Fine_tuning_layers_its_defaults_between_mamo_conf_and_the_user_and_checks_its_keys()
    {
        var s = MamoSettings.Load(null, ["finetune.task=classify", "optimizer.warmup-steps=7"], ["finetune.conf"]);
        Assert.Equal(("dataset:emoji-labels", "runs/finetune", 1e-4, 7), (s.Source, s.RunDir, s.Optimizer.LearningRate, s.Optimizer.WarmupSteps));
        Assert.Equal(["dataset:emoji-labels/test"], s.EvalSets);
        Assert.Equal(("an emoji", null, 1000, 0.995), (s.FineTune.Prompt, s.FineTune.Labels, s.FineTune.Window, s.FineTune.Fading));
        var retrieval = MamoSettings.Load(null, ["finetune.task=retrieval"], ["finetune-retrieval.conf", "finetune.conf"]);
        Assert.Equal(("dataset:emoji-labels/twitter-train", 1e-4), (retrieval.Source, retrieval.Optimizer.LearningRate));
        Assert.Null(MamoSettings.Load(null, ["finetune.text=caption"]).FineTune.Prompt);
        Assert.Equal(["a", "b"], MamoSettings.Load(null, ["finetune.labels=[a, b]"]).FineTune.Labels);
        Assert.Contains("must not repeat", Assert.Throws<SettingsException>(() => MamoSettings.Load(null, ["finetune.labels=[a, a]"])).Message);
        Assert.Contains("classify or retrieval", Assert.Throws<SettingsException>(() => MamoSettings.Load(null, ["finetune.task=detect"])).Message);
        Assert.Contains("finetune.fading", Assert.Throws<SettingsException>(() => MamoSettings.Load(null, ["finetune.fading=1.5"])).Message);
    }
}
