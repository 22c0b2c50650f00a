using System.Diagnostics;
using System.Text.Json;
using Xunit;

namespace Mamo.Cli.Tests;

/// <summary>The build's own promises, checked by evaluating the projects as MSBuild does.</summary>
public class BuildTests
{
    /// <summary>The repository's root: the folder above this test's binaries that holds MamoActors.sln.</summary>
    static string Root()
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
