using System.Diagnostics;
using System.Text.Json;
using Xunit;
using Model = Mamo.Model;

namespace Mamo.Cli.Tests;

/// <summary>The build's own promises, checked by evaluating the projects as MSBuild does.</summary>
public class BuildTests
{
    /// <summary>The repository's root: the folder above this test's binaries that holds MamoActors.sln.</summary>
    internal static string Root()
    {
        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
            if (File.Exists(Path.Combine(dir.FullName, "MamoActors.sln"))) return dir.FullName;
        throw new DirectoryNotFoundException($"no MamoActors.sln above {AppContext.BaseDirectory}");
    }

    /// <summary>The package references MSBuild evaluates for a project with these properties.</summary>
    static List<string> PackageReferences(string project, params string[] properties)
    {
        var info = new ProcessStartInfo("dotnet") { RedirectStandardOutput = true, RedirectStandardError = true };
        foreach (var a in new[] { "msbuild", project, "-getItem:PackageReference", "-nologo" }.Concat(properties)) info.ArgumentList.Add(a);
        using var p = Process.Start(info)!;
        var stdout = p.StandardOutput.ReadToEnd();
        var stderr = p.StandardError.ReadToEnd();
        p.WaitForExit();
        Assert.True(p.ExitCode == 0, $"dotnet msbuild {project}: {stderr}{stdout}");
        return JsonDocument.Parse(stdout).RootElement.GetProperty("Items").GetProperty("PackageReference").EnumerateArray()
            .Select(i => i.GetProperty("Identity").GetString()!).ToList();
    }

    [Fact]
    public void A_cuda_build_references_no_cpu_libtorch_in_any_project_and_a_default_build_no_cuda_one()
    {
        var root = Root();
        var projects = Directory.GetFiles(Path.Combine(root, "src"), "*.csproj", SearchOption.AllDirectories)
            .Concat(Directory.GetFiles(Path.Combine(root, "tests"), "*.csproj", SearchOption.AllDirectories)).ToList();
        Assert.Equal(8, projects.Count);
        foreach (var project in projects)
        {
            var cuda = PackageReferences(project, "-p:TorchBackend=cuda");
            Assert.DoesNotContain("libtorch-cpu-linux-x64", cuda);
            Assert.DoesNotContain("TorchSharp-cuda-linux", PackageReferences(project));
        }
        // The projects that use TorchSharp carry the backend they were asked for.
        foreach (var name in new[] { "Mamo.Model", "Mamo.Data" })
        {
            var project = Path.Combine(root, "src", name, name + ".csproj");
            Assert.Contains("TorchSharp-cuda-linux", PackageReferences(project, "-p:TorchBackend=cuda"));
            Assert.Contains("libtorch-cpu-linux-x64", PackageReferences(project));
        }
    }
}

/// <summary>`./mamo` as a user's script starts it. A Release build and three training processes need the two cores to
/// themselves: beside the other tests they would starve their timing (the cluster collection's reason too).</summary>
[Collection(ClusterCollection.Name)]
public class MamoScriptTests
{
    [Fact]
    public async Task Three_mamo_started_at_once_on_a_fresh_build_build_once_and_each_runs()
    {
        var root = BuildTests.Root();
        // Fresh: no Release build of the CLI (as in a new clone), so the first ./mamo builds while the others start.
        var release = Path.Combine(root, "src", "Mamo.Cli", "bin", "Release");
        if (Directory.Exists(release)) Directory.Delete(release, recursive: true);
        File.Delete(Path.Combine(root, "src", "Mamo.Cli", "obj", "mamo-run.stamp"));
        using var folder = new TempFolder();
        var runs = Enumerable.Range(0, 3).Select(async i =>
        {
            // Each loads libtorch: a process that loaded it while a build rewrote it failed in TorchSharp's type initializer.
            var info = new ProcessStartInfo("bash") { RedirectStandardOutput = true, RedirectStandardError = true, WorkingDirectory = folder.Path };
            foreach (var a in new[] { Path.Combine(root, "mamo"), "pretrain", "--run-dir", folder.File($"run{i}"), "--time-budget", "1s", "--plain",
                         "--dashboard", "off", "--set", "torch-threads=1", "--set", "eval.every-steps=0" })
                info.ArgumentList.Add(a);
            using var p = Process.Start(info)!;
            var (stdout, stderr) = (p.StandardOutput.ReadToEndAsync(), p.StandardError.ReadToEndAsync());
            using var patience = new CancellationTokenSource(TimeSpan.FromMinutes(8));
            await p.WaitForExitAsync(patience.Token);
            return (p.ExitCode, Log: await stdout + await stderr);
        }).ToList();
        var logs = await Task.WhenAll(runs);
        foreach (var (code, log) in logs) Assert.True(code == 0, log);
        Assert.Single(logs, r => r.Log.Contains("mamo: building src/Mamo.Cli (Release)"));
        for (var i = 0; i < 3; i++) Assert.NotNull(Model.Checkpoint.Latest(folder.File($"run{i}")));
        // Nothing of TorchSharp's fallback (it copies the natives into bin/.../cpu when the first load fails) is left.
        Assert.False(Directory.Exists(Path.Combine(release, "net10.0", "linux-x64", "cpu")));
    }
}
