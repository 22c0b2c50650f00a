using System.Diagnostics;
using System.Net;
using System.Text;
using System.Text.Json;
using Confluent.Kafka;
using Mamo.Data.Kafka;
using Xunit;
using Xunit.Abstractions;

namespace Mamo.Cli.Tests;

/// <summary>`mamo serve --index` (docs/SERVING.md, "Search"), end to end with real processes: `mamo dev-broker`, a
/// `mamo pretrain` that publishes a version with each checkpoint, and the search service, asked continuously while the
/// model moves through its versions. Every answer must come from one complete version: the rule a consumer of the
/// versions topic keeps, checked against what the topics hold.</summary>
public class SearchTests(ITestOutputHelper output)
{
    const string Topic = "catalogue";
    static readonly string[] Queries = ["a red apple", "a smiling face", "a flag"];

    sealed record Answer(string Server, string Query, DateTime Received, string Version, string Modality, int Items, (string Id, float Score)[] Results);

    sealed record Published(Dictionary<string, Dictionary<string, float[]>> ImageVectors, Dictionary<string, (VersionRecord Record, DateTime At)> Completed);

    [Fact]
    public async Task Search_answers_come_from_one_complete_version_while_the_model_moves_through_versions_and_a_service_that_searches_part_of_one_fails_the_check()
    {
        using var folder = new TempFolder();
        var run = folder.File("run");
        await using var broker = await Background.Start(["dev-broker", "--topics", $"{Topic},{EmbeddingSinks.VersionsTopic(Topic)}", "--partitions", "2"],
            "127.0.0.1:", output);
        var bootstrap = broker.FirstLine;
        Directory.CreateDirectory(run);
        string[] serve = ["serve", "--run-dir", run, "--index", $"kafka://{bootstrap}/{Topic}", "--listen", "127.0.0.1:0", "--set", "torch-threads=1"];
        await using var keeping = await Background.Start(serve, "serving: ", output);
        // The same service with the rule broken on purpose: it searches a version from its first vector.
        await using var breaking = await Background.Start([.. serve, "--index-searches-partial-versions"], "serving: ", output);

        using var stop = new CancellationTokenSource();
        var asking = new[] { Ask("keeping", keeping, stop.Token), Ask("breaking", breaking, stop.Token) };
        var (code, log) = await Task.Run(() => MamoProcess.Run(["pretrain", "--run-dir", run, "--source", "dataset:emoji", "--preset", "tiny", "--max-steps", "8",
            "--set", "checkpoint.every-steps=2", "--set", "checkpoint.keep-last=10", "--set", "torch-threads=1",
            "--set", $"publish.output=kafka://{bootstrap}/{Topic}", "--set", "publish.input=dataset:emoji/test", "--set", "publish.batch-size=4"]));
        Assert.True(code == 0, log);
        // Once the run is over, the service that keeps the rule reaches its last version.
        using var http = new HttpClient { BaseAddress = keeping.Address };
        var clock = Stopwatch.StartNew();
        while ((await Search(http, "keeping", Queries[0])).Version != "step-8" && clock.Elapsed < TimeSpan.FromMinutes(1)) await Task.Delay(100);
        Assert.Equal("step-8", (await Search(http, "keeping", Queries[0])).Version);
        await stop.CancelAsync();
        var answers = (await Task.WhenAll(asking)).SelectMany(a => a).ToList();

        var published = ReadTopics(bootstrap);
        Assert.Equal(["step-2", "step-4", "step-6", "step-8"], published.Completed.Keys.Order());
        var queries = await QueryVectors(keeping.Address, published.Completed.Keys);

        var kept = answers.Where(a => a.Server == "keeping").ToList();
        var keptViolations = kept.SelectMany(a => Violations(a, published, queries)).ToList();
        Assert.True(keptViolations.Count == 0, string.Join("\n", keptViolations.Take(20)));
        var seen = kept.Select(a => a.Version).Distinct().ToList();
        output.WriteLine($"keeping: {kept.Count} answers from {string.Join(", ", seen.Select(v => $"{v} ({kept.Count(a => a.Version == v)})"))}");
        Assert.True(seen.Count >= 3, $"the answers came from {string.Join(", ", seen)}: fewer than three versions");
        // Searches never go back to an older version.
        var steps = kept.OrderBy(a => a.Received).Select(a => long.Parse(a.Version["step-".Length..])).ToList();
        Assert.Equal(steps.Order(), steps);

        var broken = answers.Where(a => a.Server == "breaking").ToList();
        var brokenViolations = broken.SelectMany(a => Violations(a, published, queries)).ToList();
        output.WriteLine($"breaking: {broken.Count} answers, {brokenViolations.Count} violations, e.g. {brokenViolations.FirstOrDefault()}");
        Assert.NotEmpty(brokenViolations);
    }

