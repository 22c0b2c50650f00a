using System.Diagnostics;
using System.Net;
using System.Net.Http.Headers;
using System.Net.Http.Json;
using System.Text;
using System.Text.Json;
using Mamo.Cli.Serving;
using Mamo.Cli.Web;
using Mamo.Data;
using Mamo.Data.Datasets;
using Mamo.Data.Kafka;
using Confluent.Kafka;
using Mamo.Model;
using SkiaSharp;
using Xunit;
using Xunit.Abstractions;
using static TorchSharp.torch;

namespace Mamo.Cli.Tests;

/// <summary>`mamo serve` (docs/SERVING.md) on a real Kestrel on loopback, asked over real HTTP: its answers are `mamo
/// embed`'s vectors of the version asked for, concurrent queries share a forward pass, new checkpoints come in while
/// it serves, and bad requests get a 4xx with the reason.</summary>
public class ServeTests(ITestOutputHelper output)
{
    static readonly TextTokenizer Tokenizer = new(BuiltinDatasets.EnsureVocab());

    /// <summary>A tiny model saved as the run's checkpoint of <paramref name="step"/>.</summary>
    static string SaveCheckpoint(string run, long step, int seed)
    {
        var dir = Path.Combine(run, Checkpoint.RunFolder, Checkpoint.StepFolderName(step));
        using var trainer = new MamoTrainer(MamoConfig.Tiny, new OptimizerConfig(), CPU, seed);
        Checkpoint.Save(dir, trainer.Config, trainer.Parts(), new Checkpoint.State(step, 0, step, []));
        return dir;
    }

    static Task<EmbeddingServer> Serve(ModelVersions versions, EmbeddingServer.Options? options = null, DecodeLimits? limits = null,
        ListenAddress? at = null, string? token = null, Action<string>? log = null, EmbeddingServer.IndexOptions? index = null) =>
        EmbeddingServer.StartAsync(versions, options ?? new EmbeddingServer.Options(), limits ?? DecodeLimits.Default,
            at ?? new ListenAddress(IPAddress.Loopback, 0), token, log ?? (_ => { }), index);

    static ModelVersions Versions(string run, int keep = ModelVersions.DefaultKeep, DecodeLimits? limits = null) => new(run, keep, CPU, Tokenizer, limits ?? DecodeLimits.Default);

    static StringContent Json(object body) => new(JsonSerializer.Serialize(body), Encoding.UTF8, "application/json");

    static ByteArrayContent Image(byte[] bytes, string type = "image/png") => new(bytes) { Headers = { ContentType = new MediaTypeHeaderValue(type) } };

    sealed record Answer(string Version, long Step, float[] Embedding);

    static async Task<Answer> Ok(HttpResponseMessage response)
    {
        var body = await response.Content.ReadAsStringAsync();
        Assert.True(response.StatusCode == HttpStatusCode.OK, $"{(int)response.StatusCode}: {body}");
        return JsonSerializer.Deserialize<Answer>(body, new JsonSerializerOptions(JsonSerializerDefaults.Web))!;
    }

