using Mamo.Actors;
using Spectre.Console;
using Mamo.Actors.Pipeline;

namespace Mamo.Cli;

/// <summary>The live console view of a run: step, pairs/s, each loss, learning rate, last eval and ETA.</summary>
public sealed class ProgressDisplay : IProgress<RunProgress>
{
    volatile RunProgress? latest;

    public void Report(RunProgress value) => latest = value;

    public async Task<T> ShowWhile<T>(Func<Task<T>> work)
    {
        var table = new Table().Border(TableBorder.Rounded).AddColumn("mamo pretrain").AddColumn("");
        T result = default!;
        await AnsiConsole.Live(table).StartAsync(async ctx =>
        {
            var task = work();
            while (!task.IsCompleted)
            {
                Render(table, latest);
                ctx.Refresh();
                await Task.WhenAny(task, Task.Delay(500));
            }
            Render(table, latest);
            ctx.Refresh();
            result = await task;
        });
        return result;
    }

    static void Render(Table table, RunProgress? p)
    {
        table.Rows.Clear();
        if (p is null)
        {
            table.AddRow("status", "loading data and model…");
            return;
        }
        table.AddRow("step", p.Step.ToString("N0"));
        table.AddRow("pairs/s", p.PairsPerSecond.ToString("F1"));
        table.AddRow("loss", $"{p.Loss:F4}  " + string.Join("  ", p.Terms.Select(t => $"{t.Key} {t.Value:F3}")));
        if (p.Scores.Count > 0) table.AddRow("prequential", string.Join("  ", p.Scores.Select(t => $"{t.Key} {t.Value:F3}")));
        table.AddRow("learning rate", p.LearningRate.ToString("E2"));
        if (p.LastClassify is { } c)
            table.AddRow($"eval {Markup.Escape(c.Set)} @ {c.Step}", $"accuracy {c.Report.Accuracy:P1}  macro-F1 {c.Report.MacroF1:F3}  ({c.Report.Examples} examples)");
        if (p.LastEval is { } e)
            table.AddRow($"eval {Markup.Escape(e.Set)} @ {e.Step}",
                $"TR@1 {e.Metrics.Tr1:F1}  IR@1 {e.Metrics.Ir1:F1}  r_mean {e.Metrics.RMean:F1}  (chance {100.0 / e.Images:F2})");
        table.AddRow("checkpoint", p.LastCheckpointStep?.ToString("N0") ?? "none yet");
        table.AddRow("dead letters / non-finite", $"{p.DeadLetters} / {p.NonFiniteSteps}");
        table.AddRow("elapsed", p.Elapsed.ToString(@"hh\:mm\:ss") + (p.Remaining is { } r ? $"  (ETA {r:hh\\:mm\\:ss})" : ""));
    }
}
