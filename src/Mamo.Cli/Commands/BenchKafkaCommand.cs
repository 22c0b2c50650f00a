using System.CommandLine;
using System.Diagnostics;
using Akka.Actor;
using Akka.Streams;
using Akka.Streams.Dsl;
using Mamo.Actors;
using Mamo.Data;
using Mamo.Data.Datasets;
using Mamo.Data.Kafka;
using Mamo.Model;
using Mamo.Actors.Sources;

namespace Mamo.Cli.Commands;

/// <summary>`mamo bench kafka [--records N] [--parallelism P]`: records per second from a Kafka topic through the
/// training source and the preprocess stage (decode, crop, tokenise), without training: the input side's ceiling.
/// The broker is librdkafka's mock cluster in this process, filled with the emoji training set first.</summary>
public static class BenchKafkaCommand
{
    public static Command Create()
    {
        var records = new Option<int>("--records") { Description = "Records to ingest and read back", DefaultValueFactory = _ => 5000 };
        var parallelism = new Option<int>("--parallelism") { Description = "Samples preprocessed at once", DefaultValueFactory = _ => 1 };
        var command = new Command("kafka", "Records/s from Kafka through preprocessing (no training)") { records, parallelism };
        command.SetAction(async (parse, cancel) =>
        {
            var output = parse.InvocationConfiguration.Output;
            int n = parse.GetValue(records), p = parse.GetValue(parallelism);
            using var cluster = new KafkaMockCluster();
            cluster.CreateTopic("bench", 4);
            var ingest = MamoRoot.Create().Parse(["ingest", "--dataset", "emoji", "--limit", $"{n}", "--to", $"kafka://{cluster.BootstrapServers}/bench"])
                .Invoke(new InvocationConfiguration { Output = TextWriter.Null, Error = parse.InvocationConfiguration.Error });
            if (ingest != 0) return ingest;
            var available = Math.Min(n, File.ReadLines(BuiltinDatasets.Ensure(BuiltinDatasets.Emoji).File(BuiltinDatasets.TrainSplit)).Count());

            var config = MamoConfig.Preset("tiny");
            var preparer = new SamplePreparer(new ImageTransform(new ImageTransformOptions(ImageSize: config.ImageSize)),
                new TextTokenizer(BuiltinDatasets.EnsureVocab()), config.MaxTextLength);
            using var system = ActorSystem.Create("bench", "akka.loglevel = WARNING\nakka.stdout-loglevel = WARNING");
            using var source = new KafkaTrainingSource(KafkaSpec.Parse($"kafka://{cluster.BootstrapServers}/bench?group=bench"),
                new Dictionary<string, string>(), new Dictionary<string, string>(), null, SourceLimits.Default);
            var clock = Stopwatch.StartNew();
            var prepared = await source.Open(StreamPosition.None)
                .SelectAsync(p, x => Task.Run(() => x.Item is SampleItem { Sample: var s } && preparer.TryPrepareForTraining(s, new Random(1), out _, out _)))
                .Take(available)
                .RunAggregate(0, (count, ok) => ok ? count + 1 : count, system.Materializer());
            var seconds = clock.Elapsed.TotalSeconds;
            output.WriteLine($"{prepared} of {available} records from Kafka through decode, transform and tokenise in {seconds:F2}s: " +
                             $"{prepared / seconds:F0} records/s ({p} at a time, {Environment.ProcessorCount} cores, tiny preset's {config.ImageSize} px)");
            await system.Terminate();
            return 0;
        });
        return command;
    }
}
