using System.CommandLine;
using System.Diagnostics;
using Confluent.Kafka;
using Mamo.Actors;
using Mamo.Data;
using Mamo.Data.Datasets;
using Mamo.Data.Kafka;
using Mamo.Actors.Sources;
using Mamo.Actors.Run;

namespace Mamo.Cli.Commands;

/// <summary>`mamo ingest --dataset emoji | --input manifest:PATH --to kafka://HOST:PORT/TOPIC [--rate N] [--limit N] [--skip N]`:
/// publishes image-text pairs in the record format of docs/KAFKA.md, for demos and tests.</summary>
public static class IngestCommand
{
    public static Command Create()
    {
        var dataset = new Option<string?>("--dataset") { Description = "A built-in dataset, NAME or NAME/SPLIT (default split: train)" };
        var input = new Option<string?>("--input") { Description = "manifest:PATH (JSONL)" };
        var to = new Option<string>("--to") { Description = "kafka://HOST:PORT/TOPIC", Required = true };
        var rate = new Option<double>("--rate") { Description = "Records per second (0: as fast as the broker takes them)", DefaultValueFactory = _ => 0 };
        rate.Validators.Add(r => { if (r.GetValueOrDefault<double>() < 0) r.AddError("--rate must not be negative"); });
        var limit = new Option<int>("--limit") { Description = "Stop after this many records (0: all)", DefaultValueFactory = _ => 0 };
        var skip = new Option<int>("--skip") { Description = "Leave out the first N records", DefaultValueFactory = _ => 0 };
        var settingsOptions = new SettingsOptions();   // mamo.kafka.producer: SASL, TLS, ...
        var command = new Command("ingest", "Publish a dataset to a Kafka topic in MamoActors' record format")
        {
            dataset, input, to, rate, limit, skip, settingsOptions.Config, settingsOptions.Set,
        };
        command.SetAction(parse =>
        {
            var error = parse.InvocationConfiguration.Error;
            var output = parse.InvocationConfiguration.Output;
            int Fail(string message, int code = ExitCodes.Usage)
            {
                error.WriteLine($"mamo ingest: {message}");
                return code;
            }
            if ((parse.GetValue(dataset) is null) == (parse.GetValue(input) is null)) return Fail("give exactly one of --dataset NAME and --input manifest:PATH");
            KafkaSpec spec;
            try { spec = KafkaSpec.Parse(parse.GetValue(to)!); }
            catch (FormatException e) { return Fail(e.Message); }
            if (spec.Topics.Count != 1) return Fail("--to names exactly one topic");

            string manifest;
            try
            {
                manifest = parse.GetValue(dataset) is { } name
                    ? TrainingSamples.EvalManifest("dataset:" + (name.Contains('/') ? name : name + "/" + BuiltinDatasets.TrainSplit), error.WriteLine)
                    : parse.GetValue(input)!.StartsWith("manifest:") ? parse.GetValue(input)!["manifest:".Length..] : throw new SettingsException("--input must be manifest:PATH");
            }
            catch (Exception e) when (e is SettingsException or ArgumentException or KeyNotFoundException or DatasetFetchException or NpmMissingException)
            {
                return Fail(e.Message);
            }
            if (!File.Exists(manifest)) return Fail($"no manifest at {manifest}");

            string? lastError = null;
            IProducer<byte[]?, byte[]?> producer;
            try
            {
                var config = new ProducerConfig(KafkaProperties.Merge(new Dictionary<string, string>
                {
                    ["bootstrap.servers"] = spec.BootstrapServers, ["acks"] = "all", ["enable.idempotence"] = "true", ["linger.ms"] = "5",
                }, settingsOptions.Load(parse).KafkaProducer));
                producer = KafkaProperties.Build(() => new ProducerBuilder<byte[]?, byte[]?>(config)
                    .SetLogHandler((_, _) => { })   // librdkafka would print every reconnect attempt; one line per new error instead
                    .SetErrorHandler((_, e) =>
                    {
                        if (e.Reason != lastError) error.WriteLine($"mamo ingest: {e.Reason} (retrying)");
                        lastError = e.Reason;
                    })
                    .Build());
            }
            catch (Exception e) when (e is SettingsException or ArgumentException) { return Fail(e.Message); }
            using var _producer = producer;
            var topic = spec.Topics[0];
            double perSecond = parse.GetValue(rate);
            int max = parse.GetValue(limit), toSkip = parse.GetValue(skip), sent = 0, bad = 0;
            Error? failed = null;
            var clock = Stopwatch.StartNew();
            foreach (var item in new ManifestSource(manifest).Read(null, CancellationToken.None).Skip(toSkip))
            {
                if (item is BadItem b)
                {
                    bad++;
                    error.WriteLine($"mamo ingest: skipped {b.Bad.Location}: {b.Bad.Reason}");
                    continue;
                }
                var sample = ((SampleItem)item).Sample;
                try { producer.Produce(topic, KafkaRecords.ToMessage(sample, ContentType(sample.Image)), r => { if (r.Error.IsError) failed ??= r.Error; }); }
                catch (ProduceException<byte[]?, byte[]?> e)   // refused before sending, e.g. larger than message.max.bytes
                {
                    failed ??= e.Error;
                    break;
                }
                sent++;
                if (perSecond > 0)
                {
                    var due = TimeSpan.FromSeconds(sent / perSecond) - clock.Elapsed;
                    if (due > TimeSpan.Zero) Thread.Sleep(due);
                }
                if (sent % 500 == 0) error.WriteLine($"mamo ingest: {sent} records sent");
                if (max > 0 && sent >= max) break;
            }
            var left = producer.Flush(TimeSpan.FromMinutes(1));
            if (left > 0 || failed is not null)
                return Fail($"{(failed is null ? $"{left} records not acknowledged" : failed.Reason)} by {spec.BootstrapServers}", ExitCodes.Failed);
            output.WriteLine($"ingested {sent} records to {topic} at {spec.BootstrapServers} in {clock.Elapsed.TotalSeconds:F1}s ({sent / Math.Max(1e-9, clock.Elapsed.TotalSeconds):F0}/s); {bad} bad records skipped");
            return 0;
        });
        return command;
    }

    /// <summary>The content-type header from the image's magic bytes; the decoder sniffs anyway, this is for consumers.</summary>
    static string? ContentType(byte[] image) => image switch
    {
        [0x89, (byte)'P', (byte)'N', (byte)'G', ..] => "image/png",
        [0xFF, 0xD8, ..] => "image/jpeg",
        [(byte)'R', (byte)'I', (byte)'F', (byte)'F', _, _, _, _, (byte)'W', (byte)'E', (byte)'B', (byte)'P', ..] => "image/webp",
        [(byte)'G', (byte)'I', (byte)'F', ..] => "image/gif",
        _ => null,
    };
}
