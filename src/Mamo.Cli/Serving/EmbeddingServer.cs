using System.Diagnostics;
using System.Net;
using System.Text.Json;
using Mamo.Actors.Pipeline;
using Mamo.Cli.Web;
using Mamo.Data;
using Mamo.Data.Kafka;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Diagnostics.HealthChecks;
using Microsoft.AspNetCore.Hosting;
using Microsoft.AspNetCore.Http;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Diagnostics.HealthChecks;
using Microsoft.Extensions.Logging;
using Prometheus;

namespace Mamo.Cli.Serving;

/// <summary>
/// `mamo serve`'s HTTP service (docs/SERVING.md): embeds a text or an image with a model version of a run, the newest
/// unless the request names one, as `mamo embed` would; lists the versions; with an index (IndexFollower), searches the
/// published catalogue of one complete version with the query embedded by that version; /metrics, /healthz, /readyz. Each request
/// is prepared on its own thread and embedded in a batch with the others that arrive within the latency budget
/// (QueryBatcher). Bad input gets a 4xx with the reason. A non-loopback address needs a bearer token.
/// </summary>
public sealed class EmbeddingServer : IAsyncDisposable
{
    public const string TokenVariable = "MAMO_SERVE_TOKEN";
    /// <summary>The most a text request's body may hold; a caption is a few hundred bytes, and the tokenizer keeps
    /// MaxTextLength tokens of it.</summary>
    public const int MaxTextBody = 64 * 1024;
    static readonly TimeSpan RefreshEvery = TimeSpan.FromSeconds(1);
    static readonly string[] ImageTypes = ["image/png", "image/jpeg", "image/webp", "image/gif", "application/octet-stream"];

    /// <summary>127.0.0.1:8090, or the next free port.</summary>
    public static readonly ListenAddress DefaultAddress = new(IPAddress.Loopback, 8090) { FallsForward = true };

    /// <summary>How it batches queries: at most MaxBatch a pass, the first waiting BatchWaitMs for others, at most
    /// QueueCapacity waiting.</summary>
    public sealed record Options(int MaxBatch = 32, int BatchWaitMs = 5, int QueueCapacity = 1024);

    /// <summary>The published embeddings topic to search (kafka://HOST:PORT/TOPIC), the consumer's librdkafka
    /// properties, and when searches move to a new version.</summary>
    public sealed record IndexOptions(KafkaSpec Topic, IReadOnlyDictionary<string, string> ConsumerSettings,
        IndexFollower.SwitchRule Rule = IndexFollower.SwitchRule.Complete);

    readonly ModelVersions versions;
    readonly QueryBatcher batcher;
    readonly DecodeLimits limits;
    readonly string? token;
    readonly Action<string> log;
    readonly CollectorRegistry registry = Prometheus.Metrics.NewCustomRegistry();
    readonly Counter requests, passes, batched;
    readonly Histogram duration;
    IndexFollower? index;
    readonly CancellationTokenSource stopping = new();
    WebApplication app = null!;
    Task refreshing = Task.CompletedTask;

    /// <summary>The address it serves, e.g. http://127.0.0.1:8090/.</summary>
    public Uri Address { get; private set; } = null!;

    EmbeddingServer(ModelVersions versions, Options options, DecodeLimits limits, string? token, Action<string> log)
    {
        this.versions = versions;
        this.limits = limits;
        this.token = token;
        this.log = log;
        var f = Prometheus.Metrics.WithCustomRegistry(registry);
        requests = f.CreateCounter("mamo_serve_requests_total", "Requests answered, by endpoint and status code", "endpoint", "code");
        duration = f.CreateHistogram("mamo_serve_request_duration_seconds", "Time to answer a request, by endpoint", new HistogramConfiguration
        {
            LabelNames = ["endpoint"], Buckets = Histogram.ExponentialBuckets(0.001, 2, 14),   // 1 ms to 8 s
        });
        passes = f.CreateCounter("mamo_serve_forward_passes_total", "Forward passes of the encoders, by modality", "modality");
        batched = f.CreateCounter("mamo_serve_batched_queries_total", "Queries embedded, by modality; divided by the passes, the mean batch", "modality");
        var loaded = f.CreateGauge("mamo_serve_loaded_versions", "Model versions loaded now");
        var known = f.CreateGauge("mamo_serve_versions", "Model versions it can answer with");
        var searched = f.CreateGauge("mamo_serve_index_step", "The step of the version searched (-1: none complete yet)");
        var items = f.CreateGauge("mamo_serve_index_items", "Vectors of the version searched, by modality", "modality");
        var skippedRecords = f.CreateGauge("mamo_serve_index_skipped_records", "Records of the followed topics that were neither an embedding nor a version event");
        registry.AddBeforeCollectCallback(() =>
        {
            loaded.Set(versions.Loaded);
            known.Set(versions.List().Count);
            if (index is null) return;
            var now = index.Current;
            searched.Set(now?.Step ?? -1);
            foreach (var (modality, n) in now?.Items ?? new Dictionary<string, int>()) items.WithLabels(modality).Set(n);
            skippedRecords.Set(index.Skipped);
        });
        batcher = new QueryBatcher(versions, options.MaxBatch, TimeSpan.FromMilliseconds(options.BatchWaitMs), options.QueueCapacity, p =>
        {
            passes.WithLabels(p.Modality).Inc();
            batched.WithLabels(p.Modality).Inc(p.Queries);
        });
    }

