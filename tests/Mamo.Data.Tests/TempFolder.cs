namespace Mamo.Data.Tests;

/// <summary>A fresh folder under the system temp directory, deleted with the test.</summary>
internal sealed class TempFolder : IDisposable
{
    public string Path { get; } = Directory.CreateTempSubdirectory("mamo-data-test-").FullName;

    public string File(string relative) => System.IO.Path.Combine(Path, relative);

    public void Dispose() => Directory.Delete(Path, recursive: true);
}
