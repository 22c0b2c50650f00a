using System.Buffers.Binary;
using System.Globalization;
using System.Text;
using System.Text.Json;
using Confluent.Kafka;

namespace Mamo.Data.Kafka;

/// <summary>One embedding as published: the item's id, which modality, which model version made it.</summary>
public sealed record EmbeddingRecord(string Id, string Modality, string ModelVersion, float[] Vector);

/// <summary>One prediction as published by a fine-tuned model: the item's id, the task, the model version, the label
/// and its probability.</summary>
public sealed record PredictionRecord(string Id, string Task, string ModelVersion, string Label, double Probability);

/// <summary>One event of a model version's publication (docs/KAFKA.md, "Versions"): it started; it is complete (every
/// record acknowledged: Records embeddings, whose sorted "ID\tMODALITY\n" lines hash to IdsSha256, and Predictions
/// predictions); or it was abandoned, and why.</summary>
public sealed record VersionRecord(string Version, string State, long Step, DateTime At, int Records = 0, int Predictions = 0,
    string? IdsSha256 = null, string? Reason = null)
{
    public const string Started = "started", Complete = "complete", Abandoned = "abandoned";

    /// <summary>The record as JSON, snake_case, without the fields its state does not have.</summary>
    public byte[] ToJson() => JsonSerializer.SerializeToUtf8Bytes(new Dictionary<string, object?>
    {
        ["version"] = Version, ["state"] = State, ["step"] = Step, ["at"] = At.ToString("O", CultureInfo.InvariantCulture),
        ["records"] = State == Complete ? Records : null, ["predictions"] = State == Complete ? Predictions : null,
        ["ids_sha256"] = IdsSha256, ["reason"] = Reason,
    }.Where(kv => kv.Value is not null).ToDictionary());

    /// <summary>A record as a consumer reads it; FormatException where it is not one.</summary>
    public static VersionRecord Parse(ReadOnlySpan<byte> json)
    {
        try
        {
            using var doc = JsonDocument.Parse(json.ToArray());
            var r = doc.RootElement;
            string? Text(string name) => r.TryGetProperty(name, out var v) && v.ValueKind == JsonValueKind.String ? v.GetString() : null;
            int Count(string name) => r.TryGetProperty(name, out var v) && v.ValueKind == JsonValueKind.Number ? v.GetInt32() : 0;
            var state = Text("state");
            if (Text("version") is not { } version || state is not (Started or Complete or Abandoned) || !r.TryGetProperty("step", out var step))
                throw new FormatException("a version record needs a version, a state (started, complete or abandoned) and a step");
            return new VersionRecord(version, state, step.GetInt64(), DateTime.Parse(Text("at") ?? "0001-01-01", CultureInfo.InvariantCulture,
                DateTimeStyles.AdjustToUniversal | DateTimeStyles.AssumeUniversal), Count("records"), Count("predictions"), Text("ids_sha256"), Text("reason"));
        }
        catch (Exception e) when (e is JsonException or InvalidOperationException) { throw new FormatException($"not a version record: {e.Message}", e); }
    }

    /// <summary>The checksum of a version's ids: SHA-256 (hex) of one "ID\tMODALITY\n" line per embedding, the lines in
    /// the byte order of their UTF-8 (code point order, as a Python sort of str gives).</summary>
    public static string IdsChecksum(IEnumerable<(string Id, string Modality)> records)
    {
        var lines = records.Select(r => Encoding.UTF8.GetBytes($"{r.Id}\t{r.Modality}\n")).ToList();
        lines.Sort((a, b) => a.AsSpan().SequenceCompareTo(b));
        using var sha = System.Security.Cryptography.IncrementalHash.CreateHash(System.Security.Cryptography.HashAlgorithmName.SHA256);
        foreach (var line in lines) sha.AppendData(line);
        return Convert.ToHexStringLower(sha.GetHashAndReset());
    }
}

/// <summary>Where a model version's outputs go, its embeddings and (fine-tuned) its predictions, and the events of its
/// publication: a Kafka topic (kafka://HOST:PORT/TOPIC; events on TOPIC.versions) or a JSONL file (jsonl:PATH; events
/// in PATH's sibling NAME.versions.jsonl).</summary>
public interface IEmbeddingSink : IDisposable
{
    string Name { get; }
    void Write(EmbeddingRecord record);
    void Write(PredictionRecord record);
    void Write(VersionRecord record);
    /// <summary>Returns once everything written is acknowledged (Kafka: acks=all) or on disk.</summary>
    void Flush();
}

