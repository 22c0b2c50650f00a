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
        using var scope = NewDisposeScope();   // the implicit scalars of decay and alpha
        using var noGrad = no_grad();
        foreach (var (t, s) in teacher.Zip(student)) t.mul_(decay).add_(s, alpha: 1 - decay);
    }

    public static void Update(MamoModel teacher, MamoModel student, double decay) =>
        Update(teacher.parameters().ToArray(), student.parameters().ToArray(), decay);
}
