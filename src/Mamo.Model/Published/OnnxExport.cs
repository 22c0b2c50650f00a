using Google.Protobuf;
using Onnx;
using static TorchSharp.torch;

namespace Mamo.Model.Published;

/// <summary>
/// `mamo export --format onnx`: the image and text encoders with their ITC projections and normalisation, as two ONNX
/// graphs (image_encoder.onnx: pixels [B, 3, S, S] -> embedding [B, E]; text_encoder.onnx: input_ids and attention_mask
/// [B, L] int64 -> embedding [B, E]) whose outputs are the embeddings `mamo embed` publishes. TorchSharp cannot trace,
/// so each graph is written module by module as the forward reads (Transformer.cs, Encoders.cs), in opset 17 with
/// OnnxSharp's protobuf messages. Weights keep the checkpoint's names and values; ONNX Runtime folds the transposes.
/// </summary>
public static class OnnxExport
{
    public const string ImageFile = "image_encoder.onnx", TextFile = "text_encoder.onnx";
    public const string Pixels = "pixels", InputIds = "input_ids", AttentionMask = "attention_mask", Embedding = "embedding";
    const int Opset = 17, IrVersion = 8;

    /// <summary>Writes both graphs of the model whose tensors are <paramref name="weights"/> into <paramref name="output"/>.</summary>
    public static void Write(MamoConfig c, IReadOnlyDictionary<string, Tensor> weights, string output, string version)
    {
        Directory.CreateDirectory(output);
        Save(Path.Combine(output, ImageFile), ImageEncoder(c, weights), version);
        Save(Path.Combine(output, TextFile), TextEncoder(c, weights), version);
    }

    static void Save(string path, GraphProto graph, string version)
    {
        var model = new ModelProto
        {
            IrVersion = IrVersion, ProducerName = "mamo", ProducerVersion = version, Graph = graph,
            OpsetImport = { new OperatorSetIdProto { Domain = "", Version = Opset } },
        };
        using (var file = File.Create(path + ".tmp")) model.WriteTo(file);
        File.Move(path + ".tmp", path, overwrite: true);
    }

    /// <summary>ImageEncoder.forward over every patch, then MamoModel.ImageEmbedding.</summary>
    static GraphProto ImageEncoder(MamoConfig c, IReadOnlyDictionary<string, Tensor> weights)
    {
        var g = new Graph("mamo_image_encoder", weights);
        var pixels = g.Input(Pixels, TensorProto.Types.DataType.Float, "batch", 3, c.ImageSize, c.ImageSize);
        var patches = g.Node("Conv", [pixels, g.Weight("image.patchEmbed.weight"), g.Weight("image.patchEmbed.bias")],
            Ints("kernel_shape", c.PatchSize, c.PatchSize), Ints("strides", c.PatchSize, c.PatchSize));      // [B, W, G, G]
        var x = g.Node("Transpose", [g.Node("Reshape", [patches, g.Int64s("shape_bwn", 0, c.Width, -1)])], Ints("perm", 0, 2, 1));   // [B, N, W]
        using var scope = NewDisposeScope();
        var positions = weights["image.positionEmbedding"];
        x = g.Node("Add", [x, g.Constant("image.patchPositions", positions[.., 1..])]);
        var cls = g.Constant("image.clsWithPosition", KeptScalars.Add(weights["image.clsToken"], positions[.., ..1]));   // [1, 1, W]
        var batch = g.Node("Slice", [g.Node("Shape", [pixels]), g.Int64s("zero", 0), g.Int64s("one", 1)]);
        var clsShape = g.Node("Concat", [batch, g.Int64s("one_width", 1, c.Width)], Int("axis", 0));
        x = g.Node("Concat", [g.Node("Expand", [cls, clsShape]), x], Int("axis", 1));                        // [B, 1 + N, W]
        x = g.Stack("image.blocks", x, c.ImageLayers, c, postLn: false, c.ImageNormEps, bias: null);
        return g.Output(g.Embedding(x, "imageProjection"), c.EmbedDim);
    }