    [Fact]
    public async Task Texts_and_images_get_the_vectors_mamo_embed_publishes_with_the_version_asked_for_or_else_the_newest()
    {
        using var folder = new TempFolder();
        var run = folder.File("run");
        var checkpoints = new[] { SaveCheckpoint(run, 2, seed: 1), SaveCheckpoint(run, 4, seed: 2) };
        // Three emoji as a manifest, and what `mamo embed` publishes of them with each version, one at a time.
        var emoji = BuiltinDatasets.Ensure(BuiltinDatasets.Emoji).File(BuiltinDatasets.TrainSplit);
        var items = File.ReadLines(emoji).Take(3).Select(l => JsonDocument.Parse(l).RootElement).Select(e => (Id: e.GetProperty("id").GetString()!,
            Image: e.GetProperty("image").GetString()!, Caption: e.GetProperty("captions")[0].GetString()!)).ToList();
        Directory.CreateDirectory(folder.File("images"));
        foreach (var item in items) File.Copy(Path.Combine(Path.GetDirectoryName(emoji)!, item.Image), folder.File(item.Image));   // a manifest's images lie under its folder
        var manifest = folder.File("three.jsonl");
        File.WriteAllLines(manifest, items.Select(i => JsonSerializer.Serialize(new { id = i.Id, image = i.Image, caption = i.Caption })));
        var published = new Dictionary<(string Version, string Id, string Modality), float[]>();
        foreach (var checkpoint in checkpoints)
        {
            var jsonl = folder.File($"embed-{Path.GetFileName(checkpoint)}.jsonl");
            var (code, _, stderr) = Cli.Run("embed", "--checkpoint", checkpoint, "--input", "manifest:" + manifest, "--output", "jsonl:" + jsonl, "--batch-size", "1");
            Assert.True(code == 0, stderr);
            foreach (var e in File.ReadLines(jsonl).Select(l => JsonDocument.Parse(l).RootElement))
                published[(e.GetProperty("model_version").GetString()!, e.GetProperty("id").GetString()!, e.GetProperty("modality").GetString()!)] =
                    e.GetProperty("vector").EnumerateArray().Select(v => v.GetSingle()).ToArray();
        }
        Assert.Equal(2 * 2 * items.Count, published.Count);

        using var versions = Versions(run);
        await using var server = await Serve(versions, log: output.WriteLine);
        using var http = new HttpClient { BaseAddress = server.Address };
        foreach (var item in items)
            foreach (var version in new[] { null, "step-2", "step-4" })
            {
                var text = await Ok(await http.PostAsync("embed/text", Json(version is null ? new { text = item.Caption } : new { text = item.Caption, version })));
                var image = await Ok(await http.PostAsync("embed/image" + (version is null ? "" : $"?version={version}"), Image(File.ReadAllBytes(folder.File(item.Image)))));
                Assert.Equal(version ?? "step-4", text.Version);   // the newest where the request names none
                Assert.Equal(version ?? "step-4", image.Version);
                Assert.Equal(text.Version == "step-2" ? 2 : 4, text.Step);
                // One query a pass, as `mamo embed --batch-size 1` embeds: the same computation, the same bits.
                Assert.Equal(published[(text.Version, item.Id, "text")], text.Embedding);
                Assert.Equal(published[(image.Version, item.Id, "image")], image.Embedding);
            }
        var listed = JsonDocument.Parse(await http.GetStringAsync("versions")).RootElement;
        Assert.Equal("step-4", listed.GetProperty("default").GetString());
        Assert.Equal(["step-4", "step-2"], listed.GetProperty("versions").EnumerateArray().Select(v => v.GetProperty("version").GetString()));
    }

    [Fact]
    public async Task Concurrent_queries_share_one_forward_pass_and_each_gets_its_own_answer()
    {
        using var folder = new TempFolder();
        var run = folder.File("run");
        SaveCheckpoint(run, 2, seed: 1);
        const int Queries = 8;
        using var versions = Versions(run);
        // The pass waits until it holds Queries queries (the budget is far longer than the requests take to arrive).
        await using var server = await Serve(versions, new EmbeddingServer.Options(MaxBatch: Queries, BatchWaitMs: 30_000));
        using var http = new HttpClient { BaseAddress = server.Address };
        var texts = Enumerable.Range(0, Queries).Select(i => $"query number {i}: {new string('x', i)}").ToList();
        var answers = await Task.WhenAll(texts.Select(async t => await Ok(await http.PostAsync("embed/text", Json(new { text = t })))));

        var metrics = await http.GetStringAsync("metrics");
        Assert.Contains("mamo_serve_forward_passes_total{modality=\"text\"} 1\n", metrics);
        Assert.Contains($"mamo_serve_batched_queries_total{{modality=\"text\"}} {Queries}\n", metrics);
        // Each answer is its own query's vector: the one a pass of that query alone gives, to float rounding (the batch
        // sums in another order; measured below 1e-6).
        using var model = Mamo.Actors.Pipeline.Embedder.Load(Checkpoint.Latest(run)!, CPU);
        var prepared = versions.Resolve(null).Preparer;
        var worst = 0.0;
        for (var i = 0; i < Queries; i++)
        {
            var alone = model.EmbedTexts([prepared.PrepareText(texts[i])])[0];
            worst = Math.Max(worst, alone.Zip(answers[i].Embedding, (a, b) => Math.Abs(a - b)).Max());
        }
        output.WriteLine($"largest difference from a pass alone: {worst:E2}");
        Assert.True(worst < 1e-6, $"{worst}");
        Assert.All(answers, a => Assert.InRange(a.Embedding.Sum(v => (double)v * v), 1 - 1e-5, 1 + 1e-5));   // unit length, as ITC ranks
    }

