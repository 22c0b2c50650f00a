using System.Diagnostics;
using Akka.Actor;
using Serilog;
using TorchSharp;
using static TorchSharp.torch;

namespace Mamo.Actors.Cluster;

/// <summary>The data plane: moves named tensors (weights, deltas, gradients) to an actor on another node. The offer and
/// its acceptance go over remoting; the bytes go over the receiving node's own TCP connection (DataPlane) where it has
/// one, or else (a cluster with TLS) over remoting as chunks of at most chunk-size bytes, a window of them in flight,
/// each acknowledged: Akka.NET keeps one TCP connection per pair of nodes, so no frame is ever larger than a chunk and
/// heartbeats never wait behind a model. Tensors travel in the transfer's dtype (float32, bfloat16 or float16) and
/// arrive as float32.</summary>
public static class WeightTransfer
{
    /// <summary>What a transfer carries: θ for a round, or the state an every-step replica starts from (Weights); a
    /// replica's change of θ (Delta); to its every-step peers, its features for an all-gather (Features) or its gradient
    /// (Gradient); to the every-step coordinator, the state a replica holds (State).</summary>
    public enum Kind { Weights, Delta, Features, Gradient, State }

    /// <summary>A transfer's identity: its kind, the round attempt it belongs to, the node it comes from ("" from a
    /// coordinator), and which of the step's all-gathers it serves (Features).</summary>
    public sealed record Tag(Kind Kind, long Attempt, string Node = "", int Part = 0);

    /// <summary>Announces a transfer: what it is (Tag), the tensors' names and shapes, the wire dtype and the chunk size.</summary>
    public sealed record Offer(Guid Id, Tag Tag, IReadOnlyList<string> Names, IReadOnlyList<long[]> Shapes, string DType, int ChunkSize) : IClusterMessage;
    /// <summary>Bytes [Index · ChunkSize, ...) of the transfer's concatenated tensors.</summary>
    public sealed record Chunk(Guid Id, int Index, byte[] Bytes) : IClusterMessage;
    /// <summary>From the receiver: chunk Index has arrived (-1: the offer was accepted, its chunks go over remoting).</summary>
    public sealed record Ack(Guid Id, int Index) : IClusterMessage;
    /// <summary>From the receiver: the offer was accepted; its bytes go to the data plane at Host:Port, led by Token.</summary>
    public sealed record Accept(Guid Id, string Host, int Port, Guid Token) : IClusterMessage;

    /// <summary>To the sender's requester once every chunk is acknowledged (Delivered), or when the receiver went away.</summary>
    public sealed record Sent(Guid Id, Tag Tag, long Bytes, TimeSpan Took, bool Delivered = true);
    /// <summary>To the receiver's owner: the tensors (float32, CPU); the owner disposes them.</summary>
    public sealed record Received(Guid Id, Tag Tag, IReadOnlyList<(string Name, Tensor Value)> Tensors, IActorRef From);

    public static readonly IReadOnlyDictionary<string, ScalarType> DTypes = new Dictionary<string, ScalarType>
    {
        ["float32"] = ScalarType.Float32, ["bfloat16"] = ScalarType.BFloat16, ["float16"] = ScalarType.Float16,
    };

    /// <summary>The tensors of a transfer as one byte sequence in the wire dtype, in a pooled buffer (DataPlane.Return).</summary>
    internal static (byte[] Buffer, long Length) Encode(IReadOnlyList<(string Name, Tensor Value)> tensors, ScalarType dtype)
    {
        using var scope = NewDisposeScope();
        var parts = tensors.Select(t => t.Value.detach().to(dtype).cpu().contiguous()).ToList();
        var length = checked(parts.Sum(p => p.numel() * p.ElementSize));
        var bytes = DataPlane.Rent(length);
        long offset = 0;
        foreach (var p in parts)
        {
            var span = p.bytes;
            span.CopyTo(bytes.AsSpan((int)offset));
            offset += span.Length;
        }
        return (bytes, length);
    }

    /// <summary>Sends one transfer and stops: the Offer, then the bytes to the receiver's data plane once it accepts, or
    /// chunks over remoting while fewer than Window are unacknowledged.</summary>
    public sealed class Sender : ReceiveActor
    {
        static readonly TimeSpan GiveUpAfter = TimeSpan.FromSeconds(60);
        readonly Guid id;
        readonly Tag tag;
        readonly IActorRef target, requester;
        readonly byte[] payload;
        readonly long length;
        readonly int chunkSize, window, chunks;
        readonly Stopwatch clock = Stopwatch.StartNew();
        int next, acked;
        Task? streaming;

