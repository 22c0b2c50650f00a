using System.Diagnostics;
using System.Formats.Tar;
using System.Net;
using System.Net.Sockets;
using System.Text;
using Xunit;

namespace Mamo.Data.Tests;

/// <summary>WebDataset shards served by a real nginx on loopback, read through a relay that cuts the first transfer of
/// each shard part-way, as a proxy or a flaky link would.</summary>
public class WebDatasetHttpTests
{
    const int Shards = 3, SamplesPerShard = 24, CutAfterBytes = 40_000;

    [SkippableFact]
    public void Shards_over_http_arrive_whole_each_sample_once_though_every_first_transfer_is_cut_mid_shard()
    {
        Skip.If(Nginx.Executable is null, "nginx is not installed (apt-get install nginx; .ci/run installs it)");
        using var temp = new TempFolder();
        var www = Directory.CreateDirectory(temp.File("www")).FullName;
        var random = new Random(27);
        for (var s = 0; s < Shards; s++) WriteShard(Path.Combine(www, $"shard-{s:000}.tar"), s, random);
        using var nginx = Nginx.Serve(www, temp.File("nginx"));
        using var relay = new CuttingRelay(nginx.Socket, CutAfterBytes);

        var overHttp = new WebDatasetSource($"http://127.0.0.1:{relay.Port}/shard-{{000..002}}.tar").Read(null, CancellationToken.None).ToList();
        var onDisk = new WebDatasetSource(Path.Combine(www, "shard-{000..002}.tar")).Read(null, CancellationToken.None).ToList();

        Assert.Empty(overHttp.OfType<BadItem>().Select(b => b.Bad.Reason));
        var http = overHttp.OfType<SampleItem>().Select(i => i.Sample).ToList();
        var disk = onDisk.OfType<SampleItem>().Select(i => i.Sample).ToList();
        Assert.Equal(Shards * SamplesPerShard, disk.Count);
        Assert.Equal(disk.Select(d => d.Id), http.Select(h => h.Id));   // each once, in order
        Assert.Equal(disk.Select(d => d.Position.Offset), http.Select(h => h.Position.Offset));
        for (var i = 0; i < disk.Count; i++)
        {
            Assert.Equal(disk[i].Image, http[i].Image);
            Assert.Equal(disk[i].Captions, http[i].Captions);
        }
        // Every shard's first transfer was cut, and every shard was taken up again with a Range request.
        Assert.Equal(Shards, relay.Cut);
        Assert.Equal(Shards, relay.Ranged);

        // Resuming after a consumed sample skips it, as on disk.
        var shard1 = $"http://127.0.0.1:{relay.Port}/shard-001.tar";
        var after = new WebDatasetSource(shard1).Read(new Dictionary<string, long> { [shard1] = 9 }, CancellationToken.None)
            .OfType<SampleItem>().Select(i => i.Sample.Position.Offset).ToList();
        Assert.Equal(Enumerable.Range(10, SamplesPerShard - 10).Select(i => (long)i), after);

        // A shard the server does not have is a dead letter naming the answer, not retried.
        var missing = new WebDatasetSource($"http://127.0.0.1:{relay.Port}/shard-{{007..007}}.tar").Read(null, CancellationToken.None).ToList();
        Assert.Equal("cannot open shard: HTTP 404 Not Found", Assert.IsType<BadItem>(Assert.Single(missing)).Bad.Reason);
        // And a URL glob cannot list a server.
        var listed = Assert.Single(new WebDatasetSource($"http://127.0.0.1:{relay.Port}/shard-*.tar").Read(null, CancellationToken.None));
        Assert.StartsWith("no shard named: a web server cannot be listed", Assert.IsType<BadItem>(listed).Bad.Reason);
    }

