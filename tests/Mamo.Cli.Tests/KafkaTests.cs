using System.Diagnostics;
using System.Text;
using Confluent.Kafka;
using Mamo.Actors;
using Mamo.Data;
using Mamo.Data.Datasets;
using Mamo.Data.Kafka;
using Mamo.Data.Tests;
using Xunit;
using Xunit.Abstractions;
using Model = Mamo.Model;
using Mamo.Actors.Sources;

namespace Mamo.Cli.Tests;

/// <summary>`mamo pretrain` on a Kafka topic, as a separate process, against librdkafka's mock cluster (the real
/// protocol on 127.0.0.1). The ledger says what was trained on; the topic says what there was.</summary>
public class KafkaTests(ITestOutputHelper output)
{
    const int Batch = 8, CheckpointEvery = 4;

    static string[] Pretrain(string source, string runDir, int maxSteps, params string[] more) =>
    [
        "pretrain", "--plain", "--ledger", "--source", source, "--run-dir", runDir, "--max-steps", $"{maxSteps}",
        "--set", $"batch-size={Batch}", "--set", $"checkpoint.every-steps={CheckpointEvery}", "--set", "eval.every-steps=0",
        "--set", "torch-threads=1", "--set", "data.preprocess-parallelism=1", "--set", "optimizer.warmup-steps=4", .. more,
    ];

    [Fact]
    public void A_killed_run_loses_no_record_and_replays_at_most_one_checkpoint_interval()
    {
        using var cluster = new KafkaMockCluster();
        cluster.CreateTopic("pairs", partitions: 4);
        Ingest(cluster, "pairs", 300);
        using var folder = new TempFolder();
        var run = folder.File("run");
        var args = Pretrain($"kafka://{cluster.BootstrapServers}/pairs?group=trainer", run, maxSteps: 30);

        MamoProcess.KillAfter(args, run, stepsDone: CheckpointEvery + 2, checkpointAtLeast: CheckpointEvery);
        var beforeKill = MamoProcess.Ledger(run);
        var lastCheckpoint = MamoProcess.LastCheckpoint(run);
        var (code, log) = MamoProcess.Run(args);
        Assert.True(code == 0, log);
        var resumed = MamoProcess.Ledger(run).Skip(beforeKill.Count).ToList();
        output.WriteLine($"killed after {beforeKill.Count} steps, last checkpoint {lastCheckpoint}, resumed {resumed.Count} steps");

        Assert.Equal(lastCheckpoint, resumed[0].Step);
        var final = StreamPosition.FromExtra(Model.Checkpoint.ReadState(Model.Checkpoint.Latest(run)!).Extra);
        var history = beforeKill.Take((int)lastCheckpoint).Concat(resumed).ToList();
        Assert.Equal(Enumerable.Range(0, 30).Select(i => (long)i), history.Select(e => e.Step));
        var trained = history.SelectMany(e => e.Ids).ToList();
        // 0 lost, 0 twice: the model's history holds every record up to the final position exactly once.
        var covered = ReadTopic(cluster, "pairs").Where(r => r.Offset <= final[KafkaRecords.PartitionKey("pairs", r.Partition)]).Select(r => r.Id);
        Assert.Equal(covered.Order(), trained.Order());
        // Replays (trained before the kill, after the last checkpoint) stay within one checkpoint interval.
        Assert.InRange(beforeKill.Count - lastCheckpoint, 0, CheckpointEvery + 2);
        // The group's committed offsets are the final checkpoint's.
        Assert.Equal(final.Offsets.ToDictionary(kv => kv.Key, kv => kv.Value + 1), Committed(cluster, "pairs", 4, "trainer"));
    }

