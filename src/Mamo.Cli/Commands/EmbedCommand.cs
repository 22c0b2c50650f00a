using System.CommandLine;
using System.Diagnostics;
using System.Runtime.InteropServices;
using Confluent.Kafka;
using Mamo.Actors;
using Mamo.Data;
using Mamo.Data.Datasets;
using Mamo.Data.Kafka;
using Mamo.Model;
using Mamo.Actors.Run;
using Mamo.Actors.Pipeline;
using Mamo.Actors.Sources;

namespace Mamo.Cli.Commands;

/// <summary>
/// `mamo embed (--checkpoint PATH | --run-dir DIR | --follow DIR) --input SPEC --output SPEC [--modality image|text|both]`:
/// ITC embeddings of a set or of a live topic, as versioned records (docs/KAFKA.md). With --follow it watches the run
/// for new checkpoints and re-embeds a file input with each new model version (a backfill); a Kafka input is
/// embedded record by record with whichever version is newest.
/// </summary>
public static class EmbedCommand
{
    static readonly TimeSpan PollEvery = TimeSpan.FromSeconds(2), BatchWait = TimeSpan.FromMilliseconds(50);

    public static Command Create()
    {
        var checkpoint = new Option<string?>("--checkpoint") { Description = "A checkpoint folder" };
        var runDir = new Option<string?>("--run-dir") { Description = "A run folder: its newest checkpoint" };
        var follow = new Option<string?>("--follow") { Description = "A run folder to watch: publish again with each new checkpoint" };
        var input = new Option<string>("--input") { Description = "manifest:PATH, dataset:NAME/SPLIT or kafka://HOST:PORT/TOPIC[?group=G]", Required = true };
        var output = new Option<string>("--output") { Description = "kafka://HOST:PORT/TOPIC or jsonl:PATH", Required = true };
        var modality = new Option<string>("--modality") { Description = "image, text (the first caption) or both", DefaultValueFactory = _ => Embedder.Both };
        modality.AcceptOnlyFromAmong(Embedder.Image, Embedder.Text, Embedder.Both);
        var batchSize = new Option<int>("--batch-size") { Description = "Items per forward pass", DefaultValueFactory = _ => 64 };
        batchSize.Validators.Add(r => { if (r.GetValueOrDefault<int>() < 1) r.AddError("--batch-size must be 1 or more"); });
        var maxRecords = new Option<long>("--max-records") { Description = "Kafka input: stop after embedding this many records (0: run until stopped)", DefaultValueFactory = _ => 0 };
        var device = new Option<string>("--device") { Description = "cpu or cuda", DefaultValueFactory = _ => "cpu" };
        var settingsOptions = new SettingsOptions();   // mamo.kafka.consumer / producer: SASL, TLS, ...
        var command = new Command("embed", "Publish versioned image and text embeddings of a set or a live topic")
        {
            checkpoint, runDir, follow, input, output, modality, batchSize, maxRecords, device, settingsOptions.Config, settingsOptions.Set,
        };
        command.SetAction(async (parse, _) =>
        {
            var error = parse.InvocationConfiguration.Error;
            var stdout = parse.InvocationConfiguration.Output;
            int Fail(string message, int code = ExitCodes.Usage)
            {
                error.WriteLine($"mamo embed: {message}");
                return code;
            }
            var sources = new[] { parse.GetValue(checkpoint), parse.GetValue(runDir), parse.GetValue(follow) }.Count(v => v is not null);
            if (sources != 1) return Fail("give exactly one of --checkpoint PATH, --run-dir DIR and --follow DIR");
            var watched = parse.GetValue(follow);
            var fixedDir = parse.GetValue(checkpoint) ?? parse.GetValue(runDir);
            string? Newest() => Checkpoint.Latest((fixedDir ?? watched)!);
            if (watched is null && Newest() is null) return Fail($"no checkpoint at {fixedDir}");

            TorchSharp.torch.Device dev;
            try { dev = RunInputs.OpenDevice(parse.GetValue(device)!); }
            catch (SettingsException e) { return Fail(e.Message); }

            MamoSettings settings;
            IEmbeddingSink sink;
            try
            {
                settings = settingsOptions.Load(parse);
                sink = EmbeddingSinks.Open(parse.GetValue(output)!, settings.KafkaProducer);
            }
            catch (Exception e) when (e is SettingsException or FormatException or ArgumentException) { return Fail(e.Message); }
            using var _sink = sink;
            using var stop = new CancellationTokenSource();
            using var sigint = PosixSignalRegistration.Create(PosixSignal.SIGINT, c => { c.Cancel = true; stop.Cancel(); });
            using var sigterm = PosixSignalRegistration.Create(PosixSignal.SIGTERM, c => { c.Cancel = true; stop.Cancel(); });

            var options = new Options(parse.GetValue(modality)!, parse.GetValue(batchSize), parse.GetValue(maxRecords), dev, watched is not null);
            try
            {
                var tokenizer = new TextTokenizer(BuiltinDatasets.EnsureVocab(log: error.WriteLine));
                var spec = parse.GetValue(input)!;
                return KafkaSpec.IsKafka(spec)
                    ? EmbedTopic(KafkaSpec.Parse(spec), settings, Newest, tokenizer, sink, options, error, stop.Token)
                    : await EmbedSet(spec, Newest, tokenizer, sink, options, stdout, error, stop.Token);
            }
            catch (Exception e) when (e is FormatException or SettingsException or InvalidDataException or IOException or KafkaException
                                          or DatasetFetchException or NpmMissingException or KeyNotFoundException or ArgumentException)
            {
                return Fail(e.Message, e is KafkaException or IOException ? ExitCodes.Failed : ExitCodes.Usage);
            }
        });
        return command;
    }