        sealed record Streamed(Exception? Failure);

        public Sender(IActorRef target, IActorRef requester, Offer offer, byte[] payload, long length, int window)
        {
            this.target = target;
            this.requester = requester;
            this.payload = payload;
            this.length = length;
            this.window = window;
            chunkSize = offer.ChunkSize;
            chunks = (int)((length + chunkSize - 1) / chunkSize);
            (id, tag) = (offer.Id, offer.Tag);
            target.Tell(offer);
            // A receiver that went away (its node died) never acknowledges: give up rather than hold the payload.
            Context.SetReceiveTimeout(GiveUpAfter);
            Receive<ReceiveTimeout>(_ =>
            {
                Log.Warning("weight transfer {Id} ({Tag}) abandoned: no acknowledgement for {Seconds} s", id, tag, GiveUpAfter.TotalSeconds);
                Finish(delivered: false);
            });
            Receive<Accept>(a =>
            {
                if (a.Id != id || streaming is not null) return;
                if (DataPlane.Of(Context.System)?.TryDeliver(a.Host, a.Port, a.Token, payload, length) == true)
                {
                    Finish(delivered: true);
                    return;
                }
                // The stream has its own idle timeout; the acceptance was the receiver's last word on remoting.
                Context.SetReceiveTimeout(null);
                streaming = DataPlane.Send(a.Host, a.Port, a.Token, payload, length);
                streaming.PipeTo(Self, success: () => new Streamed(null), failure: e => new Streamed(e));
            });
            Receive<Streamed>(s =>
            {
                if (s.Failure is { } e) Log.Warning("weight transfer {Id} ({Tag}) failed on the data plane: {Why}", id, tag, e.GetBaseException().Message);
                Finish(delivered: s.Failure is null);
            });
            Receive<Ack>(a =>
            {
                if (a.Id != id) return;
                if (a.Index >= 0) acked++;
                while (next < chunks && next - acked < window) SendChunk(next++);
                if (acked == chunks) Finish(delivered: true);
            });
        }

        void Finish(bool delivered)
        {
            requester.Tell(new Sent(id, tag, length, clock.Elapsed, delivered));
            Context.Stop(Self);
        }

        void SendChunk(int index)
        {
            var start = (long)index * chunkSize;
            var size = (int)Math.Min(chunkSize, length - start);
            target.Tell(new Chunk(id, index, payload.AsSpan((int)start, size).ToArray()));
        }

        // A restart keeps the payload: PostStop (which returns it to the pool) runs only when the sender stops.
        protected override void PreRestart(Exception reason, object message) { }

        protected override void PostStop()
        {
            // The payload goes back to the pool only once no stream reads it.
            if (streaming is { IsCompleted: false } running) running.ContinueWith(_ => DataPlane.Return(payload), TaskScheduler.Default);
            else DataPlane.Return(payload);
        }

        /// <param name="tensors">encoded here, on the caller's thread: the caller may change or dispose them afterwards</param>
        public static Props Props(IActorRef target, IActorRef requester, Tag tag, IReadOnlyList<(string Name, Tensor Value)> tensors, string dtype, int chunkSize, int window)
        {
            if (!DTypes.TryGetValue(dtype, out var scalar)) throw new ArgumentException($"unknown transfer dtype '{dtype}' ({string.Join(", ", DTypes.Keys)})");
            var (payload, length) = Encode(tensors, scalar);
            var offer = new Offer(Guid.NewGuid(), tag, tensors.Select(t => t.Name).ToArray(), tensors.Select(t => t.Value.shape).ToArray(), dtype, chunkSize);
            return Akka.Actor.Props.Create(() => new Sender(target, requester, offer, payload, length, window));
        }
    }

