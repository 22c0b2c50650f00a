using System.Diagnostics;
using System.Globalization;
using System.Net;
using System.Net.Sockets;
using System.Text.Json;
using System.Text.Json.Nodes;
using System.Text.RegularExpressions;
using Mamo.Actors.Pipeline;
using Mamo.Actors.Sources;
using Mamo.Cli.Dashboard;
using Mamo.Cli.Web;
using Microsoft.Playwright;
using Xunit;
using Model = Mamo.Model;
using Xunit.Abstractions;

namespace Mamo.Cli.Tests;

/// <summary>The dashboard: a real `mamo pretrain` watched in Debian's Chromium through Playwright, its /metrics read by
/// promtool and scraped by a real Prometheus server, and the token rule on a real Kestrel.</summary>
public class DashboardTests(ITestOutputHelper output)
{
    const int Steps = 24;

    [Fact]
    public async Task A_run_shows_live_in_Chromium_and_Prometheus_scrapes_what_metrics_jsonl_says()
    {
        using var folder = new TempFolder();
        var manifest = PretrainTests.WriteManifest(folder);   // forty emoji and four bad lines, one an undecodable PNG
        var run = folder.File("run");
        using var mamo = Process.Start(MamoProcess.StartInfo([
            "pretrain", "--plain", "--source", "manifest:" + manifest, "--run-dir", run, "--max-steps", $"{Steps}", "--dashboard", "127.0.0.1:0",
            "--set", "batch-size=8", "--set", "metrics.every-steps=1", "--set", "metrics.sample-every=1s", "--set", "checkpoint.every-steps=8",
            "--set", "eval.every-steps=4", "--set", $"eval.sets=[\"manifest:{manifest}\"]", "--set", "torch-threads=1", "--set", "data.preprocess-parallelism=1",
        ]))!;
        var stderr = mamo.StandardError.ReadToEndAsync();
        var clock = Stopwatch.StartNew();
        var address = await ListenAddressOf(mamo);

        await using (var browser = await Chromium())
        {
            var page = await browser.NewPageAsync(new() { ViewportSize = new() { Width = 1280, Height = 1600 } });
            await page.GotoAsync(address.ToString());
            // The counter moves by itself: the page was loaded once, and new steps arrive over Server-Sent Events.
            var first = await StepShown(page, atLeast: 1);
            await StepShown(page, atLeast: first + 2);
            Assert.Equal(address.ToString(), page.Url);
            await page.WaitForFunctionAsync("() => window.mamo.charts.loss && window.mamo.charts.loss.data[0].length >= 3");
            await page.Locator("#eval-table tbody tr").First.WaitForAsync();
            var corrupt = DeadLetters(run).First(d => d["location"]!.ToString().Contains("corrupt"));
            await page.Locator("#dead-letters").GetByText(corrupt["reason"]!.ToString()).WaitForAsync();
            Assert.Equal(HttpStatusCode.OK, (await new HttpClient().GetAsync(new Uri(address, "readyz"))).StatusCode);
            output.WriteLine($"live checks done at {clock.Elapsed.TotalSeconds:F1} s, step {await page.Locator("#step").TextContentAsync()}");
            // The run's last line reaches the page before its dashboard closes.
            await page.WaitForFunctionAsync("() => window.mamo.state && window.mamo.state.state === 'stopped'", null, new() { Timeout = 120_000 });
            var screenshot = Environment.GetEnvironmentVariable("MAMO_DASHBOARD_SCREENSHOT") ?? Path.Combine(AppContext.BaseDirectory, "dashboard.png");
            await page.ScreenshotAsync(new() { Path = screenshot, FullPage = true });
            Assert.True(new FileInfo(screenshot).Length > 10_000);
        }
        await mamo.WaitForExitAsync();
        Assert.True(mamo.ExitCode == 0, await stderr);
        output.WriteLine($"run exited at {clock.Elapsed.TotalSeconds:F1} s");

        // The finished run, served from its files alone, as `mamo dashboard RUN_DIR` does.
        var lines = File.ReadAllLines(Path.Combine(run, RunFiles.MetricsFile)).Select(l => JsonNode.Parse(l)!.AsObject()).ToList();
        var lastTrain = lines.Last(l => (string?)l["kind"] == "train");
        var lastEval = lines.Last(l => (string?)l["kind"] == "eval");
        var lastCheckpoint = lines.Last(l => (string?)l["kind"] == "checkpoint");
        await using var server = await DashboardServer.StartAsync(new RunFiles(run), new ListenAddress(IPAddress.Loopback, 0), token: null);
        using var http = new HttpClient { BaseAddress = server.Address };
        var scrape = await http.GetStringAsync("metrics");
        var samples = Parse(scrape);
        Assert.Equal((double)lastTrain["step"]!, samples["mamo_step"]);
        Assert.Equal((double)lastTrain["loss"]!, samples["mamo_loss{term=\"total\"}"], 6);
        Assert.Equal((double)lastTrain["pairs_per_s"]!, samples["mamo_pairs_per_second"], 6);
        Assert.Equal((double)lastEval["ir1"]! / 100, samples[$"mamo_eval_recall{{set=\"{lastEval["set"]}\",direction=\"text_to_image\",k=\"1\"}}"], 6);
        Assert.Equal((double)lastEval["tr5"]! / 100, samples[$"mamo_eval_recall{{set=\"{lastEval["set"]}\",direction=\"image_to_text\",k=\"5\"}}"], 6);
        Assert.Equal((double)lastCheckpoint["step"]!, samples["mamo_checkpoint_last_step"]);
        var reason = RunFiles.Reason(DeadLetters(run).First(d => d["location"]!.ToString().Contains("corrupt"))["reason"]!.ToString());
        Assert.Equal(DeadLetters(run).Count(d => RunFiles.Reason(d["reason"]!.ToString()) == reason), samples[$"mamo_dead_letters_total{{reason=\"{reason}\"}}"]);
        Assert.True(samples["mamo_process_resident_memory_bytes"] > 0);
        Assert.Equal(HttpStatusCode.OK, (await http.GetAsync("healthz")).StatusCode);
        var history = JsonNode.Parse(await http.GetStringAsync("api/history"))!;
        Assert.Equal(lines.Count(l => (string?)l["kind"] == "train"), (int)history["train_points"]!);

        var (check, checkOutput) = await Tool("promtool", ["check", "metrics"], stdin: scrape);
        Assert.True(check == 0, checkOutput);
        Assert.Equal((double)lastTrain["step"]!, await ScrapedByPrometheus(server.Address, folder.File("prometheus")));
    }

    [Fact]
    public async Task Another_address_needs_a_token_and_then_nothing_but_health_answers_without_it()
    {
        using var folder = new TempFolder();
        var refused = await Assert.ThrowsAsync<ArgumentException>(() =>
            DashboardServer.StartAsync(new RunFiles(folder.Path), new ListenAddress(IPAddress.Any, 0), token: null));
        Assert.Contains("not a loopback address", refused.Message);
        var (code, _, stderr) = Cli.Run("dashboard", folder.Path, "--listen", "0.0.0.0:0");
        Assert.Equal(2, code);
        Assert.Contains("--dashboard-token", stderr);

        await using var server = await DashboardServer.StartAsync(new RunFiles(folder.Path), new ListenAddress(IPAddress.Any, 0), token: "s3cret");
        var loopback = new Uri($"http://127.0.0.1:{server.Address.Port}/");
        using var anonymous = new HttpClient(new HttpClientHandler { AllowAutoRedirect = false, UseCookies = false }) { BaseAddress = loopback };
        Assert.Equal(HttpStatusCode.Unauthorized, (await anonymous.GetAsync("metrics")).StatusCode);
        Assert.Equal(HttpStatusCode.Unauthorized, (await anonymous.GetAsync("api/history")).StatusCode);
        Assert.Equal(HttpStatusCode.OK, (await anonymous.GetAsync("healthz")).StatusCode);
        var bearer = new HttpRequestMessage(HttpMethod.Get, "metrics") { Headers = { { "Authorization", "Bearer s3cret" } } };
        Assert.Equal(HttpStatusCode.OK, (await anonymous.SendAsync(bearer)).StatusCode);
        var wrong = new HttpRequestMessage(HttpMethod.Get, "metrics") { Headers = { { "Authorization", "Bearer s3cre" } } };
        Assert.Equal(HttpStatusCode.Unauthorized, (await anonymous.SendAsync(wrong)).StatusCode);

        var link = await anonymous.GetAsync("?token=s3cret");
        Assert.Equal(HttpStatusCode.Redirect, link.StatusCode);
        var cookie = link.Headers.GetValues("Set-Cookie").Single();
        Assert.Contains("httponly", cookie, StringComparison.OrdinalIgnoreCase);
        var withCookie = new HttpRequestMessage(HttpMethod.Get, "api/history") { Headers = { { "Cookie", cookie.Split(';')[0] } } };
        Assert.Equal(HttpStatusCode.OK, (await anonymous.SendAsync(withCookie)).StatusCode);
        // Read-only: nothing but GET is routed.
        Assert.Equal(HttpStatusCode.MethodNotAllowed, (await anonymous.SendAsync(new HttpRequestMessage(HttpMethod.Post, "metrics") { Headers = { { "Authorization", "Bearer s3cret" } } })).StatusCode);
    }

    [Fact]
    public async Task A_busy_port_that_was_asked_for_is_refused_and_only_the_default_moves_to_the_next_free_one()
    {
        using var folder = new TempFolder();
        var port = Ports.Free();
        using var holder = new TcpListener(IPAddress.Loopback, port);
        holder.Start();
        var asked = new ListenAddress(IPAddress.Loopback, port);

        var refused = await Assert.ThrowsAsync<AddressInUseError>(() => DashboardServer.StartAsync(new RunFiles(folder.Path), asked, token: null));
        Assert.Equal($"127.0.0.1:{port} is in use", refused.Message);
        await using (var moved = await DashboardServer.StartAsync(new RunFiles(folder.Path), asked with { FallsForward = true }, token: null))
            Assert.True(moved.Address.Port > port, $"served at {moved.Address} with {port} taken");

        // A run asked to serve there stops before it trains, with the usage exit code.
        var run = folder.File("run");
        var (code, log) = MamoProcess.Run(["pretrain", "--run-dir", run, "--dashboard", $"127.0.0.1:{port}", "--max-steps", "1", "--plain"]);
        Assert.Equal(ExitCodes.Usage, code);
        Assert.Contains($"--dashboard 127.0.0.1:{port} is in use: name a free address, or leave --dashboard out", log);
        Assert.Null(Model.Checkpoint.Latest(run));
    }

    [Fact]
    public void The_history_follows_a_growing_file_and_waits_for_a_line_to_end()
    {
        using var folder = new TempFolder();
        var path = folder.File(RunFiles.MetricsFile);
        File.WriteAllText(path, "{\"kind\":\"train\",\"step\":1,\"loss\":2.5,\"itc\":1.5}\nnot json\n{\"kind\":\"train\",\"step\":1,\"step\":9,\"loss\":1}\n{\"kind\":\"train\",\"st");
        var history = new RunFiles(folder.Path);
        Assert.Equal(1, history.Poll());
        Assert.Equal(2, history.Malformed);
        File.AppendAllText(path, "ep\":2,\"loss\":2.0,\"mlm\":0.5}\n");
        File.AppendAllText(folder.File(RunFiles.DeadLetterFile), "{\"reason\":\"Undecodable: bad PNG\",\"location\":\"m.jsonl@3\"}\n");
        Assert.Equal(2, history.Poll());
        var train = history.Snapshot(100)["train"]!;
        Assert.Equal("[1,2]", train["step"]!.ToJsonString());
        Assert.Equal("[1.5,null]", train["itc"]!.ToJsonString());   // a term a line lacks is a gap, not a zero
        Assert.Equal("[null,0.5]", train["mlm"]!.ToJsonString());
        Assert.Equal(1L, history.Values().DeadLetters["Undecodable"]);
        Assert.Equal(2.0, history.Values().Loss["total"]);
        Assert.Equal(2, history.EventsAfter(1).Count);
    }

    [Fact]
    public void Records_expired_unread_add_up_over_the_processes_of_a_run()
    {
        // Each process counts from its start; a kafka line repeats its process's count so far.
        using var folder = new TempFolder();
        static string Kafka(long expired) => new KafkaLine([new PartitionStatus("pairs/4", 10, 20, 10, 9, expired)]).ToJson().ToJsonString();
        File.WriteAllLines(folder.File(RunFiles.MetricsFile), [
            "{\"kind\":\"start\"}", Kafka(0), Kafka(5), Kafka(7),
            "{\"kind\":\"start\"}", Kafka(3), Kafka(3)]);
        var history = new RunFiles(folder.Path);
        history.Poll();
        Assert.Equal(10L, history.Values().KafkaExpired["pairs/4"]);
    }

    [Fact]
    public async Task Lines_of_any_shape_are_counted_or_shown_never_a_failure()
    {
        // Every kind the dashboard reads, with each field replaced by values of the wrong type, plus garbage.
        using var folder = new TempFolder();
        string[] kinds = ["train", "eval", "probe", "thumbnail", "checkpoint", "publish", "start", "state", "process", "kafka"];
        string[] fields = ["step", "loss", "set", "image", "png", "partitions", "lag", "state", "ir1", "tr5", "rss_bytes", "cpu_s", "probes", "offsets", "reason"];
        JsonNode?[] values = [null, 1, -1e300, "NaN", "x", "@@@", new JsonArray(1, "a"), new JsonObject { ["pairs/0"] = 5 }, true, 1e20];
        var random = new Random(7);
        var lines = new List<string>();
        for (var i = 0; i < 3000; i++)
        {
            if (i % 10 == 0) { lines.Add(new string((char)random.Next(32, 127), random.Next(0, 30))); continue; }
            var line = new JsonObject { ["kind"] = kinds[random.Next(kinds.Length)] };
            for (var f = 0; f < 4; f++) line[fields[random.Next(fields.Length)]] = values[random.Next(values.Length)]?.DeepClone();
            lines.Add(line.ToJsonString());
        }
        File.WriteAllLines(folder.File(RunFiles.MetricsFile), lines);
        File.WriteAllLines(folder.File(RunFiles.DeadLetterFile), lines.Take(500));
        var history = new RunFiles(folder.Path);
        history.Poll();
        Assert.True(history.Malformed >= 300, $"{history.Malformed} malformed");   // the garbage lines, at least
        // Whatever the lines held, the snapshot serialises and reads back whole.
        var snapshot = JsonNode.Parse(history.Snapshot(50).ToJsonString())!;
        Assert.Equal((history.Malformed, Path.GetFullPath(folder.Path)), ((long)snapshot["malformed"]!, (string)snapshot["run_dir"]!));
        await using var server = await DashboardServer.StartAsync(history, new ListenAddress(IPAddress.Loopback, 0), token: null);
        using var http = new HttpClient { BaseAddress = server.Address };
        Assert.Equal(HttpStatusCode.OK, (await http.GetAsync("metrics")).StatusCode);
        Assert.Equal(HttpStatusCode.OK, (await http.GetAsync("api/history")).StatusCode);
    }

    [Fact]
    public void Downsampling_keeps_each_buckets_extremes()
    {
        var x = Enumerable.Range(0, 10_000).Select(i => (double)i).ToList();
        var y = x.Select(i => Math.Sin(i / 300)).ToList();
        y[4321] = 50;    // a spike
        y[7777] = -50;   // and a dip
        var (dx, dys) = Downsampling.MinMax(x, [y], maxPoints: 200);
        Assert.Equal(200, dx.Count);
        Assert.Contains(50, dys[0]);
        Assert.Contains(-50, dys[0]);
        Assert.Equal(0, dx[0]);
        Assert.Equal(9_999, dx[^1]);
        Assert.Equal(dx.Order(), dx);
        var (sx, sys) = Downsampling.MinMax(x[..150], [y[..150]], maxPoints: 200);   // fewer rows than points: as they are
        Assert.Equal(x[..150], sx);
        Assert.Equal(y[..150], sys[0]);
    }

    [Fact]
    public void A_weeks_process_history_stays_bounded_and_even_from_the_first_line_to_the_newest()
    {
        const int cap = 1000, day = 24 * 720;   // a process line every 5 s
        var history = new BoundedHistory<int>(cap);
        for (var i = 0; i < 7 * day; i++)
        {
            history.Add(i);
            Assert.Equal(i, history.Items[^1]);
            Assert.True(history.Items.Count <= cap, $"{history.Items.Count} kept after {i + 1}");
        }
        // Evenly spaced from the first line on, up to the newest, and thinned no more than the cap asks.
        var stride = (int)history.Stride;
        var onStride = history.Items.Take(history.Items.Count - 1).ToList();
        Assert.Equal(Enumerable.Range(0, onStride.Count).Select(k => k * stride), onStride);
        Assert.True(7 * day - 1 - onStride[^1] <= stride, $"the last on the stride is {onStride[^1]}");
        Assert.True(history.Items.Count > cap / 2, $"{history.Items.Count} kept at stride {stride}");
    }

    static async Task<Uri> ListenAddressOf(Process mamo)
    {
        using var patience = new CancellationTokenSource(TimeSpan.FromMinutes(2));
        while (await mamo.StandardOutput.ReadLineAsync(patience.Token) is { } line)
            if (line.StartsWith("dashboard: ")) return new Uri(line["dashboard: ".Length..]);
        throw new InvalidOperationException("mamo exited without printing its dashboard address");
    }

    static async Task<int> StepShown(IPage page, int atLeast)
    {
        await page.WaitForFunctionAsync($"() => +document.getElementById('step').textContent >= {atLeast}", null, new() { Timeout = 120_000 });
        return int.Parse(await page.Locator("#step").TextContentAsync() ?? "0");
    }

    static List<JsonObject> DeadLetters(string run) =>
        File.ReadAllLines(Path.Combine(run, RunFiles.DeadLetterFile)).Select(l => JsonNode.Parse(l)!.AsObject()).ToList();

    /// <summary>Debian's Chromium, never one Playwright downloads (nothing outside the package registries can be fetched).</summary>
    static async Task<IBrowser> Chromium()
    {
        var chromium = (await Tool("sh", ["-c", "command -v chromium"])).Output.Trim();
        Assert.True(chromium.Length > 0, "chromium is not on PATH: apt-get install chromium (.ci/run does)");
        var playwright = await Playwright.CreateAsync();
        return await playwright.Chromium.LaunchAsync(new()
        {
            ExecutablePath = chromium, Headless = true,
            // Its blocked outbound connections only slow it down here (docs/DASHBOARD.md).
            Args = ["--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-gpu"],
        });
    }

    /// <summary>A real Prometheus scraping the dashboard every second; mamo_step read back from its query API.</summary>
    async Task<double> ScrapedByPrometheus(Uri dashboard, string dir)
    {
        Directory.CreateDirectory(dir);
        var port = Ports.Free();
        var config = Path.Combine(dir, "prometheus.yml");
        File.WriteAllText(config, $"""
            global:
              scrape_interval: 1s
            scrape_configs:
              - job_name: mamo
                static_configs:
                  - targets: ["127.0.0.1:{dashboard.Port}"]
            """);
        using var prometheus = Process.Start(new ProcessStartInfo("prometheus",
            [$"--config.file={config}", $"--storage.tsdb.path={Path.Combine(dir, "data")}", $"--web.listen-address=127.0.0.1:{port}"])
            { RedirectStandardOutput = true, RedirectStandardError = true })!;
        var log = prometheus.StandardError.ReadToEndAsync();
        try
        {
            using var http = new HttpClient();
            var clock = Stopwatch.StartNew();
            while (clock.Elapsed < TimeSpan.FromMinutes(1) && !prometheus.HasExited)
            {
                try
                {
                    var answer = JsonNode.Parse(await http.GetStringAsync($"http://127.0.0.1:{port}/api/v1/query?query=mamo_step"))!;
                    if (answer["data"]?["result"] is JsonArray { Count: 1 } result)
                        return double.Parse(result[0]!["value"]![1]!.ToString(), CultureInfo.InvariantCulture);
                }
                catch (HttpRequestException) { }   // not listening yet
                await Task.Delay(250);
            }
            throw new TimeoutException("Prometheus never had mamo_step");
        }
        finally
        {
            if (!prometheus.HasExited) prometheus.Kill();
            await prometheus.WaitForExitAsync();
            output.WriteLine(await log);
        }
    }


    /// <summary>Prometheus text samples by name and labels, as written: `name{a="x"}` → value. Comments and blank lines
    /// are skipped; any other line that is not a sample fails the parse.</summary>
    static Dictionary<string, double> Parse(string text)
    {
        var samples = new Dictionary<string, double>();
        foreach (var line in text.Split('\n'))
        {
            if (line.Length == 0 || line.StartsWith('#')) continue;
            var m = Regex.Match(line, @"^([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{[^}]*\})?) (\S+)$");
            Assert.True(m.Success, $"not a Prometheus sample: {line}");
            samples[m.Groups[1].Value] = m.Groups[2].Value switch
            {
                "NaN" => double.NaN, "+Inf" => double.PositiveInfinity, "-Inf" => double.NegativeInfinity,
                var v => double.Parse(v, CultureInfo.InvariantCulture),
            };
        }
        return samples;
    }

    static async Task<(int Code, string Output)> Tool(string file, string[] args, string? stdin = null)
    {
        using var p = Process.Start(new ProcessStartInfo(file, args) { RedirectStandardOutput = true, RedirectStandardError = true, RedirectStandardInput = stdin is not null })!;
        if (stdin is not null)
        {
            await p.StandardInput.WriteAsync(stdin);
            p.StandardInput.Close();
        }
        var stdout = p.StandardOutput.ReadToEndAsync();
        var stderr = p.StandardError.ReadToEndAsync();
        await p.WaitForExitAsync();
        return (p.ExitCode, await stdout + await stderr);
    }
}
