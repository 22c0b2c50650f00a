using System.Buffers;
using System.Collections.Concurrent;
using System.Net;
using System.Security.Cryptography;
using Akka;
using Akka.Actor;
using ByteString = Akka.IO.ByteString;
using Akka.Streams;
using Akka.Streams.Dsl;
using Serilog;

namespace Mamo.Actors.Cluster;

/// <summary>The data plane's bulk transport: a node's transfers arrive on a TCP connection of their own (Akka.Streams'
/// Tcp), not on Akka remoting's one connection per node pair, which carries only the offers, acceptances and heartbeats.
/// A receiver that accepts an offer registers what it expects under a random 128-bit token; the sender connects, sends
/// the token and exactly the offer's bytes, and gets one byte back once they are all in. A connection that names no
/// expected transfer, or sends more or fewer than its bytes, is closed and nothing of it is kept. The transport is plain TCP: a
/// cluster with TLS keeps its weights on the encrypted remoting (docs/CLUSTER.md, "The data plane").</summary>
public sealed class DataPlane : IExtension
{
    const int TokenBytes = 16;
    /// <summary>The bytes per write: ByteStrings that wrap the payload, no copy.</summary>
    const int SliceBytes = 1 << 20;
    static readonly ByteString AllIn = ByteString.FromBytes([1]);
    /// <summary>A connection that moves no byte this long is closed (a sender or receiver that went away).</summary>
    public static readonly TimeSpan IdleTimeout = TimeSpan.FromSeconds(60);

    /// <summary>To a receiver: every byte of its transfer has arrived in its buffer.</summary>
    public sealed record Arrived(Guid Id);
    /// <summary>To a receiver: the connection of its transfer ended before its bytes were in.</summary>
    public sealed record Broken(Guid Id, string Why);

    sealed record Expected(Guid Id, byte[] Buffer, long Length, IActorRef Receiver);

    readonly IMaterializer materializer;
    readonly ConcurrentDictionary<Guid, Expected> expected = new();
    public string Host { get; private set; } = "";
    public int Port { get; private set; }
    long connections;
    /// <summary>The connections this node's data plane has taken.</summary>
    public long Connections => Interlocked.Read(ref connections);

    DataPlane(ActorSystem system) => materializer = system.Materializer(namePrefix: "data-plane");

    sealed class Id : ExtensionIdProvider<DataPlane>
    {
        public override DataPlane CreateExtension(ExtendedActorSystem system) => new(system);
    }

    /// <summary>The node's data plane, or null where its transfers go over remoting.</summary>
    public static DataPlane? Of(ActorSystem system) => system.HasExtension<DataPlane>() && system.GetExtension<DataPlane>() is { Port: > 0 } plane ? plane : null;

    /// <summary>Listens on host:port (0: any free port) for this node's incoming transfers.</summary>
    public static async Task<DataPlane> StartAsync(ActorSystem system, string host, int port)
    {
        var plane = system.WithExtension<DataPlane, Id>();
        Tcp.ServerBinding binding;
        try
        {
            // halfClose: a sender closes its side after its last byte and waits for the answer on the other.
            // A host name (--cluster's) is bound at its address; offers name the host, as remoting's address does.
            var address = IPAddress.TryParse(host, out var ip) ? ip : (await System.Net.Dns.GetHostAddressesAsync(host)).First();
            binding = await system.TcpStream().Bind(address.ToString(), port, halfClose: true, idleTimeout: IdleTimeout)
                .To(Sink.ForEach<Tcp.IncomingConnection>(c => c.HandleWith(plane.Inbound(), plane.materializer)))
                .Run(plane.materializer);
        }
        catch (Exception e) { throw new IOException($"the data plane cannot listen on {host}:{port} (mamo.cluster.data-plane-port): {e.GetBaseException().Message}", e); }
        (plane.Host, plane.Port) = (host, ((IPEndPoint)binding.LocalAddress).Port);
        // Unbound with the other listeners, before the actor system's IO actors stop under it.
        CoordinatedShutdown.Get(system).AddTask(CoordinatedShutdown.PhaseServiceUnbind, "data-plane-unbind", async () =>
        {
            await binding.Unbind();
            return Done.Instance;
        });
        Log.Information("data plane listening on {Host}:{Port}", plane.Host, plane.Port);
        return plane;
    }

    /// <summary>Registers a transfer this node accepts: its bytes go to buffer[0, length), and receiver gets Arrived or
    /// Broken. Returns the token its sender must present.</summary>
    public Guid Expect(Guid id, byte[] buffer, long length, IActorRef receiver)
    {
        var token = new Guid(RandomNumberGenerator.GetBytes(TokenBytes));
        expected[token] = new Expected(id, buffer, length, receiver);
        return token;
    }