    [Fact]
    public async Task New_checkpoints_come_in_while_it_serves_and_at_most_K_versions_stay_loaded()
    {
        using var folder = new TempFolder();
        var run = folder.File("run");
        Directory.CreateDirectory(run);
        using var versions = Versions(run, keep: 2);
        await using var server = await Serve(versions);
        using var http = new HttpClient { BaseAddress = server.Address };
        Assert.Equal(HttpStatusCode.OK, (await http.GetAsync("healthz")).StatusCode);
        Assert.Equal(HttpStatusCode.ServiceUnavailable, (await http.GetAsync("readyz")).StatusCode);
        var none = await http.PostAsync("embed/text", Json(new { text = "too early" }));
        Assert.Equal(HttpStatusCode.ServiceUnavailable, none.StatusCode);
        Assert.Contains("no checkpoint yet", await none.Content.ReadAsStringAsync());

        async Task<JsonElement> AwaitDefault(string version)
        {
            var clock = Stopwatch.StartNew();
            while (true)
            {
                var listed = JsonDocument.Parse(await http.GetStringAsync("versions")).RootElement;
                if (listed.GetProperty("default").GetString() == version) return listed;
                Assert.True(clock.Elapsed < TimeSpan.FromMinutes(1), $"{version} never became the default: {listed}");
                await Task.Delay(100);
            }
        }
        foreach (var step in new[] { 2, 4, 6 })
        {
            SaveCheckpoint(run, step, seed: step);
            await AwaitDefault($"step-{step}");
            Assert.Equal(step, (await Ok(await http.PostAsync("embed/text", Json(new { text = "a cat" })))).Step);
        }
        Assert.Equal(HttpStatusCode.OK, (await http.GetAsync("readyz")).StatusCode);
        // Three versions asked for, two kept: the one used longest ago (step-2) is unloaded, and loads again when asked.
        var loaded = JsonDocument.Parse(await http.GetStringAsync("versions")).RootElement.GetProperty("versions").EnumerateArray()
            .Where(v => v.GetProperty("loaded").GetBoolean()).Select(v => v.GetProperty("version").GetString()).ToList();
        Assert.Equal(["step-6", "step-4"], loaded);
        Assert.Contains("mamo_serve_loaded_versions 2\n", await http.GetStringAsync("metrics"));
        Assert.Equal("step-2", (await Ok(await http.PostAsync("embed/text", Json(new { text = "a cat", version = "step-2" })))).Version);

        // A pruned checkpoint that is not loaded is no longer a version; asking for it is a 404 that lists the versions.
        Directory.Delete(Path.Combine(run, Checkpoint.RunFolder, Checkpoint.StepFolderName(4)), recursive: true);
        var clock = Stopwatch.StartNew();
        while (JsonDocument.Parse(await http.GetStringAsync("versions")).RootElement.GetProperty("versions").GetArrayLength() != 2)
        {
            Assert.True(clock.Elapsed < TimeSpan.FromMinutes(1), "the pruned version stayed listed");
            await Task.Delay(100);
        }
        var gone = await http.PostAsync("embed/text", Json(new { text = "a cat", version = "step-4" }));
        Assert.Equal(HttpStatusCode.NotFound, gone.StatusCode);
        Assert.Contains("step-6, step-2", await gone.Content.ReadAsStringAsync());
    }

