using Xunit;

namespace Mamo.Model.Tests;

public class CheckpointLatestTests : IDisposable
{
    readonly string run = Directory.CreateTempSubdirectory("mamo-run-").FullName;
    public void Dispose() => Directory.Delete(run, recursive: true);

    string Step(string name, params string[] files)
    {
        var dir = Path.Combine(run, Checkpoint.RunFolder, name);
        Directory.CreateDirectory(dir);
        foreach (var f in files) File.WriteAllText(Path.Combine(dir, f), "{}");
        return dir;
    }

    [Fact]
    public void The_newest_complete_checkpoint_of_a_run_is_chosen()
    {
        Step(Checkpoint.StepFolderName(2), Checkpoint.ConfigFile, Checkpoint.StateFile);
        var newest = Step(Checkpoint.StepFolderName(100), Checkpoint.ConfigFile, Checkpoint.StateFile);
        Step(Checkpoint.StepFolderName(99), Checkpoint.ConfigFile, Checkpoint.StateFile);
        Step(Checkpoint.StepFolderName(120) + ".tmp", Checkpoint.ConfigFile, Checkpoint.StateFile);   // being written
        Step(Checkpoint.StepFolderName(130), Checkpoint.ConfigFile);                                 // no state.json yet
        Step("step-140", Checkpoint.ConfigFile, Checkpoint.StateFile);                               // not a step folder
        Assert.Equal("step-000000000100", Path.GetFileName(newest));
        Assert.Equal(newest, Checkpoint.Latest(run));
    }

    [Fact]
    public void A_checkpoint_folder_is_itself()
    {
        var dir = Step(Checkpoint.StepFolderName(3), Checkpoint.ConfigFile, Checkpoint.StateFile);
        Assert.Equal(dir, Checkpoint.Latest(dir));
    }

    [Fact]
    public void No_checkpoint_is_null()
    {
        Assert.Null(Checkpoint.Latest(run));
        Assert.Null(Checkpoint.Latest(Path.Combine(run, "missing")));
        Step(Checkpoint.StepFolderName(7) + ".tmp", Checkpoint.ConfigFile, Checkpoint.StateFile);
        Assert.Null(Checkpoint.Latest(run));
    }
}