    sealed record Options(string Modality, int BatchSize, long MaxRecords, TorchSharp.torch.Device Device, bool Follow);

    static SamplePreparer Preparer(Embedder embedder, TextTokenizer tokenizer) =>
        SamplePreparer.ForEvaluation(embedder.Config.ImageSize, embedder.Config.MaxTextLength, tokenizer);

    /// <summary>A file set: embed it with the newest checkpoint, and with --follow again with each newer one.</summary>
    static async Task<int> EmbedSet(string spec, Func<string?> newest, TextTokenizer tokenizer, IEmbeddingSink sink, Options o,
        TextWriter stdout, TextWriter error, CancellationToken stop)
    {
        var manifest = spec.StartsWith("manifest:") || spec.StartsWith("dataset:") ? TrainingSamples.EvalManifest(spec, error.WriteLine)
            : throw new FormatException($"unknown input '{spec}': use manifest:PATH, dataset:NAME/SPLIT or kafka://HOST:PORT/TOPIC");
        if (!File.Exists(manifest)) throw new FormatException($"no manifest at {manifest}");
        var (samples, bad) = ManifestSource.ReadAll(manifest);
        string? done = null;
        List<EmbeddingItem>? items = null;
        int? imageSize = null;
        while (!stop.IsCancellationRequested)
        {
            var dir = newest();
            if (dir is null || dir == done)
            {
                if (!o.Follow) break;
                if (dir is null && done is null) error.WriteLine("mamo embed: waiting for a first checkpoint");
                try { await Task.Delay(PollEvery, stop); } catch (OperationCanceledException) { }
                continue;
            }
            var clock = Stopwatch.StartNew();
            using var embedder = Embedder.Load(dir, o.Device);
            if (items is null || imageSize != embedder.Config.ImageSize)
            {
                var preparer = Preparer(embedder, tokenizer);
                items = EmbeddingItem.PrepareAll(samples, preparer, bad);
                foreach (var b in bad) error.WriteLine($"mamo embed: skipped {b.Location}: {b.Reason}");
                bad.Clear();
                imageSize = embedder.Config.ImageSize;
            }
            var (count, _) = new VersionPublication(null).Publish(embedder, items, o.Modality, o.BatchSize, sink, null, o.Device);
            stdout.WriteLine($"published {count} embeddings of model {embedder.Version} ({embedder.Checkpoint}) to {sink.Name} in {clock.Elapsed.TotalSeconds:F1}s");
            done = dir;
        }
        return 0;
    }

