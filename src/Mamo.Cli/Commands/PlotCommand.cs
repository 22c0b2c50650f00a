using System.CommandLine;
using ScottPlot;
using ScottPlot.TickGenerators;
using Mamo.Actors.Pipeline;

namespace Mamo.Cli.Commands;

/// <summary>`mamo plot RUN_DIR [--out DIR]`: losses.png and eval.png from a run's metrics.jsonl.</summary>
public static class PlotCommand
{
    public const string LossesFile = "losses.png", EvalFile = "eval.png", FinetuneFile = "finetune.png";
    const int Width = 1200, Height = 700;
    const float TotalLineWidth = 3, TermLineWidth = 1.5f, EvalLineWidth = 2, EvalMarkerSize = 5;

    public static Command Create()
    {
        var runDir = new Argument<string>("run-dir") { Description = $"A run folder holding {MetricsLog.FileName}" };
        var outDir = new Option<string?>("--out") { Description = "Where to write the PNGs (default: the run folder)" };
        var command = new Command("plot", $"Chart the losses ({LossesFile}), the retrieval metrics ({EvalFile}) and fine-tuning's scores ({FinetuneFile}) of a run over steps") { runDir, outDir };
        command.SetAction(parse =>
        {
            var output = parse.InvocationConfiguration.Output;
            var error = parse.InvocationConfiguration.Error;
            var run = parse.GetValue(runDir)!;
            var path = Path.Combine(run, MetricsLog.FileName);
            if (!File.Exists(path))
            {
                error.WriteLine($"mamo plot: no {MetricsLog.FileName} in {run}");
                return ExitCodes.Usage;
            }
            var log = MetricsLog.Read(path);
            if (log.Malformed + log.UnknownKind > 0)
                error.WriteLine($"mamo plot: skipped {log.Malformed} malformed lines and {log.UnknownKind} lines of unknown kind in {path}");
            if (log.Train.Count == 0 && log.Eval.Count == 0 && log.Classify.Count == 0)
            {
                error.WriteLine($"mamo plot: {path} has no train or eval lines to plot");
                return ExitCodes.Usage;
            }

            if (ChartFonts.Ensure() is null) error.WriteLine("mamo plot: no TrueType font found (install fonts-dejavu-core); the charts will have no text");
            var dir = parse.GetValue(outDir) ?? run;
            Directory.CreateDirectory(dir);
            if (log.Train.Count > 0) output.WriteLine(Save(Losses(log.Train), Path.Combine(dir, LossesFile)));
            else error.WriteLine($"mamo plot: no train lines, so no {LossesFile}");
            if (log.Eval.Count > 0) output.WriteLine(Save(Eval(log.Eval), Path.Combine(dir, EvalFile)));
            else error.WriteLine($"mamo plot: no eval lines yet, so no {EvalFile}");
            if (log.Classify.Count > 0 || log.Train.Any(t => t.Scores.Count > 0)) output.WriteLine(Save(Finetune(log), Path.Combine(dir, FinetuneFile)));
            return 0;
        });
        return command;
    }

    static string Save(Plot plot, string path)
    {
        plot.SavePng(path, Width, Height);
        return path;
    }

    /// <summary>The total loss and each term against step, on a log scale: the terms differ by orders of magnitude.</summary>
    static Plot Losses(IReadOnlyList<TrainLine> train)
    {
        var plot = new Plot();
        void Line(string name, IEnumerable<(long Step, double Value)> points, float width)
        {
            // Log scale: ScottPlot plots log10 of the values, and the tick labels undo it.
            var kept = points.Where(p => p.Value > 0 && double.IsFinite(p.Value)).ToArray();
            if (kept.Length == 0) return;
            var line = plot.Add.ScatterLine(kept.Select(p => (double)p.Step).ToArray(), kept.Select(p => Math.Log10(p.Value)).ToArray());
            line.LegendText = name;
            line.LineWidth = width;
        }
        Line("loss", train.Select(t => (t.Step, t.Loss)), TotalLineWidth);
        foreach (var term in TrainLine.LossTerms)
            Line(term, train.Where(t => t.Terms.ContainsKey(term)).Select(t => (t.Step, t.Terms[term])), TermLineWidth);

        plot.Axes.Left.TickGenerator = new NumericAutomatic
        {
            MinorTickGenerator = new LogMinorTickGenerator(),
            IntegerTicksOnly = true,
            LabelFormatter = y => $"{Math.Pow(10, y):G3}",
        };
        plot.Title("Pre-training losses");
        plot.XLabel("step");
        plot.YLabel("loss (log scale)");
        plot.ShowLegend(Alignment.UpperRight);
        return plot;
    }

