using System.CommandLine;

namespace Mamo.Cli.Tests;

/// <summary>Runs the real `mamo` root command in-process and captures what it writes.</summary>
static class Cli
{
    public static (int ExitCode, string Stdout, string Stderr) Run(params string[] args)
    {
        var stdout = new StringWriter();
        var stderr = new StringWriter();
        var code = MamoRoot.Create().Parse(args).Invoke(new InvocationConfiguration { Output = stdout, Error = stderr });
        return (code, stdout.ToString(), stderr.ToString());
    }
}

/// <summary>A fresh folder under the system temp directory, deleted with the test.</summary>
sealed class TempFolder : IDisposable
{
    public string Path { get; } = Directory.CreateTempSubdirectory("mamo-cli-test-").FullName;
    public string File(string relative) => System.IO.Path.Combine(Path, relative);
    public void Dispose() => Directory.Delete(Path, recursive: true);
}
