using System.Net;
using System.Net.ServerSentEvents;
using System.Reflection;
using System.Runtime.CompilerServices;
using System.Text;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Diagnostics.HealthChecks;
using Microsoft.AspNetCore.Hosting;
using Microsoft.AspNetCore.Http;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Diagnostics.HealthChecks;
using Microsoft.Extensions.Logging;
using Mamo.Cli.Web;

namespace Mamo.Cli.Dashboard;

/// <summary>
/// The read-only dashboard of one run (docs/DASHBOARD.md): the page, the run's history and its new lines over
/// Server-Sent Events, thumbnails of the evaluation probes, /metrics in Prometheus text, /healthz and /readyz.
/// Everything it shows comes from <see cref="RunFiles"/>, which follows the run's files; no request input reaches
/// a file path. A non-loopback address needs a token: a bearer header, or a cookie set by opening ?token=TOKEN once.
/// </summary>
public sealed class DashboardServer : IAsyncDisposable
{
    const int SnapshotPoints = 2000;
    static readonly TimeSpan PollEvery = TimeSpan.FromMilliseconds(500), KeepAlive = TimeSpan.FromSeconds(15);
    public const string TokenCookie = "mamo_dashboard_token", TokenVariable = "MAMO_DASHBOARD_TOKEN";

    /// <summary>127.0.0.1:8080, or the next free port: several runs on one machine each get a dashboard.</summary>
    public static readonly ListenAddress DefaultAddress = new(IPAddress.Loopback, 8080) { FallsForward = true };

    readonly RunFiles history;
    readonly RunMetrics metrics;
    readonly string? token;
    readonly Func<HealthCheckResult>? live, ready;
    readonly CancellationTokenSource stopping = new();
    TaskCompletionSource changed = new(TaskCreationOptions.RunContinuationsAsynchronously);
    volatile bool closing;
    WebApplication? app;
    Task polling = Task.CompletedTask;

    /// <summary>The address it serves, e.g. http://127.0.0.1:8080/.</summary>
    public Uri Address { get; private set; } = null!;

    DashboardServer(RunFiles history, string? token, Func<HealthCheckResult>? live, Func<HealthCheckResult>? ready)
    {
        this.history = history;
        metrics = new RunMetrics(history);
        this.token = token;
        this.live = live;
        this.ready = ready;
    }

    /// <summary>Serves <paramref name="history"/> at <paramref name="listen"/>, or, where it falls forward, at the next
    /// free port when that one is taken.</summary>
    /// <param name="live">liveness of the process behind the dashboard; null: the dashboard serves</param>
    /// <param name="ready">whether the run is ready; null: once metrics.jsonl has been read</param>
    /// <exception cref="ArgumentException">a non-loopback address without a token</exception>
    public static async Task<DashboardServer> StartAsync(RunFiles history, ListenAddress listen, string? token,
        Func<HealthCheckResult>? live = null, Func<HealthCheckResult>? ready = null)
    {
        if (!listen.IsLoopback && string.IsNullOrEmpty(token))
            throw new ArgumentException($"the dashboard would listen on {listen}, which is not a loopback address, without a token: give one " +
                                        $"(--dashboard-token, or {TokenVariable}), or listen on 127.0.0.1 behind a reverse proxy (docs/DASHBOARD.md)");
        var server = new DashboardServer(history, string.IsNullOrEmpty(token) ? null : token, live, ready);
        history.Poll();
        (server.app, server.Address) = await WebServer.StartAsync(listen, server.Build);
        server.polling = Task.Run(server.PollAsync);
        return server;
    }

    WebApplication Build(ListenAddress listen)
    {
        var builder = WebApplication.CreateSlimBuilder();
        builder.Logging.ClearProviders();
        builder.WebHost.ConfigureKestrel(k => k.Listen(listen.Host, listen.Port));
        builder.Services.AddHealthChecks()
            .AddCheck("process", () => live?.Invoke() ?? HealthCheckResult.Healthy("the dashboard serves"), tags: ["live"])
            .AddCheck("run", () => ready?.Invoke() ?? (history.Loaded ? HealthCheckResult.Healthy($"{RunFiles.MetricsFile} read")
                : HealthCheckResult.Unhealthy($"no {RunFiles.MetricsFile} in {history.RunDir} yet")), tags: ["ready"]);
        var web = builder.Build();
        web.Use(Guard);
        web.MapGet("/", () => Asset("index.html", "text/html; charset=utf-8"));
        web.MapGet("/dashboard.js", () => Asset("dashboard.js", "text/javascript; charset=utf-8"));
        web.MapGet("/dashboard.css", () => Asset("dashboard.css", "text/css; charset=utf-8"));
        web.MapGet("/uplot.js", () => Asset("uPlot.iife.min.js", "text/javascript; charset=utf-8"));
        web.MapGet("/uplot.css", () => Asset("uPlot.min.css", "text/css; charset=utf-8"));
        web.MapGet("/api/history", (int? points) =>
            Results.Text(history.Snapshot(Math.Clamp(points ?? SnapshotPoints, 2, 20_000)).ToJsonString(), "application/json"));
        web.MapGet("/api/events", (HttpContext context, long? after, CancellationToken ct) =>
        {
            // A reconnecting EventSource says where it stopped; a new page, where its snapshot ended.
            var from = long.TryParse(context.Request.Headers["Last-Event-ID"], out var last) ? last : after ?? history.Sequence;
            return TypedResults.ServerSentEvents(Events(from, ct));
        });
        web.MapGet("/api/thumbnail/{set:int}/{image:int}", (int set, int image) =>
            history.Thumbnail(set, image) is { } png ? Results.Bytes(png, "image/png") : Results.NotFound());
        web.MapGet("/metrics", async (HttpContext context, CancellationToken ct) =>
        {
            context.Response.ContentType = RunMetrics.ContentType;
            await metrics.WriteAsync(context.Response.Body, ct);
        });
        web.MapHealthChecks("/healthz", new HealthCheckOptions { Predicate = r => r.Tags.Contains("live") });
        web.MapHealthChecks("/readyz", new HealthCheckOptions { Predicate = r => r.Tags.Contains("ready") });
        return web;
    }

