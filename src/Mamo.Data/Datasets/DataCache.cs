namespace Mamo.Data.Datasets;

/// <summary>
/// Where fetched data lives: $MAMO_DATA, else $XDG_CACHE_HOME/mamo, else ~/.cache/mamo; never inside the repository.
/// A dataset folder is complete only when its marker holds the current build stamp: the marker is written last,
/// into a staging folder that then replaces the old one, so an interrupted fetch is redone.
/// </summary>
public static class DataCache
{
    public const string MarkerFile = ".complete";
    private const string LockFile = ".fetch.lock";
    private const string StagingSuffix = ".partial";
    private static readonly TimeSpan LockPoll = TimeSpan.FromMilliseconds(200);
    private static readonly TimeSpan LockTimeout = TimeSpan.FromMinutes(15);

    public static string Root(string? dir = null)
    {
        if (!string.IsNullOrEmpty(dir)) return Path.GetFullPath(dir);
        var mamoData = Environment.GetEnvironmentVariable("MAMO_DATA");
        if (!string.IsNullOrEmpty(mamoData)) return Path.GetFullPath(mamoData);
        var xdg = Environment.GetEnvironmentVariable("XDG_CACHE_HOME");
        if (!string.IsNullOrEmpty(xdg)) return Path.Combine(Path.GetFullPath(xdg), "mamo");
        return Path.Combine(Environment.GetFolderPath(Environment.SpecialFolder.UserProfile), ".cache", "mamo");
    }

    public static bool IsComplete(string folder, string stamp)
    {
        var marker = Path.Combine(folder, MarkerFile);
        return File.Exists(marker) && File.ReadAllText(marker) == stamp;
    }

    /// <summary>Builds <paramref name="folder"/> with <paramref name="build"/> unless it is complete for this stamp.</summary>
    public static void BuildOnce(string folder, string stamp, Action<string> build)
    {
        if (IsComplete(folder, stamp)) return;
        var staging = folder + StagingSuffix;
        if (Directory.Exists(staging)) Directory.Delete(staging, recursive: true);
        Directory.CreateDirectory(staging);
        build(staging);
        File.WriteAllText(Path.Combine(staging, MarkerFile), stamp);
        if (Directory.Exists(folder)) Directory.Delete(folder, recursive: true);
        Directory.Move(staging, folder);
    }

    /// <summary>
    /// One fetch at a time per cache root, across threads and processes (an exclusive open is an flock on Linux).
    /// </summary>
    public static IDisposable Lock(string root)
    {
        Directory.CreateDirectory(root);
        var path = Path.Combine(root, LockFile);
        var deadline = DateTime.UtcNow + LockTimeout;
        while (true)
        {
            try
            {
                return new FileStream(path, FileMode.OpenOrCreate, FileAccess.ReadWrite, FileShare.None);
            }
            catch (IOException) when (DateTime.UtcNow < deadline)
            {
                Thread.Sleep(LockPoll);
            }
        }
    }
}