    /// <summary>Serves the versions of <paramref name="versions"/> at <paramref name="listen"/>, refreshing them from
    /// the run folder every second.</summary>
    /// <exception cref="ArgumentException">a non-loopback address without a token</exception>
    /// <exception cref="AddressInUseError">the address is taken</exception>
    /// <exception cref="FormatException">an index address it cannot follow</exception>
    public static async Task<EmbeddingServer> StartAsync(ModelVersions versions, Options options, DecodeLimits limits, ListenAddress listen, string? token,
        Action<string> log, IndexOptions? index = null)
    {
        if (!listen.IsLoopback && string.IsNullOrEmpty(token))
            throw new ArgumentException($"mamo serve would listen on {listen}, which is not a loopback address, without a token: give one " +
                                        $"(--token, or {TokenVariable}), or listen on 127.0.0.1 behind a reverse proxy (docs/SERVING.md)");
        var server = new EmbeddingServer(versions, options, limits, string.IsNullOrEmpty(token) ? null : token, log);
        server.Refresh();
        try
        {
            if (index is not null) server.index = new IndexFollower(index.Topic, index.ConsumerSettings, index.Rule, server.Prepare, log);
            (server.app, server.Address) = await WebServer.StartAsync(listen, server.Build);
        }
        catch
        {
            server.index?.Dispose();
            server.batcher.Dispose();
            throw;
        }
        server.refreshing = Task.Run(server.RefreshAsync);
        return server;
    }

    WebApplication Build(ListenAddress listen)
    {
        var builder = WebApplication.CreateSlimBuilder();
        builder.Logging.ClearProviders();
        builder.WebHost.ConfigureKestrel(k =>
        {
            k.Listen(listen.Host, listen.Port);
            k.Limits.MaxRequestBodySize = null;   // each endpoint reads its body against its own limit, and says which
        });
        builder.Services.AddHealthChecks()
            .AddCheck("process", () => HealthCheckResult.Healthy("it serves"), tags: ["live"])
            .AddCheck("model", () => versions.Newest is { } v ? HealthCheckResult.Healthy($"answering with {v.Name}")
                : HealthCheckResult.Unhealthy("the run folder has no checkpoint yet"), tags: ["ready"])
            .AddCheck("index", () => index is null || index.Current is not null ? HealthCheckResult.Healthy(index?.Current?.Version ?? "no index")
                : HealthCheckResult.Unhealthy($"no version of {index.Name} is complete yet"), tags: ["ready"]);
        var web = builder.Build();
        web.Use(Guard);
        web.MapPost("/embed/text", EmbedText);
        web.MapPost("/embed/image", EmbedImage);
        web.MapGet("/search", Search);
        web.MapGet("/versions", () => Results.Json(new
        {
            @default = versions.Newest?.Name,
            versions = versions.List().Select(l => new { version = l.Version.Name, step = l.Version.Step, loaded = l.Loaded }),
            index = index is null ? null : new { topic = index.Name, version = index.Current?.Version, items = index.Current?.Items },
        }));
        web.MapGet("/metrics", async (HttpContext context, CancellationToken ct) =>
        {
            context.Response.ContentType = Dashboard.RunMetrics.ContentType;
            await registry.CollectAndExportAsTextAsync(context.Response.Body, ExpositionFormat.PrometheusText, ct);
        });
        web.MapHealthChecks("/healthz", new HealthCheckOptions { Predicate = r => r.Tags.Contains("live") });
        web.MapHealthChecks("/readyz", new HealthCheckOptions { Predicate = r => r.Tags.Contains("ready") });
        return web;
    }