    /// <summary>Reassembles the transfers offered to it and hands each, complete, to its owner. An offer that does not
    /// add up (sizes, dtype, a chunk out of place, a broken connection) is dropped with a reason in the log, never
    /// half-applied.</summary>
    public sealed class Receiver : ReceiveActor
    {
        sealed class Incoming(Offer offer, ScalarType dtype, long length, int chunks, IActorRef from)
        {
            public Offer Offer { get; } = offer;
            public ScalarType DType { get; } = dtype;
            public long Length { get; } = length;
            public byte[] Buffer { get; } = DataPlane.Rent(length);
            public bool[] Arrived { get; } = new bool[chunks];
            public int Remaining { get; set; } = chunks;
            public IActorRef From { get; } = from;
            /// <summary>Where the bytes come over the data plane: the token they are expected under.</summary>
            public Guid? Token { get; set; }
        }

        readonly Dictionary<Guid, Incoming> incoming = new();

        /// <param name="owner">gets each complete transfer</param>
        /// <param name="maxBytes">the largest transfer accepted</param>
        /// <param name="dataPlane">take the bytes on this node's data plane where it has one (else as chunks over remoting)</param>
        public Receiver(IActorRef owner, long maxBytes, bool dataPlane = true)
        {
            Receive<Offer>(o =>
            {
                // An id already under way is a repeated offer: its bytes would complete the other transfer's buffer.
                if ((incoming.ContainsKey(o.Id) ? "its id is already under way" : Check(o, maxBytes)) is { } problem)
                {
                    Log.Warning("weight transfer {Id} from {Sender} refused: {Problem}", o.Id, Sender.Path, problem);
                    return;
                }
                var dtype = DTypes[o.DType];
                var total = o.Shapes.Sum(s => s.Aggregate(1L, (a, d) => a * d)) * ElementSize(dtype);
                var t = incoming[o.Id] = new Incoming(o, dtype, total, (int)((total + o.ChunkSize - 1) / o.ChunkSize), Sender);
                var plane = dataPlane ? DataPlane.Of(Context.System) : null;
                if (plane is null || total == 0) Sender.Tell(new Ack(o.Id, -1));
                else
                {
                    t.Token = plane.Expect(o.Id, t.Buffer, total, Self);
                    Sender.Tell(new Accept(o.Id, plane.Host, plane.Port, t.Token.Value));
                }
                if (total == 0) Complete(owner, o.Id);
            });
            Receive<Chunk>(c =>
            {
                if (!incoming.TryGetValue(c.Id, out var t) || t.Token is not null) return;
                long start = (long)c.Index * t.Offer.ChunkSize;
                var expected = c.Index < 0 || c.Index >= t.Arrived.Length ? -1 : (int)Math.Min(t.Offer.ChunkSize, t.Length - start);
                if (expected < 0 || c.Bytes.Length != expected || t.Arrived[c.Index])
                {
                    Log.Warning("weight transfer {Id}: chunk {Index} of {Length} bytes does not fit; the transfer is dropped", c.Id, c.Index, c.Bytes.Length);
                    Drop(c.Id);
                    return;
                }
                c.Bytes.CopyTo(t.Buffer, start);
                t.Arrived[c.Index] = true;
                Sender.Tell(new Ack(c.Id, c.Index));
                if (--t.Remaining == 0) Complete(owner, c.Id);
            });
            Receive<DataPlane.Arrived>(a =>
            {
                if (incoming.ContainsKey(a.Id)) Complete(owner, a.Id);
            });
            Receive<DataPlane.Broken>(b =>
            {
                Log.Warning("weight transfer {Id}: {Why}; the transfer is dropped", b.Id, b.Why);
                Drop(b.Id);
            });
        }

        public static Props Props(IActorRef owner, long maxBytes, bool dataPlane = true) => Akka.Actor.Props.Create(() => new Receiver(owner, maxBytes, dataPlane));

        void Drop(Guid id)
        {
            if (incoming.Remove(id, out var t)) DataPlane.Return(t.Buffer);
        }

        protected override void PostStop()
        {
            // A transfer whose connection has not come is forgotten; a buffer a connection may still write into is left to
            // the garbage collector, never back in the pool.
            foreach (var t in incoming.Values)
                if (t.Token is { } token) DataPlane.Of(Context.System)?.Forget(token);
                else DataPlane.Return(t.Buffer);
        }

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
            DataPlane.Return(t.Buffer);
            owner.Tell(new Received(id, t.Offer.Tag, tensors, t.From));
        }

        static int ElementSize(ScalarType dtype) => dtype == ScalarType.Float32 ? 4 : 2;
    }
}