    /// <summary>Stops expecting a transfer (its receiver gave up on it).</summary>
    public void Forget(Guid token) => expected.TryRemove(token, out _);

    /// <summary>A transfer to this node's own data plane (a coordinator's to the replica beside it) is copied into its
    /// buffer here, with no connection; false where host:port is another node's or the token is not expected.</summary>
    public bool TryDeliver(string host, int port, Guid token, byte[] payload, long length)
    {
        if (host != Host || port != Port || !expected.TryRemove(token, out var transfer)) return false;
        if (length != transfer.Length)
        {
            transfer.Receiver.Tell(new Broken(transfer.Id, $"{length} bytes for a transfer of {transfer.Length}"));
            return false;
        }
        payload.AsSpan(0, checked((int)length)).CopyTo(transfer.Buffer);
        transfer.Receiver.Tell(new Arrived(transfer.Id));
        return true;
    }

    /// <summary>Sends payload[0, length) to a node's data plane under token; completes once the receiver has every byte.</summary>
    public static async Task Send(ActorSystem system, IMaterializer materializer, string host, int port, Guid token, byte[] payload, long length)
    {
        EndPoint remote = IPAddress.TryParse(host, out var ip) ? new IPEndPoint(ip, port) : new DnsEndPoint(host, port);
        var slices = Enumerable.Range(0, (int)((length + SliceBytes - 1) / SliceBytes))
            .Select(i => ByteString.FromBytes(payload, i * SliceBytes, (int)Math.Min(SliceBytes, length - (long)i * SliceBytes)));
        var answer = await Source.Single(ByteString.FromBytes(token.ToByteArray())).Concat(Source.From(slices))
            .Via(system.TcpStream().OutgoingConnection(remote, connectionTimeout: IdleTimeout, idleTimeout: IdleTimeout))
            .RunWith(Sink.FirstOrDefault<ByteString>(), materializer);
        if (answer is null || answer.Count != 1 || answer[0] != AllIn[0])
            throw new IOException($"the data plane at {host}:{port} closed the transfer before taking all of its {length} bytes");
    }

    /// <summary>One incoming connection: its token, then exactly the expected transfer's bytes and the sender's end of
    /// the stream, then one byte back.</summary>
    Flow<ByteString, ByteString, NotUsed> Inbound()
    {
        Interlocked.Increment(ref connections);
        var connection = new Connection(this);
        return Flow.Create<ByteString>().Aggregate(0L, (_, bytes) => connection.Take(bytes)).Select(_ => connection.Finish())
            .WatchTermination((_, ended) =>
            {
                ended.ContinueWith(t => connection.End(t.Exception?.GetBaseException().Message), TaskScheduler.Default);
                return NotUsed.Instance;
            });
    }

    sealed class Connection(DataPlane plane)
    {
        readonly byte[] token = new byte[TokenBytes];
        int tokenRead;
        Expected? transfer;
        long arrived;
        bool finished;

        public long Take(ByteString bytes)
        {
            var at = 0;
            if (transfer is null)
            {
                at = Math.Min(TokenBytes - tokenRead, bytes.Count);
                bytes.Slice(0, at).CopyTo(token, tokenRead, at);
                tokenRead += at;
                if (tokenRead < TokenBytes) return arrived;
                if (!plane.expected.TryRemove(new Guid(token), out transfer))
                    throw new InvalidDataException("a connection named no transfer this node expects");
            }
            var count = bytes.Count - at;
            if (count > transfer.Length - arrived) throw new InvalidDataException($"transfer {transfer.Id} sent more than its {transfer.Length} bytes");
            if (count > 0) bytes.Slice(at, count).CopyTo(transfer.Buffer, (int)arrived, count);
            return arrived += count;
        }

        /// <summary>At the sender's end of the stream: the transfer is whole, or the connection fails.</summary>
        public ByteString Finish()
        {
            if (transfer is null) throw new InvalidDataException($"a connection ended after {tokenRead} bytes, before naming its transfer");
            if (arrived < transfer.Length) throw new InvalidDataException($"the sender stopped after {arrived} of {transfer.Length} bytes");
            finished = true;
            transfer.Receiver.Tell(new Arrived(transfer.Id));
            return AllIn;
        }

        public void End(string? failure)
        {
            if (failure is null) return;
            if (transfer is null) Log.Warning("data plane connection refused: {Why}", failure);
            else if (!finished) transfer.Receiver.Tell(new Broken(transfer.Id, failure));
        }
    }

    /// <summary>Transfer buffers come from one pool, so that a model's bytes are not a new large object at every round.</summary>
    public static byte[] Rent(long length) => length == 0 ? [] : ArrayPool<byte>.Shared.Rent(checked((int)length));

    public static void Return(byte[] buffer)
    {
        if (buffer.Length > 0) ArrayPool<byte>.Shared.Return(buffer);
    }
}
