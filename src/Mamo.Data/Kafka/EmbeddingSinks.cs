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

/// <summary>Where a model version's outputs go, its embeddings and (fine-tuned) its predictions: a Kafka topic
/// (kafka://HOST:PORT/TOPIC) or a JSONL file (jsonl:PATH).</summary>
public interface IEmbeddingSink : IDisposable
{
    string Name { get; }
    void Write(EmbeddingRecord record);
    void Write(PredictionRecord record);
    /// <summary>Returns once everything written is acknowledged (Kafka: acks=all) or on disk.</summary>
    void Flush();
}

public static class EmbeddingSinks
{
    public const string ModelVersionHeader = "model-version", ModalityHeader = "modality", DimHeader = "dim", TaskHeader = "task";

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

    void Produce(Message<byte[], byte[]> message)
    {
        while (true)
        {
            try
            {
                producer.Produce(topic, message, report => { if (report.Error.IsError) failed ??= report.Error; });
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
    readonly StreamWriter writer;
    readonly FileStream file;

    public string Name { get; }

    public JsonlEmbeddingSink(string path)
    {
        Name = "jsonl:" + path;
        var folder = Path.GetDirectoryName(Path.GetFullPath(path));
        if (folder is not null) Directory.CreateDirectory(folder);
        file = new FileStream(path, FileMode.Append, FileAccess.Write, FileShare.Read);
        writer = new StreamWriter(file, new UTF8Encoding(false));
    }

    public void Write(EmbeddingRecord r) => writer.WriteLine(JsonSerializer.Serialize(new
    {
        id = r.Id, modality = r.Modality, model_version = r.ModelVersion, dim = r.Vector.Length, vector = r.Vector,
    }));

    public void Write(PredictionRecord r) => writer.WriteLine(JsonSerializer.Serialize(new
    {
        id = r.Id, task = r.Task, model_version = r.ModelVersion, label = r.Label, probability = r.Probability,
    }));

    public void Flush()
    {
        writer.Flush();
        file.Flush(flushToDisk: true);
    }

    public void Dispose() => writer.Dispose();
}
