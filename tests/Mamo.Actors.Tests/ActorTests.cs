using Akka.Actor;
using Akka.TestKit.Xunit2;
using Mamo.Model;
using TorchSharp;
using Xunit;
using static TorchSharp.torch;
using Mamo.Actors.Sources;
using Mamo.Actors.Run;
using Mamo.Actors.Pipeline;

namespace Mamo.Actors.Tests;

/// <summary>The teacher, checkpointer and evaluator actors in a real actor system.</summary>
public class ActorTests() : TestKit(MamoSettings.Defaults())
{
    static readonly MamoConfig Tiny = MamoConfig.Tiny;
    readonly List<string> folders = [];

    /// <summary>A checkpoint holding <paramref name="model"/> as its teacher part after <paramref name="teacherStep"/>
    /// updates: what a teacher actor starts from.</summary>
    string TeacherCheckpoint(MamoModel model, long teacherStep)
    {
        var dir = Directory.CreateTempSubdirectory("mamo-teacher-").FullName;
        folders.Add(dir);
        Checkpoint.Save(dir, model.Config, [new Checkpoint.Part(Checkpoint.TeacherPart, Checkpoint.Named(model))],
            new Checkpoint.State(teacherStep, 0, teacherStep, new()));
        return dir;
    }

    IActorRef Teacher(MamoModel student, long teacherStep, bool pipelined, double decay = 0.995) =>
        Sys.ActorOf(MomentumTeacher.Props(student.Config, MamoPretraining.With(new PretrainingConfig { MomentumDecay = decay }),
            TeacherCheckpoint(student, teacherStep), CPU, pipelined ? 1 : 0));

    protected override void Dispose(bool disposing)
    {
        base.Dispose(disposing);
        foreach (var dir in folders) Directory.Delete(dir, recursive: true);
    }

    static (Tensor Images, Tensor Ids, Tensor Mask) Batch(int b)
    {
        var ids = full(b, Tiny.MaxTextLength, 2000L);
        ids[.., 0] = tensor(101L);
        return (randn(new long[] { b, 3, Tiny.ImageSize, Tiny.ImageSize }, generator: new Generator((ulong)b)), ids, ones(b, Tiny.MaxTextLength, int64));
    }

    static Tensor[] Weights(MamoModel m) => m.parameters().Select(p => p.detach().clone().DetachFromDisposeScope()).ToArray();

    [Fact]
    public void Pipelined_teacher_waits_for_the_update_its_step_needs()
    {
        using var student = new MamoModel(Tiny);
        var teacher = Teacher(student, teacherStep: 0, pipelined: true);
        var (images, ids, mask) = Batch(2);

        // Steps 0 and 1 need no update with a lag of one; step 2 needs the update after step 1.
        teacher.Tell(new MomentumTeacher.ComputeTargets(0, images.clone(), ids.clone(), mask.clone()));
        ExpectMsg<MomentumTeacher.TargetsReady>(TimeSpan.FromSeconds(30)).Targets!.Dispose();
        teacher.Tell(new MomentumTeacher.ComputeTargets(2, images.clone(), ids.clone(), mask.clone()));
        // Served after the request for step 2: had the teacher answered that one, its targets would come first.
        teacher.Tell(new Evaluator.GetWeights(0));
        var waiting = ExpectMsg<Evaluator.Weights>(TimeSpan.FromSeconds(30));
        Assert.Equal(0, waiting.WeightsStep);
        foreach (var (_, t) in waiting.Tensors) t.Dispose();
        teacher.Tell(new MomentumTeacher.StudentUpdated(1, Weights(student)));
        ExpectMsg<MomentumTeacher.TargetsReady>(TimeSpan.FromSeconds(30)).Targets!.Dispose();

        // The part sent with update 2 holds the teacher after exactly one update (lag 1).
        teacher.Tell(new MomentumTeacher.StudentUpdated(2, Weights(student), SnapshotTo: TestActor));
        var part = ExpectMsg<Checkpointer.Parts>(TimeSpan.FromSeconds(30));
        Assert.Equal((2L, 1L, Checkpoint.TeacherPart), (part.Step, part.TeacherStep!.Value, part.Tensors.Single().Name));
        foreach (var (_, t) in part.Tensors.Single().Tensors) t.Dispose();
    }