    /// <summary>What an answer breaks of the rule: it came before its version was complete; its version's index did not
    /// hold the whole catalogue; a result's score is not the query's and the item's vectors of that one version.</summary>
    static IEnumerable<string> Violations(Answer a, Published published, Dictionary<(string Query, string Version), float[]> queries)
    {
        if (!published.Completed.TryGetValue(a.Version, out var complete))
        {
            yield return $"{a.Server}: an answer from {a.Version}, which never completed";
            yield break;
        }
        if (a.Received < complete.At) yield return $"{a.Server}: an answer from {a.Version} at {a.Received:O}, before it was complete at {complete.At:O}";
        var catalogue = published.ImageVectors[a.Version];
        if (a.Items != catalogue.Count) yield return $"{a.Server}: an answer from {a.Version} searched {a.Items} image vectors of {catalogue.Count}";
        var query = queries[(a.Query, a.Version)];
        foreach (var (id, score) in a.Results)
        {
            if (!catalogue.TryGetValue(id, out var item)) yield return $"{a.Server}: {id} is not in {a.Version}";
            // A query that shared its forward pass with another may differ in the last float bits (ServeTests: below 1e-6).
            else if (Math.Abs(Dot(query, item) - score) > 1e-5) yield return $"{a.Server}: {id}'s score {score} is not its {a.Version} score {Dot(query, item)}";
        }
    }

    static float Dot(float[] a, float[] b) => a.Zip(b).Aggregate(0f, (s, p) => s + p.First * p.Second);

    /// <summary>Asks /search continuously, a query at a time, until told to stop; the answers it got.</summary>
    async Task<List<Answer>> Ask(string server, Background service, CancellationToken stop)
    {
        using var http = new HttpClient { BaseAddress = service.Address };
        var answers = new List<Answer>();
        for (var i = 0; !stop.IsCancellationRequested; i++)
        {
            try
            {
                var response = await http.GetAsync($"search?q={Uri.EscapeDataString(Queries[i % Queries.Length])}&k=5", stop);
                // No version complete yet: a 503, and only before the first answer (once searching, it never stops). The
                // service that breaks the rule rebuilds its index at every vector, so a request of its may see three in a row.
                if (response.StatusCode == HttpStatusCode.ServiceUnavailable && (answers.Count == 0 || server == "breaking")) await Task.Delay(50, stop);
                else answers.Add(await Read(response, server, Queries[i % Queries.Length]));
            }
            catch (OperationCanceledException) { break; }
        }
        return answers;
    }

    static async Task<Answer> Search(HttpClient http, string server, string query)
    {
        var response = await http.GetAsync($"search?q={Uri.EscapeDataString(query)}&k=5");
        return response.StatusCode == HttpStatusCode.ServiceUnavailable ? new Answer(server, query, DateTime.UtcNow, "", "", 0, []) : await Read(response, server, query);
    }

    static async Task<Answer> Read(HttpResponseMessage response, string server, string query)
    {
        var body = await response.Content.ReadAsStringAsync();
        var received = DateTime.UtcNow;
        Assert.True(response.StatusCode == HttpStatusCode.OK, $"{server}: {(int)response.StatusCode} {body}");
        using var json = JsonDocument.Parse(body);
        var r = json.RootElement;
        return new Answer(server, query, received, r.GetProperty("version").GetString()!, r.GetProperty("modality").GetString()!, r.GetProperty("items").GetInt32(),
            r.GetProperty("results").EnumerateArray().Select(e => (e.GetProperty("id").GetString()!, e.GetProperty("score").GetSingle())).ToArray());
    }

    /// <summary>Each query embedded with each version, by the service that keeps the rule.</summary>
    static async Task<Dictionary<(string, string), float[]>> QueryVectors(Uri address, IEnumerable<string> versions)
    {
        using var http = new HttpClient { BaseAddress = address };
        var vectors = new Dictionary<(string, string), float[]>();
        foreach (var version in versions)
            foreach (var query in Queries)
            {
                var response = await http.PostAsync("embed/text", new StringContent(JsonSerializer.Serialize(new { text = query, version }), Encoding.UTF8, "application/json"));
                var body = await response.Content.ReadAsStringAsync();
                Assert.True(response.StatusCode == HttpStatusCode.OK, body);
                using var json = JsonDocument.Parse(body);
                vectors[(query, version)] = json.RootElement.GetProperty("embedding").EnumerateArray().Select(e => e.GetSingle()).ToArray();
            }
        return vectors;
    }

