using Akka.Actor;
using Akka.Cluster.Hosting;
using Akka.Configuration;
using Akka.Event;
using Akka.Hosting;
using Akka.Remote.Hosting;
using System.Security.Cryptography;
using System.Security.Cryptography.X509Certificates;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;
using Mamo.Actors.Run;

namespace Mamo.Actors.Cluster;

/// <summary>What makes a process a cluster node: an ActorSystem built through Akka.Hosting, with remoting on the node's
/// address and Akka.Cluster with its seeds and roles (Akka.Cluster.Hosting), over hocon/cluster.conf (embedded) and
/// mamo's settings. The caller adds its singletons and proxies to the builder.</summary>
public static class ClusterNode
{
    /// <summary>cluster.conf over <paramref name="settings"/> (mamo.conf's defaults when null).</summary>
    public static Config Config(Config? settings = null)
    {
        using var stream = typeof(ClusterNode).Assembly.GetManifestResourceStream("cluster.conf")
            ?? throw new InvalidOperationException("cluster.conf is not embedded");
        using var reader = new StreamReader(stream);
        return ConfigurationFactory.ParseString(reader.ReadToEnd()).WithFallback(settings ?? MamoSettings.Defaults());
    }

    /// <summary>Starts the node; its ActorSystem is the host's. Stopping the host runs CoordinatedShutdown.</summary>
    /// <param name="tls">remoting over TLS with mutual authentication; null: plain TCP</param>
    public static async Task<IHost> StartAsync(ClusterNodeOptions node, Config settings, ClusterTls? tls, Action<AkkaConfigurationBuilder>? configure = null)
    {
        var remote = new RemoteOptions { HostName = node.Host, Port = node.Port };
        if (tls is not null) (remote.EnableSsl, remote.Ssl) = (true, Tls(tls));
        var protocol = tls is null ? "akka.tcp" : "akka.ssl.tcp";   // a TLS node's address names its transport
        var seeds = node.SeedNodes.Select(a => ClusterNodeOptions.ParseAddress(a, "--seed-nodes")).Select(a => $"{protocol}://mamo@{a.Host}:{a.Port}").ToArray();
        // Akka.Cluster.Hosting (1.5.73) writes the roles into HOCON as they are: quoted, the name's ':' parses.
        string[] roles = [.. node.Roles, ClusterNodeOptions.NamePrefix + node.Name];
        static string Quote(string v) => "\"" + v.Replace("\\", "\\\\").Replace("\"", "\\\"") + "\"";
        var host = new HostBuilder().ConfigureServices(services =>
        {
            services.AddSingleton<IHostLifetime, ProcessLifetime>();
            services.AddAkka("mamo", builder =>
            {
                // Each of these overrides what came before: the node's own address and membership win over the files.
                builder.AddHocon(Config(settings), HoconAddMode.Prepend)
                    .WithRemoting(remote)
                    .WithClustering(new ClusterOptions { Roles = [.. roles.Select(Quote)], SeedNodes = seeds });
                configure?.Invoke(builder);
            });
        }).Build();
        try { await host.StartAsync(); }
        catch
        {
            host.Dispose();
            throw;
        }
        return host;
    }

    /// <summary>This node's certificate, presented to every peer and asked of every peer; a peer's must chain to the CA.
    /// The host name is not checked: a node is known by its certificate, not by the address it dialled.</summary>
    static SslOptions Tls(ClusterTls tls)
    {
        X509Certificate2 certificate, ca;
        try
        {
            certificate = X509CertificateLoader.LoadPkcs12FromFile(tls.Certificate, tls.Password);
            ca = X509CertificateLoader.LoadCertificateFromFile(tls.Ca);
        }
        catch (CryptographicException e) { throw new SettingsException($"'mamo.cluster.tls': {e.Message} ({tls.Certificate}, {tls.Ca})"); }
        if (!certificate.HasPrivateKey) throw new SettingsException($"'mamo.cluster.tls.certificate': {tls.Certificate} holds no private key");
        if (!IssuedBy(ca, certificate, out var why)) throw new SettingsException($"'mamo.cluster.tls.certificate' does not chain to 'mamo.cluster.tls.ca': {why}");
        return new SslOptions
        {
            X509Certificate = certificate,
            RequireMutualAuthentication = true,
            ValidateCertificateHostname = false,
            CustomValidator = (peer, _, remote, _, log) =>
            {
                var why = "no certificate";
                if (peer is not null && IssuedBy(ca, peer, out why)) return true;
                log.Warning("refused TLS peer {0}: {1}", remote, why);
                return false;
            },
        };
    }

    /// <summary>Whether <paramref name="certificate"/> chains to <paramref name="ca"/> alone (not the system's roots).</summary>
    static bool IssuedBy(X509Certificate2 ca, X509Certificate certificate, out string why)
    {
        using var chain = new X509Chain();
        chain.ChainPolicy.TrustMode = X509ChainTrustMode.CustomRootTrust;
        chain.ChainPolicy.CustomTrustStore.Add(ca);
        chain.ChainPolicy.RevocationMode = X509RevocationMode.NoCheck;   // a private CA publishes no revocation list
        var ok = chain.Build(certificate as X509Certificate2 ?? X509CertificateLoader.LoadCertificate(certificate.GetRawCertData()));
        why = ok ? "" : string.Join("; ", chain.ChainStatus.Select(s => s.StatusInformation.Trim()));
        return ok;
    }

    /// <summary>The node's ActorSystem.</summary>
    public static ActorSystem System(this IHost host) => host.Services.GetRequiredService<ActorSystem>();

    /// <summary>mamo's own SIGINT/SIGTERM handler stops a node (it finishes what it does, then leaves the cluster): the
    /// host's console lifetime would stop it at once.</summary>
    sealed class ProcessLifetime : IHostLifetime
    {
        public Task WaitForStartAsync(CancellationToken cancellationToken) => Task.CompletedTask;
        public Task StopAsync(CancellationToken cancellationToken) => Task.CompletedTask;
    }
}