    [Fact]
    public void A_replicas_teacher_answers_the_steps_of_a_round_given_up_before_its_weights_came()
    {
        // A coordinator gave round 1 (attempt 10) and died before its weights went out; the next one gave round 1 again
        // (attempt 20). Attempt 10's step waits for its round's reset, which never comes, and the pipeline's ordered
        // stream waits on it with every step behind: seen as a cluster that trained nothing after its coordinator's
        // node was killed. Once the trainer gives attempt 10 up, the teacher answers it, without targets.
        using var student = new MamoModel(Tiny);
        var teacher = Sys.ActorOf(MomentumTeacher.Props(Tiny, MamoPretraining.With(new PretrainingConfig()), checkpoint: null, CPU, lag: 1));
        var (images, ids, mask) = Batch(2);
        Round old = new(Attempt: 10, Number: 1, FirstStep: 2, ResetsTeacher: true), again = new(Attempt: 20, Number: 1, FirstStep: 2, ResetsTeacher: true);
        teacher.Tell(new MomentumTeacher.ComputeTargets(2, images.clone(), ids.clone(), mask.clone(), old));
        teacher.Tell(new MomentumTeacher.Reset(again, student.named_parameters().Select(p => (p.name, p.parameter.detach().clone().DetachFromDisposeScope())).ToArray(), again.FirstStep));
        teacher.Tell(new MomentumTeacher.ComputeTargets(2, images.clone(), ids.clone(), mask.clone(), again));
        ExpectMsg<MomentumTeacher.TargetsReady>(TimeSpan.FromSeconds(30)).Targets!.Dispose();   // attempt 20's
        teacher.Tell(new MomentumTeacher.GiveUpRound(old.Attempt));
        Assert.Null(ExpectMsg<MomentumTeacher.TargetsReady>(TimeSpan.FromSeconds(30)).Targets);
        // And a step of it that comes after is answered at once.
        teacher.Tell(new MomentumTeacher.ComputeTargets(3, images.clone(), ids.clone(), mask.clone(), old));
        Assert.Equal((3L, null), ExpectMsg<MomentumTeacher.TargetsReady>(TimeSpan.FromSeconds(30)) is var r ? (r.Step, r.Targets) : default);
    }

    [Fact]
    public void Updates_are_folded_in_even_when_no_targets_are_asked_for()
    {
        // With MIM and MRM off nobody asks for targets; the teacher must still follow the student (and not hoard copies).
        using var student = new MamoModel(Tiny);
        var teacher = Teacher(student, teacherStep: 0, pipelined: true);
        for (int step = 1; step <= 5; step++) teacher.Tell(new MomentumTeacher.StudentUpdated(step, Weights(student)));
        teacher.Tell(new Evaluator.GetWeights(5));
        var snapshot = ExpectMsg<Evaluator.Weights>(TimeSpan.FromSeconds(30));
        Assert.Equal(4, snapshot.WeightsStep);   // lag 1: the fifth update waits for the targets of step 6
        foreach (var (_, t) in snapshot.Tensors) t.Dispose();
    }

    /// <summary>A step of one of a round's N replicas stands for N steps of one node: the EMA decays by d^N.</summary>
    [Theory]
    [InlineData(1, 0.5)]    // teacher = 0.5 * before + 0.5 * (before + 1) = before + 0.5
    [InlineData(2, 0.75)]   // 0.25 * before + 0.75 * (before + 1) = before + 0.75
    public void Ema_through_the_actor_matches_the_arithmetic(int replicas, double moved)
    {
        using var student = new MamoModel(Tiny);
        using var reference = Momentum.CreateTeacher(student);
        var teacher = Teacher(student, teacherStep: 0, pipelined: false, decay: 0.5);
        using (no_grad()) foreach (var p in student.parameters()) p.add_(1.0);
        var round = replicas == 1 ? null : new Round(Attempt: 1, Number: 0, FirstStep: 0, ResetsTeacher: false, Replicas: replicas);
        teacher.Tell(new MomentumTeacher.StudentUpdated(1, Weights(student), SnapshotTo: TestActor, Round: round));
        var part = ExpectMsg<Checkpointer.Parts>(TimeSpan.FromSeconds(30));
        Assert.Equal(1, part.TeacherStep);
        foreach (var ((name, got), before) in part.Tensors.Single().Tensors.Zip(reference.parameters()))
        {
            Assert.True(got.allclose(before + moved, rtol: 1e-5, atol: 1e-5), name);
            got.Dispose();
        }
    }

