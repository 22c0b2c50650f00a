namespace Mamo.Data;

/// <summary>
/// Resolves paths named by data files so they stay inside their root: `..` that climbs out, and absolute paths
/// elsewhere, are refused. Symbolic links are not followed here; a root is trusted not to link outside itself.
/// </summary>
public static class RootedPath
{
    public static bool TryResolve(string root, string path, out string fullPath, out string? reason)
    {
        var fullRoot = Path.TrimEndingDirectorySeparator(Path.GetFullPath(root));
        if (path.Length == 0 || path.Contains('\0'))
        {
            fullPath = fullRoot;
            reason = "empty path or path with a NUL character";
            return false;
        }
        fullPath = Path.GetFullPath(path, fullRoot);
        var inside = fullPath.StartsWith(fullRoot + Path.DirectorySeparatorChar, StringComparison.Ordinal);
        reason = inside ? null : $"path escapes its root {fullRoot}: {path}";
        return inside;
    }

    /// <summary>True for archive entry names that are absolute or contain a `..` segment.</summary>
    public static bool EscapesArchive(string entryName)
    {
        var name = entryName.Replace('\\', '/');
        return name.StartsWith('/') || (name.Length > 1 && name[1] == ':') || name.Split('/').Contains("..");
    }
}
