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
        var run = new RunOptions(MamoSettings.Load(null, null, TrainingTask.ConfigLayers(FineTuneSettings.Classify)));
        var labelField = new Option<string?>("--label-field") { Description = "The manifest field that holds the label (default label)" };
        var text = new Option<string?>("--text") { Description = "classify: prompt (a fixed text, the default) or caption (the record's own)" };
        text.AcceptOnlyFromAmong("prompt", "caption");
        var settingsOptions = new SettingsOptions();
        var ledger = new Option<bool>("--ledger") { Description = "Write each step's sample ids, loss, predictions and labels to ledger.jsonl (default off)" };
        var dashboard = PretrainCommand.Dashboard();
        var cluster = new ClusterOptions();
        var command = new Command("finetune", "Fine-tune a pre-trained checkpoint online: predict each record, then learn from it")
        {
            from, task,
        };
        foreach (var option in (Option[])[.. run.All, labelField, text, settingsOptions.Config, settingsOptions.Set, ledger, dashboard.Listen, dashboard.Token])
            command.Options.Add(option);
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
            void Add(string key, object? value) { if (value is not null) sets.Add($"{key}={PretrainCommand.Hocon(value)}"); }
            var taskName = parse.GetValue(task)!;
            Add("finetune.task", taskName);
            run.AddSets(parse, Add);
            Add("finetune.label-field", parse.GetValue(labelField));
            Add("finetune.text", parse.GetValue(text));
            if (parse.GetValue(ledger)) Add("ledger", "on");

            MamoSettings settings;
            (Mamo.Cli.Web.ListenAddress? Address, string? Token) serve;
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
            return await PretrainCommand.Train("finetune", settings, parse.GetValue(run.Plain), node, init: checkpoint,
                dashboard: PretrainCommand.NodeDashboard(node, dashboard, parse, serve));
        });
        return command;
    }
}