    [Fact]
    public async Task The_broker_going_away_pauses_training_and_loses_nothing()
    {
        using var cluster = new KafkaMockCluster();
        cluster.CreateTopic("pairs", partitions: 2);
        Ingest(cluster, "pairs", 300);   // every record is in the broker before it goes down
        using var folder = new TempFolder();
        var run = folder.File("run");
        const int steps = 30;
        // librdkafka prefetches a few records per partition only, so most of them wait in the broker.
        using var p = Process.Start(MamoProcess.StartInfo(Pretrain($"kafka://{cluster.BootstrapServers}/pairs", run, maxSteps: steps,
            "--set", "kafka.consumer.queued.min.messages=1", "--set", "kafka.consumer.queued.max.messages.kbytes=1",
            "--set", "kafka.consumer.fetch.max.bytes=20000", "--set", "kafka.consumer.message.max.bytes=20000",
            "--set", "kafka.consumer.max.partition.fetch.bytes=10000", "--set", "metrics.sample-every=1s")))!;
        var stdout = p.StandardOutput.ReadToEndAsync();
        var stderr = p.StandardError.ReadToEndAsync();
        WaitFor(() => File.Exists(Path.Combine(run, "ledger.jsonl")) && MamoProcess.Ledger(run).Count >= 6, p, run);
        cluster.SetBrokerDown(1, down: true);
        WaitFor(() => File.ReadAllText(Path.Combine(run, "mamo.log")).Contains("Kafka broker unavailable"), p, run);
        // While the broker is away the run trains what it had read, every full batch of it, and no more: it settles where
        // the ledger holds floor(samples read / batch) steps, by the process lines (written each second) once the reader
        // has stopped, and says it is paused to its dashboard. It cannot finish: librdkafka had fetched only a few records ahead.
        var read = -1L;
        WaitFor(() => States(run).LastOrDefault() == "paused" && (read = SamplesRead(run)) >= 0 && MamoProcess.Ledger(run).Count == read / Batch, p, run);
        var during = MamoProcess.Ledger(run).Count;
        output.WriteLine($"while the broker was away: {read} samples read, {during} steps trained");
        Assert.True(during < steps, $"{during} steps trained from {read} samples with the broker away");
        cluster.SetBrokerDown(1, down: false);
        using var patience = new CancellationTokenSource(TimeSpan.FromMinutes(3));
        await p.WaitForExitAsync(patience.Token);
        var log = await stdout + await stderr;
        Assert.True(p.ExitCode == 0, log);
        // An outage pauses the pipeline; it never fails it (a restart would train the steps since the checkpoint again).
        Assert.True(!States(run).Contains("restarting"), File.ReadAllText(Path.Combine(run, "mamo.log")));
        var ledger = MamoProcess.Ledger(run);
        Assert.Equal(Enumerable.Range(0, steps).Select(i => (long)i), ledger.Select(e => e.Step));
        // Every record up to the final position, once each.
        var final = StreamPosition.FromExtra(Model.Checkpoint.ReadState(Model.Checkpoint.Latest(run)!).Extra);
        var covered = ReadTopic(cluster, "pairs").Where(r => r.Offset <= (final[KafkaRecords.PartitionKey("pairs", r.Partition)] ?? -1)).Select(r => r.Id);
        Assert.Equal(covered.Order(), ledger.SelectMany(e => e.Ids).Order());
        // The dashboard's lines: running, paused while the broker was away, running again, stopped; and the consumer's
        // position, end offset and lag in both partitions.
        Assert.Equal(["running", "paused", "running", "stopped"], Collapse(States(run)));
        var kafka = MetricLines(run).Where(l => (string?)l["kind"] == "kafka").Select(l => l["partitions"]!.AsObject()).ToList();
        Assert.Contains(kafka, k => k.ContainsKey("pairs/0") && k.ContainsKey("pairs/1")
            && k.All(p => p.Value!["lag"] is not null && (long)p.Value["lag"]! == (long)p.Value["end"]! - (long)p.Value["position"]!));
    }

    static List<System.Text.Json.Nodes.JsonObject> MetricLines(string run) =>
        File.ReadAllLines(Path.Combine(run, "metrics.jsonl")).Where(l => l.EndsWith('}')).Select(l => System.Text.Json.Nodes.JsonNode.Parse(l)!.AsObject()).ToList();

    /// <summary>samples_read once the reader has stopped (the last two process lines agree); -1 while it reads.</summary>
    static long SamplesRead(string run)
    {
        var read = MetricLines(run).Where(l => (string?)l["kind"] == "process").TakeLast(2).Select(l => (long)l["samples_read"]!).ToList();
        return read.Count == 2 && read[0] == read[1] ? read[1] : -1;
    }

    static List<string> States(string run) => MetricLines(run).Where(l => (string?)l["kind"] == "state").Select(l => (string)l["state"]!).ToList();

    /// <summary>Runs of the same state as one.</summary>
    static List<string> Collapse(List<string> states) => states.Where((s, i) => i == 0 || states[i - 1] != s).ToList();

