using System.Diagnostics;
using Akka.Actor;
using Serilog;
using TorchSharp;
using static TorchSharp.torch;

namespace Mamo.Actors.Cluster;

/// <summary>The data plane: moves named tensors (weights, deltas, gradients) to an actor on another node as chunks of at
/// most chunk-size bytes, a window of them in flight, each acknowledged. Akka.NET keeps one TCP connection per pair of
/// nodes, so no frame is ever larger than a chunk and heartbeats never wait behind a model. Tensors travel in the
/// transfer's dtype (float32, bfloat16 or float16) and arrive as float32.</summary>
public static class WeightTransfer
{
    /// <summary>What a transfer carries: θ for a round (Weights), a replica's change of it (Delta), an every-step replica's
    /// features for the all-gather (Features), all of them back (Gathered), or its gradient (Gradient).</summary>
    public enum Kind { Weights, Delta, Features, Gathered, Gradient }

    /// <summary>A transfer's identity: its kind, the round attempt it belongs to, and the node it comes from ("" from a
    /// coordinator).</summary>
    public sealed record Tag(Kind Kind, long Attempt, string Node = "");

    /// <summary>Announces a transfer: what it is (Tag), the tensors' names and shapes, the wire dtype and the chunk size.</summary>
    public sealed record Offer(Guid Id, Tag Tag, IReadOnlyList<string> Names, IReadOnlyList<long[]> Shapes, string DType, int ChunkSize) : IClusterMessage;
    /// <summary>Bytes [Index · ChunkSize, ...) of the transfer's concatenated tensors.</summary>
    public sealed record Chunk(Guid Id, int Index, byte[] Bytes) : IClusterMessage;
    /// <summary>From the receiver: chunk Index has arrived (-1: the offer was accepted).</summary>
    public sealed record Ack(Guid Id, int Index) : IClusterMessage;

    /// <summary>To the sender's requester once every chunk is acknowledged (Delivered), or when the receiver went away.</summary>
    public sealed record Sent(Guid Id, Tag Tag, long Bytes, TimeSpan Took, bool Delivered = true);
    /// <summary>To the receiver's owner: the tensors (float32, CPU); the owner disposes them.</summary>
    public sealed record Received(Guid Id, Tag Tag, IReadOnlyList<(string Name, Tensor Value)> Tensors, IActorRef From);

    public static readonly IReadOnlyDictionary<string, ScalarType> DTypes = new Dictionary<string, ScalarType>
    {
        ["float32"] = ScalarType.Float32, ["bfloat16"] = ScalarType.BFloat16, ["float16"] = ScalarType.Float16,
    };

    /// <summary>The tensors of a transfer as one byte sequence in the wire dtype.</summary>
    internal static byte[] Encode(IReadOnlyList<(string Name, Tensor Value)> tensors, ScalarType dtype)
    {
        using var scope = NewDisposeScope();
        var parts = tensors.Select(t => t.Value.detach().to(dtype).cpu().contiguous()).ToList();
        var bytes = new byte[checked(parts.Sum(p => p.numel() * p.ElementSize))];
        long offset = 0;
        foreach (var p in parts)
        {
            var span = p.bytes;
            span.CopyTo(bytes.AsSpan((int)offset));
            offset += span.Length;
        }
        return bytes;
    }

    /// <summary>Sends one transfer and stops: the Offer, then chunks while fewer than Window are unacknowledged.</summary>
    public sealed class Sender : ReceiveActor
    {
        static readonly TimeSpan GiveUpAfter = TimeSpan.FromSeconds(60);
        readonly Guid id;
        readonly IActorRef target, requester;
        readonly byte[] payload;
        readonly int chunkSize, window, chunks;
        readonly Stopwatch clock = Stopwatch.StartNew();
        int next, acked;

        public Sender(IActorRef target, IActorRef requester, Offer offer, byte[] payload, int window)
        {
            this.target = target;
            this.requester = requester;
            this.payload = payload;
            this.window = window;
            chunkSize = offer.ChunkSize;
            chunks = (int)((payload.LongLength + chunkSize - 1) / chunkSize);
            id = offer.Id;
            target.Tell(offer);
            // A receiver that went away (its node died) never acknowledges: give up rather than hold the payload.
            Context.SetReceiveTimeout(GiveUpAfter);
            Receive<ReceiveTimeout>(_ =>
            {
                Log.Warning("weight transfer {Id} ({Tag}) abandoned: no acknowledgement for {Seconds} s", id, offer.Tag, GiveUpAfter.TotalSeconds);
                requester.Tell(new Sent(id, offer.Tag, payload.LongLength, clock.Elapsed, Delivered: false));
                Context.Stop(Self);
            });
            Receive<Ack>(a =>
            {
                if (a.Id != id) return;
                if (a.Index >= 0) acked++;
                while (next < chunks && next - acked < window) SendChunk(next++);
                if (acked < chunks) return;
                requester.Tell(new Sent(id, offer.Tag, payload.LongLength, clock.Elapsed));
                Context.Stop(Self);
            });
        }

        void SendChunk(int index)
        {
            var start = (long)index * chunkSize;
            var length = (int)Math.Min(chunkSize, payload.LongLength - start);
            target.Tell(new Chunk(id, index, payload.AsSpan((int)start, length).ToArray()));
        }

