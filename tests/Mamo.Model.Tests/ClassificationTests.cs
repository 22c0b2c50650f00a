using Xunit;
using static TorchSharp.torch;

namespace Mamo.Model.Tests;

public sealed class ClassificationTests : IDisposable
{
    static readonly MamoConfig Tiny = MamoConfig.Tiny;
    readonly string dir = Path.Combine(Path.GetTempPath(), "mamo-cls-" + Guid.NewGuid().ToString("N"));

    static MamoTrainer Trainer(ClassificationConfig? c = null) =>
        new(Tiny, new OptimizerConfig { WarmupSteps = 1 }, CPU, seed: 3, withTeacher: false, OnlineClassification.With(c ?? new ClassificationConfig()));

    static StepResult Step(MamoTrainer trainer, int seed, params string[] labels)
    {
        var (images, ids, mask) = Pairs.Make(Tiny, labels.Length, seed);
        using (images) using (ids) using (mask)
            return trainer.StudentStep(new StepInput(images, ids, mask, Labels: labels), null);
    }

    static OnlineClassification Classifier(MamoTrainer t) => (OnlineClassification)t.Objective;

    [Fact]
    public void A_new_label_grows_the_head_and_keeps_the_old_classes()
    {
        using var trainer = Trainer();
        Step(trainer, 1, "cat", "dog", "cat");
        var head = Classifier(trainer).Head;
        Assert.Equal(2, head.Classes);
        var before = head.named_parameters().ToDictionary(p => p.name, p => p.parameter.detach().clone());

        var result = Step(trainer, 2, "bird", "dog", "cat");

        Assert.Equal(["cat", "dog", "bird"], Classifier(trainer).Labels);
        Assert.Equal(3, head.Classes);
        Assert.False(result.Skipped);
        Assert.Equal(3, result.Predictions!.Count);
        Assert.All(result.Predictions, p => Assert.Contains(p, Classifier(trainer).Labels));
        // The optimiser's moments follow the grown rows: its state has the parameters' shapes.
        var state = trainer.Optimizer.State().ToDictionary(s => s.Name, s => s.Value);
        Assert.Equal([3L, Tiny.Width], state["m." + OnlineClassification.HeadPart + ".weight"].shape);
        // Growth alone changes no old row: grow again without a step and compare.
        var grownWeight = head.named_parameters().Single(p => p.name == "weight").parameter.detach().clone();
        head.Grow(5);
        var weight = head.named_parameters().Single(p => p.name == "weight").parameter;
        Assert.True(Pairs.Same(grownWeight, weight[..3]));
        Assert.Equal(2, before["weight"].shape[0]);
    }

    [Fact]
    public void A_closed_label_set_rejects_an_unknown_label()
    {
        using var trainer = Trainer(new ClassificationConfig(Labels: ["cat", "dog"]));
        Assert.Equal(2, Classifier(trainer).Head.Classes);
        Assert.Equal(1, Classifier(trainer).Admit("dog"));
        Assert.Equal(-1, Classifier(trainer).Admit("bird"));
        Assert.Throws<ArgumentException>(() => Step(trainer, 1, "cat", "bird"));
    }

    [Fact]
    public void A_checkpoint_restores_the_label_map_the_head_the_optimizer_and_the_prequential_sums()
    {
        using var trainer = Trainer();
        Step(trainer, 1, "cat", "dog");
        Step(trainer, 2, "bird", "cat");
        trainer.Save(dir);
        var next = Step(trainer, 3, "dog", "fish");

        using var loaded = MamoTrainer.Load(dir, new OptimizerConfig { WarmupSteps = 1 }, CPU, seed: 3, withTeacher: false,
            objective: OnlineClassification.With(new ClassificationConfig()));
        Assert.Equal(["cat", "dog", "bird"], Classifier(loaded).Labels);
        Assert.Equal(4, Classifier(loaded).Prequential.Seen);
        var resumed = Step(loaded, 3, "dog", "fish");

        Assert.Equal(next.Loss, resumed.Loss);
        Assert.Equal(next.Predictions, resumed.Predictions);
        Assert.Equal(next.Scores, resumed.Scores);
        Assert.Equal(["cat", "dog", "bird", "fish"], Classifier(loaded).Labels);
    }