    [Fact]
    public void Unusable_records_go_to_the_dead_letter_topic_with_reasons_and_training_goes_on()
    {
        using var cluster = new KafkaMockCluster();
        cluster.CreateTopic("pairs", partitions: 1);
        var png = File.ReadAllBytes(Path.Combine(Path.GetDirectoryName(EmojiTrain())!, "images", "1f600.png"));
        Headers Captions(params string[] c) => [.. c.Select(x => new Header(KafkaRecords.CaptionHeader, Encoding.UTF8.GetBytes(x)))];
        var kinds = new (string Name, Func<int, Message<byte[]?, byte[]?>> Make, string Reason)[]
        {
            ("truncated", i => new() { Key = Key("truncated", i), Value = png[..(png.Length / 3)], Headers = Captions("a grinning face") }, "Undecodable"),
            ("empty", i => new() { Key = Key("empty", i), Value = [], Headers = Captions("nothing") }, "empty value"),
            ("uncaptioned", i => new() { Key = Key("uncaptioned", i), Value = png, Headers = [] }, "no 'caption' header"),
            ("bad-utf8", i => new() { Key = Key("bad-utf8", i), Value = png, Headers = [new Header(KafkaRecords.CaptionHeader, [0x61, 0xC3, 0x28])] }, "invalid UTF-8"),
            ("huge", i => new() { Key = Key("huge", i), Value = TestImages.PngHeader(50_000, 50_000), Headers = Captions("a vast picture") }, "TooManyPixels"),
        };
        using (var producer = new ProducerBuilder<byte[]?, byte[]?>(new ProducerConfig { BootstrapServers = cluster.BootstrapServers }).Build())
        {
            for (var i = 0; i < 20; i++)
                foreach (var kind in kinds) producer.Produce("pairs", kind.Make(i));
            producer.Flush(TimeSpan.FromSeconds(30));
        }
        Ingest(cluster, "pairs", 40);
        using var folder = new TempFolder();
        var run = folder.File("run");
        var (code, log) = MamoProcess.Run(Pretrain($"kafka://{cluster.BootstrapServers}/pairs", run, maxSteps: 4));
        Assert.True(code == 0, log);
        Assert.Equal(4, MamoProcess.Ledger(run).Count);

        var dead = ReadTopic(cluster, "pairs.dlq");
        Assert.Equal(100, dead.Count);
        foreach (var kind in kinds)
        {
            var ofKind = dead.Where(d => d.Id.StartsWith(kind.Name + "-")).ToList();
            Assert.Equal(20, ofKind.Count);
            Assert.All(ofKind, d => Assert.Contains(kind.Reason, d.Headers[KafkaRecords.ErrorHeader]));
        }
        Assert.All(dead, d => Assert.Matches(@"^pairs/0@\d+$", d.Headers[KafkaRecords.SourceOffsetHeader]));
        Assert.Equal(100, File.ReadAllLines(Path.Combine(run, "dead-letters.jsonl")).Length);
    }

    [Fact]
    public void Kcat_produces_what_mamo_trains_on_and_reads_the_embeddings_it_publishes()
    {
        using var cluster = new KafkaMockCluster();
        cluster.CreateTopic("kcat-pairs", partitions: 1);
        var train = EmojiTrain();
        var root = Path.GetDirectoryName(train)!;
        var samples = ManifestSource.ReadAll(train).Samples.Take(2 * Batch).ToList();
        foreach (var s in samples)
        {
            string[] args = ["-P", "-b", cluster.BootstrapServers, "-t", "kcat-pairs", "-k", s.Id, "-H", "content-type=image/png",
                .. s.Captions.SelectMany(c => new[] { "-H", $"caption={c}" }), Path.Combine(root, "images", s.Id + ".png")];
            var (kcatCode, kcatLog) = Kcat(args);
            Assert.True(kcatCode == 0, kcatLog);
        }
        using var folder = new TempFolder();
        var run = folder.File("run");
        var (code, log) = MamoProcess.Run(Pretrain($"kafka://{cluster.BootstrapServers}/kcat-pairs", run, maxSteps: 2,
            "--set", $"publish.output=kafka://{cluster.BootstrapServers}/embeddings", "--set", "publish.input=dataset:emoji/test", "--set", "checkpoint.every-steps=2"));
        Assert.True(code == 0, log);
        Assert.Equal(samples.Select(s => s.Id).Order(), MamoProcess.Ledger(run).SelectMany(e => e.Ids).Order());

        // kcat reads the embeddings: every value holds `dim` float32s, and each vector has unit length.
        var (listCode, listing) = Kcat(["-C", "-b", cluster.BootstrapServers, "-t", "embeddings", "-e", "-f", "%k|%S|%h\n"]);
        Assert.True(listCode == 0, listing);
        var lines = listing.Split('\n', StringSplitOptions.RemoveEmptyEntries).Where(l => l.Contains('|')).ToList();
        Assert.Equal(2 * 181, lines.Count);   // image and text vectors of the emoji test set, from the checkpoint at step 2
        foreach (var line in lines)
        {
            var parts = line.Split('|');
            var headers = parts[2].Split(',').Select(h => h.Split('=', 2)).ToDictionary(h => h[0], h => h[1]);
            Assert.Equal(int.Parse(headers[EmbeddingSinks.DimHeader]) * sizeof(float), int.Parse(parts[1]));
            Assert.Equal("step-2", headers[EmbeddingSinks.ModelVersionHeader]);
        }
        // The version's events on embeddings.versions: started, then complete with the count and checksum of those vectors.
        var (eventsCode, events) = Kcat(["-C", "-b", cluster.BootstrapServers, "-t", EmbeddingSinks.VersionsTopic("embeddings"), "-e", "-f", "%k|%s\n"]);
        Assert.True(eventsCode == 0, events);
        var versions = events.Split('\n', StringSplitOptions.RemoveEmptyEntries).Where(l => l.Contains('|'))
            .Select(l => (Key: l[..l.IndexOf('|')], Record: VersionRecord.Parse(System.Text.Encoding.UTF8.GetBytes(l[(l.IndexOf('|') + 1)..])))).ToList();
        Assert.Equal([("step-2", "started"), ("step-2", "complete")], versions.Select(v => (v.Key, v.Record.State)));
        Assert.Equal(2 * 181, versions[1].Record.Records);
        Assert.Equal(VersionRecord.IdsChecksum(lines.Select(l => (l.Split('|')[0], l.Split('|')[2].Split(',').Select(h => h.Split('=', 2))
            .Single(h => h[0] == EmbeddingSinks.ModalityHeader)[1]))), versions[1].Record.IdsSha256);
        var raw = KcatBytes(["-C", "-b", cluster.BootstrapServers, "-t", "embeddings", "-e", "-c", "1", "-f", "%s"]);
        var vector = EmbeddingSinks.Decode(raw);
        Assert.Equal(128, vector.Length);
        Assert.InRange(Math.Sqrt(vector.Sum(v => (double)v * v)), 0.999, 1.001);
    }