    /// <summary>The token (health checks excepted), and each request counted and timed.</summary>
    async Task Guard(HttpContext context, RequestDelegate next)
    {
        var path = context.Request.Path;
        var clock = Stopwatch.StartNew();
        if (token is not null && !path.StartsWithSegments("/healthz") && !path.StartsWithSegments("/readyz") && !WebServer.HasBearer(context, token))
        {
            context.Response.Headers.WWWAuthenticate = "Bearer";
            await Error(StatusCodes.Status401Unauthorized, "a token is required: send Authorization: Bearer TOKEN").ExecuteAsync(context);
        }
        else await next(context);
        var endpoint = path.Value is "/embed/text" or "/embed/image" or "/search" or "/versions" or "/metrics" or "/healthz" or "/readyz" ? path.Value : "other";
        requests.WithLabels(endpoint, context.Response.StatusCode.ToString()).Inc();
        duration.WithLabels(endpoint).Observe(clock.Elapsed.TotalSeconds);
    }

    /// <summary>{"text": "...", "version": "step-N" (optional)}.</summary>
    async Task<IResult> EmbedText(HttpRequest request)
    {
        if (!request.HasJsonContentType()) return Error(StatusCodes.Status415UnsupportedMediaType, "send the text as application/json: {\"text\": \"...\"}");
        if (await ReadBody(request, MaxTextBody) is not { } body) return Error(StatusCodes.Status413PayloadTooLarge, $"a text request holds at most {MaxTextBody} bytes");
        string text;
        string? version;
        try
        {
            using var json = JsonDocument.Parse(body);
            var root = json.RootElement;
            if (root.ValueKind != JsonValueKind.Object || !root.TryGetProperty("text", out var t) || t.ValueKind != JsonValueKind.String)
                return Error(StatusCodes.Status400BadRequest, "expected {\"text\": \"...\"} (and, optionally, \"version\": \"step-N\")");
            text = t.GetString()!;
            version = root.TryGetProperty("version", out var v) ? v.ValueKind == JsonValueKind.String ? v.GetString() : "" : null;
        }
        catch (JsonException e) { return Error(StatusCodes.Status400BadRequest, $"not JSON: {e.Message}"); }
        catch (InvalidOperationException e) { return Error(StatusCodes.Status400BadRequest, $"not UTF-8 JSON: {e.Message}"); }   // a string of bad UTF-8
        if (string.IsNullOrWhiteSpace(text)) return Error(StatusCodes.Status400BadRequest, "the text is empty");
        if (version == "") return Error(StatusCodes.Status400BadRequest, "\"version\" must be a string such as \"step-100\"");
        return await Answer(version, v => batcher.EmbedText(v, v.Preparer.PrepareText(text)));
    }

    /// <summary>The image's bytes as the body; ?version=step-N (optional).</summary>
    async Task<IResult> EmbedImage(HttpRequest request, string? version)
    {
        var type = request.ContentType?.Split(';')[0].Trim().ToLowerInvariant();
        if (type is null || !ImageTypes.Contains(type))
            return Error(StatusCodes.Status415UnsupportedMediaType, $"send the image's bytes with Content-Type {string.Join(", ", ImageTypes)}");
        if (request.ContentLength > limits.MaxBytes || await ReadBody(request, limits.MaxBytes) is not { } image)
            return Error(StatusCodes.Status413PayloadTooLarge, $"an image holds at most {limits.MaxBytes} bytes (data.max-image-bytes)");
        return await Answer(version, v =>
        {
            if (!v.Preparer.TryPrepareImage(image, out var pixels, out var error))
                throw new BadQueryException(error.Kind is DecodeErrorKind.TooManyPixels or DecodeErrorKind.TooManyBytes
                    ? StatusCodes.Status413PayloadTooLarge : StatusCodes.Status400BadRequest, $"{error.Kind}: {error.Reason}");
            return batcher.EmbedImage(v, pixels);
        });
    }

