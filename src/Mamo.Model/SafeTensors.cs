using System.Buffers.Binary;
using System.Text;
using System.Text.Json;
using static TorchSharp.torch;

namespace Mamo.Model;

/// <summary>The safetensors format (an 8-byte little-endian header length, a JSON header, then raw little-endian
/// data), so that PyTorch and other tools read our checkpoints. Reading validates every offset: a damaged or
/// hostile file gives InvalidDataException, never an out-of-range read. Files are streamed tensor by tensor in chunks,
/// so neither a file nor a tensor is capped at 2 GB.</summary>
public static class SafeTensors
{
    const long MaxHeaderBytes = 100_000_000;
    /// <summary>Bytes moved between a tensor and the file at a time.</summary>
    const long ChunkBytes = 64L << 20;

    static readonly Dictionary<ScalarType, (string Name, int Size)> DTypes = new()
    {
        [ScalarType.Float32] = ("F32", 4), [ScalarType.Int64] = ("I64", 8), [ScalarType.Float64] = ("F64", 8),
        [ScalarType.Int32] = ("I32", 4), [ScalarType.Float16] = ("F16", 2), [ScalarType.BFloat16] = ("BF16", 2),
        [ScalarType.Byte] = ("U8", 1),
    };

    public static void Save(string path, IEnumerable<(string Name, Tensor Value)> tensors, IReadOnlyDictionary<string, string>? metadata = null)
    {
        using var scope = NewDisposeScope();
        var items = tensors.Select(t => (t.Name, Value: t.Value.detach().cpu().contiguous())).ToList();
        var header = new Dictionary<string, object>();
        if (metadata is not null) header["__metadata__"] = metadata;
        long offset = 0;
        foreach (var (name, value) in items)
        {
            if (!DTypes.TryGetValue(value.dtype, out var dt)) throw new NotSupportedException($"dtype {value.dtype} of '{name}'");
            long bytes = value.numel() * dt.Size;
            header[name] = new { dtype = dt.Name, shape = value.shape, data_offsets = new[] { offset, offset + bytes } };
            offset += bytes;
        }
        var json = Encoding.UTF8.GetBytes(JsonSerializer.Serialize(header));
        int padded = (json.Length + 7) / 8 * 8;   // the data starts 8-byte aligned
        using var file = new FileStream(path, FileMode.Create, FileAccess.Write, FileShare.None, 1 << 20);
        Span<byte> len = stackalloc byte[8];
        BinaryPrimitives.WriteInt64LittleEndian(len, padded);
        file.Write(len);
        file.Write(json);
        for (int i = json.Length; i < padded; i++) file.WriteByte((byte)' ');
        foreach (var (_, value) in items) WriteTensor(file, value);
        file.Flush(flushToDisk: true);
    }

    /// <summary>Loads every tensor onto the CPU. The caller owns them.</summary>
    public static Dictionary<string, Tensor> Load(string path) => Load(path, out _);

    public static Dictionary<string, Tensor> Load(string path, out Dictionary<string, string> metadata) => Read(path, readData: true, out metadata);

    /// <summary>Validates the header against the file (every dtype, shape and offset) without reading any tensor.</summary>
    public static void Check(string path) => Read(path, readData: false, out _);

