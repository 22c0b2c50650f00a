using System.Text;
using Confluent.Kafka;

namespace Mamo.Data.Kafka;

/// <summary>
/// The record format of image-text pairs on Kafka (docs/KAFKA.md): key = sample id (UTF-8), value = the encoded
/// image, one header <c>caption</c> per caption (UTF-8), optional headers <c>content-type</c> and <c>label</c> (the class of
/// a labelled stream, for fine-tuning). Dead letters keep
/// the original key, value and headers and add <c>error</c> and <c>source-offset</c>.
/// </summary>
public static class KafkaRecords
{
    public const string CaptionHeader = "caption", ContentTypeHeader = "content-type", LabelHeader = "label";
    public const string ErrorHeader = "error", SourceOffsetHeader = "source-offset";

    static readonly UTF8Encoding StrictUtf8 = new(encoderShouldEmitUTF8Identifier: false, throwOnInvalidBytes: true);

    /// <summary>The stream a record belongs to, as positions and checkpoints name it.</summary>
    public static string PartitionKey(string topic, int partition) => $"{topic}/{partition}";

    /// <summary>A partition key's topic and partition number, as text ("TOPIC/N" → ("TOPIC", "N")).</summary>
    public static (string Topic, string Partition) SplitPartitionKey(string key)
    {
        var slash = key.LastIndexOf('/');
        return slash < 0 ? ("", key) : (key[..slash], key[(slash + 1)..]);
    }

    public static Message<byte[]?, byte[]?> ToMessage(ImageTextSample sample, string? contentType = null)
    {
        var headers = new Headers();
        foreach (var caption in sample.Captions) headers.Add(CaptionHeader, Encoding.UTF8.GetBytes(caption));
        if (contentType is not null) headers.Add(ContentTypeHeader, Encoding.UTF8.GetBytes(contentType));
        if (sample.Label is not null) headers.Add(LabelHeader, Encoding.UTF8.GetBytes(sample.Label));
        return new Message<byte[]?, byte[]?> { Key = Encoding.UTF8.GetBytes(sample.Id), Value = sample.Image, Headers = headers };
    }

    /// <summary>A consumed record as a sample, or as a dead letter saying what is wrong with it. Never throws.</summary>
    public static SourceItem Read(string topic, int partition, long offset, byte[]? key, byte[]? value, Headers? headers, SourceLimits limits)
    {
        var position = new SourcePosition(PartitionKey(topic, partition), offset);
        var location = $"{topic}/{partition}@{offset}";
        BadItem Bad(string reason) => new(new BadInput(reason, location, position));

        string id;
        if (key is null || key.Length == 0) id = location;
        else if (TryUtf8(key, out var text)) id = text;
        else return Bad("invalid UTF-8 in key");
        if (value is null || value.Length == 0) return Bad("empty value (no image)");
        if (value.LongLength > limits.MaxImageBytes) return Bad($"image of {value.LongLength} bytes exceeds {limits.MaxImageBytes}");

        var raw = new List<string>();
        string? label = null;
        foreach (var header in headers ?? [])
        {
            if (header.Key == LabelHeader)
            {
                if (!TryUtf8(header.GetValueBytes() ?? [], out label)) return Bad("invalid UTF-8 in label header");
                if (label.Length > limits.MaxCaptionChars) return Bad($"label longer than {limits.MaxCaptionChars} characters");
                continue;
            }
            if (header.Key != CaptionHeader) continue;
            if (!TryUtf8(header.GetValueBytes() ?? [], out var caption)) return Bad("invalid UTF-8 in caption header");
            raw.Add(caption);
        }
        if (raw.Count == 0) return Bad($"no '{CaptionHeader}' header");
        var captions = Captions.Validate(raw, limits, out var reason);
        if (captions is null) return Bad(reason!);
        return new SampleItem(new ImageTextSample(id, value, captions, position, string.IsNullOrWhiteSpace(label) ? null : label));
    }

    /// <summary>The dead-letter copy of a record: its key, value and headers, plus why and where it came from.</summary>
    public static Message<byte[]?, byte[]?> DeadLetter(byte[]? key, byte[]? value, Headers? headers, string error, string sourceOffset)
    {
        var copy = new Headers();
        foreach (var h in headers ?? []) copy.Add(h.Key, h.GetValueBytes());
        copy.Add(ErrorHeader, Encoding.UTF8.GetBytes(error));
        copy.Add(SourceOffsetHeader, Encoding.UTF8.GetBytes(sourceOffset));
        return new Message<byte[]?, byte[]?> { Key = key, Value = value, Headers = copy };
    }

    static bool TryUtf8(byte[] bytes, [System.Diagnostics.CodeAnalysis.NotNullWhen(true)] out string? text)
    {
        try { text = StrictUtf8.GetString(bytes); return true; }
        catch (DecoderFallbackException) { text = null; return false; }
    }
}