public static class EmbeddingSinks
{
    public const string ModelVersionHeader = "model-version", ModalityHeader = "modality", DimHeader = "dim", TaskHeader = "task";

    /// <summary>The topic that holds a topic's version events.</summary>
    public static string VersionsTopic(string topic) => topic + ".versions";

    /// <summary>The file that holds a JSONL output's version events: embeddings.jsonl's is embeddings.versions.jsonl.</summary>
    public static string VersionsFile(string path) =>
        Path.Combine(Path.GetDirectoryName(path) ?? "", Path.GetFileNameWithoutExtension(path) + ".versions.jsonl");

    /// <exception cref="FormatException">the spec is neither kafka://HOST:PORT/TOPIC nor jsonl:PATH</exception>
    public static IEmbeddingSink Open(string spec, IReadOnlyDictionary<string, string>? producerSettings = null)
    {
        if (KafkaSpec.IsKafka(spec))
        {
            var kafka = KafkaSpec.Parse(spec);
            if (kafka.Topics.Count != 1) throw new FormatException($"'{spec}': embeddings go to exactly one topic");
            return new KafkaEmbeddingSink(kafka, producerSettings ?? new Dictionary<string, string>());
        }
        if (spec.StartsWith("jsonl:")) return new JsonlEmbeddingSink(spec["jsonl:".Length..]);
        throw new FormatException($"unknown embedding output '{spec}': use kafka://HOST:PORT/TOPIC or jsonl:PATH");
    }

    /// <summary>The record value: the vector as float32 little-endian, 4 x dim bytes.</summary>
    public static byte[] Encode(float[] vector)
    {
        var bytes = new byte[vector.Length * sizeof(float)];
        for (var i = 0; i < vector.Length; i++) BinaryPrimitives.WriteSingleLittleEndian(bytes.AsSpan(i * sizeof(float)), vector[i]);
        return bytes;
    }

    /// <summary>An embedding record as the Kafka sink writes it (key: the id; headers model-version, modality, dim);
    /// null where the record is another kind the topic carries (a prediction: no modality header).</summary>
    /// <exception cref="FormatException">a record that claims to be an embedding and is not a whole one</exception>
    public static EmbeddingRecord? ReadEmbedding(byte[]? key, byte[]? value, Headers? headers)
    {
        string? Header(string name) => headers is not null && headers.TryGetLastBytes(name, out var b) ? Encoding.UTF8.GetString(b) : null;
        if (Header(ModalityHeader) is not { } modality) return null;
        if (key is null || key.Length == 0) throw new FormatException("an embedding without a key (its item's id)");
        if (Header(ModelVersionHeader) is not { Length: > 0 } version) throw new FormatException($"an embedding without a {ModelVersionHeader} header");
        var vector = Decode(value ?? []);
        if (vector.Length == 0) throw new FormatException("an embedding of no values");
        if (Header(DimHeader) is { } dim && dim != vector.Length.ToString(CultureInfo.InvariantCulture))
            throw new FormatException($"an embedding of {vector.Length} values whose {DimHeader} header says {dim}");
        return new EmbeddingRecord(Encoding.UTF8.GetString(key), modality, version, vector);
    }

    public static float[] Decode(byte[] value)
    {
        if (value.Length % sizeof(float) != 0) throw new FormatException($"an embedding of {value.Length} bytes is not a whole number of float32s");
        var vector = new float[value.Length / sizeof(float)];
        for (var i = 0; i < vector.Length; i++) vector[i] = BinaryPrimitives.ReadSingleLittleEndian(value.AsSpan(i * sizeof(float)));
        return vector;
    }
}

sealed class KafkaEmbeddingSink : IEmbeddingSink
{
    static readonly TimeSpan FlushTimeout = TimeSpan.FromMinutes(1);
    readonly IProducer<byte[], byte[]> producer;
    readonly string topic;
    Error? failed;

    public string Name { get; }

    public KafkaEmbeddingSink(KafkaSpec spec, IReadOnlyDictionary<string, string> settings)
    {
        topic = spec.Topics[0];
        Name = spec.ToString();
        producer = KafkaProperties.Build(() => new ProducerBuilder<byte[], byte[]>(new ProducerConfig(KafkaProperties.Merge(new Dictionary<string, string>
        {
            ["bootstrap.servers"] = spec.BootstrapServers, ["acks"] = "all", ["enable.idempotence"] = "true", ["linger.ms"] = "5",
        }, settings))).Build());
    }

