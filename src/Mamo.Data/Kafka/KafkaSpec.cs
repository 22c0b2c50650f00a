using System.Text.RegularExpressions;

namespace Mamo.Data.Kafka;

/// <summary>librdkafka properties: MamoActors' defaults for a client, then the user's (SASL, TLS, ...), which win.</summary>
public static class KafkaProperties
{
    public static Dictionary<string, string> Merge(Dictionary<string, string> defaults, IReadOnlyDictionary<string, string> user)
    {
        foreach (var (key, value) in user) defaults[key] = value;
        return defaults;
    }

    /// <summary>Builds a client; a property librdkafka refuses (Confluent throws InvalidOperationException) becomes an
    /// ArgumentException that names it, for a clear error instead of a crash.</summary>
    public static T Build<T>(Func<T> build)
    {
        try { return build(); }
        catch (InvalidOperationException e) when (e.Message.Contains("configuration property")) { throw new ArgumentException(e.Message, e); }
    }
}

/// <summary>A Kafka address as users write it: <c>kafka://HOST:PORT[,HOST:PORT]/TOPIC[,TOPIC2][?group=NAME]</c>.</summary>
public sealed partial record KafkaSpec(string BootstrapServers, IReadOnlyList<string> Topics, string? Group)
{
    public const string Scheme = "kafka://";

    public static bool IsKafka(string spec) => spec.StartsWith(Scheme, StringComparison.OrdinalIgnoreCase);

    /// <summary>Parses the address; a malformed one is a FormatException that shows the expected form.</summary>
    public static KafkaSpec Parse(string spec)
    {
        const string form = "expected kafka://HOST:PORT/TOPIC[,TOPIC2][?group=NAME]";
        if (!IsKafka(spec)) throw new FormatException($"'{spec}' is not a Kafka address: {form}");
        var rest = spec[Scheme.Length..];
        string? group = null;
        var q = rest.IndexOf('?');
        if (q >= 0)
        {
            foreach (var pair in rest[(q + 1)..].Split('&', StringSplitOptions.RemoveEmptyEntries))
            {
                var kv = pair.Split('=', 2);
                if (kv.Length != 2 || kv[0] != "group" || kv[1].Length == 0)
                    throw new FormatException($"'{spec}': unknown or empty query '{pair}' (only group=NAME is understood); {form}");
                group = Uri.UnescapeDataString(kv[1]);
            }
            rest = rest[..q];
        }
        var slash = rest.IndexOf('/');
        if (slash <= 0) throw new FormatException($"'{spec}' names no broker or no topic: {form}");
        var servers = rest[..slash];
        foreach (var server in servers.Split(','))
            if (!HostPort().IsMatch(server)) throw new FormatException($"'{spec}': '{server}' is not HOST:PORT; {form}");
        var topics = rest[(slash + 1)..].Split(',', StringSplitOptions.RemoveEmptyEntries);
        if (topics.Length == 0) throw new FormatException($"'{spec}' names no topic: {form}");
        foreach (var topic in topics)
            if (!TopicName().IsMatch(topic)) throw new FormatException($"'{spec}': '{topic}' is not a valid topic name (letters, digits, '.', '_', '-'; at most 249)");
        return new KafkaSpec(servers, topics, group);
    }

    public override string ToString() => $"{Scheme}{BootstrapServers}/{string.Join(',', Topics)}{(Group is null ? "" : $"?group={Group}")}";

    [GeneratedRegex(@"^[A-Za-z0-9.\-]+:[0-9]{1,5}$")] private static partial Regex HostPort();
    [GeneratedRegex(@"^[A-Za-z0-9._\-]{1,249}$")] private static partial Regex TopicName();
}
