using Mamo.Model;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;
using static TorchSharp.torch.nn;
using F = TorchSharp.torch.nn.functional;

namespace Mamo.Actors.Tests;

/// <summary>A second objective, written outside the product: a linear probe on the fused [CLS] of each pair over a
/// fixed label set. The backbone stays frozen and there is no teacher; the head is a checkpoint part of its own.</summary>
sealed class LinearProbe : IObjective
{
    public const string HeadPart = "head";

    readonly Linear head;
    readonly Dictionary<string, long> classes;

    public LinearProbe(MamoConfig config, IReadOnlyList<string> labels)
    {
        // Zero-initialised, as a fine-tuning head is; Linear's default init draws from torch's global generator.
        lock (Seeds.GlobalGenerator) head = Linear(config.Width, labels.Count);
        using (no_grad()) { head.weight!.zero_(); head.bias!.zero_(); }
        classes = labels.Select((l, i) => (l, (long)i)).ToDictionary();
        Parts = new Dictionary<string, Module> { [HeadPart] = head };
    }

    public double? TeacherMomentum => null;
    public bool NeedsTargets => false;
    public TeacherTargets Targets(MamoModel teacher, StepInput batch) => throw new InvalidOperationException("the probe keeps no teacher");
    public IReadOnlyDictionary<string, Module> Parts { get; }

    public IEnumerable<(string Name, Parameter Parameter)> TrainedParameters(MamoModel student) =>
        head.named_parameters().Select(p => (HeadPart + "." + p.name, p.parameter));

    public MamoLoss Loss(MamoModel student, StepInput batch, TeacherTargets? targets, int seed)
    {
        using var scope = NewDisposeScope();
        var device = student.Device;
        Tensor fused;
        using (no_grad())
        {
            var mask = batch.AttentionMask.to(device);
            fused = student.FusedCls(student.EncodeImage(batch.Images.to(device)), student.EncodeText(batch.TokenIds.to(device), mask), mask);   // [B, W]
        }
        var labels = tensor(batch.Labels!.Select(l => classes[l ?? throw new ArgumentException("an unlabelled pair reached the probe")]).ToArray(), device: device);
        var probe = F.cross_entropy(head.forward(fused), labels);
        var total = probe.clone();
        return new MamoLoss { Total = total.MoveToOuterDisposeScope(), Terms = new Dictionary<string, Tensor> { ["probe"] = probe.MoveToOuterDisposeScope() } };
    }

    public void Dispose() => head.Dispose();
}
