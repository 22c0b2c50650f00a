using System.Net;
using System.Net.Sockets;
using System.Security.Cryptography;
using System.Text;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Connections;
using Microsoft.AspNetCore.Hosting.Server;
using Microsoft.AspNetCore.Hosting.Server.Features;
using Microsoft.AspNetCore.Http;
using Microsoft.Extensions.DependencyInjection;

namespace Mamo.Cli.Web;

/// <summary>No server could listen: its address (and, for a default, the ports after it) are taken.</summary>
public sealed class AddressInUseError(string message, Exception inner) : IOException(message, inner);

/// <summary>Where a server of mamo's listens (the dashboard, `mamo serve`): an IP address and a port (0: any free one).</summary>
public sealed record ListenAddress(IPAddress Host, int Port)
{
    /// <summary>Whether a busy port moves to the next free one. Only a default does: an address the user named is a
    /// fixed target (a Prometheus scrape, a client, a tunnel), and serving elsewhere would break it unseen.</summary>
    public bool FallsForward { get; init; }

    public bool IsLoopback => IPAddress.IsLoopback(Host);

    /// <summary>HOST:PORT (an IP address, or localhost), or null for "off".</summary>
    /// <exception cref="FormatException">neither</exception>
    public static ListenAddress? Parse(string value, string option)
    {
        if (value.Equals("off", StringComparison.OrdinalIgnoreCase)) return null;
        var colon = value.LastIndexOf(':');
        if (colon <= 0 || !int.TryParse(value.AsSpan(colon + 1), out var port) || port is < 0 or > 65535)
            throw new FormatException($"{option} '{value}': expected HOST:PORT (e.g. 127.0.0.1:8080) or off");
        var host = value[..colon].Trim('[', ']');
        var address = host.Equals("localhost", StringComparison.OrdinalIgnoreCase) ? IPAddress.Loopback
            : IPAddress.TryParse(host, out var ip) ? ip
            : throw new FormatException($"{option} '{value}': '{host}' is not an IP address (no name but localhost is resolved)");
        return new ListenAddress(address, port);
    }

    public override string ToString() => Host.AddressFamily == AddressFamily.InterNetworkV6 ? $"[{Host}]:{Port}" : $"{Host}:{Port}";
}

/// <summary>What mamo's Kestrel servers share: binding an address (a default falls forward to the next free port) and
/// the bearer-token check.</summary>
public static class WebServer
{
    const int PortsTried = 50;

    /// <summary>Starts the application <paramref name="build"/> makes for an address, at <paramref name="listen"/> or,
    /// where it falls forward, the next free port; returns it and the address it serves, e.g. http://127.0.0.1:8080/.</summary>
    public static async Task<(WebApplication App, Uri Address)> StartAsync(ListenAddress listen, Func<ListenAddress, WebApplication> build)
    {
        for (var attempt = 0; ; attempt++)
        {
            var at = listen with { Port = listen.Port == 0 ? 0 : listen.Port + attempt };
            var candidate = build(at);
            try
            {
                await candidate.StartAsync();
            }
            catch (IOException e) when (e.InnerException is AddressInUseException)
            {
                await candidate.DisposeAsync();
                if (listen.FallsForward && listen.Port != 0 && attempt < PortsTried && at.Port < 65535) continue;
                throw new AddressInUseError(listen.FallsForward ? $"{listen} and the {attempt} ports after it are in use" : $"{listen} is in use", e);
            }
            var bound = candidate.Services.GetRequiredService<IServer>().Features.Get<IServerAddressesFeature>()!.Addresses.First();
            return (candidate, new Uri(bound.EndsWith('/') ? bound : bound + "/"));
        }
    }

    /// <summary>Whether the request carries Authorization: Bearer TOKEN.</summary>
    public static bool HasBearer(HttpContext context, string token)
    {
        var header = context.Request.Headers.Authorization.ToString();
        return header.StartsWith("Bearer ", StringComparison.Ordinal) && SameToken(header["Bearer ".Length..], token);
    }

    /// <summary>Compares in constant time, so the answer's timing tells nothing of the token.</summary>
    public static bool SameToken(string given, string token) =>
        CryptographicOperations.FixedTimeEquals(Encoding.UTF8.GetBytes(given), Encoding.UTF8.GetBytes(token));
}