    [Fact]
    public async Task Bad_requests_get_a_4xx_with_the_reason_and_fuzzed_ones_never_a_5xx()
    {
        using var folder = new TempFolder();
        var run = folder.File("run");
        SaveCheckpoint(run, 2, seed: 1);
        var limits = new DecodeLimits(MaxBytes: 20_000, MaxPixels: 300 * 300);
        using var versions = Versions(run, limits: limits);
        await using var server = await Serve(versions, limits: limits);
        using var http = new HttpClient { BaseAddress = server.Address };
        var png = Png(64, 64);

        async Task Refused(HttpStatusCode status, string reason, Func<Task<HttpResponseMessage>> send)
        {
            var response = await send();
            var body = await response.Content.ReadAsStringAsync();
            Assert.True(response.StatusCode == status, $"{(int)response.StatusCode} {body}");
            Assert.Contains(reason, JsonDocument.Parse(body).RootElement.GetProperty("error").GetString());
        }
        await Refused(HttpStatusCode.UnsupportedMediaType, "application/json", () => http.PostAsync("embed/text", new StringContent("a cat")));
        await Refused(HttpStatusCode.BadRequest, "not JSON", () => http.PostAsync("embed/text", new StringContent("{\"text\": ", Encoding.UTF8, "application/json")));
        await Refused(HttpStatusCode.BadRequest, "expected {\"text\"", () => http.PostAsync("embed/text", Json(new { query = "a cat" })));
        await Refused(HttpStatusCode.BadRequest, "the text is empty", () => http.PostAsync("embed/text", Json(new { text = "  " })));
        await Refused(HttpStatusCode.BadRequest, "must be a string", () => http.PostAsync("embed/text", Json(new { text = "a cat", version = 2 })));
        await Refused(HttpStatusCode.NotFound, "no version step-3: the versions are step-2", () => http.PostAsync("embed/text", Json(new { text = "a cat", version = "step-3" })));
        await Refused(HttpStatusCode.RequestEntityTooLarge, $"at most {EmbeddingServer.MaxTextBody} bytes",
            () => http.PostAsync("embed/text", Json(new { text = new string('a', EmbeddingServer.MaxTextBody) })));
        await Refused(HttpStatusCode.UnsupportedMediaType, "image/png", () => http.PostAsync("embed/image", Image(png, "text/plain")));
        await Refused(HttpStatusCode.BadRequest, "UnrecognisedFormat", () => http.PostAsync("embed/image", Image("not an image"u8.ToArray())));
        await Refused(HttpStatusCode.BadRequest, "Empty", () => http.PostAsync("embed/image", Image([])));
        await Refused(HttpStatusCode.RequestEntityTooLarge, "at most 20000 bytes", () => http.PostAsync("embed/image", Image(new byte[20_001])));
        await Refused(HttpStatusCode.RequestEntityTooLarge, "TooManyPixels", () => http.PostAsync("embed/image", Image(Png(400, 400))));
        await Refused(HttpStatusCode.NotFound, "no version step-9", () => http.PostAsync("embed/image?version=step-9", Image(png)));
        Assert.Equal(HttpStatusCode.OK, (await http.PostAsync("embed/image", Image(png))).StatusCode);
        await Refused(HttpStatusCode.NotFound, "no index", () => http.GetAsync("search?q=a+cat"));

        // Fuzz: bytes of a valid request changed at random. Each answer is a 200 or a 4xx with a reason; both happen.
        var random = new Random(7);
        var valid = Encoding.UTF8.GetBytes(JsonSerializer.Serialize(new { text = "a red apple", version = "step-2" }));
        var outcomes = new Dictionary<string, int>();
        for (var i = 0; i < 150; i++)
        {
            var image = i % 2 == 0;
            var bytes = (image ? png : valid).ToArray();
            for (var k = random.Next(1, 4); k > 0; k--) bytes[random.Next(bytes.Length)] = (byte)random.Next(256);
            var response = image ? await http.PostAsync("embed/image", Image(bytes))
                : await http.PostAsync("embed/text", new ByteArrayContent(bytes) { Headers = { ContentType = new MediaTypeHeaderValue("application/json") } });
            var code = (int)response.StatusCode;
            Assert.True(code == 200 || (code is >= 400 and < 500 && JsonDocument.Parse(await response.Content.ReadAsStringAsync()).RootElement
                .GetProperty("error").GetString()!.Length > 0), $"{code} for {Convert.ToBase64String(bytes)}");
            var key = $"{(image ? "image" : "text")} {(code == 200 ? "ok" : "refused")}";
            outcomes[key] = outcomes.GetValueOrDefault(key) + 1;
        }
        output.WriteLine(string.Join(", ", outcomes.Select(o => $"{o.Key}: {o.Value}")));
        Assert.Equal(4, outcomes.Count);   // accepted and refused, of each endpoint
        Assert.DoesNotContain("code=\"5", await http.GetStringAsync("metrics"));
    }

