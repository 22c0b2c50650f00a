using System.CommandLine;
using System.Runtime.InteropServices;
using Mamo.Actors.Run;
using Mamo.Cli.Serving;
using Mamo.Cli.Web;
using Mamo.Data;
using Mamo.Data.Datasets;
using Mamo.Data.Kafka;

namespace Mamo.Cli.Commands;

/// <summary>`mamo serve --run-dir DIR [--index kafka://HOST:PORT/TOPIC] [--listen HOST:PORT]`: an embedding service over a
/// run's model versions, taking each new checkpoint as the run writes it, and with an index a search service over the
/// catalogue the run publishes, until Ctrl-C or SIGTERM (docs/SERVING.md).</summary>
public static class ServeCommand
{
    public static Command Create()
    {
        var runDir = new Option<string>("--run-dir") { Description = "The run folder whose checkpoints are the versions (it may have none yet)", Required = true };
        var listen = new ListenOptions("--listen", $"HOST:PORT to serve on (default {EmbeddingServer.DefaultAddress}, or the next free port)",
            EmbeddingServer.DefaultAddress, "--token", EmbeddingServer.TokenVariable, "docs/SERVING.md");
        var defaults = new EmbeddingServer.Options();
        var keep = new Option<int>("--keep-versions") { Description = "Model versions kept loaded at once", DefaultValueFactory = _ => ModelVersions.DefaultKeep };
        var maxBatch = new Option<int>("--max-batch") { Description = "Queries embedded in one forward pass at most", DefaultValueFactory = _ => defaults.MaxBatch };
        var batchWait = new Option<int>("--batch-wait-ms") { Description = "How long a query waits for others to share its forward pass", DefaultValueFactory = _ => defaults.BatchWaitMs };
        foreach (var (option, least) in new[] { (keep, 1), (maxBatch, 1), (batchWait, 0) })
            option.Validators.Add(r => { if (r.GetValueOrDefault<int>() < least) r.AddError($"{option.Name} must be {least} or more"); });
        var index = new Option<string?>("--index")
        {
            Description = "kafka://HOST:PORT/TOPIC: the embeddings the run publishes there, searched at /search one complete version at a time (default: no index)",
        };
        // TESTING ONLY: searches a version from its first vector, so the end-to-end test can show that it catches that.
        var breakRule = new Option<bool>("--index-searches-partial-versions") { Hidden = true };
        var device = SettingsOptions.DeviceOption();
        var settingsOptions = new SettingsOptions();   // torch-threads, device, data.max-image-bytes and -pixels
        var command = new Command("serve", "Serve embeddings of texts and images with a run's model versions over HTTP")
        {
            runDir, index, breakRule, listen.Listen, listen.Token, keep, maxBatch, batchWait, device, settingsOptions.Config, settingsOptions.Set,
        };
        command.SetAction(async (parse, ct) =>
        {
            var error = parse.InvocationConfiguration.Error;
            var stdout = parse.InvocationConfiguration.Output;
            int Fail(string message)
            {
                error.WriteLine($"mamo serve: {message}");
                return ExitCodes.Usage;
            }
            var dir = parse.GetValue(runDir)!;
            if (!Directory.Exists(dir)) return Fail($"no run folder at {dir}");
            ListenAddress? address;
            string? token;
            TorchSharp.torch.Device dev;
            DecodeLimits limits;
            TextTokenizer tokenizer;
            EmbeddingServer.IndexOptions? indexOptions = null;
            try
            {
                (address, token) = listen.Resolve(parse);
                (dev, limits) = settingsOptions.LoadInference(parse, parse.GetValue(device));
                if (parse.GetValue(index) is { } topic)
                    indexOptions = new EmbeddingServer.IndexOptions(KafkaSpec.Parse(topic), settingsOptions.Load(parse).KafkaConsumer,
                        parse.GetValue(breakRule) ? IndexFollower.SwitchRule.FirstVector : IndexFollower.SwitchRule.Complete);
                tokenizer = new TextTokenizer(BuiltinDatasets.EnsureVocab(log: error.WriteLine));
            }
            catch (Exception e) when (e is FormatException or SettingsException or DatasetFetchException or NpmMissingException) { return Fail(e.Message); }
            if (address is null) return Fail("--listen off leaves nothing to do");

            using var stop = CancellationTokenSource.CreateLinkedTokenSource(ct);
            using var sigterm = PosixSignalRegistration.Create(PosixSignal.SIGTERM, c => { c.Cancel = true; stop.Cancel(); });
            using var versions = new ModelVersions(dir, parse.GetValue(keep), dev, tokenizer, limits);
            var options = new EmbeddingServer.Options(parse.GetValue(maxBatch), parse.GetValue(batchWait));
            EmbeddingServer server;
            try { server = await EmbeddingServer.StartAsync(versions, options, limits, address, token, m => error.WriteLine($"mamo serve: {m}"), indexOptions); }
            catch (AddressInUseError e) { return Fail($"{e.Message}: name a free address with --listen"); }
            catch (Exception e) when (e is FormatException or ArgumentException) { return Fail(e.Message); }
            await using (server)
            {
                stdout.WriteLine($"serving: {server.Address}");
                if (versions.Newest is null) error.WriteLine($"mamo serve: {dir} has no checkpoint yet; /readyz says ready once the run writes one");
                try { await Task.Delay(Timeout.Infinite, stop.Token); }
                catch (OperationCanceledException) { }
            }
            return ExitCodes.Success;
        });
        return command;
    }
}