    [SkippableFact]
    public void A_link_that_drops_every_resumed_transfer_costs_the_rest_of_the_shard_as_a_dead_letter_after_the_retries()
    {
        Skip.If(Nginx.Executable is null, "nginx is not installed (apt-get install nginx; .ci/run installs it)");
        using var temp = new TempFolder();
        var www = Directory.CreateDirectory(temp.File("www")).FullName;
        WriteShard(Path.Combine(www, "shard-000.tar"), 0, new Random(5));
        using var nginx = Nginx.Serve(www, temp.File("nginx"));
        using var relay = new CuttingRelay(nginx.Socket, CutAfterBytes, cutRangedAfter: 0);

        var items = new WebDatasetSource($"http://127.0.0.1:{relay.Port}/shard-000.tar").Read(null, CancellationToken.None).ToList();
        var read = items.OfType<SampleItem>().Select(i => i.Sample.Position.Offset).ToList();
        // What arrived before the first cut is the shard's start, in order; the rest is one dead letter.
        Assert.Equal(Enumerable.Range(0, read.Count).Select(i => (long)i), read);
        Assert.True(read.Count > 0 && read.Count < SamplesPerShard, $"{read.Count} of {SamplesPerShard} samples before a cut at byte {CutAfterBytes}");
        var bad = Assert.IsType<BadItem>(items[^1]).Bad.Reason;
        Assert.StartsWith("corrupt tar, rest of shard skipped", bad);
        Assert.Contains($"gave up after {HttpShardStream.MaxRetries} retries", bad);
        Assert.Equal(HttpShardStream.MaxRetries + 1, relay.Cut);   // the first transfer and each retry
        Assert.Equal(HttpShardStream.MaxRetries, relay.Ranged);
    }

    /// <summary>Samples of a few kilobytes each (random bytes: the reader does not decode), key.png and key.txt.</summary>
    static void WriteShard(string path, int shard, Random random)
    {
        using var file = File.Create(path);
        using var tar = new TarWriter(file, TarEntryFormat.Ustar);
        for (var i = 0; i < SamplesPerShard; i++)
        {
            var key = $"s{shard}/{i:0000}";
            var image = new byte[random.Next(2_000, 6_000)];
            random.NextBytes(image);
            tar.WriteEntry(new UstarTarEntry(TarEntryType.RegularFile, key + ".png") { DataStream = new MemoryStream(image) });
            tar.WriteEntry(new UstarTarEntry(TarEntryType.RegularFile, key + ".txt") { DataStream = new MemoryStream(Encoding.UTF8.GetBytes($"sample {i} of shard {shard}")) });
        }
    }

    /// <summary>nginx from the system, serving a folder on a Unix socket of its own (no port to race for), one
    /// process, no keep-alive: each request comes on a connection of its own, which the relay sees whole.</summary>
    sealed class Nginx : IDisposable
    {
        public static readonly string? Executable = new[] { "/usr/sbin/nginx", "/usr/bin/nginx" }.FirstOrDefault(File.Exists);
        readonly Process process;
        public string Socket { get; }

        Nginx(Process process, string socket) => (this.process, Socket) = (process, socket);

        public static Nginx Serve(string root, string dir)
        {
            Directory.CreateDirectory(dir);
            var socket = Path.Combine(dir, "nginx.sock");
            var conf = Path.Combine(dir, "nginx.conf");
            var temps = string.Join("\n", new[] { "client_body", "proxy", "fastcgi", "uwsgi", "scgi" }.Select(t => $"  {t}_temp_path {dir}/{t};"));
            File.WriteAllText(conf, $$"""
                daemon off;
                master_process off;
                pid {{dir}}/nginx.pid;
                error_log {{dir}}/error.log;
                events { worker_connections 64; }
                http {
                  access_log off;
                  keepalive_timeout 0;
                {{temps}}
                  types { application/x-tar tar; }
                  server { listen unix:{{socket}}; root {{root}}; }
                }
                """);
            var info = new ProcessStartInfo(Executable!) { RedirectStandardError = true, RedirectStandardOutput = true };
            foreach (var a in new[] { "-c", conf, "-p", dir, "-e", Path.Combine(dir, "error.log") }) info.ArgumentList.Add(a);
            var process = Process.Start(info)!;
            var clock = Stopwatch.StartNew();
            while (!File.Exists(socket))
            {
                if (process.HasExited || clock.Elapsed > TimeSpan.FromSeconds(30))
                    throw new InvalidOperationException($"nginx did not start: {process.StandardError.ReadToEnd()} {ReadLog(dir)}");
                Thread.Sleep(20);
            }
            return new Nginx(process, socket);
        }

        static string ReadLog(string dir) => File.Exists(Path.Combine(dir, "error.log")) ? File.ReadAllText(Path.Combine(dir, "error.log")) : "";