        /// <param name="tensors">encoded here, on the caller's thread: the caller may change or dispose them afterwards</param>
        public static Props Props(IActorRef target, IActorRef requester, Tag tag, IReadOnlyList<(string Name, Tensor Value)> tensors, string dtype, int chunkSize, int window)
        {
            if (!DTypes.TryGetValue(dtype, out var scalar)) throw new ArgumentException($"unknown transfer dtype '{dtype}' ({string.Join(", ", DTypes.Keys)})");
            var payload = Encode(tensors, scalar);
            var offer = new Offer(Guid.NewGuid(), tag, tensors.Select(t => t.Name).ToArray(), tensors.Select(t => t.Value.shape).ToArray(), dtype, chunkSize);
            return Akka.Actor.Props.Create(() => new Sender(target, requester, offer, payload, window));
        }
    }

    /// <summary>Reassembles the transfers offered to it and hands each, complete, to its owner. An offer that does not
    /// add up (sizes, dtype, a chunk out of place) is dropped with a reason in the log, never half-applied.</summary>
    public sealed class Receiver : ReceiveActor
    {
        sealed class Incoming(Offer offer, ScalarType dtype, byte[] buffer, int chunks, IActorRef from)
        {
            public Offer Offer { get; } = offer;
            public ScalarType DType { get; } = dtype;
            public byte[] Buffer { get; } = buffer;
            public bool[] Arrived { get; } = new bool[chunks];
            public int Remaining { get; set; } = chunks;
            public IActorRef From { get; } = from;
        }

        readonly Dictionary<Guid, Incoming> incoming = new();

        /// <param name="owner">gets each complete transfer</param>
        /// <param name="maxBytes">the largest transfer accepted</param>
        public Receiver(IActorRef owner, long maxBytes)
        {
            Receive<Offer>(o =>
            {
                if (Check(o, maxBytes) is { } problem)
                {
                    Log.Warning("weight transfer {Id} from {Sender} refused: {Problem}", o.Id, Sender.Path, problem);
                    return;
                }
                var dtype = DTypes[o.DType];
                var total = o.Shapes.Sum(s => s.Aggregate(1L, (a, d) => a * d)) * ElementSize(dtype);
                incoming[o.Id] = new Incoming(o, dtype, new byte[total], (int)((total + o.ChunkSize - 1) / o.ChunkSize), Sender);
                Sender.Tell(new Ack(o.Id, -1));
                if (total == 0) Complete(owner, o.Id);
            });
            Receive<Chunk>(c =>
            {
                if (!incoming.TryGetValue(c.Id, out var t)) return;
                long start = (long)c.Index * t.Offer.ChunkSize;
                var expected = c.Index < 0 || c.Index >= t.Arrived.Length ? -1 : (int)Math.Min(t.Offer.ChunkSize, t.Buffer.LongLength - start);
                if (expected < 0 || c.Bytes.Length != expected || t.Arrived[c.Index])
                {
                    Log.Warning("weight transfer {Id}: chunk {Index} of {Length} bytes does not fit; the transfer is dropped", c.Id, c.Index, c.Bytes.Length);
                    incoming.Remove(c.Id);
                    return;
                }
                c.Bytes.CopyTo(t.Buffer, start);
                t.Arrived[c.Index] = true;
                Sender.Tell(new Ack(c.Id, c.Index));
                if (--t.Remaining == 0) Complete(owner, c.Id);
            });
        }

        public static Props Props(IActorRef owner, long maxBytes) => Akka.Actor.Props.Create(() => new Receiver(owner, maxBytes));

        static string? Check(Offer o, long maxBytes)
        {
            if (!DTypes.TryGetValue(o.DType, out var dtype)) return $"unknown dtype '{o.DType}'";
            if (o.ChunkSize <= 0) return $"chunk size {o.ChunkSize}";
            if (o.Names.Count != o.Shapes.Count) return $"{o.Names.Count} names for {o.Shapes.Count} shapes";
            if (o.Names.Distinct().Count() != o.Names.Count) return "a tensor name appears twice";
            long total = 0;
            foreach (var shape in o.Shapes)
            {
                if (shape.Any(d => d < 0)) return "a negative dimension";
                long n = 1;
                foreach (var d in shape) { n *= d; if (n > maxBytes) return $"more than {maxBytes} bytes"; }
                total += n * ElementSize(dtype);
                if (total > maxBytes) return $"more than {maxBytes} bytes";
            }
            return total > Array.MaxLength ? "over the largest single buffer" : null;
        }

        void Complete(IActorRef owner, Guid id)
        {
            var t = incoming[id];
            incoming.Remove(id);
            var tensors = new List<(string, Tensor)>();
            long offset = 0;
            for (int i = 0; i < t.Offer.Names.Count; i++)
            {
                using var scope = NewDisposeScope();
                var shape = t.Offer.Shapes[i];
                var wire = empty(shape, t.DType);
                var length = (int)(wire.numel() * wire.ElementSize);
                if (length > 0) wire.bytes = t.Buffer.AsSpan((int)offset, length);
                offset += length;
                tensors.Add((t.Offer.Names[i], wire.to(float32).MoveToOuterDisposeScope()));
            }
            owner.Tell(new Received(id, t.Offer.Tag, tensors, t.From));
        }

        static int ElementSize(ScalarType dtype) => dtype == ScalarType.Float32 ? 4 : 2;
    }
}
