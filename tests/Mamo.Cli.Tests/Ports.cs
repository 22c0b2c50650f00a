using System.Net;
using System.Net.Sockets;

namespace Mamo.Cli.Tests;

/// <summary>Ports for the processes a test starts, which must know them before they bind. A port the kernel picks for
/// port 0 is an ephemeral one, and once it is let go the kernel may give it to any outgoing connection (a Kafka client,
/// a heartbeat) before the node binds it. A port below the ephemeral range is never handed out unasked: one that binds
/// now stays free for the node, unless another test takes it, which the handed-out set rules out.</summary>
static class Ports
{
    static readonly HashSet<int> Handed = [];
    static readonly int Below = EphemeralLow();

    public static int Free()
    {
        lock (Handed)
        {
            for (var tries = 0; tries < 1000; tries++)
            {
                var port = Random.Shared.Next(10_000, Below);
                if (!Handed.Add(port)) continue;
                try
                {
                    using var listener = new TcpListener(IPAddress.Loopback, port);
                    listener.Start();
                    return port;
                }
                catch (SocketException) { }   // held by something else: try another
            }
        }
        throw new InvalidOperationException($"no free port between 10000 and {Below}");
    }

    /// <summary>The low end of the kernel's ephemeral range (net.ipv4.ip_local_port_range; Linux's default 32768).</summary>
    static int EphemeralLow()
    {
        const string range = "/proc/sys/net/ipv4/ip_local_port_range";
        var low = File.Exists(range) ? int.Parse(File.ReadAllText(range).Split((char[])['\t', ' ', '\n'], StringSplitOptions.RemoveEmptyEntries)[0]) : 32768;
        if (low <= 12_000) throw new InvalidOperationException($"{range} starts at {low}: the tests need ports below it");
        return low;
    }
}