    /// <summary>Every image vector each version published, and when each version's "complete" record was written.</summary>
    static Published ReadTopics(string bootstrap)
    {
        var images = new Dictionary<string, Dictionary<string, float[]>>();
        var completed = new Dictionary<string, (VersionRecord, DateTime)>();
        foreach (var record in ReadAll(bootstrap, Topic))
            if (EmbeddingSinks.ReadEmbedding(record.Message.Key, record.Message.Value, record.Message.Headers) is { Modality: "image" } e)
                (images.TryGetValue(e.ModelVersion, out var v) ? v : images[e.ModelVersion] = [])[e.Id] = e.Vector;
        foreach (var record in ReadAll(bootstrap, EmbeddingSinks.VersionsTopic(Topic)))
            if (VersionRecord.Parse(record.Message.Value!) is { State: VersionRecord.Complete } c)
                completed[c.Version] = (c, record.Message.Timestamp.UtcDateTime);
        return new Published(images, completed);
    }

    static List<ConsumeResult<byte[]?, byte[]?>> ReadAll(string bootstrap, string topic)
    {
        using var admin = new AdminClientBuilder(new AdminClientConfig { BootstrapServers = bootstrap }).Build();
        var partitions = admin.GetMetadata(topic, TimeSpan.FromSeconds(10)).Topics[0].Partitions.Select(p => p.PartitionId).ToList();
        using var consumer = new ConsumerBuilder<byte[]?, byte[]?>(new ConsumerConfig
        {
            BootstrapServers = bootstrap, GroupId = "reader-" + Guid.NewGuid(), EnableAutoCommit = false, EnablePartitionEof = true,
        }).Build();
        consumer.Assign(partitions.Select(p => new TopicPartitionOffset(topic, p, Offset.Beginning)));
        var records = new List<ConsumeResult<byte[]?, byte[]?>>();
        var ended = new HashSet<int>();
        var clock = Stopwatch.StartNew();
        while (ended.Count < partitions.Count && clock.Elapsed < TimeSpan.FromSeconds(30))
        {
            if (consumer.Consume(TimeSpan.FromMilliseconds(200)) is not { } r) continue;
            if (r.IsPartitionEOF) ended.Add(r.Partition.Value);
            else records.Add(r);
        }
        Assert.True(ended.Count == partitions.Count, $"could not read {topic} to its end");
        return records;
    }

    /// <summary>A `mamo` process that runs in the background until disposed (SIGTERM, then its log to the test's output):
    /// started once it has printed the line that begins with <c>ready</c>.</summary>
    sealed class Background : IAsyncDisposable
    {
        readonly Process process;
        readonly Task<string> stderr;
        readonly ITestOutputHelper output;

        public string FirstLine { get; }
        public Uri Address => new(FirstLine);

        Background(Process process, Task<string> stderr, string firstLine, ITestOutputHelper output) =>
            (this.process, this.stderr, FirstLine, this.output) = (process, stderr, firstLine, output);

        public static async Task<Background> Start(string[] args, string ready, ITestOutputHelper output)
        {
            var process = Process.Start(MamoProcess.StartInfo(args))!;
            var stderr = process.StandardError.ReadToEndAsync();
            using var patience = new CancellationTokenSource(TimeSpan.FromMinutes(2));
            var line = await process.StandardOutput.ReadLineAsync(patience.Token);
            if (line?.Contains(ready) != true)
            {
                process.Kill(entireProcessTree: true);
                Assert.Fail($"mamo {args[0]} printed '{line}', not '{ready}...'\n{await stderr}");
            }
            return new Background(process, stderr, line![line!.IndexOf(ready, StringComparison.Ordinal)..].Replace("serving: ", ""), output);
        }

        public async ValueTask DisposeAsync()
        {
            if (!process.HasExited) await Process.Start("kill", ["-TERM", process.Id.ToString()])!.WaitForExitAsync();
            if (!process.WaitForExit(TimeSpan.FromSeconds(30))) process.Kill(entireProcessTree: true);
            output.WriteLine($"--- mamo {process.StartInfo.ArgumentList[1]}, exit {process.ExitCode}:\n{await stderr}");
            process.Dispose();
        }
    }
}
