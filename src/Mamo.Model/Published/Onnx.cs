using System.Buffers.Binary;
using System.Text;
using static TorchSharp.torch;

namespace Mamo.Model.Published;

/// <summary>
/// What an ONNX model holds that an import needs, read straight from its protobuf (onnx.proto3): the graph's
/// initializers (the weights) and its nodes (op, inputs, outputs), which name the weights an exporter left anonymous.
/// Only the fields used are decoded; every other field is skipped by its wire type. A damaged or hostile file gives
/// InvalidDataException, never an out-of-range read or an allocation larger than the file.
/// </summary>
public sealed class OnnxModel
{
    /// <summary>An initializer: its dims and float32 values (other element types keep an empty Values).</summary>
    public sealed record Initializer(string Name, int DataType, long[] Dims, float[] Values);

    public sealed record Node(string Op, string Name, IReadOnlyList<string> Inputs, IReadOnlyList<string> Outputs);

    public const int Float = 1;

    public IReadOnlyDictionary<string, Initializer> Initializers { get; }
    public IReadOnlyList<Node> Nodes { get; }
    public IReadOnlyList<string> Outputs { get; }

    OnnxModel(Dictionary<string, Initializer> initializers, List<Node> nodes, List<string> outputs) =>
        (Initializers, Nodes, Outputs) = (initializers, nodes, outputs);

    // Field numbers of onnx.proto3.
    const int ModelGraph = 7;
    const int GraphNode = 1, GraphInitializer = 5, GraphOutput = 12;
    const int NodeInput = 1, NodeOutput = 2, NodeName = 3, NodeOp = 4;
    const int TensorDims = 1, TensorDataType = 2, TensorFloatData = 4, TensorName = 8, TensorRawData = 9, TensorDataLocation = 14;
    const int ValueInfoName = 1;

    public static OnnxModel Load(string path)
    {
        var bytes = File.ReadAllBytes(path);
        try { return Parse(bytes); }
        catch (InvalidDataException e) { throw new InvalidDataException($"{path}: {e.Message}", e); }
    }

    public static OnnxModel Parse(ReadOnlyMemory<byte> model)
    {
        var initializers = new Dictionary<string, Initializer>();
        var nodes = new List<Node>();
        var outputs = new List<string>();
        var graphs = 0;
        foreach (var (field, value) in Fields(model))
        {
            if (field != ModelGraph) continue;
            if (++graphs > 1) throw new InvalidDataException("more than one graph");
            foreach (var (gf, gv) in Fields(value.Bytes))
            {
                if (gf == GraphNode) nodes.Add(ReadNode(gv.Bytes));
                else if (gf == GraphInitializer)
                {
                    var t = ReadTensor(gv.Bytes);
                    if (!initializers.TryAdd(t.Name, t)) throw new InvalidDataException($"initializer '{t.Name}' appears twice");
                }
                else if (gf == GraphOutput)
                    outputs.AddRange(Fields(gv.Bytes).Where(f => f.Field == ValueInfoName).Select(f => Text(f.Value)));
            }
        }
        if (graphs == 0) throw new InvalidDataException("no graph: not an ONNX model");
        return new OnnxModel(initializers, nodes, outputs);
    }

    /// <summary>The model with more graph outputs, so that a runtime hands back intermediate values (ONNX Runtime
    /// returns only graph outputs). Every other byte is kept as it was.</summary>
    public static byte[] WithOutputs(ReadOnlyMemory<byte> model, IEnumerable<string> names)
    {
        using var result = new MemoryStream();
        foreach (var (field, value) in Fields(model))
        {
            if (field != ModelGraph) { result.Write(value.Raw.Span); continue; }
            using var graph = new MemoryStream();
            graph.Write(value.Bytes.Span);
            foreach (var name in names)
            {
                var info = LengthDelimited(ValueInfoName, Encoding.UTF8.GetBytes(name));
                graph.Write(LengthDelimited(GraphOutput, info));
            }
            result.Write(LengthDelimited(ModelGraph, graph.ToArray()));
        }
        return result.ToArray();
    }

    /// <summary>A weight as a CPU tensor (the caller owns it); a clear error if it is missing or not float32.</summary>
    public Tensor Tensor(string name)
    {
        if (!Initializers.TryGetValue(name, out var t)) throw new InvalidDataException($"the ONNX model has no initializer '{name}'");
        if (t.DataType != Float) throw new InvalidDataException($"initializer '{name}' has ONNX data type {t.DataType}, not float32 (1)");
        return tensor(t.Values, t.Dims);
    }

    /// <summary>The node that produces <paramref name="output"/>, if any.</summary>
    public Node? Producer(string output) => Nodes.FirstOrDefault(n => n.Outputs.Contains(output));

    static Node ReadNode(ReadOnlyMemory<byte> bytes)
    {
        string op = "", name = "";
        var inputs = new List<string>();
        var outputs = new List<string>();
        foreach (var (f, v) in Fields(bytes))
        {
            if (f == NodeInput) inputs.Add(Text(v));
            else if (f == NodeOutput) outputs.Add(Text(v));
            else if (f == NodeName) name = Text(v);
            else if (f == NodeOp) op = Text(v);
        }
        return new Node(op, name, inputs, outputs);
    }