    /// <summary>Security headers on every answer; with a token, nothing but the health checks without it.</summary>
    async Task Guard(HttpContext context, RequestDelegate next)
    {
        context.Response.Headers.XContentTypeOptions = "nosniff";
        context.Response.Headers.ContentSecurityPolicy = "default-src 'self'; img-src 'self'; style-src 'self' 'unsafe-inline'";
        var path = context.Request.Path;
        if (token is null || path.StartsWithSegments("/healthz") || path.StartsWithSegments("/readyz"))
        {
            await next(context);
            return;
        }
        if (context.Request.Query.TryGetValue("token", out var given) && WebServer.SameToken(given.ToString(), token))
        {
            // A link with ?token= sets the cookie once; the address bar then stops showing the token.
            context.Response.Cookies.Append(TokenCookie, token, new CookieOptions { HttpOnly = true, SameSite = SameSiteMode.Strict, Path = "/" });
            context.Response.Redirect(context.Request.PathBase + path);
            return;
        }
        if (WebServer.HasBearer(context, token) || (context.Request.Cookies.TryGetValue(TokenCookie, out var cookie) && WebServer.SameToken(cookie, token)))
        {
            await next(context);
            return;
        }
        context.Response.StatusCode = StatusCodes.Status401Unauthorized;
        context.Response.Headers.WWWAuthenticate = "Bearer";
        await context.Response.WriteAsync("a token is required: send Authorization: Bearer TOKEN, or open the dashboard once with ?token=TOKEN\n");
    }

    static IResult Asset(string name, string contentType)
    {
        using var stream = Assembly.GetExecutingAssembly().GetManifestResourceStream("dashboard/" + name)
            ?? throw new InvalidOperationException($"the dashboard asset {name} is not embedded in this build");
        using var copy = new MemoryStream();
        stream.CopyTo(copy);
        return Results.Bytes(copy.ToArray(), contentType);
    }

    /// <summary>Each new line as an event, with its sequence number as the id. When the server closes, a stream sends
    /// what is left (a run's final state line) and ends.</summary>
    async IAsyncEnumerable<SseItem<string>> Events(long after, [EnumeratorCancellation] CancellationToken ct)
    {
        var last = after;
        while (!ct.IsCancellationRequested)
        {
            var wake = Volatile.Read(ref changed).Task;
            var events = history.EventsAfter(last);
            foreach (var (seq, e) in events)
            {
                last = seq;
                yield return new SseItem<string>(e.ToJsonString()) { EventId = seq.ToString() };
            }
            if (events.Count > 0) continue;
            if (closing) yield break;
            var idle = Task.Delay(KeepAlive, ct);
            if (await Task.WhenAny(wake, idle) == idle && !ct.IsCancellationRequested)
                yield return new SseItem<string>("{}", "ping");   // keeps proxies from closing a quiet stream
        }
    }

    async Task PollAsync()
    {
        while (!stopping.IsCancellationRequested)
        {
            Poll();
            try { await Task.Delay(PollEvery, stopping.Token); }
            catch (OperationCanceledException) { break; }
        }
    }

    void Poll()
    {
        try
        {
            if (history.Poll() > 0) Wake();
        }
        catch (IOException) { }   // a file being replaced: read at the next poll
    }

    void Wake() => Interlocked.Exchange(ref changed, new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously)).TrySetResult();

    /// <summary>Reads the files a last time, lets every open page receive it, then stops.</summary>
    public async ValueTask DisposeAsync()
    {
        await stopping.CancelAsync();
        await polling;
        Poll();
        closing = true;
        Wake();
        if (app is not null)
        {
            using (var patience = new CancellationTokenSource(TimeSpan.FromSeconds(2))) await app.StopAsync(patience.Token);
            await app.DisposeAsync();
        }
        stopping.Dispose();
    }
}