    [Fact]
    public async Task The_index_searches_a_version_only_once_it_is_whole_and_skips_bad_records_and_bad_searches_get_a_4xx()
    {
        using var folder = new TempFolder();
        var run = folder.File("run");
        SaveCheckpoint(run, 2, seed: 1);
        SaveCheckpoint(run, 10, seed: 2);
        using var cluster = new KafkaMockCluster();
        cluster.CreateTopic("catalogue", partitions: 1);
        cluster.CreateTopic(EmbeddingSinks.VersionsTopic("catalogue"), partitions: 1);
        var switches = new List<string>();
        using var versions = Versions(run);
        await using var server = await Serve(versions, log: m =>
        {
            output.WriteLine(m);
            if (m.StartsWith("index: searching ")) lock (switches) switches.Add(m.Split(' ')[2]);
        }, index: new EmbeddingServer.IndexOptions(KafkaSpec.Parse($"kafka://{cluster.BootstrapServers}/catalogue"), new Dictionary<string, string>()));
        using var http = new HttpClient { BaseAddress = server.Address };
        using var sink = EmbeddingSinks.Open($"kafka://{cluster.BootstrapServers}/catalogue");
        var random = new Random(3);
        float[] Unit()
        {
            var v = Enumerable.Range(0, MamoConfig.Tiny.EmbedDim).Select(_ => (float)random.NextDouble() - 0.5f).ToArray();
            var norm = MathF.Sqrt(v.Sum(x => x * x));
            return v.Select(x => x / norm).ToArray();
        }
        Dictionary<string, float[]> Publish(string version, string[] ids, string? state, int? claimed = null, string[]? claimedIds = null)
        {
            var step = long.Parse(version["step-".Length..]);
            sink.Write(new VersionRecord(version, VersionRecord.Started, step, DateTime.UtcNow));
            var vectors = ids.ToDictionary(id => id, _ => Unit());
            foreach (var (id, vector) in vectors) sink.Write(new EmbeddingRecord(id, "image", version, vector));
            sink.Flush();
            if (state is not null)
                sink.Write(new VersionRecord(version, state, step, DateTime.UtcNow, claimed ?? ids.Length, 0,
                    VersionRecord.IdsChecksum((claimedIds ?? ids).Select(id => (id, "image"))), state == VersionRecord.Abandoned ? "superseded" : null));
            sink.Flush();
            return vectors;
        }
        async Task<JsonElement> Search(string query, string expected)
        {
            var clock = Stopwatch.StartNew();
            while (true)
            {
                var response = await http.GetAsync($"search?q={Uri.EscapeDataString(query)}&k=2");
                var body = JsonDocument.Parse(await response.Content.ReadAsStringAsync()).RootElement;
                if (response.StatusCode == HttpStatusCode.OK && body.GetProperty("version").GetString() == expected) return body;
                Assert.True(clock.Elapsed < TimeSpan.FromSeconds(30), $"no answer from {expected} within 30 s: {(int)response.StatusCode} {body}");
                await Task.Delay(100);
            }
        }
        async Task SearchedExactly(JsonElement answer, Dictionary<string, float[]> catalogue, string query)
        {
            var q = (await Ok(await http.PostAsync("embed/text", Json(new { text = query, version = answer.GetProperty("version").GetString() })))).Embedding;
            var exact = catalogue.Select(c => (Id: c.Key, Score: q.Zip(c.Value).Aggregate(0f, (s, p) => s + p.First * p.Second)))
                .OrderByDescending(c => c.Score).Take(2).ToList();
            var results = answer.GetProperty("results").EnumerateArray().Select(r => (Id: r.GetProperty("id").GetString()!, Score: r.GetProperty("score").GetSingle())).ToList();
            Assert.Equal(exact.Select(e => e.Id), results.Select(r => r.Id));
            Assert.All(exact.Zip(results), p => Assert.Equal(p.First.Score, p.Second.Score, 1e-6f));
            Assert.Equal(catalogue.Count, answer.GetProperty("items").GetInt32());
        }

        Assert.Equal(HttpStatusCode.ServiceUnavailable, (await http.GetAsync("readyz")).StatusCode);   // no version complete yet
        var two = Publish("step-2", ["a", "b", "c"], VersionRecord.Complete);
        await SearchedExactly(await Search("a red apple", "step-2"), two, "a red apple");
        Assert.Equal(HttpStatusCode.OK, (await http.GetAsync("readyz")).StatusCode);

        Publish("step-4", ["a", "b"], VersionRecord.Complete, claimed: 3, claimedIds: ["a", "b", "c"]);   // an item missing
        Publish("step-6", ["a", "b", "c"], VersionRecord.Abandoned);
        Publish("step-8", ["a", "b", "d"], VersionRecord.Complete, claimedIds: ["a", "b", "c"]);   // not the ids it names
        using (var producer = new ProducerBuilder<byte[], byte[]>(new ProducerConfig { BootstrapServers = cluster.BootstrapServers }).Build())
        {
            producer.Produce("catalogue", new Message<byte[], byte[]>
            {
                Key = "x"u8.ToArray(), Value = new byte[5], Headers = new Headers { { EmbeddingSinks.ModalityHeader, "image"u8.ToArray() } },
            });
            producer.Produce(EmbeddingSinks.VersionsTopic("catalogue"), new Message<byte[], byte[]> { Key = "step-9"u8.ToArray(), Value = "not json"u8.ToArray() });
            producer.Flush(TimeSpan.FromSeconds(10));
        }
        var ten = Publish("step-10", ["a", "b", "c", "e"], VersionRecord.Complete);
        await SearchedExactly(await Search("a smiling face", "step-10"), ten, "a smiling face");
        lock (switches) Assert.Equal(["step-2", "step-10"], switches);   // never a version that was not whole
        Assert.Contains("mamo_serve_index_skipped_records 2", await http.GetStringAsync("metrics"));
        Assert.Contains("\"index\":{\"topic\":", await http.GetStringAsync("versions"));

        async Task Refused(HttpStatusCode status, string path, string reason)
        {
            var response = await http.GetAsync(path);
            var body = await response.Content.ReadAsStringAsync();
            Assert.True(response.StatusCode == status, $"{path}: {(int)response.StatusCode} {body}");
            Assert.Contains(reason, JsonDocument.Parse(body).RootElement.GetProperty("error").GetString());
        }
        await Refused(HttpStatusCode.BadRequest, "search", "the query is empty");
        await Refused(HttpStatusCode.BadRequest, "search?q=%20", "the query is empty");
        foreach (var k in new[] { "0", "101", "abc", "-1", "1e3" }) await Refused(HttpStatusCode.BadRequest, $"search?q=a&k={k}", "k must be a whole number from 1 to 100");
        await Refused(HttpStatusCode.BadRequest, "search?q=a&modality=audio", "modality must be image or text");
        await Refused(HttpStatusCode.NotFound, "search?q=a&modality=text", "step-10 published no text vectors");

        // Fuzz: random bytes as the query, k and modality. Each answer is a 200 or a 4xx with a reason; both happen.
        var fuzz = new Random(11);
        string Noise(int most) => Uri.EscapeDataString(Encoding.Latin1.GetString(Enumerable.Range(0, fuzz.Next(most)).Select(_ => (byte)fuzz.Next(256)).ToArray()));
        var outcomes = new Dictionary<bool, int>();
        for (var i = 0; i < 60; i++)
        {
            var path = $"search?q={Noise(40)}" + (fuzz.Next(2) == 0 ? $"&k={(fuzz.Next(2) == 0 ? Noise(4) : fuzz.Next(-5, 120).ToString())}" : "")
                + (fuzz.Next(3) == 0 ? $"&modality={Noise(6)}" : "");
            var response = await http.GetAsync(path);
            var code = (int)response.StatusCode;
            Assert.True(code == 200 || (code is >= 400 and < 500 && JsonDocument.Parse(await response.Content.ReadAsStringAsync()).RootElement
                .GetProperty("error").GetString()!.Length > 0), $"{code} for {path}");
            outcomes[code == 200] = outcomes.GetValueOrDefault(code == 200) + 1;
        }
        output.WriteLine($"fuzzed searches: {outcomes.GetValueOrDefault(true)} answered, {outcomes.GetValueOrDefault(false)} refused");
        Assert.Equal(2, outcomes.Count);
        Assert.DoesNotContain("code=\"500\"", await http.GetStringAsync("metrics"));   // (503s: /readyz and /search before step-2 was complete)
    }