    [Fact]
    public void Ingest_embed_and_pretrain_hand_the_kafka_settings_to_librdkafka()
    {
        using var cluster = new KafkaMockCluster();
        cluster.CreateTopic("props", partitions: 1);
        var topic = $"kafka://{cluster.BootstrapServers}/props";
        // A property librdkafka knows takes effect: a 1,000-byte cap refuses every emoji PNG.
        var (code, stdout, stderr) = Cli.Run("ingest", "--dataset", "emoji", "--limit", "3", "--to", topic, "--set", "kafka.producer.message.max.bytes=1000");
        Assert.True(code == 1, stdout + stderr);
        Assert.Contains("too large", stderr);
        // One it does not know is a clear error naming it, not a crash: from ingest, and from the consumer and producer
        // of embed and of pretrain alike.
        (code, stdout, stderr) = Cli.Run("ingest", "--dataset", "emoji", "--limit", "3", "--to", topic, "--set", "kafka.producer.no.such.property=1");
        Assert.True(code == 2, stdout + stderr);
        Assert.Contains("no.such.property", stderr);

        using var folder = new TempFolder();
        using (var trainer = new Model.MamoTrainer(Model.MamoConfig.Tiny, new Model.OptimizerConfig(), TorchSharp.torch.CPU, seed: 1))
            trainer.Save(folder.File("checkpoint"));
        foreach (var set in new[] { "kafka.consumer.no.such.property=1", "kafka.producer.no.such.property=1" })
        {
            (code, stdout, stderr) = Cli.Run("embed", "--checkpoint", folder.File("checkpoint"), "--input", topic, "--output", $"{topic}-embeddings",
                "--max-records", "1", "--set", set);
            Assert.True(code == 2, $"{set}: {stdout}{stderr}");
            Assert.Contains("no.such.property", stderr);

            var (pretrainCode, log) = MamoProcess.Run(Pretrain(topic, folder.File("run"), 1, "--set", set));
            Assert.True(pretrainCode == 2, $"{set}: {log}");
            Assert.Contains("No such configuration property", log);
        }
    }

    static byte[] Key(string kind, int i) => Encoding.UTF8.GetBytes($"{kind}-{i}");

    static string EmojiTrain() => BuiltinDatasets.Ensure(BuiltinDatasets.Emoji).File(BuiltinDatasets.TrainSplit);

    /// <summary>`mamo ingest` of n Noto emoji of the training split, after the first `skip`.</summary>
    internal static void Ingest(KafkaMockCluster cluster, string topic, int n, int skip = 0)
    {
        var (code, stdout, stderr) = Cli.Run("ingest", "--dataset", "emoji", "--skip", $"{skip}", "--limit", $"{n}", "--to", $"kafka://{cluster.BootstrapServers}/{topic}");
        Assert.True(code == 0, stdout + stderr);
        Assert.Contains($"ingested {n} records", stdout);
    }

