using Google.Protobuf;
using Onnx;
using static TorchSharp.torch;

namespace Mamo.Model.Published;

/// <summary>
/// What an ONNX model holds that an import needs: the graph's initializers (the weights) and its nodes (op, inputs,
/// outputs), which name the weights an exporter left anonymous. Read with OnnxSharp's onnx.proto messages, the schema
/// the export (OnnxExport) writes with. A damaged or hostile file gives InvalidDataException, never an out-of-range
/// read or an allocation larger than the file.
/// </summary>
public sealed class OnnxModel
{
    /// <summary>An initializer: its dims and float32 values (other element types keep an empty Values).</summary>
    public sealed record Initializer(string Name, int DataType, long[] Dims, float[] Values);

    public sealed record Node(string Op, string Name, IReadOnlyList<string> Inputs, IReadOnlyList<string> Outputs);

    public const int Float = (int)TensorProto.Types.DataType.Float;

    public IReadOnlyDictionary<string, Initializer> Initializers { get; }
    public IReadOnlyList<Node> Nodes { get; }
    public IReadOnlyList<string> Outputs { get; }

    OnnxModel(Dictionary<string, Initializer> initializers, List<Node> nodes, List<string> outputs) =>
        (Initializers, Nodes, Outputs) = (initializers, nodes, outputs);

    public static OnnxModel Load(string path)
    {
        var bytes = File.ReadAllBytes(path);
        try { return Parse(bytes); }
        catch (InvalidDataException e) { throw new InvalidDataException($"{path}: {e.Message}", e); }
    }

    public static OnnxModel Parse(ReadOnlyMemory<byte> model)
    {
        var graph = Read(model).Graph ?? throw new InvalidDataException("no graph: not an ONNX model");
        var initializers = new Dictionary<string, Initializer>();
        foreach (var t in graph.Initializer)
            if (!initializers.TryAdd(t.Name, ReadTensor(t))) throw new InvalidDataException($"initializer '{t.Name}' appears twice");
        var nodes = graph.Node.Select(n => new Node(n.OpType, n.Name, n.Input.ToList(), n.Output.ToList())).ToList();
        return new OnnxModel(initializers, nodes, graph.Output.Select(o => o.Name).ToList());
    }

    static ModelProto Read(ReadOnlyMemory<byte> model)
    {
        try { return ModelProto.Parser.ParseFrom(model.Span); }
        catch (InvalidProtocolBufferException e) { throw new InvalidDataException($"not an ONNX model: {e.Message}", e); }
    }

    /// <summary>The model with more graph outputs, so that a runtime hands back intermediate values (ONNX Runtime
    /// returns only graph outputs). Everything else is kept as it was.</summary>
    public static byte[] WithOutputs(ReadOnlyMemory<byte> model, IEnumerable<string> names)
    {
        var proto = Read(model);
        if (proto.Graph is null) throw new InvalidDataException("no graph: not an ONNX model");
        proto.Graph.Output.AddRange(names.Select(n => new ValueInfoProto { Name = n }));
        return proto.ToByteArray();
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

    static Initializer ReadTensor(TensorProto t)
    {
        if (t.DataLocation == TensorProto.Types.DataLocation.External)
            throw new InvalidDataException($"initializer '{t.Name}' keeps its data in an external file, which is not read");
        if (t.Dims.Any(d => d < 0)) throw new InvalidDataException($"initializer '{t.Name}' has a negative dim");
        long count = 1;
        foreach (var d in t.Dims)
            count = d == 0 || count <= long.MaxValue / 4 / d ? count * d : throw new InvalidDataException($"initializer '{t.Name}' has dims too large to hold");
        var values = Array.Empty<float>();
        if (t.DataType == Float)
        {
            if (!t.RawData.IsEmpty)
            {
                if (t.RawData.Length != count * 4) throw new InvalidDataException($"initializer '{t.Name}': {t.RawData.Length} raw bytes for {count} float32 values");
                values = new float[count];
                for (int i = 0; i < count; i++) values[i] = System.Buffers.Binary.BinaryPrimitives.ReadSingleLittleEndian(t.RawData.Span.Slice(i * 4, 4));
            }
            else if (t.FloatData.Count == count) values = t.FloatData.ToArray();
            else throw new InvalidDataException($"initializer '{t.Name}': {t.FloatData.Count} float values for {count} elements");
        }
        return new Initializer(t.Name, t.DataType, t.Dims.ToArray(), values);
    }
}