    [Fact]
    public async Task Another_address_needs_a_token_and_then_nothing_but_health_answers_without_it()
    {
        using var folder = new TempFolder();
        var run = folder.File("run");
        SaveCheckpoint(run, 2, seed: 1);
        using var versions = Versions(run);
        var refused = await Assert.ThrowsAsync<ArgumentException>(() => Serve(versions, at: new ListenAddress(IPAddress.Any, 0)));
        Assert.Contains("--token", refused.Message);
        await using var server = await Serve(versions, at: new ListenAddress(IPAddress.Any, 0), token: "s3cret");
        using var http = new HttpClient { BaseAddress = new Uri($"http://127.0.0.1:{server.Address.Port}/") };
        Assert.Equal(HttpStatusCode.OK, (await http.GetAsync("healthz")).StatusCode);
        Assert.Equal(HttpStatusCode.OK, (await http.GetAsync("readyz")).StatusCode);
        foreach (var path in new[] { "versions", "metrics" })
            Assert.Equal(HttpStatusCode.Unauthorized, (await http.GetAsync(path)).StatusCode);
        var anonymous = await http.PostAsync("embed/text", Json(new { text = "a cat" }));
        Assert.Equal(HttpStatusCode.Unauthorized, anonymous.StatusCode);
        Assert.Contains("Bearer", await anonymous.Content.ReadAsStringAsync());
        http.DefaultRequestHeaders.Authorization = new AuthenticationHeaderValue("Bearer", "wrong");
        Assert.Equal(HttpStatusCode.Unauthorized, (await http.PostAsync("embed/text", Json(new { text = "a cat" }))).StatusCode);
        http.DefaultRequestHeaders.Authorization = new AuthenticationHeaderValue("Bearer", "s3cret");
        Assert.Equal("step-2", (await Ok(await http.PostAsync("embed/text", Json(new { text = "a cat" })))).Version);
    }

