using TorchSharp;
using static TorchSharp.torch;
using Xunit;

namespace Mamo.Model.Tests;

public class MomentumTests
{
    [Fact]
    public void Ema_update_matches_known_values()
    {
        using var scope = NewDisposeScope();
        var teacher = new[] { tensor(new[] { 1f, 2f, 3f }), tensor(new[] { 10f }) };
        var student = new[] { tensor(new[] { 3f, 2f, 1f }), tensor(new[] { 0f }) };
        Momentum.Update(teacher, student, decay: 0.9);
        Assert.Equal(new[] { 1.2f, 2.0f, 2.8f }, teacher[0].data<float>().ToArray(), new FloatTolerance(1e-6f));
        Assert.Equal(new[] { 9.0f }, teacher[1].data<float>().ToArray(), new FloatTolerance(1e-6f));
        Momentum.Update(teacher, student, decay: 0.5);
        Assert.Equal(new[] { 2.1f, 2.0f, 1.9f }, teacher[0].data<float>().ToArray(), new FloatTolerance(1e-6f));
        Assert.Equal(new[] { 3f, 2f, 1f }, student[0].data<float>().ToArray());   // the student is untouched
    }

    [Fact]
    public void Teacher_follows_the_student_at_the_configured_decay()
    {
        using var scope = NewDisposeScope();
        var config = MamoConfig.Tiny;
        using var trainer = new MamoTrainer(config, new OptimizerConfig { WarmupSteps = 1, LearningRate = 1e-3 }, CPU, seed: 20,
            objective: MamoPretraining.With(new PretrainingConfig { MomentumDecay = 0.9 }));
        var (images, ids, attn) = Pairs.Make(config, 4, seed: 20);
        var before = trainer.Teacher.parameters().Select(p => p.clone()).ToArray();
        trainer.TrainStep(images, ids, attn);
        foreach (var ((t, s), t0) in trainer.Teacher.parameters().Zip(trainer.Student.parameters()).Zip(before))
        {
            var expected = t0 * 0.9 + s * 0.1;
            Assert.True(t.allclose(expected, rtol: 1e-5, atol: 1e-6));
        }
    }

    sealed class FloatTolerance(float eps) : IEqualityComparer<float>
    {
        public bool Equals(float x, float y) => Math.Abs(x - y) <= eps;
        public int GetHashCode(float obj) => 0;
    }
}