        public void Dispose()
        {
            if (!process.HasExited) process.Kill();
            process.WaitForExit();
            process.Dispose();
        }
    }

    /// <summary>A TCP relay in front of nginx that cuts a response after a number of body bytes, as a dropped link would:
    /// the first response of each path asked without Range, and, given cutRangedAfter, every response to a Range request.</summary>
    sealed class CuttingRelay : IDisposable
    {
        readonly TcpListener listener = new(IPAddress.Loopback, 0);
        readonly string upstream;
        readonly int cutAfter;
        readonly int? cutRangedAfter;
        readonly HashSet<string> cutPaths = [];
        readonly CancellationTokenSource stop = new();
        int cut, ranged;

        public CuttingRelay(string upstream, int cutAfter, int? cutRangedAfter = null)
        {
            (this.upstream, this.cutAfter, this.cutRangedAfter) = (upstream, cutAfter, cutRangedAfter);
            listener.Start();
            _ = Task.Run(AcceptAsync);
        }

        public int Port => ((IPEndPoint)listener.LocalEndpoint).Port;
        public int Cut => Volatile.Read(ref cut);
        public int Ranged => Volatile.Read(ref ranged);

        async Task AcceptAsync()
        {
            while (!stop.IsCancellationRequested)
            {
                TcpClient client;
                try { client = await listener.AcceptTcpClientAsync(stop.Token); }
                catch (Exception) when (stop.IsCancellationRequested) { return; }
                _ = Task.Run(() => RelayAsync(client));
            }
        }

        async Task RelayAsync(TcpClient client)
        {
            using var _ = client;
            using var server = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
            await server.ConnectAsync(new UnixDomainSocketEndPoint(upstream));
            var fromClient = client.GetStream();
            // The request head, whole (a GET has no body), forwarded as it came.
            var head = new List<byte>();
            var buffer = new byte[1 << 16];
            while (!EndsHead(head))
            {
                var n = await fromClient.ReadAsync(buffer);
                if (n == 0) return;
                head.AddRange(buffer.AsSpan(0, n).ToArray());
            }
            var request = Encoding.ASCII.GetString(head.ToArray());
            var path = request.Split(' ')[1];
            var hasRange = request.Contains("\r\nRange:", StringComparison.OrdinalIgnoreCase);
            if (hasRange) Interlocked.Increment(ref ranged);
            int? cutAt;
            lock (cutPaths) cutAt = hasRange ? cutRangedAfter : cutPaths.Add(path) ? cutAfter : null;
            await server.SendAsync(head.ToArray());
            // The cut counts body bytes: the response head always passes, so each cut is one broken transfer to the
            // reader (a connection closed before the head would be retried inside HttpClient, unseen).
            var response = new List<byte>();
            long sent = 0, bodyStart = -1;
            while (true)
            {
                var n = await server.ReceiveAsync(buffer);
                if (n == 0) return;
                if (bodyStart < 0)
                {
                    response.AddRange(buffer.AsSpan(0, n).ToArray());
                    var end = IndexOfHeadEnd(response);
                    if (end >= 0) bodyStart = end;
                }
                if (cutAt is { } at && bodyStart >= 0 && sent + n >= bodyStart + at)
                {
                    await fromClient.WriteAsync(buffer.AsMemory(0, (int)(bodyStart + at - sent)));
                    Interlocked.Increment(ref cut);
                    client.Client.LingerState = new LingerOption(true, 0);   // a reset, as a dropped link gives
                    return;
                }
                await fromClient.WriteAsync(buffer.AsMemory(0, n));
                sent += n;
            }
        }

        static int IndexOfHeadEnd(List<byte> bytes)
        {
            for (var i = 3; i < bytes.Count; i++)
                if (bytes[i - 3] == '\r' && bytes[i - 2] == '\n' && bytes[i - 1] == '\r' && bytes[i] == '\n') return i + 1;
            return -1;
        }

        static bool EndsHead(List<byte> head) =>
            head.Count >= 4 && head[^4] == '\r' && head[^3] == '\n' && head[^2] == '\r' && head[^1] == '\n';

        public void Dispose()
        {
            stop.Cancel();
            listener.Stop();
        }
    }
}