    [Fact]
    public void Prequential_accuracy_is_cumulative_windowed_and_faded()
    {
        var p = new Prequential(window: 2, fading: 0.5);
        foreach (var hit in new[] { true, false, true, true }) p.Add(hit);
        Assert.Equal(0.75, p.Cumulative);
        Assert.Equal(1.0, p.Windowed);
        // Faded: (1*0.125 + 0*0.25 + 1*0.5 + 1) / (0.125 + 0.25 + 0.5 + 1)
        Assert.Equal(1.625 / 1.875, p.Faded, 12);

        var copy = new Prequential(window: 2, fading: 0.5);
        copy.Load(p.Save());
        p.Add(false);
        copy.Add(false);
        Assert.Equal(p.Scores(), copy.Scores());
        Assert.Equal(0.5, copy.Windowed);
    }

    [Fact]
    public void Heads_built_on_another_thread_leave_a_seeded_models_weights_as_they_are()
    {
        using var alone = MamoModel.Seeded(Tiny, 5);
        using var stop = new CancellationTokenSource();
        long built = 0;
        var heads = new Thread(() =>
        {
            while (!stop.IsCancellationRequested)
            {
                using var head = new ClassifierHead(Tiny.Width, 2, seed: 1);
                Interlocked.Increment(ref built);
            }
        });
        heads.Start();
        SpinWait.SpinUntil(() => Interlocked.Read(ref built) > 0);
        var beside = Enumerable.Range(0, 3).Select(_ => MamoModel.Seeded(Tiny, 5)).ToList();
        var during = Interlocked.Read(ref built);
        stop.Cancel();
        heads.Join();
        Assert.True(during > 1, $"{during} heads built beside the models");
        foreach (var model in beside)
            using (model)
                foreach (var ((name, pa), (_, pb)) in alone.named_parameters().Zip(model.named_parameters())) Assert.True(Pairs.Same(pa, pb), name);
    }

    [Fact]
    public void Growth_draws_each_new_row_from_its_class_seed_not_from_the_process_generator()
    {
        using var a = new ClassifierHead(Tiny.Width, 1, seed: 9);
        lock (Seeds.GlobalGenerator) TorchSharp.torch.manual_seed(1);   // another state of the process's generator
        a.Grow(3);
        using var b = new ClassifierHead(Tiny.Width, 0, seed: 9);
        lock (Seeds.GlobalGenerator) TorchSharp.torch.manual_seed(2);
        b.Grow(2);
        b.Grow(3);
        foreach (var ((name, pa), (_, pb)) in a.named_parameters().Zip(b.named_parameters())) Assert.True(Pairs.Same(pa, pb), name);
    }

    [Fact]
    public void A_linear_probe_trains_its_head_only()
    {
        using var trainer = Trainer(new ClassificationConfig(Probe: true));
        var before = trainer.Student.named_parameters().ToDictionary(p => p.name, p => p.parameter.detach().clone());
        Step(trainer, 1, "cat", "dog");
        Step(trainer, 2, "dog", "cat");
        Assert.All(trainer.Student.named_parameters(), p => Assert.True(Pairs.Same(before[p.name], p.parameter), p.name));
        Assert.Equal(["bias", "weight"], Classifier(trainer).Head.named_parameters().Select(p => p.name).Order());
        Assert.All(trainer.Optimizer.State(), s => Assert.StartsWith("m." + OnlineClassification.HeadPart, s.Name.Replace("v.", "m.")));
    }

    [Fact]
    public void Classification_report_scores_accuracy_macro_f1_and_each_class()
    {
        var r = ClassificationReport.Of(["a", "a", "b", "c"], ["a", "b", "b", "a"]);
        Assert.Equal(0.5, r.Accuracy);
        // a: P 1/2, R 1/2, F1 1/2; b: P 1/2, R 1, F1 2/3; c: P 0 (never predicted), R 0, F1 0.
        Assert.Equal((0.5 + 2.0 / 3 + 0) / 3, r.MacroF1, 12);
        Assert.Equal(1, r.PerClass["b"].Support);
        Assert.Equal(0.5, r.PerClass["b"].Precision);
    }

    public void Dispose()
    {
        if (Directory.Exists(dir)) Directory.Delete(dir, recursive: true);
    }
}
