using System.CommandLine;
using Mamo.Actors;
using Mamo.Model;
using Mamo.Actors.Run;

namespace Mamo.Cli.Commands;

/// <summary>`mamo finetune`: online fine-tuning of a pre-trained checkpoint on a labelled stream (classify) or on a
/// target domain's pairs (retrieval), test-then-train, on the same pipeline and with the same guarantees as
/// `pretrain` (docs/FINETUNE.md). A run directory that already holds checkpoints resumes; --from starts a new one.</summary>
public static class FinetuneCommand
{
    public static Command Create()
    {
        var from = new Option<string>("--from") { Description = "The pre-training run folder (its newest checkpoint) or checkpoint folder to start from", Required = true };
        var task = new Option<string>("--task") { Description = "classify: a head on the fused [CLS]; retrieval: ITC and ITM on the target domain", Required = true };
        task.AcceptOnlyFromAmong(FineTuneSettings.Classify, FineTuneSettings.Retrieval);
        var source = new Option<string?>("--source") { Description = "dataset:NAME[/SPLIT], manifest:PATH, wds:GLOB or kafka://... (default dataset:emoji-labels)" };
        var runDir = new Option<string?>("--run-dir") { Description = "Checkpoints, metrics and logs of the fine-tuning run (default runs/finetune)" };
        var labelField = new Option<string?>("--label-field") { Description = "The manifest field that holds the label (default label)" };
        var text = new Option<string?>("--text") { Description = "classify: prompt (a fixed text, the default) or caption (the record's own)" };
        text.AcceptOnlyFromAmong("prompt", "caption");
        var maxSteps = new Option<long?>("--max-steps") { Description = "Stop after this many steps in total" };
        var timeBudget = new Option<string?>("--time-budget") { Description = "Stop after this much wall time, e.g. 20m or 1h" };
        var device = new Option<string?>("--device") { Description = "cpu, or cuda where libtorch-cuda is installed" };
        var settingsOptions = new SettingsOptions();
        var ledger = new Option<bool>("--ledger") { Description = "Write each step's sample ids, loss, predictions and labels to ledger.jsonl" };
        var plain = new Option<bool>("--plain") { Description = "Log lines instead of the live progress display" };
        var dashboard = PretrainCommand.Dashboard();
        var cluster = new ClusterOptions();
        var command = new Command("finetune", "Fine-tune a pre-trained checkpoint online: predict each record, then learn from it")
        {
            from, task, source, runDir, labelField, text, maxSteps, timeBudget, device, settingsOptions.Config, settingsOptions.Set, ledger, plain,
            dashboard.Listen, dashboard.Token,
        };
        foreach (var option in cluster.All) command.Options.Add(option);
        command.SetAction(async (parse, _) =>
        {
            var error = parse.InvocationConfiguration.Error;
            var checkpoint = Checkpoint.Latest(parse.GetValue(from)!);
            if (checkpoint is null)
            {
                error.WriteLine($"mamo finetune: no checkpoint at {parse.GetValue(from)}: expected a checkpoint folder holding {Checkpoint.ConfigFile}, " +
                                $"or a run folder with complete {Checkpoint.RunFolder}/step-* folders");
                return ExitCodes.Usage;
            }
            var sets = new List<string>();
            void Add(string key, object? value) { if (value is not null) sets.Add($"{key}={PretrainCommand.Quote(value.ToString()!)}"); }
            var taskName = parse.GetValue(task)!;
            Add("finetune.task", taskName);
            Add("source", parse.GetValue(source));
            Add("run-dir", parse.GetValue(runDir));
            Add("finetune.label-field", parse.GetValue(labelField));
            Add("finetune.text", parse.GetValue(text));
            Add("max-steps", parse.GetValue(maxSteps));
            Add("time-budget", parse.GetValue(timeBudget));
            Add("device", parse.GetValue(device));
            if (parse.GetValue(ledger)) Add("ledger", "on");

            MamoSettings settings;
            (Mamo.Cli.Dashboard.DashboardAddress? Address, string? Token) serve;
            Mamo.Actors.Cluster.ClusterNodeOptions? node;
            try
            {
                serve = dashboard.Resolve(parse);
                node = cluster.Resolve(parse);
                var model = Checkpoint.ReadConfig(checkpoint);
                var preset = MamoConfig.PresetOf(model) ?? throw new SettingsException($"{checkpoint} holds a model of no preset's architecture");
                settings = MamoSettings.Load(parse.GetValue(settingsOptions.Config), [$"preset={preset}", .. sets, .. parse.GetValue(settingsOptions.Set) ?? []],
                    TrainingTask.ConfigLayers(taskName));
                settings = settings with { Model = settings.Model.WithLayoutOf(model) };
            }
            catch (Exception e) when (e is SettingsException or IOException or System.Text.Json.JsonException or InvalidDataException or FormatException)
            {
                error.WriteLine($"mamo finetune: {e.Message}");
                return ExitCodes.Usage;
            }
            return await PretrainCommand.Train("finetune", settings, parse.GetValue(plain), node, init: checkpoint,
                dashboard: PretrainCommand.NodeDashboard(node, dashboard, parse, serve));
        });
        return command;
    }
}
