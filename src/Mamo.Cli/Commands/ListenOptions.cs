using System.CommandLine;
using Mamo.Cli.Dashboard;
using Mamo.Cli.Web;

namespace Mamo.Cli.Commands;

/// <summary>An address option and its token option, and the address and token they mean: `--dashboard ADDR|off` and
/// `--dashboard-token` of the training commands (docs/DASHBOARD.md), `--listen` and `--token` of `mamo serve`.</summary>
sealed class ListenOptions(string listenName, string listenDescription, ListenAddress defaultAddress, string tokenName, string tokenVariable, string docs)
{
    public Option<string?> Listen { get; } = new(listenName) { Description = listenDescription };
    public Option<string?> Token { get; } = new(tokenName)
    {
        Description = $"Required to listen on a non-loopback address: a bearer token (default: {tokenVariable}, or none)",
    };

    /// <summary>The dashboard's: a bearer token, or open ?token=TOKEN once for a cookie.</summary>
    public static ListenOptions Dashboard(string listenName, string listenDescription) =>
        new(listenName, listenDescription, DashboardServer.DefaultAddress, "--dashboard-token", DashboardServer.TokenVariable, "docs/DASHBOARD.md");

    /// <summary>The address to serve (null: off) and the token; a bad address or a missing token throws FormatException.</summary>
    public (ListenAddress? Address, string? Token) Resolve(ParseResult parse)
    {
        var name = Listen.Name;
        var address = parse.GetValue(Listen) is { } given ? ListenAddress.Parse(given, name) : defaultAddress;
        var token = parse.GetValue(Token) ?? Environment.GetEnvironmentVariable(tokenVariable);
        if (address is { IsLoopback: false } && string.IsNullOrEmpty(token))
            throw new FormatException($"{name} {address}: a non-loopback address needs {tokenName} (or {tokenVariable}); " +
                                      $"or keep 127.0.0.1 and put a reverse proxy in front ({docs})");
        return (address, string.IsNullOrEmpty(token) ? null : token);
    }
}