    [Fact]
    public void Checkpointer_joins_the_declared_parts_writes_atomically_keeps_the_last_k_and_then_announces()
    {
        var runDir = Directory.CreateTempSubdirectory("mamo-ckpt-").FullName;
        folders.Add(runDir);
        using var student = new MamoModel(Tiny);
        var checkpointer = Sys.ActorOf(Checkpointer.Props(runDir, Tiny, [Checkpoint.StudentPart, Checkpoint.TeacherPart], keepLast: 2, seed: 1, [TestActor]));
        Checkpoint.Part Part(string name) => new(name, student.named_parameters().Select(p => (p.name, p.parameter.detach().clone().DetachFromDisposeScope())).ToArray());
        foreach (var step in new long[] { 10, 20, 30 })
        {
            checkpointer.Tell(new Checkpointer.Parts(step, [Part(Checkpoint.TeacherPart)], TeacherStep: step - 1));
            // Half a checkpoint is not a checkpoint. Identify is answered after the part is handled, and an announcement
            // would have reached us first.
            checkpointer.Tell(new Identify(step));
            Assert.Equal(step, ExpectMsg<ActorIdentity>(TimeSpan.FromSeconds(30)).MessageId);
            Assert.False(Directory.Exists(Path.Combine(runDir, Checkpoint.RunFolder, Checkpoint.StepFolderName(step))));
            checkpointer.Tell(new Checkpointer.Parts(step, [Part(Checkpoint.StudentPart)], StreamPosition.None.Advance(new("t/0", step * 8 - 1)).Advance(new("t/1", step)), OptimizerStep: step));
            var durable = ExpectMsg<Checkpointer.CheckpointDurable>(TimeSpan.FromSeconds(30));
            Assert.Equal(step, durable.Step);
            Assert.True(File.Exists(Path.Combine(durable.Path, Checkpoint.StateFile)));
        }
        var kept = Directory.GetDirectories(Path.Combine(runDir, Checkpoint.RunFolder)).Select(d => Path.GetFileName(d)!).Order().ToArray();
        Assert.Equal([Checkpoint.StepFolderName(20), Checkpoint.StepFolderName(30)], kept);
        var latest = Checkpoint.Latest(runDir)!;
        var state = Checkpoint.ReadState(latest);
        Assert.Equal((30L, 30L, 29L), (state.Step, state.OptimizerStep, state.TeacherStep));
        Assert.Equal([Checkpoint.TeacherPart, Checkpoint.StudentPart], state.Parts);
        // Each partition's position survives the round trip through state.json.
        Assert.Equal([("t/0", 239L), ("t/1", 30L)], StreamPosition.FromExtra(state.Extra).Offsets.Select(kv => (kv.Key, kv.Value)));
    }

    [Fact]
    public void Evaluator_scores_a_copy_of_the_teacher_labels_it_with_the_teacher_step_and_collapses_requests_while_busy()
    {
        var tokenizer = new Mamo.Data.TextTokenizer(Mamo.Data.Datasets.BuiltinDatasets.EnsureVocab());
        var manifest = Mamo.Data.Datasets.BuiltinDatasets.Ensure(Mamo.Data.Datasets.BuiltinDatasets.Emoji).File(Mamo.Data.Datasets.BuiltinDatasets.TestSplit);
        using var set = Mamo.Data.EvalSet.Load(manifest, new Mamo.Data.ImageTransform(new Mamo.Data.ImageTransformOptions(ImageSize: Tiny.ImageSize)), tokenizer, Tiny.MaxTextLength);
        using var student = new MamoModel(Tiny);
        using var reference = Momentum.CreateTeacher(student);
        var teacher = Teacher(student, teacherStep: 0, pipelined: false);
        using (no_grad()) foreach (var p in student.parameters()) p.mul_(1.5);
        for (int step = 1; step <= 2; step++)
        {
            teacher.Tell(new MomentumTeacher.StudentUpdated(step, Weights(student)));
            Momentum.Update(reference, student, 0.995);
        }
        var expected = Retrieval.Evaluate(reference, set.Images, set.TokenIds, set.AttentionMask, set.TextToImage, 2, 64);
        var evaluator = Sys.ActorOf(Evaluator.Props(Tiny, CPU, [new RetrievalSet("emoji-test", set)], teacher, TestActor, 2, 64, CancellationToken.None));

        evaluator.Tell(new Evaluator.EvaluateNow(7));
        evaluator.Tell(new Evaluator.EvaluateNow(8));   // these two arrive while the first runs: one evaluation follows it
        evaluator.Tell(new Evaluator.EvaluateNow(9));
        foreach (var _ in new[] { "first", "collapsed" })
        {
            var done = ExpectMsg<Evaluator.EvalCompleted>(TimeSpan.FromSeconds(120));
            // Labelled with what was evaluated: the teacher after two updates, whatever step the request named.
            Assert.Equal((2L, "emoji-test", set.ImageCount, set.TextCount), (done.Step, done.Set, done.Images, done.Texts));
            foreach (var (got, want) in new[] { (done.Metrics.Ir1, expected.Ir1), (done.Metrics.Tr5, expected.Tr5), (done.Metrics.RMean, expected.RMean) })
                Assert.Equal(want, got, 6);
            Assert.Equal(2L, ExpectMsg<Evaluator.EvaluationDone>(TimeSpan.FromSeconds(30)).Step);
        }
        AwaitAssert(() => Assert.Equal(new Evaluator.Status(2, Busy: false, Pending: false),
            evaluator.Ask<Evaluator.Status>(new Evaluator.GetStatus(), TimeSpan.FromSeconds(10)).Result), TimeSpan.FromSeconds(30));
    }
}
