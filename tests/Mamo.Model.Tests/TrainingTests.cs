using TorchSharp;
using System.Diagnostics;
using static TorchSharp.torch;
using Xunit;
using Xunit.Abstractions;

using static Mamo.Model.Tests.Pairs;
namespace Mamo.Model.Tests;

public class TrainingTests(ITestOutputHelper output)
{
    [Fact]
    public void Overfits_eight_pairs_and_retrieves_each_one()
    {
        using var scope = NewDisposeScope();
        var config = MamoConfig.Tiny;
        var optim = new OptimizerConfig { LearningRate = 1e-3, MinLearningRate = 1e-4, WarmupSteps = 20, DecaySteps = 180 };
        using var trainer = new MamoTrainer(config, optim, CPU, seed: 40);
        var (images, ids, attn) = Pairs.Make(config, 8, seed: 40);
        var first = trainer.TrainStep(images, ids, attn);
        StepResult last = first;
        for (int i = 1; i < 200; i++) last = trainer.TrainStep(images, ids, attn);
        output.WriteLine($"loss {first.Loss:F3} -> {last.Loss:F3}; terms {string.Join(", ", last.Terms.Select(t => $"{t.Key}={t.Value:F3}"))}");
        Assert.True(last.Loss < first.Loss / 10, $"loss {first.Loss} -> {last.Loss}");

        using var noGrad = no_grad();
        trainer.Student.eval();
        var imageEmb = trainer.Student.ImageEmbedding(trainer.Student.EncodeImage(images));
        var textEmb = trainer.Student.TextEmbedding(trainer.Student.EncodeText(ids, attn));
        var sim = imageEmb.matmul(textEmb.t());
        var best = sim.argmax(1).data<long>().ToArray();
        var bestImage = sim.argmax(0).data<long>().ToArray();
        Assert.Equal(Enumerable.Range(0, 8).Select(i => (long)i), best);        // image-to-text R@1 = 100%
        Assert.Equal(Enumerable.Range(0, 8).Select(i => (long)i), bestImage);   // text-to-image R@1 = 100%
    }

    [Fact]
    public void A_non_finite_loss_skips_the_step_and_leaves_the_weights()
    {
        using var scope = NewDisposeScope();
        using var trainer = new MamoTrainer(MamoConfig.Tiny, new OptimizerConfig(), CPU, seed: 60);
        var (images, ids, attn) = Pairs.Make(MamoConfig.Tiny, 4, seed: 60);
        images[0, 0, 0, 0] = tensor(float.NaN);
        var before = trainer.Student.parameters().Select(p => p.clone()).ToArray();
        var result = trainer.TrainStep(images, ids, attn);
        Assert.True(result.Skipped);
        Assert.Equal(1, trainer.Step);
        foreach (var (a, b) in trainer.Student.parameters().Zip(before)) Assert.True(Same(a, b));
    }

    [Fact]
    public void Learning_rate_warms_up_then_decays_to_the_floor()
    {
        var o = new OptimizerConfig { LearningRate = 1e-3, MinLearningRate = 1e-4, WarmupSteps = 10, DecaySteps = 100 };
        Assert.Equal(1e-4, o.LearningRateAt(0), 9);
        Assert.Equal(1e-3, o.LearningRateAt(9), 9);
        Assert.Equal(5.5e-4, o.LearningRateAt(60), 9);
        Assert.Equal(1e-4, o.LearningRateAt(110), 9);
        Assert.Equal(1e-4, o.LearningRateAt(100_000), 9);
    }

    [Fact]
    public void A_replica_of_a_round_of_two_takes_the_learning_rate_one_node_takes_at_the_same_samples()
    {
        var o = new OptimizerConfig { LearningRate = 1e-3, MinLearningRate = 1e-4, WarmupSteps = 10, DecaySteps = 100 };
        using var trainer = new MamoTrainer(MamoConfig.Tiny, o, CPU, seed: 1);
        trainer.StartAt(0, stride: 2, schedule: 0);
        // Replica step s stands for one node's steps 2s and 2s + 1: it takes the rate of the last of them.
        Assert.Equal(o.LearningRateAt(1), trainer.LearningRateAt(0), 12);
        Assert.Equal(1e-3, trainer.LearningRateAt(4), 12);   // warm-up over after 5 steps of a replica, 10 of one node
        Assert.Equal(o.LearningRateAt(61), trainer.LearningRateAt(30), 12);
        // The other replica is lost: a round of one from step 30, after the two trained one node's 60 steps of samples,
        // goes on from one node's step 60 (counted in steps, 30 x 1, it went back to one node's rate at step 30).
        trainer.StartAt(30, stride: 1, schedule: 60);
        Assert.Equal(o.LearningRateAt(60), trainer.LearningRateAt(30), 12);
        Assert.Equal(o.LearningRateAt(70), trainer.LearningRateAt(40), 12);
        Assert.NotEqual(o.LearningRateAt(30), trainer.LearningRateAt(30), 12);
        // wsd's cool-down ends where the cluster's last step does: max-steps of each replica, twice one node's samples.
        var wsd = o with { Schedule = OptimizerConfig.WarmupStableDecay, TotalSteps = 100, CooldownSteps = 20 };
        using var replica = new MamoTrainer(MamoConfig.Tiny, wsd, CPU, seed: 1);
        replica.StartAt(50, stride: 2, schedule: 100);
        Assert.Equal(1e-3, replica.LearningRateAt(89), 12);   // one node's step 179: before the cool-down
        Assert.Equal(1e-4, replica.LearningRateAt(99), 12);   // the last step at the floor
    }