    [Fact]
    public async Task Mamo_serve_prints_its_address_serves_until_sigterm_and_refuses_a_busy_one()
    {
        using var folder = new TempFolder();
        var run = folder.File("run");
        SaveCheckpoint(run, 2, seed: 1);
        using var mamo = Process.Start(MamoProcess.StartInfo(["serve", "--run-dir", run, "--listen", "127.0.0.1:0", "--set", "torch-threads=1"]))!;
        var stderr = mamo.StandardError.ReadToEndAsync();
        using var patience = new CancellationTokenSource(TimeSpan.FromMinutes(2));
        var line = await mamo.StandardOutput.ReadLineAsync(patience.Token);
        if (line?.StartsWith("serving: http://127.0.0.1:") != true) Assert.Fail($"{line}\n{await stderr}");   // its stderr ends only when it exits
        var address = new Uri(line!["serving: ".Length..]);
        using var http = new HttpClient { BaseAddress = address };
        Assert.Equal("step-2", (await Ok(await http.PostAsync("embed/text", Json(new { text = "a cat" })))).Version);

        var (code, _, busy) = Cli.Run("serve", "--run-dir", run, "--listen", $"127.0.0.1:{address.Port}");
        Assert.Equal(ExitCodes.Usage, code);
        Assert.Contains($"127.0.0.1:{address.Port} is in use", busy);

        await Process.Start("kill", ["-TERM", mamo.Id.ToString()])!.WaitForExitAsync();
        await mamo.WaitForExitAsync(patience.Token);
        Assert.True(mamo.ExitCode == 0, await stderr);
        Assert.Contains("version step-2", await stderr);
    }

    static byte[] Png(int width, int height)
    {
        using var bitmap = new SKBitmap(width, height);
        using (var canvas = new SKCanvas(bitmap)) canvas.Clear(SKColors.Orange);
        using var data = bitmap.Encode(SKEncodedImageFormat.Png, 100);
        return data.ToArray();
    }
}
