using System.Diagnostics;
using System.Security.Cryptography;
using System.Security.Cryptography.X509Certificates;
using System.Text.Json;
using Xunit;
using Xunit.Abstractions;

using static Mamo.Cli.Tests.ClusterTests;

namespace Mamo.Cli.Tests;

/// <summary>Remoting over TLS with mutual authentication (mamo.cluster.tls), between real node processes.</summary>
[Collection(ClusterCollection.Name)]
public class ClusterTlsTests(ITestOutputHelper output)
{
    /// <summary>A CA, and a .pfx per node signed by it, as docs/CLUSTER.md makes them with openssl.</summary>
    sealed class Authority(string name) : IDisposable
    {
        public X509Certificate2 Certificate { get; } = MakeCa(name);

        static X509Certificate2 MakeCa(string name)
        {
            using var key = RSA.Create(2048);
            var request = new CertificateRequest($"CN={name}", key, HashAlgorithmName.SHA256, RSASignaturePadding.Pkcs1);
            request.CertificateExtensions.Add(new X509BasicConstraintsExtension(true, false, 0, true));
            request.CertificateExtensions.Add(new X509KeyUsageExtension(X509KeyUsageFlags.KeyCertSign, true));
            return request.CreateSelfSigned(DateTimeOffset.UtcNow.AddDays(-1), DateTimeOffset.UtcNow.AddDays(30));
        }

        /// <summary>Writes the CA's certificate (PEM) to <paramref name="path"/>.</summary>
        public string WriteCa(string path)
        {
            File.WriteAllText(path, Certificate.ExportCertificatePem());
            return path;
        }

        /// <summary>A node certificate with its key, signed by this CA, as a .pfx with <paramref name="password"/>.</summary>
        public string WriteNode(string path, string node, string password)
        {
            using var nodeKey = RSA.Create(2048);
            var request = new CertificateRequest($"CN={node}", nodeKey, HashAlgorithmName.SHA256, RSASignaturePadding.Pkcs1);
            request.CertificateExtensions.Add(new X509EnhancedKeyUsageExtension([new Oid("1.3.6.1.5.5.7.3.1"), new Oid("1.3.6.1.5.5.7.3.2")], false));
            var serial = RandomNumberGenerator.GetBytes(8);
            using var signed = request.Create(Certificate, DateTimeOffset.UtcNow.AddDays(-1), DateTimeOffset.UtcNow.AddDays(29), serial);
            using var withKey = signed.CopyWithPrivateKey(nodeKey);
            File.WriteAllBytes(path, withKey.Export(X509ContentType.Pfx, password));
            return path;
        }

        public void Dispose() => Certificate.Dispose();
    }

    [Fact]
    public async Task Two_nodes_form_a_cluster_over_tls_and_a_node_of_another_ca_or_without_tls_cannot_join()
    {
        using var folder = new TempFolder();
        var manifest = Manifest(folder);
        var run = folder.File("run");
        using var ca = new Authority("mamo-test-ca");
        using var rogue = new Authority("another-ca");
        const string Password = "s3cret";
        string[] Tls(Authority authority, string node) => [
            "--set", $"cluster.tls.certificate={authority.WriteNode(folder.File(node + ".pfx"), node, Password)}",
            "--set", $"cluster.tls.password={Password}", "--set", $"cluster.tls.ca={authority.WriteCa(folder.File(authority.Certificate.GetNameInfo(X509NameType.SimpleName, false) + ".pem"))}"];
        var ports = Enumerable.Range(0, 4).Select(_ => Ports.Free()).ToArray();
        var seed = $"127.0.0.1:{ports[0]}";
        // One replica more than there are nodes: no round starts, and the cluster stays up to be looked at.
        Process Start(int i, string roles, string[] tls) => Process.Start(MamoProcess.StartInfo([
            "pretrain", "--plain", "--source", "manifest:" + manifest, "--run-dir", run, "--cluster", $"127.0.0.1:{ports[i]}", "--seed-nodes", seed,
            "--node-name", $"n{i}", "--roles", roles, "--set", "cluster.min-replicas=5", "--set", "torch-threads=1", "--set", "eval.every-steps=0", .. tls]))!;
        var nodes = new List<Process>
        {
            Start(0, "coordinator,trainer", Tls(ca, "n0")),
            Start(1, "trainer", Tls(ca, "n1")),
            Start(2, "trainer", Tls(rogue, "n2")),   // TLS, with a certificate the cluster's CA did not sign
            Start(3, "trainer", []),                  // plain TCP
        };
        var logs = nodes.Select(p => (Out: p.StandardOutput.ReadToEndAsync(), Err: p.StandardError.ReadToEndAsync())).ToList();
        var seedLog = Path.Combine(run, "nodes", "n0", "mamo.log");
        try
        {
            // The seed refuses both: the rogue's certificate in the handshake, the plain node's bytes as not TLS at all.
            var clock = Stopwatch.StartNew();
            while (!File.Exists(seedLog) || Read(seedLog) is var log && !(log.Contains("refused TLS peer") && log.Contains("not an SSL/TLS record")))
            {
                // A refused node may give up at once (Akka shuts a node down on a failed TLS handshake): the two members may not.
                if (nodes.Take(2).FirstOrDefault(p => p.HasExited) is { } gone)
                    Assert.Fail($"node n{nodes.IndexOf(gone)} exited {gone.ExitCode} before the seed refused both: {await logs[nodes.IndexOf(gone)].Err}");
                Assert.True(clock.Elapsed < TimeSpan.FromMinutes(2), "the seed saw no refused attempt");
                Thread.Sleep(200);
            }
            Assert.Contains("unable to get local issuer certificate", Read(seedLog));

            // Looked at over TLS with a certificate of the cluster's CA, the cluster is the two nodes, both up.
            string[] names = [];
            while (true)
            {
                var (code, stdout, stderr) = Cli.Run(["cluster", "status", "--seed-nodes", seed, "--json", "--timeout", "30", .. Tls(ca, "status")]);
                Assert.True(code == 0, stderr);
                var members = JsonDocument.Parse(stdout).RootElement.GetProperty("members").EnumerateArray().ToList();
                names = [.. members.Select(m => m.GetProperty("name").GetString()!)];
                if (members.Count(m => m.GetProperty("status").GetString() == "up") == 2) break;
                Assert.True(clock.Elapsed < TimeSpan.FromMinutes(3), $"the two TLS nodes did not come up: {stdout}");
            }
            Assert.Equal(["n0", "n1"], names);
            // Without TLS, status cannot reach it either.
            var (plainCode, _, plainErr) = Cli.Run("cluster", "status", "--seed-nodes", seed, "--json", "--timeout", "5");
            Assert.True(plainCode == 1, plainErr);
            // A refused node that gave up said why, and failed.
            foreach (var i in new[] { 2, 3 }.Where(i => nodes[i].HasExited))
            {
                var err = await logs[i].Err;
                Assert.True(nodes[i].ExitCode != 0 && err.Contains("this node could not join the cluster"), $"n{i} exited {nodes[i].ExitCode}: {err}");
            }
        }
        finally
        {
            foreach (var p in nodes.Where(p => !p.HasExited)) p.Kill(entireProcessTree: true);
            foreach (var p in nodes) await p.WaitForExitAsync();
            output.WriteLine(await logs[0].Err);
        }
    }

    static string Read(string path)
    {
        using var stream = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.ReadWrite);
        return new StreamReader(stream).ReadToEnd();
    }
}