    static Dictionary<string, Tensor> Read(string path, bool readData, out Dictionary<string, string> metadata)
    {
        using var file = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read, 1 << 20);
        long fileLength = file.Length;
        if (fileLength < 8) throw new InvalidDataException($"{path}: too short for a safetensors file");
        Span<byte> len = stackalloc byte[8];
        file.ReadExactly(len);
        long headerLength = BinaryPrimitives.ReadInt64LittleEndian(len);
        if (headerLength <= 0 || headerLength > MaxHeaderBytes || 8 + headerLength > fileLength)
            throw new InvalidDataException($"{path}: header length {headerLength} does not fit a file of {fileLength} bytes");
        var header = new byte[headerLength];
        file.ReadExactly(header);
        long dataStart = 8 + headerLength;
        long dataLength = fileLength - dataStart;
        metadata = new();
        var result = new Dictionary<string, Tensor>();
        var ranges = new List<(long Begin, long End)>();
        var names = new HashSet<string>();
        try
        {
            using (var doc = JsonDocument.Parse(header))
            {
                if (doc.RootElement.ValueKind != JsonValueKind.Object) throw new InvalidDataException($"{path}: header is not a JSON object");
                foreach (var entry in doc.RootElement.EnumerateObject())
                {
                    if (entry.Name == "__metadata__")
                    {
                        foreach (var m in entry.Value.EnumerateObject()) metadata[m.Name] = m.Value.GetString() ?? "";
                        continue;
                    }
                    if (!names.Add(entry.Name)) throw new InvalidDataException($"{path}: '{entry.Name}' appears twice");
                    var (dtype, shape, begin) = ReadEntry(path, entry, dataLength, ranges);
                    if (!readData) continue;
                    var t = result[entry.Name] = empty(shape, dtype);
                    file.Position = dataStart + begin;
                    ReadTensor(file, t);
                }
            }
        }
        catch (Exception e) when (e is JsonException or InvalidOperationException or FormatException or KeyNotFoundException or OverflowException)
        {
            foreach (var t in result.Values) t.Dispose();
            throw new InvalidDataException($"{path}: malformed safetensors header: {e.Message}", e);
        }
        catch
        {
            foreach (var t in result.Values) t.Dispose();
            throw;
        }
        return result;
    }

    /// <summary>The entry's dtype and shape, and where its bytes begin, after every check.</summary>
    static (ScalarType DType, long[] Shape, long Begin) ReadEntry(string path, JsonProperty entry, long dataLength, List<(long Begin, long End)> ranges)
    {
        var dtypeName = entry.Value.GetProperty("dtype").GetString();
        var (dtype, size) = DTypes.Where(d => d.Value.Name == dtypeName).Select(d => (d.Key, d.Value.Size)).FirstOrDefault();
        if (dtypeName is null || size == 0) throw new InvalidDataException($"{path}: '{entry.Name}' has unsupported dtype {dtypeName}");
        var shape = entry.Value.GetProperty("shape").EnumerateArray().Select(e => e.GetInt64()).ToArray();
        var offsets = entry.Value.GetProperty("data_offsets").EnumerateArray().Select(e => e.GetInt64()).ToArray();
        if (shape.Any(s => s < 0) || offsets.Length != 2) throw new InvalidDataException($"{path}: '{entry.Name}' has a bad shape or offsets");
        long count = 1;
        foreach (var s in shape) count = checked(count * s);
        long begin = offsets[0], end = offsets[1];
        if (begin < 0 || end < begin || end > dataLength || end - begin != checked(count * size))
            throw new InvalidDataException($"{path}: '{entry.Name}' offsets [{begin}, {end}) do not match shape [{string.Join(",", shape)}] within {dataLength} data bytes");
        // Tensors may not share bytes: otherwise a small file could make the reader allocate without bound.
        if (end > begin && ranges.Any(r => begin < r.End && r.Begin < end))
            throw new InvalidDataException($"{path}: '{entry.Name}' overlaps another tensor's bytes");
        ranges.Add((begin, end));
        return (dtype, shape, begin);
    }

    /// <summary>Fills a contiguous CPU tensor from the stream, a chunk of whole elements at a time.</summary>
    static void ReadTensor(Stream file, Tensor t)
    {
        using var scope = NewDisposeScope();
        var flat = t.view(-1);
        long count = flat.shape[0], perChunk = Math.Max(1, ChunkBytes / t.ElementSize);
        var buffer = new byte[Math.Min(count, perChunk) * t.ElementSize];
        for (long start = 0; start < count; start += perChunk)
        {
            long n = Math.Min(perChunk, count - start);
            var bytes = buffer.AsSpan(0, (int)(n * t.ElementSize));
            file.ReadExactly(bytes);
            var chunk = empty(n, t.dtype);
            chunk.bytes = bytes;
            flat.narrow(0, start, n).copy_(chunk);
        }
    }

    static void WriteTensor(Stream file, Tensor t)
    {
        using var scope = NewDisposeScope();
        var flat = t.view(-1);
        long count = flat.shape[0], perChunk = Math.Max(1, ChunkBytes / t.ElementSize);
        for (long start = 0; start < count; start += perChunk)
            file.Write(flat.narrow(0, start, Math.Min(perChunk, count - start)).contiguous().bytes);
    }
}