    internal sealed record TopicRecord(int Partition, long Offset, string Id, IReadOnlyDictionary<string, string> Headers);

    /// <summary>Everything in a topic, from the beginning, outside any group.</summary>
    internal static List<TopicRecord> ReadTopic(KafkaMockCluster cluster, string topic)
    {
        using var admin = new AdminClientBuilder(new AdminClientConfig { BootstrapServers = cluster.BootstrapServers }).Build();
        var partitions = admin.GetMetadata(topic, TimeSpan.FromSeconds(10)).Topics[0].Partitions.Select(p => p.PartitionId).ToList();
        using var consumer = new ConsumerBuilder<byte[]?, byte[]?>(new ConsumerConfig
        {
            BootstrapServers = cluster.BootstrapServers, GroupId = "reader-" + Guid.NewGuid(), EnableAutoCommit = false, EnablePartitionEof = true,
        }).Build();
        consumer.Assign(partitions.Select(p => new TopicPartitionOffset(topic, p, Offset.Beginning)));
        var records = new List<TopicRecord>();
        var ended = new HashSet<int>();
        var clock = Stopwatch.StartNew();
        while (ended.Count < partitions.Count && clock.Elapsed < TimeSpan.FromSeconds(30))
        {
            var r = consumer.Consume(TimeSpan.FromMilliseconds(200));
            if (r is null) continue;
            if (r.IsPartitionEOF) { ended.Add(r.Partition.Value); continue; }
            records.Add(new TopicRecord(r.Partition.Value, r.Offset.Value, Encoding.UTF8.GetString(r.Message.Key ?? []),
                (r.Message.Headers ?? []).GroupBy(h => h.Key).ToDictionary(g => g.Key, g => Encoding.UTF8.GetString(g.Last().GetValueBytes()))));
        }
        Assert.True(ended.Count == partitions.Count, $"could not read {topic} to its end");
        return records;
    }

    internal static Dictionary<string, long> Committed(KafkaMockCluster cluster, string topic, int partitions, string group)
    {
        using var consumer = new ConsumerBuilder<byte[], byte[]>(new ConsumerConfig { BootstrapServers = cluster.BootstrapServers, GroupId = group }).Build();
        return consumer.Committed(Enumerable.Range(0, partitions).Select(p => new TopicPartition(topic, p)), TimeSpan.FromSeconds(10))
            .Where(c => c.Offset != Offset.Unset)
            .ToDictionary(c => KafkaRecords.PartitionKey(c.Topic, c.Partition.Value), c => c.Offset.Value);
    }

    static void WaitFor(Func<bool> condition, Process p, string run)
    {
        var clock = Stopwatch.StartNew();
        while (!condition())
        {
            if (p.HasExited) throw new InvalidOperationException($"mamo exited ({p.ExitCode}) early\n{ClusterTests.Tail(Path.Combine(run, "mamo.log"))}");
            if (clock.Elapsed > TimeSpan.FromMinutes(3)) throw new TimeoutException($"mamo made no progress\n{ClusterTests.Tail(Path.Combine(run, "mamo.log"))}");
            Thread.Sleep(50);
        }
    }

    static ProcessStartInfo KcatInfo(IEnumerable<string> args)
    {
        var kcat = new[] { "/usr/bin/kcat", "/usr/local/bin/kcat" }.FirstOrDefault(File.Exists)
            ?? throw new InvalidOperationException("kcat is not installed: `apt-get install -y kcat` (.ci/run does this)");
        var info = new ProcessStartInfo(kcat) { RedirectStandardOutput = true, RedirectStandardError = true };
        foreach (var a in args) info.ArgumentList.Add(a);
        return info;
    }

    internal static (int Code, string Output) Kcat(IEnumerable<string> args)
    {
        using var p = Process.Start(KcatInfo(args))!;
        var stderr = p.StandardError.ReadToEndAsync();
        var stdout = p.StandardOutput.ReadToEnd();
        p.WaitForExit();
        return (p.ExitCode, stdout + stderr.Result);
    }

    static byte[] KcatBytes(IEnumerable<string> args)
    {
        using var p = Process.Start(KcatInfo(args))!;
        _ = p.StandardError.ReadToEndAsync();
        using var bytes = new MemoryStream();
        p.StandardOutput.BaseStream.CopyTo(bytes);
        p.WaitForExit();
        Assert.Equal(0, p.ExitCode);
        return bytes.ToArray();
    }
}