    /// <summary>TextEncoder.forward, then MamoModel.TextEmbedding.</summary>
    static GraphProto TextEncoder(MamoConfig c, IReadOnlyDictionary<string, Tensor> weights)
    {
        var g = new Graph("mamo_text_encoder", weights);
        var ids = g.Input(InputIds, TensorProto.Types.DataType.Int64, "batch", "length");
        var mask = g.Input(AttentionMask, TensorProto.Types.DataType.Int64, "batch", "length");
        var bert = c.TextLayout == TextLayouts.Bert;
        var length = g.Node("Slice", [g.Node("Shape", [ids]), g.Int64s("one", 1), g.Int64s("two", 2)]);
        var positions = g.Node("Slice", [g.Weight("text.positionEmbedding"), g.Int64s("zero", 0), length, g.Int64s("one", 1)]);
        var x = g.Node("Add", [g.Node("Gather", [g.Weight("text.wordEmbedding.weight"), ids]), positions]);
        if (bert)
        {
            using var scope = NewDisposeScope();
            x = g.Node("Add", [x, g.Constant("text.tokenType0", weights["text.tokenTypeEmbedding"][0])]);
        }
        var eps = bert ? TextLayouts.BertEps : 1e-5;
        x = g.LayerNorm(x, "text.embeddingNorm", eps);
        // BlockStack.PaddingBias: 0 where a token is kept, -inf where it is padding; [B, 1, 1, L].
        var padding = g.Node("Equal", [mask, g.Scalar(0)]);
        var bias = g.Node("Unsqueeze", [g.Node("Where", [padding, g.Floats("minus_inf", float.NegativeInfinity), g.Floats("zero_float", 0f)]),
            g.Int64s("axes_1_2", 1, 2)]);
        x = g.Stack("text.blocks", x, c.TextLayers, c, postLn: bert, eps, bias);
        return g.Output(g.Embedding(x, "textProjection"), c.EmbedDim);
    }

    static AttributeProto Ints(string name, params long[] values) => new() { Name = name, Type = AttributeProto.Types.AttributeType.Ints, Ints = { values } };
    static AttributeProto Int(string name, long value) => new() { Name = name, Type = AttributeProto.Types.AttributeType.Int, I = value };
    static AttributeProto Float(string name, float value) => new() { Name = name, Type = AttributeProto.Types.AttributeType.Float, F = value };

    /// <summary>A graph written node by node: each node's output is a fresh name; weights become initializers once.</summary>
    sealed class Graph(string name, IReadOnlyDictionary<string, Tensor> weights)
    {
        readonly GraphProto graph = new() { Name = name };
        readonly HashSet<string> initializers = [];
        int nodes;

        public string Input(string input, TensorProto.Types.DataType type, params object[] dims)
        {
            graph.Input.Add(Value(input, type, dims));
            return input;
        }

        public GraphProto Output(string value, int dim)
        {
            if (graph.Node[^1].Output[0] != value) throw new InvalidOperationException($"{value} is not the last node's output");
            graph.Node[^1].Output[0] = OnnxExport.Embedding;   // the last node writes the graph's output
            graph.Output.Add(Value(OnnxExport.Embedding, TensorProto.Types.DataType.Float, ["batch", dim]));
            return graph;
        }

        static ValueInfoProto Value(string name, TensorProto.Types.DataType type, object[] dims)
        {
            var shape = new TensorShapeProto();
            foreach (var d in dims)
                shape.Dim.Add(d is string symbol ? new TensorShapeProto.Types.Dimension { DimParam = symbol }
                    : new TensorShapeProto.Types.Dimension { DimValue = Convert.ToInt64(d) });
            return new ValueInfoProto { Name = name, Type = new TypeProto { TensorType = new TypeProto.Types.Tensor { ElemType = (int)type, Shape = shape } } };
        }

        public string Node(string op, string[] inputs, params AttributeProto[] attributes)
        {
            var output = $"{op}_{nodes++}";
            graph.Node.Add(new NodeProto { OpType = op, Name = output, Input = { inputs }, Output = { output }, Attribute = { attributes } });
            return output;
        }

        /// <summary>A checkpoint tensor, under its own name.</summary>
        public string Weight(string tensor) => Constant(tensor, weights.TryGetValue(tensor, out var t) ? t
            : throw new InvalidDataException($"the checkpoint has no tensor {tensor}"));

        public string Constant(string constant, Tensor value) => Initializer(constant, () =>
        {
            using var scope = NewDisposeScope();
            var data = value.to(ScalarType.Float32).cpu().contiguous().data<float>().ToArray();
            var bytes = new byte[data.Length * sizeof(float)];
            Buffer.BlockCopy(data, 0, bytes, 0, bytes.Length);   // little-endian, as ONNX's raw_data is
            return new TensorProto { DataType = (int)TensorProto.Types.DataType.Float, Dims = { value.shape }, RawData = ByteString.CopyFrom(bytes) };
        });

        /// <summary>A float scalar.</summary>
        public string Floats(string constant, float value) =>
            Initializer(constant, () => new TensorProto { DataType = (int)TensorProto.Types.DataType.Float, FloatData = { value } });