    /// <summary>A live topic: records are embedded as they come, with the newest model version; offsets are committed
    /// once the embeddings of the records before them are acknowledged. Prints the produce-to-publish lag at the end.</summary>
    static int EmbedTopic(KafkaSpec spec, MamoSettings settings, Func<string?> newest, TextTokenizer tokenizer, IEmbeddingSink sink, Options o,
        TextWriter error, CancellationToken stop)
    {
        using var consumer = KafkaProperties.Build(() => new ConsumerBuilder<byte[]?, byte[]?>(new ConsumerConfig(KafkaProperties.Merge(new Dictionary<string, string>
        {
            ["bootstrap.servers"] = spec.BootstrapServers, ["group.id"] = spec.Group ?? "mamo-embed",
            ["enable.auto.commit"] = "false", ["auto.offset.reset"] = "earliest",
            ["topic.metadata.refresh.interval.ms"] = "10000",   // a topic created after we subscribed is found within seconds
        }, settings.KafkaConsumer))).Build());
        using var deadLetters = KafkaProperties.Build(() => new ProducerBuilder<byte[]?, byte[]?>(new ProducerConfig(KafkaProperties.Merge(new Dictionary<string, string>
        {
            ["bootstrap.servers"] = spec.BootstrapServers, ["acks"] = "all",
        }, settings.KafkaProducer))).Build());
        consumer.Subscribe(spec.Topics);
        Embedder? embedder = null;
        SamplePreparer? preparer = null;
        var lags = new List<double>();
        string? lastError = null;
        long embedded = 0, bad = 0;
        try
        {
            while (!stop.IsCancellationRequested && (o.MaxRecords == 0 || embedded < o.MaxRecords))
            {
                if (newest() is { } dir && dir != embedder?.Checkpoint)
                {
                    embedder?.Dispose();
                    embedder = Embedder.Load(dir, o.Device);
                    preparer = Preparer(embedder, tokenizer);
                    error.WriteLine($"mamo embed: model {embedder.Version} from {dir}");
                }
                if (embedder is null)
                {
                    if (!o.Follow) throw new InvalidDataException("no checkpoint");
                    Thread.Sleep(PollEvery);
                    continue;
                }
                var batch = new List<(EmbeddingItem Item, DateTime Produced)>();
                var offsets = new Dictionary<TopicPartition, Offset>();
                var deadline = DateTime.UtcNow + BatchWait;
                while (batch.Count < o.BatchSize && !stop.IsCancellationRequested)
                {
                    ConsumeResult<byte[]?, byte[]?>? r;
                    try { r = consumer.Consume(batch.Count == 0 ? TimeSpan.FromMilliseconds(200) : deadline - DateTime.UtcNow is var left && left > TimeSpan.Zero ? left : TimeSpan.Zero); }
                    catch (ConsumeException e)
                    {
                        // e.g. the topic does not exist yet: say so, and keep polling until it does.
                        if (e.Error.Reason != lastError) error.WriteLine($"mamo embed: {e.Error.Reason} (waiting)");
                        lastError = e.Error.Reason;
                        Thread.Sleep(PollEvery);
                        break;
                    }
                    if (r is null) { if (batch.Count > 0 || DateTime.UtcNow >= deadline) break; continue; }
                    offsets[r.TopicPartition] = r.Offset + 1;
                    var record = KafkaRecords.Read(r.Topic, r.Partition.Value, r.Offset.Value, r.Message.Key, r.Message.Value, r.Message.Headers, SourceLimits.Default);
                    BadInput? why = (record as BadItem)?.Bad;
                    var item = record is SampleItem { Sample: var s } ? EmbeddingItem.Prepare(s, preparer!, out why) : null;
                    if (item is null)
                    {
                        bad++;
                        error.WriteLine($"mamo embed: dead letter {why!.Location}: {why.Reason}");
                        deadLetters.Produce(r.Topic + ".dlq", KafkaRecords.DeadLetter(r.Message.Key, r.Message.Value, r.Message.Headers, why.Reason, $"{r.Topic}/{r.Partition.Value}@{r.Offset.Value}"));
                        continue;
                    }
                    batch.Add((item, r.Message.Timestamp.UtcDateTime));
                }
                if (batch.Count > 0)
                {
                    embedder.Embed(batch.Select(b => b.Item).ToList(), o.Modality, o.BatchSize, sink);
                    sink.Flush();
                    var published = DateTime.UtcNow;
                    lags.AddRange(batch.Select(b => (published - b.Produced).TotalMilliseconds));
                    embedded += batch.Count;
                }
                if (offsets.Count > 0)
                {
                    deadLetters.Flush(TimeSpan.FromSeconds(30));
                    consumer.Commit(offsets.Select(kv => new TopicPartitionOffset(kv.Key, kv.Value)));
                }
            }
        }
        finally
        {
            embedder?.Dispose();
            consumer.Close();
        }
        lags.Sort();
        if (lags.Count > 0)
            error.WriteLine($"mamo embed: {embedded} records embedded, {bad} dead letters; produce-to-publish lag ms: p50 {lags[lags.Count / 2]:F0}, p95 {lags[(int)(lags.Count * 0.95)]:F0}, max {lags[^1]:F0}");
        return 0;
    }
}