    static Initializer ReadTensor(ReadOnlyMemory<byte> bytes)
    {
        string name = "";
        int dataType = 0;
        var dims = new List<long>();
        ReadOnlyMemory<byte>? raw = null;
        var floats = new List<float>();
        foreach (var (f, v) in Fields(bytes))
        {
            switch (f)
            {
                case TensorName: name = Text(v); break;
                case TensorDataType: dataType = (int)v.Varint; break;
                case TensorDims when v.WireType == 0: dims.Add((long)v.Varint); break;
                case TensorDims: dims.AddRange(PackedVarints(v.Bytes).Select(d => (long)d)); break;
                case TensorRawData: raw = v.Bytes; break;
                case TensorFloatData when v.WireType == 5: floats.Add(BinaryPrimitives.ReadSingleLittleEndian(v.Bytes.Span)); break;
                case TensorFloatData: floats.AddRange(PackedFloats(v.Bytes)); break;
                case TensorDataLocation when v.Varint != 0: throw new InvalidDataException($"initializer '{name}' keeps its data in an external file, which is not read");
            }
        }
        if (dims.Any(d => d < 0)) throw new InvalidDataException($"initializer '{name}' has a negative dim");
        long count = 1;
        foreach (var d in dims)
            count = d == 0 || count <= long.MaxValue / 4 / d ? count * d : throw new InvalidDataException($"initializer '{name}' has dims too large to hold");
        var values = Array.Empty<float>();
        if (dataType == Float)
        {
            if (raw is { } r)
            {
                if (r.Length != count * 4) throw new InvalidDataException($"initializer '{name}': {r.Length} raw bytes for {count} float32 values");
                values = new float[count];
                for (int i = 0; i < count; i++) values[i] = BinaryPrimitives.ReadSingleLittleEndian(r.Span.Slice(i * 4, 4));
            }
            else if (floats.Count == count) values = floats.ToArray();
            else throw new InvalidDataException($"initializer '{name}': {floats.Count} float values for {count} elements");
        }
        return new Initializer(name, dataType, dims.ToArray(), values);
    }

    /// <summary>A field's value: a varint (wire type 0), or its bytes (2: the payload, 1 and 5: the fixed bytes);
    /// Raw is the whole field with its tag, for copying it unchanged.</summary>
    readonly record struct Value(int WireType, ulong Varint, ReadOnlyMemory<byte> Bytes, ReadOnlyMemory<byte> Raw);

    static string Text(Value v) => v.WireType == 2 ? Encoding.UTF8.GetString(v.Bytes.Span) : throw new InvalidDataException($"a string field has wire type {v.WireType}");

    static IEnumerable<(int Field, Value Value)> Fields(ReadOnlyMemory<byte> message)
    {
        int i = 0;
        while (i < message.Length)
        {
            int start = i;
            var tag = Varint(message.Span, ref i);
            int field = (int)(tag >> 3), wire = (int)(tag & 7);
            if (field == 0) throw new InvalidDataException($"field number 0 at byte {start}");
            Value value;
            switch (wire)
            {
                case 0: value = new Value(0, Varint(message.Span, ref i), default, default); break;
                case 1 or 5:
                    int size = wire == 1 ? 8 : 4;
                    if (i + size > message.Length) throw new InvalidDataException($"a fixed field runs past the end at byte {start}");
                    value = new Value(wire, 0, message.Slice(i, size), default);
                    i += size;
                    break;
                case 2:
                    var length = Varint(message.Span, ref i);
                    if (length > (ulong)(message.Length - i)) throw new InvalidDataException($"field {field} at byte {start} claims {length} bytes, past the end");
                    value = new Value(2, 0, message.Slice(i, (int)length), default);
                    i += (int)length;
                    break;
                default: throw new InvalidDataException($"unsupported wire type {wire} at byte {start}");
            }
            yield return (field, value with { Raw = message[start..i] });
        }
    }

    static ulong Varint(ReadOnlySpan<byte> bytes, ref int i)
    {
        ulong result = 0;
        for (int shift = 0; shift < 64; shift += 7)
        {
            if (i >= bytes.Length) throw new InvalidDataException("a varint runs past the end");
            var b = bytes[i++];
            result |= (ulong)(b & 0x7f) << shift;
            if (b < 0x80) return result;
        }
        throw new InvalidDataException("a varint longer than 10 bytes");
    }

    static IEnumerable<ulong> PackedVarints(ReadOnlyMemory<byte> bytes)
    {
        int i = 0;
        var list = new List<ulong>();
        while (i < bytes.Length) list.Add(Varint(bytes.Span, ref i));
        return list;
    }

    static IEnumerable<float> PackedFloats(ReadOnlyMemory<byte> bytes)
    {
        if (bytes.Length % 4 != 0) throw new InvalidDataException("packed floats are not a whole number of float32s");
        for (int i = 0; i < bytes.Length; i += 4) yield return BinaryPrimitives.ReadSingleLittleEndian(bytes.Span.Slice(i, 4));
    }

    static byte[] LengthDelimited(int field, byte[] payload)
    {
        using var s = new MemoryStream();
        WriteVarint(s, (ulong)(field << 3 | 2));
        WriteVarint(s, (ulong)payload.Length);
        s.Write(payload);
        return s.ToArray();
    }

    static void WriteVarint(Stream s, ulong v)
    {
        while (v >= 0x80) { s.WriteByte((byte)(v | 0x80)); v >>= 7; }
        s.WriteByte((byte)v);
    }
}