        /// <summary>A 1-D int64 tensor.</summary>
        public string Int64s(string constant, params long[] values) =>
            Initializer(constant, () => new TensorProto { DataType = (int)TensorProto.Types.DataType.Int64, Dims = { values.Length }, Int64Data = { values } });

        /// <summary>An int64 scalar.</summary>
        public string Scalar(long value) =>
            Initializer($"scalar_{value}", () => new TensorProto { DataType = (int)TensorProto.Types.DataType.Int64, Int64Data = { value } });

        /// <summary>The initializer of that name, made once.</summary>
        string Initializer(string name, Func<TensorProto> make)
        {
            if (initializers.Add(name))
            {
                var tensor = make();
                tensor.Name = name;
                graph.Initializer.Add(tensor);
            }
            return name;
        }

        /// <summary>nn.Linear: x W^T + b.</summary>
        public string Linear(string x, string prefix) =>
            Node("Add", [Node("MatMul", [x, Node("Transpose", [Weight(prefix + ".weight")])]), Weight(prefix + ".bias")]);

        public string LayerNorm(string x, string prefix, double eps) =>
            Node("LayerNormalization", [x, Weight(prefix + ".weight"), Weight(prefix + ".bias")], Int("axis", -1), Float("epsilon", (float)eps));

        /// <summary>Exact GELU, as functional.gelu: x/2 (1 + erf(x / sqrt 2)).</summary>
        string Gelu(string x) =>
            Node("Mul", [Node("Mul", [x, Node("Add", [Node("Erf", [Node("Div", [x, Floats("sqrt2", MathF.Sqrt(2))])]), Floats("one_float", 1f)])]), Floats("half", 0.5f)]);

        /// <summary>SelfAttention.forward: qkv, heads, softmax(q k^T / sqrt(D) + bias) v, proj.</summary>
        string Attention(string x, string prefix, MamoConfig c, string? bias)
        {
            var d = c.Width / c.Heads;
            var qkv = Node("Transpose", [Node("Reshape", [Linear(x, prefix + ".qkv"), Int64s("shape_qkv", 0, 0, 3, c.Heads, d)])], Ints("perm", 2, 0, 3, 1, 4));
            string Part(int i) => Node("Gather", [qkv, Scalar(i)], Int("axis", 0));
            var (q, k, v) = (Part(0), Part(1), Part(2));                                                          // [B, H, L, D]
            var scores = Node("Mul", [Node("MatMul", [q, Node("Transpose", [k], Ints("perm", 0, 1, 3, 2))]), Floats($"scale_{d}", 1f / MathF.Sqrt(d))]);
            if (bias is not null) scores = Node("Add", [scores, bias]);
            var y = Node("MatMul", [Node("Softmax", [scores], Int("axis", -1)), v]);                                // [B, H, L, D]
            y = Node("Reshape", [Node("Transpose", [y], Ints("perm", 0, 2, 1, 3)), Int64s("shape_bl_w", 0, 0, c.Width)]);
            return Linear(y, prefix + ".proj");
        }

        /// <summary>BlockStack.forward: pre-LN blocks and a final norm, or post-LN (BERT) blocks.</summary>
        public string Stack(string prefix, string x, int layers, MamoConfig c, bool postLn, double eps, string? bias)
        {
            for (var i = 0; i < layers; i++)
            {
                var block = $"{prefix}.blocks.{i}";
                string Mlp(string h) => Linear(Gelu(Linear(h, block + ".mlp.fc")), block + ".mlp.proj");
                if (postLn)
                {
                    x = LayerNorm(Node("Add", [x, Attention(x, block + ".attn", c, bias)]), block + ".ln1", eps);
                    x = LayerNorm(Node("Add", [x, Mlp(x)]), block + ".ln2", eps);
                }
                else
                {
                    x = Node("Add", [x, Attention(LayerNorm(x, block + ".ln1", eps), block + ".attn", c, bias)]);
                    x = Node("Add", [x, Mlp(LayerNorm(x, block + ".ln2", eps))]);
                }
            }
            return postLn ? x : LayerNorm(x, prefix + ".lnFinal", eps);
        }

        /// <summary>MamoModel's ITC embedding: the [CLS] token, projected, divided by its L2 norm (at least 1e-12, as
        /// F.normalize).</summary>
        public string Embedding(string x, string projection)
        {
            var projected = Linear(Node("Gather", [x, Scalar(0)], Int("axis", 1)), projection);                  // [B, E]
            var norm = Node("Max", [Node("ReduceL2", [projected], Ints("axes", -1), Int("keepdims", 1)), Floats("eps_normalize", 1e-12f)]);
            return Node("Div", [projected, norm]);
        }
    }
}
