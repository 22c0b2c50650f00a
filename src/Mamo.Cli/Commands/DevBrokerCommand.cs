using System.CommandLine;
using System.Runtime.InteropServices;
using Mamo.Data.Kafka;

namespace Mamo.Cli.Commands;

/// <summary>`mamo dev-broker [--port-file F] [--topics a,b] [--partitions N] [--session-timeout S]`: librdkafka's in-memory mock cluster
/// on 127.0.0.1, for development and demos. Not durable, not for production: use docker-compose.yml for that.</summary>
public static class DevBrokerCommand
{
    public static Command Create()
    {
        var portFile = new Option<string?>("--port-file") { Description = "Write the bootstrap address (127.0.0.1:PORT) to this file once the broker is up" };
        var topics = new Option<string>("--topics")
        {
            Description = "Topics to create, comma-separated",
            DefaultValueFactory = _ => "mamo.pairs,mamo.pairs.dlq,mamo.embeddings,mamo.embeddings.versions",
        };
        var partitions = new Option<int>("--partitions") { Description = "Partitions per topic", DefaultValueFactory = _ => 4 };
        partitions.Validators.Add(r => { if (r.GetValueOrDefault<int>() < 1) r.AddError("--partitions must be 1 or more"); });
        var sessionTimeout = new Option<int>("--session-timeout")
        {
            Description = "Seconds before the group gives a silent member's partitions to the others (0: the mock's default)",
            DefaultValueFactory = _ => 0,
        };
        sessionTimeout.Validators.Add(r => { if (r.GetValueOrDefault<int>() < 0) r.AddError("--session-timeout must be 0 or more"); });
        var command = new Command("dev-broker", "DEVELOPMENT ONLY: an in-memory Kafka (librdkafka mock cluster) on 127.0.0.1; not durable")
        {
            portFile, topics, partitions, sessionTimeout,
        };
        command.SetAction(async (parse, _) =>
        {
            using var cluster = new KafkaMockCluster();
            if (parse.GetValue(sessionTimeout) is > 0 and var seconds) cluster.SetConsumerSessionTimeout(TimeSpan.FromSeconds(seconds));
            foreach (var topic in parse.GetValue(topics)!.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries))
                cluster.CreateTopic(topic, parse.GetValue(partitions));
            Console.Error.WriteLine("mamo dev-broker: DEVELOPMENT BROKER (librdkafka mock cluster). Everything lives in this process's memory and is");
            Console.Error.WriteLine("  lost when it stops. Not for production: see docker-compose.yml for a real Kafka.");
            Console.Error.WriteLine($"  topics: {parse.GetValue(topics)} ({parse.GetValue(partitions)} partitions each; others are created on first use)");
            Console.WriteLine(cluster.BootstrapServers);
            if (parse.GetValue(portFile) is { } file)
            {
                var temp = file + ".tmp";
                await File.WriteAllTextAsync(temp, cluster.BootstrapServers + "\n");
                File.Move(temp, file, overwrite: true);   // readers never see half a line
            }
            using var stopped = new CancellationTokenSource();
            using var sigint = PosixSignalRegistration.Create(PosixSignal.SIGINT, c => { c.Cancel = true; stopped.Cancel(); });
            using var sigterm = PosixSignalRegistration.Create(PosixSignal.SIGTERM, c => { c.Cancel = true; stopped.Cancel(); });
            try { await Task.Delay(Timeout.Infinite, stopped.Token); }
            catch (OperationCanceledException) { }
            Console.Error.WriteLine("mamo dev-broker: stopped; its topics are gone");
            return 0;
        });
        return command;
    }
}
