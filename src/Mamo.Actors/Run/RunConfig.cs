using System.Globalization;
using System.Reflection;
using System.Text;
using System.Text.RegularExpressions;
using Akka.Configuration;
using Akka.Configuration.Hocon;
using Mamo.Actors.Sources;

namespace Mamo.Actors.Run;

/// <summary>The configuration a run folder records (config.resolved.conf: every mamo.* value the run resolved, with the
/// command line and version), and what a resume may change of it. A run that resumes with other settings applies and
/// logs a change it can honour (a learning rate, a batch size, eval sets) and refuses one it cannot (the preset, the
/// seed, the kind of source), naming it; a silent change would make a run's history lie. The file is HOCON: `--config
/// RUN/config.resolved.conf` runs with it again, but for its secrets, which it records as "(redacted)".</summary>
public static class RunConfig
{
    public const string File = "config.resolved.conf";

    /// <summary>One value that differs from what the run folder recorded; null: absent on that side.</summary>
    public sealed record Change(string Key, string? Was, string? Now);

    /// <summary>Keys whose change a resume cannot honour, and why.</summary>
    static readonly Dictionary<string, string> Fixed = new()
    {
        ["mamo.preset"] = "the checkpoints hold a model of the recorded preset",
        ["mamo.seed"] = "the masks, shuffles and augmentations of the steps so far follow the recorded seed",
    };

    /// <summary>What a secret's value is recorded and shown as: a run folder is shared more widely than a config file.</summary>
    public const string Redacted = "(redacted)";

    /// <summary>A key that holds a secret (a TLS or SASL password, a token, a private key), by librdkafka's and our names.</summary>
    static bool Secret(string key) =>
        Regex.IsMatch(key.Split('.', 3).Last(), @"password|secret|token|jaas|private|key\.pem|keystore", RegexOptions.IgnoreCase);

    /// <summary>Every mamo.* leaf of the settings (librdkafka's pass-through keys too), in key order, as HOCON values;
    /// a secret's value redacted.</summary>
    public static SortedDictionary<string, string> Values(MamoSettings s)
    {
        var values = new SortedDictionary<string, string>(StringComparer.Ordinal);
        void Walk(HoconValue value, string path)
        {
            if (value.IsObject())
                foreach (var (key, child) in value.GetObject().Items) Walk(child, $"{path}.{Quote(key)}");
            else if (Secret(path)) values[path] = Literal(Redacted);
            else values[path] = value.IsArray() ? $"[{string.Join(", ", value.GetArray().Select(v => Literal(v.GetString())))}]" : Literal(value.GetString());
        }
        Walk(s.Config.GetValue("mamo"), "mamo");
        return values;
    }

    /// <summary>Compares the settings with what the run folder recorded (nothing: a new run, or a folder from before
    /// the record) and records them. A change that cannot be honoured throws SettingsException naming it; the others
    /// are returned for the run to log.</summary>
    public static IReadOnlyList<Change> Resume(MamoSettings s, IEnumerable<string> commandLine)
    {
        var changes = Model.Checkpoint.Complete(s.RunDir).Any() ? Changes(s) : [];
        if (changes.Select(c => (c, Why: Refusal(c))).Where(r => r.Why is not null).ToList() is { Count: > 0 } refused)
            throw new SettingsException($"cannot resume the run in {s.RunDir} with other settings: " +
                string.Join("; ", refused.Select(r => $"'{r.c.Key}' was {r.c.Was ?? "unset"}, now {r.c.Now ?? "unset"} ({r.Why})")) +
                $". Keep the recorded values ({Path.Combine(s.RunDir, File)}), or start a new --run-dir");
        Record(Path.Combine(s.RunDir, File), Values(s), commandLine);
        return changes;
    }

    /// <summary>The values that differ from what the run folder recorded; none where it records nothing.</summary>
    public static IReadOnlyList<Change> Changes(MamoSettings s)
    {
        var path = Path.Combine(s.RunDir, File);
        if (!System.IO.File.Exists(path)) return [];
        var (was, now) = (Read(path), Values(s));
        return was.Keys.Union(now.Keys).Order(StringComparer.Ordinal)
            .Select(k => new Change(k, was.GetValueOrDefault(k), now.GetValueOrDefault(k)))
            .Where(c => c.Was != c.Now).ToList();
    }

    /// <summary>Why a resume cannot honour the change; null: it can.</summary>
    public static string? Refusal(Change c) => Fixed.GetValueOrDefault(c.Key) ?? (c.Key == "mamo.source" ? SourceKindChange(c) : null);

    static string? SourceKindChange(Change c)
    {
        // The recorded value is HOCON: one spec, or a list of them (a mix). One edited by hand into something else is
        // compared as written.
        static List<string> Specs(string? v)
        {
            if (v is null) return [];
            try
            {
                var parsed = ConfigurationFactory.ParseString("v = " + v);
                return parsed.GetValue("v").IsArray() ? [.. parsed.GetStringList("v").Select(x => WeightedSource.Parse(x).Spec)]
                    : [WeightedSource.Parse(parsed.GetString("v")).Spec];
            }
            catch (Exception e) when (e is not OutOfMemoryException) { return [v]; }
        }
        static string Kind(string spec) => Regex.Match(spec, @"^([a-z]+):").Groups[1].Value;
        var (was, now) = (Specs(c.Was), Specs(c.Now));
        if (was.Count > 1 || now.Count > 1)
            return was.SequenceEqual(now) ? null : "the stream positions in the checkpoints are each mixed source's, in the order given";
        return was.Select(Kind).SequenceEqual(now.Select(Kind)) ? null : $"the stream positions in the checkpoints are a {was.Select(Kind).FirstOrDefault()} source's";
    }

    static void Record(string path, SortedDictionary<string, string> values, IEnumerable<string> commandLine)
    {
        var version = Assembly.GetEntryAssembly()?.GetCustomAttribute<AssemblyInformationalVersionAttribute>()?.InformationalVersion ?? "unknown";
        var text = new StringBuilder()
            .AppendLine("# The configuration this run resolved; `mamo config show --run-dir DIR` says where each value came from.")
            .AppendLine($"# written {DateTime.UtcNow.ToString("O", CultureInfo.InvariantCulture)} by mamo {version}")
            .AppendLine($"# command: {string.Join(' ', commandLine)}");
        foreach (var (key, value) in values) text.AppendLine($"{key} = {value}");
        // Whole or not at all: a crash while writing leaves the last record.
        System.IO.File.WriteAllText(path + ".tmp", text.ToString());
        System.IO.File.Move(path + ".tmp", path, overwrite: true);
    }

    static Dictionary<string, string> Read(string path) =>
        System.IO.File.ReadLines(path).Where(l => !l.StartsWith('#')).Select(l => l.Split(" = ", 2)).Where(p => p.Length == 2)
            .ToDictionary(p => p[0], p => p[1]);

    /// <summary>A string as a HOCON quoted string; null as null.</summary>
    static string Literal(string? value) => value is null ? "null" : System.Text.Json.JsonSerializer.Serialize(value);

    /// <summary>A key segment quoted where it holds a dot (librdkafka's "sasl.mechanism").</summary>
    static string Quote(string key) => key.Contains('.') ? Literal(key) : key;
}