    [Fact]
    public void An_update_of_a_global_batch_of_two_moves_the_teacher_as_two_steps_of_one_node()
    {
        using var trainer = new MamoTrainer(MamoConfig.Tiny, new OptimizerConfig(), CPU, seed: 1);
        var d = trainer.Objective.TeacherMomentum!.Value;
        using (no_grad()) foreach (var p in trainer.Student.parameters()) p.add_(1.0);   // the student moved by 1 everywhere
        var before = trainer.Teacher.named_parameters().Select(p => (p.name, Value: p.parameter.clone())).ToList();
        trainer.StartAt(0, stride: 2, schedule: 0);   // every-step's update of two replicas' global batch (StepCoordinator)
        trainer.FollowStudent();
        var student = trainer.Student.named_parameters().ToDictionary(p => p.name, p => p.parameter);
        foreach (var (name, teacher) in trainer.Teacher.named_parameters())
        {
            using var expected = before.Single(b => b.name == name).Value * (d * d) + student[name] * (1 - d * d);
            Assert.True(teacher.allclose(expected, rtol: 0, atol: 1e-6), $"{name}: not d^2");
        }
        foreach (var (_, t) in before) t.Dispose();
    }

    [Fact]
    public void Constant_stays_at_the_rate_wsd_cools_down_over_the_last_steps_and_a_rewarm_starts_the_schedule_again()
    {
        var constant = new OptimizerConfig { LearningRate = 1e-3, MinLearningRate = 1e-4, WarmupSteps = 10, Schedule = OptimizerConfig.Constant };
        Assert.Equal(1e-4, constant.LearningRateAt(0), 9);
        Assert.Equal(1e-3, constant.LearningRateAt(10), 9);
        Assert.Equal(1e-3, constant.LearningRateAt(1_000_000), 9);

        var wsd = constant with { Schedule = OptimizerConfig.WarmupStableDecay, TotalSteps = 1_000, CooldownSteps = 100 };
        Assert.Equal(1e-3, wsd.LearningRateAt(899), 9);
        Assert.Equal(1e-3 - 9e-4 / 100, wsd.LearningRateAt(900), 9);
        Assert.Equal(5.5e-4, wsd.LearningRateAt(949), 9);
        Assert.Equal(1e-4, wsd.LearningRateAt(999), 9);   // the last step trains at the floor
        Assert.Equal(1e-3, (wsd with { TotalSteps = 0 }).LearningRateAt(999), 9);   // no end, no cool-down

        var rewarmed = new OptimizerConfig { LearningRate = 1e-3, MinLearningRate = 1e-4, WarmupSteps = 10, DecaySteps = 100, RewarmAt = [500] };
        Assert.Equal(1e-4, rewarmed.LearningRateAt(499), 9);   // the first decay ended at the floor
        Assert.Equal(1e-4, rewarmed.LearningRateAt(500), 9);   // warm-up again
        Assert.Equal(1e-3, rewarmed.LearningRateAt(509), 9);
        Assert.Equal(5.5e-4, rewarmed.LearningRateAt(560), 9);   // and the cosine again, from there
    }
}

/// <summary>RSS is the whole process's: the memory test runs alone, after the parallel ones (beside them it measured
/// their tensors too: 1446 MB at warm-up in CI against 633 MB alone).</summary>
[CollectionDefinition(Name, DisableParallelization = true)]
public sealed class MemoryCollection
{
    public const string Name = "process memory";
}

[Collection(MemoryCollection.Name)]
public class MemoryTests(ITestOutputHelper output)
{
    [Fact]
    public void Training_does_not_grow_process_memory()
    {
        using var trainer = new MamoTrainer(MamoConfig.Tiny, new OptimizerConfig(), CPU, seed: 50);
        var (images, ids, attn) = Pairs.Make(MamoConfig.Tiny, 2, seed: 50);
        long Rss()
        {
            GC.Collect(); GC.WaitForPendingFinalizers(); GC.Collect();
            using var p = Process.GetCurrentProcess();
            p.Refresh();
            return p.WorkingSet64;
        }
        for (int i = 0; i < 50; i++) trainer.TrainStep(images, ids, attn);
        var warm = Rss();
        for (int i = 0; i < 300; i++) trainer.TrainStep(images, ids, attn);
        var after = Rss();
        output.WriteLine($"RSS after warm-up {warm / 1e6:F1} MB, after 300 more steps {after / 1e6:F1} MB");
        Assert.True(after <= warm * 1.05, $"RSS grew from {warm} to {after}");
    }
}
