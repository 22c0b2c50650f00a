using System.Buffers;
using System.Collections.Concurrent;
using System.Net;
using System.Net.Sockets;
using System.Security.Cryptography;
using Akka;
using Akka.Actor;
using Serilog;

namespace Mamo.Actors.Cluster;

/// <summary>The data plane's bulk transport: a node's transfers arrive on a TCP connection of their own, not on Akka
/// remoting's one connection per node pair, which carries only the offers, acceptances and heartbeats. A receiver that
/// accepts an offer registers what it expects under a random 128-bit token; the sender connects, sends the token and
/// exactly the offer's bytes, ends its side, and gets one byte back once they are all in. A connection that names no
/// expected transfer, or sends more or fewer than its bytes, is closed and nothing of it is kept. The transport is plain
/// TCP: a cluster with TLS keeps its weights on the encrypted remoting (docs/CLUSTER.md, "The data plane").
/// It is .NET's Socket, not Akka.Streams' Tcp: the bytes are received straight into the transfer's buffer and sent
/// straight from the payload, where Akka.IO copied each read into a new ByteString that was copied again, and that
/// stream alone peaked under 1 GB/s on loopback here (docs/CLUSTER.md, "The data plane").</summary>
public sealed class DataPlane : IExtension
{
    const int TokenBytes = 16;
    /// <summary>The most bytes one send or receive call moves: each call's deadline is the idle timeout.</summary>
    const int SliceBytes = 4 << 20;
    const byte AllIn = 1;
    static readonly TimeSpan AcceptRetry = TimeSpan.FromMilliseconds(100);
    /// <summary>A connection that moves no byte this long is closed (a sender or receiver that went away).</summary>
    public static readonly TimeSpan IdleTimeout = TimeSpan.FromSeconds(60);

    /// <summary>To a receiver: every byte of its transfer has arrived in its buffer.</summary>
    public sealed record Arrived(Guid Id);
    /// <summary>To a receiver: the connection of its transfer ended before its bytes were in.</summary>
    public sealed record Broken(Guid Id, string Why);

    sealed record Expected(Guid Id, byte[] Buffer, long Length, IActorRef Receiver);

    readonly ConcurrentDictionary<Guid, Expected> expected = new();
    readonly CancellationTokenSource stopping = new();
    public string Host { get; private set; } = "";
    public int Port { get; private set; }
    long connections;
    /// <summary>The connections this node's data plane has taken.</summary>
    public long Connections => Interlocked.Read(ref connections);

    sealed class Id : ExtensionIdProvider<DataPlane>
    {
        public override DataPlane CreateExtension(ExtendedActorSystem system) => new();
    }

    /// <summary>The node's data plane, or null where its transfers go over remoting.</summary>
    public static DataPlane? Of(ActorSystem system) => system.HasExtension<DataPlane>() && system.GetExtension<DataPlane>() is { Port: > 0 } plane ? plane : null;

    /// <summary>Listens on host:port (0: any free port) for this node's incoming transfers.</summary>
    public static async Task<DataPlane> StartAsync(ActorSystem system, string host, int port)
    {
        var plane = system.WithExtension<DataPlane, Id>();
        Socket listener;
        try
        {
            // A host name (--cluster's) is bound at its address; offers name the host, as remoting's address does.
            var address = IPAddress.TryParse(host, out var ip) ? ip : (await Dns.GetHostAddressesAsync(host)).First();
            listener = new Socket(address.AddressFamily, SocketType.Stream, ProtocolType.Tcp);
            listener.Bind(new IPEndPoint(address, port));
            listener.Listen(64);
        }
        catch (Exception e) { throw new IOException($"the data plane cannot listen on {host}:{port} (mamo.cluster.data-plane-port): {e.GetBaseException().Message}", e); }
        (plane.Host, plane.Port) = (host, ((IPEndPoint)listener.LocalEndPoint!).Port);
        var accepting = plane.Accept(listener);
        // Closed with the other listeners, before the actor system stops under the connections' receivers.
        CoordinatedShutdown.Get(system).AddTask(CoordinatedShutdown.PhaseServiceUnbind, "data-plane-unbind", async () =>
        {
            plane.stopping.Cancel();
            listener.Dispose();
            await accepting;
            return Done.Instance;
        });
        Log.Information("data plane listening on {Host}:{Port}", plane.Host, plane.Port);
        return plane;
    }

    async Task Accept(Socket listener)
    {
        while (!stopping.IsCancellationRequested)
        {
            Socket socket;
            try { socket = await listener.AcceptAsync(stopping.Token); }
            catch (Exception) when (stopping.IsCancellationRequested) { return; }
            catch (SocketException e)
            {
                // A lasting failure (no file descriptors left) fails every accept at once: not in a busy loop.
                Log.Warning("data plane: a connection could not be accepted: {Why}", e.Message);
                try { await Task.Delay(AcceptRetry, stopping.Token); }
                catch (OperationCanceledException) { return; }
                continue;
            }
            Interlocked.Increment(ref connections);
            _ = Task.Run(() => Serve(socket));
        }
    }

