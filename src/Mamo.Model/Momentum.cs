using TorchSharp;
using static TorchSharp.torch;

namespace Mamo.Model;

/// <summary>The momentum (EMA) teacher update: teacher = decay * teacher + (1 - decay) * student.</summary>
public static class Momentum
{
    /// <summary>A frozen copy of the student: same weights, no gradients, eval mode.</summary>
    public static MamoModel CreateTeacher(MamoModel student)
    {
        var teacher = new MamoModel(student.Config);
        teacher.to(student.parameters().First().device);
        CopyWeights(student, teacher);
        foreach (var p in teacher.parameters()) p.requires_grad = false;
        teacher.eval();
        return teacher;
    }

    public static void CopyWeights(MamoModel from, MamoModel to)
    {
        using var noGrad = no_grad();
        foreach (var (t, s) in to.parameters().Zip(from.parameters())) t.copy_(s);
    }

    /// <summary>EMA over matching parameter lists; both lists in the model's parameter order.</summary>
    public static void Update(IReadOnlyList<Tensor> teacher, IReadOnlyList<Tensor> student, double decay)
    {
        if (teacher.Count != student.Count) throw new ArgumentException($"teacher has {teacher.Count} tensors, student {student.Count}");
        // Explicit scalars, alive until the loop ends: an implicit one can be finalised by the GC while libtorch still
        // reads it (a raw handle), which once broke a 30-minute run with "Expected false to be true" in Scalar::toDouble.
        using var keep = decay.ToScalar();
        using var alpha = (1 - decay).ToScalar();
        using var noGrad = no_grad();
        foreach (var (t, s) in teacher.Zip(student)) t.mul_(keep).add_(s, alpha);
    }

    public static void Update(MamoModel teacher, MamoModel student, double decay) =>
        Update(teacher.parameters().ToArray(), student.parameters().ToArray(), decay);
}