    /// <summary>?q=TEXT&amp;k=10&amp;modality=image: the k items of the catalogue nearest the query, which is embedded with
    /// the version searched, all of one version.</summary>
    async Task<IResult> Search(string? q, string? k, string? modality)
    {
        if (index is null) return Error(StatusCodes.Status404NotFound, "this service has no index: start it with --index kafka://HOST:PORT/TOPIC");
        if (string.IsNullOrWhiteSpace(q)) return Error(StatusCodes.Status400BadRequest, "the query is empty: /search?q=TEXT[&k=10][&modality=image]");
        var count = 10;
        if (k is not null && (!int.TryParse(k, System.Globalization.NumberStyles.None, null, out count) || count is < 1 or > SearchIndex.MaxK))
            return Error(StatusCodes.Status400BadRequest, $"k must be a whole number from 1 to {SearchIndex.MaxK}");
        modality ??= Embedder.Image;
        if (modality is not (Embedder.Image or Embedder.Text)) return Error(StatusCodes.Status400BadRequest, "modality must be image or text");
        for (var attempt = 0; attempt < 3; attempt++)
        {
            if (index.Current is not { } catalogue) return Error(StatusCodes.Status503ServiceUnavailable, $"no version of {index.Name} is complete yet");
            var answer = await Refusing(named: false, async () =>
            {
                var version = versions.Resolve(catalogue.Version);
                var query = await batcher.EmbedText(version, version.Preparer.PrepareText(q));
                IReadOnlyList<(string Id, float Score)>? results;
                try { results = catalogue.Search(modality, query, count); }
                catch (KeyNotFoundException e) { throw new BadQueryException(StatusCodes.Status404NotFound, e.Message); }
                catch (ArgumentException e) { throw new BadQueryException(StatusCodes.Status409Conflict, $"{e.Message}: {index.Name} was not published by this run's model"); }
                return results is null ? null : Results.Json(new
                {
                    version = catalogue.Version, step = catalogue.Step, modality, items = catalogue.Items[modality],
                    results = results.Select(r => new { id = r.Id, score = r.Score }),
                });
            });
            if (answer is not null) return answer;
            // The catalogue was replaced and disposed while the query was embedded: search the one that replaced it.
        }
        return Error(StatusCodes.Status503ServiceUnavailable, "the index changed version three times during this request; try again");
    }

    /// <summary>Makes a version's model ready for the index's queries (IndexFollower): loaded, by one query through the
    /// batcher; false where the run folder does not hold it (yet).</summary>
    bool Prepare(string name)
    {
        try
        {
            var version = versions.Resolve(name);
            batcher.EmbedText(version, version.Preparer.PrepareText(name)).GetAwaiter().GetResult();
            return true;
        }
        catch (Exception e) when (e is UnknownVersionException or ServiceBusyException) { return false; }
    }

    async Task<IResult> Answer(string? name, Func<ModelVersions.Version, Task<float[]>> embed) => (await Refusing(named: name is not null, async () =>
    {
        var version = versions.Resolve(name);
        var embedding = await embed(version);
        return Results.Json(new { version = version.Name, step = version.Step, embedding });
    }))!;

    /// <summary>The answer, or the refusal a query's failure calls for; <paramref name="named"/>: the request named the
    /// version (one that is not there is a 404, not a 503).</summary>
    static async Task<IResult?> Refusing(bool named, Func<Task<IResult?>> answer)
    {
        try { return await answer(); }
        catch (BadQueryException e) { return Error(e.Status, e.Message); }
        catch (UnknownVersionException e) { return Error(named ? StatusCodes.Status404NotFound : StatusCodes.Status503ServiceUnavailable, e.Message); }
        catch (ServiceBusyException e) { return Error(StatusCodes.Status503ServiceUnavailable, e.Message); }
    }

    sealed class BadQueryException(int status, string message) : Exception(message)
    {
        public int Status { get; } = status;
    }

    static IResult Error(int status, string reason) => Results.Json(new { error = reason }, statusCode: status);

    /// <summary>The body, or null where it holds more than <paramref name="limit"/> bytes.</summary>
    static async Task<byte[]?> ReadBody(HttpRequest request, long limit)
    {
        using var buffer = new MemoryStream();
        var chunk = new byte[81920];
        int read;
        while ((read = await request.Body.ReadAsync(chunk, request.HttpContext.RequestAborted)) > 0)
        {
            if (buffer.Length + read > limit) return null;
            buffer.Write(chunk, 0, read);
        }
        return buffer.ToArray();
    }

    void Refresh()
    {
        try
        {
            foreach (var v in versions.Refresh()) log($"version {v.Name} ({v.Checkpoint})");
        }
        catch (IOException e) { log($"the run folder could not be read: {e.Message} (trying again)"); }
    }

    async Task RefreshAsync()
    {
        while (!stopping.IsCancellationRequested)
        {
            try { await Task.Delay(RefreshEvery, stopping.Token); }
            catch (OperationCanceledException) { break; }
            Refresh();
        }
    }

    public async ValueTask DisposeAsync()
    {
        await stopping.CancelAsync();
        await refreshing;
        index?.Dispose();
        using (var patience = new CancellationTokenSource(TimeSpan.FromSeconds(5))) await app.StopAsync(patience.Token);
        await app.DisposeAsync();
        batcher.Dispose();
        stopping.Dispose();
    }
}