    /// <summary>Registers a transfer this node accepts: its bytes go to buffer[0, length), and receiver gets Arrived or
    /// Broken. Returns the token its sender must present. A sender that never connects (its node died after the
    /// acceptance) leaves it Broken after twice the idle timeout, so the receiver lets its buffer go.</summary>
    public Guid Expect(Guid id, byte[] buffer, long length, IActorRef receiver)
    {
        var token = new Guid(RandomNumberGenerator.GetBytes(TokenBytes));
        expected[token] = new Expected(id, buffer, length, receiver);
        _ = Task.Delay(2 * IdleTimeout, stopping.Token).ContinueWith(_ =>
        {
            // Whoever removes the token owns the buffer: a connection that took it first writes into it, not this.
            if (expected.TryRemove(token, out var t)) t.Receiver.Tell(new Broken(t.Id, $"no connection came within {2 * IdleTimeout.TotalSeconds:F0} s"));
        }, CancellationToken.None, TaskContinuationOptions.OnlyOnRanToCompletion, TaskScheduler.Default);
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
    public static async Task Send(string host, int port, Guid token, byte[] payload, long length)
    {
        using var socket = new Socket(SocketType.Stream, ProtocolType.Tcp) { NoDelay = true };
        using var idle = new CancellationTokenSource(IdleTimeout);
        await socket.ConnectAsync(host, port, idle.Token);
        await Write(socket, token.ToByteArray(), idle);
        for (long at = 0; at < length; at += SliceBytes)
            await Write(socket, payload.AsMemory((int)at, (int)Math.Min(SliceBytes, length - at)), idle);
        socket.Shutdown(SocketShutdown.Send);
        var answer = new byte[1];
        idle.CancelAfter(IdleTimeout);
        if (await socket.ReceiveAsync(answer, SocketFlags.None, idle.Token) != 1 || answer[0] != AllIn)
            throw new IOException($"the data plane at {host}:{port} closed the transfer before taking all of its {length} bytes");
    }

    static async Task Write(Socket socket, ReadOnlyMemory<byte> bytes, CancellationTokenSource idle)
    {
        while (bytes.Length > 0)
        {
            idle.CancelAfter(IdleTimeout);
            bytes = bytes[await socket.SendAsync(bytes, SocketFlags.None, idle.Token)..];
        }
    }

    /// <summary>Reads into bytes until it is full or the sender ends its side; returns the bytes read.</summary>
    static async Task<int> Read(Socket socket, Memory<byte> bytes, CancellationTokenSource idle)
    {
        var read = 0;
        while (read < bytes.Length)
        {
            idle.CancelAfter(IdleTimeout);
            var n = await socket.ReceiveAsync(bytes[read..], SocketFlags.None, idle.Token);
            if (n == 0) break;
            read += n;
        }
        return read;
    }

    /// <summary>One incoming connection: its token, then exactly the expected transfer's bytes and the sender's end of
    /// the stream, then one byte back.</summary>
    async Task Serve(Socket socket)
    {
        Expected? transfer = null;
        var finished = false;
        try
        {
            using var idle = CancellationTokenSource.CreateLinkedTokenSource(stopping.Token);
            var token = new byte[TokenBytes];
            var read = await Read(socket, token, idle);
            if (read < TokenBytes) throw new InvalidDataException($"a connection ended after {read} bytes, before naming its transfer");
            if (!expected.TryRemove(new Guid(token), out transfer)) throw new InvalidDataException("a connection named no transfer this node expects");
            var arrived = await Read(socket, transfer.Buffer.AsMemory(0, checked((int)transfer.Length)), idle);
            if (arrived < transfer.Length) throw new InvalidDataException($"the sender stopped after {arrived} of {transfer.Length} bytes");
            if (await Read(socket, new byte[1], idle) > 0) throw new InvalidDataException($"transfer {transfer.Id} sent more than its {transfer.Length} bytes");
            finished = true;
            transfer.Receiver.Tell(new Arrived(transfer.Id));
            await Write(socket, new[] { AllIn }, idle);
            socket.Shutdown(SocketShutdown.Both);
        }
        catch (Exception e)
        {
            var why = e is OperationCanceledException && !stopping.IsCancellationRequested ? $"no byte for {IdleTimeout.TotalSeconds:F0} s" : e.Message;
            if (transfer is null) Log.Warning("data plane connection refused: {Why}", why);
            else if (!finished) transfer.Receiver.Tell(new Broken(transfer.Id, why));
        }
        finally { socket.Dispose(); }
    }

    /// <summary>Transfer buffers come from one pool, so that a model's bytes are not a new large object at every round.</summary>
    public static byte[] Rent(long length) => length == 0 ? [] : ArrayPool<byte>.Shared.Rent(checked((int)length));

    public static void Return(byte[] buffer)
    {
        if (buffer.Length > 0) ArrayPool<byte>.Shared.Return(buffer);
    }
}