    public void Write(EmbeddingRecord r)
    {
        var headers = new Headers
        {
            { EmbeddingSinks.ModelVersionHeader, Encoding.UTF8.GetBytes(r.ModelVersion) },
            { EmbeddingSinks.ModalityHeader, Encoding.UTF8.GetBytes(r.Modality) },
            { EmbeddingSinks.DimHeader, Encoding.UTF8.GetBytes(r.Vector.Length.ToString(CultureInfo.InvariantCulture)) },
        };
        // Key = item id: on a compacted topic the newest vector per id is what stays.
        Produce(new Message<byte[], byte[]> { Key = Encoding.UTF8.GetBytes(r.Id), Value = EmbeddingSinks.Encode(r.Vector), Headers = headers });
    }

    /// <summary>Value: UTF-8 JSON {"label", "probability"}; headers model-version and task.</summary>
    public void Write(PredictionRecord r)
    {
        var headers = new Headers
        {
            { EmbeddingSinks.ModelVersionHeader, Encoding.UTF8.GetBytes(r.ModelVersion) },
            { EmbeddingSinks.TaskHeader, Encoding.UTF8.GetBytes(r.Task) },
        };
        var value = JsonSerializer.SerializeToUtf8Bytes(new { label = r.Label, probability = r.Probability });
        Produce(new Message<byte[], byte[]> { Key = Encoding.UTF8.GetBytes(r.Id), Value = value, Headers = headers });
    }

    /// <summary>On TOPIC.versions, keyed by version: compaction keeps each version's last state.</summary>
    public void Write(VersionRecord r) =>
        Produce(new Message<byte[], byte[]> { Key = Encoding.UTF8.GetBytes(r.Version), Value = r.ToJson() }, EmbeddingSinks.VersionsTopic(topic));

    void Produce(Message<byte[], byte[]> message, string? to = null)
    {
        while (true)
        {
            try
            {
                producer.Produce(to ?? topic, message, report => { if (report.Error.IsError) failed ??= report.Error; });
                return;
            }
            catch (ProduceException<byte[], byte[]> e) when (e.Error.Code == ErrorCode.Local_QueueFull)
            {
                producer.Poll(TimeSpan.FromMilliseconds(100));   // the local queue is full: let deliveries drain
            }
        }
    }

    public void Flush()
    {
        if (producer.Flush(FlushTimeout) > 0) throw new KafkaException(new Error(ErrorCode.Local_TimedOut, $"embeddings not acknowledged by {Name} within {FlushTimeout}"));
        if (failed is { } e)
        {
            failed = null;
            throw new KafkaException(e);
        }
    }

    public void Dispose() => producer.Dispose();
}

sealed class JsonlEmbeddingSink : IEmbeddingSink
{
    readonly StreamWriter writer, versions;
    readonly FileStream file, versionsFile;

    public string Name { get; }

    public JsonlEmbeddingSink(string path)
    {
        Name = "jsonl:" + path;
        var folder = Path.GetDirectoryName(Path.GetFullPath(path));
        if (folder is not null) Directory.CreateDirectory(folder);
        (file, writer) = Append(path);
        (versionsFile, versions) = Append(EmbeddingSinks.VersionsFile(path));
    }

    /// <summary>Opens the file to append; a last line a crash cut short is ended first, so it stays one bad line and
    /// the next record starts a line of its own.</summary>
    static (FileStream, StreamWriter) Append(string path)
    {
        var file = new FileStream(path, FileMode.OpenOrCreate, FileAccess.ReadWrite, FileShare.Read);
        var endsLine = file.Length == 0 || (file.Seek(-1, SeekOrigin.End) >= 0 && file.ReadByte() == '\n');
        file.Seek(0, SeekOrigin.End);
        var writer = new StreamWriter(file, new UTF8Encoding(false));
        if (!endsLine) writer.WriteLine();
        return (file, writer);
    }

    public void Write(VersionRecord r) => versions.WriteLine(Encoding.UTF8.GetString(r.ToJson()));

    public void Write(EmbeddingRecord r) => writer.WriteLine(JsonSerializer.Serialize(new
    {
        id = r.Id, modality = r.Modality, model_version = r.ModelVersion, dim = r.Vector.Length, vector = r.Vector,
    }));

    public void Write(PredictionRecord r) => writer.WriteLine(JsonSerializer.Serialize(new
    {
        id = r.Id, task = r.Task, model_version = r.ModelVersion, label = r.Label, probability = r.Probability,
    }));

    /// <summary>The vectors reach the disk before the version events that speak of them.</summary>
    public void Flush()
    {
        writer.Flush();
        file.Flush(flushToDisk: true);
        versions.Flush();
        versionsFile.Flush(flushToDisk: true);
    }

    public void Dispose()
    {
        writer.Dispose();
        versions.Dispose();
    }
}