    /// <summary>Fine-tuning: each prequential score (test, then train) and the held-out accuracy of each labelled set, in percent.</summary>
    static Plot Finetune(MetricsLog log)
    {
        var plot = new Plot();
        foreach (var score in log.Train.SelectMany(t => t.Scores.Keys).Distinct())
        {
            var points = log.Train.Where(t => t.Scores.ContainsKey(score)).ToArray();
            var line = plot.Add.ScatterLine(points.Select(t => (double)t.Step).ToArray(), points.Select(t => 100 * t.Scores[score]).ToArray());
            line.LegendText = score;
            line.LineWidth = TermLineWidth;
        }
        foreach (var set in log.Classify.Select(c => c.Set).Distinct())
        {
            var points = log.Classify.Where(c => c.Set == set).OrderBy(c => c.Step).ToArray();
            var line = plot.Add.Scatter(points.Select(c => (double)c.Step).ToArray(), points.Select(c => 100 * c.Accuracy).ToArray());
            line.LegendText = $"{set} accuracy (held out)";
            line.LineWidth = EvalLineWidth;
            line.MarkerSize = EvalMarkerSize;
        }
        plot.Title("Online fine-tuning: prequential and held-out scores");
        plot.XLabel("step");
        plot.YLabel("%");
        plot.ShowLegend(Alignment.LowerRight);
        return plot;
    }

    /// <summary>TR@1, IR@1 and r_mean of each held-out set against step, one colour per set, with its chance level dashed.</summary>
    static Plot Eval(IReadOnlyList<RetrievalEvalLine> eval)
    {
        var plot = new Plot();
        var palette = new ScottPlot.Palettes.Category10();
        var sets = eval.Select(e => e.Set).Distinct().ToList();
        foreach (var (set, index) in sets.Select((s, i) => (s, i)))
        {
            var records = eval.Where(e => e.Set == set).OrderBy(e => e.Step).ToArray();
            var colour = palette.GetColor(index);
            void Line(string metric, RetrievalEvalLine[] points, Func<RetrievalEvalLine, double> value, LinePattern pattern, float markerSize)
            {
                if (points.Length == 0) return;
                var line = plot.Add.Scatter(points.Select(e => (double)e.Step).ToArray(), points.Select(value).ToArray());
                line.LegendText = $"{set} {metric}";
                line.Color = colour;
                line.LineWidth = EvalLineWidth;
                line.LinePattern = pattern;
                line.MarkerSize = markerSize;
            }
            // Markers, so that a set evaluated only once still shows.
            Line("TR@1", records, e => e.Metrics.Tr1, LinePattern.Solid, EvalMarkerSize);
            Line("IR@1", records, e => e.Metrics.Ir1, LinePattern.DenselyDashed, EvalMarkerSize);
            Line("r_mean", records, e => e.Metrics.RMean, LinePattern.Dotted, EvalMarkerSize);
            Line("chance", records.Where(e => e.Chance is not null).ToArray(), e => e.Chance!.Value, LinePattern.Dashed, 0);
        }
        plot.Title("Zero-shot retrieval on held-out sets");
        plot.XLabel("step");
        plot.YLabel("recall (%)");
        plot.ShowLegend(Alignment.UpperLeft);
        return plot;
    }
}
