using TorchSharp;
using Xunit;
using static TorchSharp.torch;

namespace Mamo.Model.Tests;

public class RetrievalFineTuningTests
{
    static readonly MamoConfig Tiny = MamoConfig.Tiny;

    [Fact]
    public void Distillation_moves_the_itc_targets_towards_the_teacher_and_alpha_zero_is_the_plain_loss()
    {
        using var model = MamoModel.Seeded(Tiny, 2);
        using var teacher = MamoModel.Seeded(Tiny, 3);
        var (images, ids, mask) = Pairs.Make(Tiny, 6, seed: 4);
        StepInput batch = new(images, ids, mask);
        double Itc(double alpha)
        {
            using var objective = new RetrievalFineTuning(Tiny, new PretrainingConfig(), alpha);
            using var targets = new RetrievalFineTuning(Tiny, new PretrainingConfig(), 0.4).Targets(teacher, batch);
            using var loss = objective.Loss(model, batch, alpha > 0 ? targets : null, seed: 7);
            return loss.Terms["itc"].ToDouble();
        }
        // Alpha 0 is ITC against the true pairs: the same number as the model's own forward without masking.
        using var plain = model.Forward(images, ids, mask, JointMasking.Sample(Tiny, new PretrainingConfig { ImageMaskRatio = 0, TextMaskRatio = 0 }, ids, mask, 7),
            new PretrainingConfig { ImageMaskRatio = 0, TextMaskRatio = 0, AlignOnVisiblePatches = false, Weights = new LossWeights(Mlm: 0, Mim: 0, Mrm: 0) }, null);
        Assert.Equal(plain.Terms["itc"].ToDouble(), Itc(0), 6);
        Assert.NotEqual(Math.Round(Itc(0), 6), Math.Round(Itc(0.4), 6));
    }

    [Fact]
    public void In_batch_hits_count_a_duplicate_of_the_own_image_as_a_hit()
    {
        using var model = MamoModel.Seeded(Tiny, 2);
        var (images, ids, mask) = Pairs.Make(Tiny, 4, seed: 5);
        // Every text of a batch whose four images are one image: whichever image it ranks first is its own.
        var same = images[..1].repeat(4, 1, 1, 1);
        using var objective = new RetrievalFineTuning(Tiny, new PretrainingConfig(), 0);
        using var loss = objective.Loss(model, new StepInput(same, ids, mask, ImageKeys: zeros(4, ScalarType.Int64)), null, seed: 1);
        Assert.True(loss.TextToImageHits!.all().item<bool>());
        Assert.Equal(1.0, loss.Scores!["preq_ir1"]);
        Assert.Equal(["itc", "itm"], loss.Terms.Keys.Order());   // no masked modelling: the pairs are whole
    }
}
