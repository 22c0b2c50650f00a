using System.Text.Json.Nodes;
using Akka.Actor;
using Akka.Streams;
using Akka.Streams.Dsl;
using Mamo.Data;
using Mamo.Model;
using Serilog;
using static TorchSharp.torch;
using Mamo.Actors.Sources;
using Mamo.Actors.Run;
using Mamo.Actors.Pipeline;

namespace Mamo.Actors.Cluster;

/// <summary>What a trainer replica reads and records, whichever the sync. A file source is read in the cursor ranges
/// the coordinator assigns; a Kafka source is one stream through the run's consumer group, which splits the partitions
/// between the nodes, read on from where the last batch ended unless the coordinator rewinds it to the last cluster
/// checkpoint (a round it trained was not applied). With --ledger, one line per batch trained on.</summary>
public sealed class ReplicaData(MamoSettings settings, ITrainingSource source, SamplePreparer preparer, IMaterializer materializer, string node,
    string nodeDir) : IDisposable
{
    /// <summary>A collated batch with the identity of each image and the stream position of its records.</summary>
    public sealed record Prepared(Batch Batch, Tensor ImageKeys, StreamPosition Position) : IDisposable
    {
        public void Dispose() { Batch.Dispose(); ImageKeys.Dispose(); }
    }

    static readonly TimeSpan PullTimeout = TimeSpan.FromMinutes(10);
    readonly StreamWriter? ledger = settings.Ledger ? OpenLedger(nodeDir) : null;
    (IKillSwitch Stop, ISinkQueue<Positioned> Queue)? stream;
    /// <summary>The position of the last record read from the stream.</summary>
    StreamPosition next = StreamPosition.None;

    /// <summary>Whether the coordinator assigns cursor ranges (a file source) or the consumer group assigns partitions.</summary>
    public bool Ranges => source is TrainingSamples;

    static StreamWriter OpenLedger(string dir)
    {
        Directory.CreateDirectory(dir);
        return new StreamWriter(new FileStream(Path.Combine(dir, Metrics.LedgerFile), FileMode.Append, FileAccess.Write, FileShare.Read)) { AutoFlush = true };
    }

    /// <summary>The position just before cursor <paramref name="cursor"/> of a file source.</summary>
    public static StreamPosition BeforeCursor(long cursor) => StreamPosition.None.Advance(TrainingSamples.CursorPartition, cursor - 1);

    /// <summary><paramref name="steps"/> batches of <paramref name="batchSize"/> records after <paramref name="from"/>
    /// (null: after the last record read). A record that does not decode is a dead letter, and a batch left with fewer
    /// than <paramref name="atLeast"/> pairs is not trained on.</summary>
    public IEnumerable<Prepared> Batches(StreamPosition? from, int steps, int batchSize, int atLeast)
    {
        if (stream is null || from is not null && !Same(from, next))
        {
            stream?.Stop.Shutdown();
            stream = source.Open(from ?? next).ViaMaterialized(KillSwitches.Single<Positioned>(), Keep.Right)
                .ToMaterialized(Sink.Queue<Positioned>(), Keep.Both).Run(materializer);
            next = from ?? next;
        }
        for (int step = 0; step < steps; step++)
        {
            var prepared = new List<PreparedSample>(batchSize);
            var position = StreamPosition.None;
            for (int i = 0; i < batchSize; i++)
            {
                var pulled = stream.Value.Queue.PullAsync();
                if (!pulled.Wait(PullTimeout)) throw new TimeoutException($"no training record within {PullTimeout} from {source.Name}");
                if (pulled.Result is not { HasValue: true, Value: var record }) throw new InvalidOperationException($"{source.Name} ended");
                if (source is KafkaTrainingSource kafka && !kafka.Owns(record.Partition))
                {
                    i--;   // read before a rebalance moved its partition away: the new owner reads it from the committed offset
                    continue;
                }
                position = position.Advance(record.Partition, record.Offset);
                next = next.Advance(record.Partition, record.Offset);
                BadInput? bad = (record.Item as BadItem)?.Bad;
                if (record.Item is SampleItem { Sample: var sample }
                    && preparer.TryPrepareForTraining(sample, TrainingGraph.SampleRandom(settings.Seed, record.Partition, record.Offset), out var p, out bad))
                    prepared.Add(p!);
                else
                {
                    Log.Warning("dead letter: {Reason} at {Location}", bad!.Reason, bad.Location);
                    source.DeadLetter(record, bad);
                }
            }
            if (prepared.Count < atLeast) continue;
            var batch = Collator.Collate(prepared, settings.Model.ImageSize);
            yield return new Prepared(batch, tensor(batch.Ids.Select(Seeds.StableHash).ToArray()), position);
        }
    }

    static bool Same(StreamPosition a, StreamPosition b) => a.Offsets.Count == b.Offsets.Count && a.Offsets.All(kv => b[kv.Key] == kv.Value);

    /// <summary>Everything up to <paramref name="durable"/> is in a cluster checkpoint: the source may acknowledge it.</summary>
    public void Commit(StreamPosition durable) => source.Commit(durable);

    /// <summary>The ledger's line for a batch this node trained on (at least once: a step that is given again is
    /// recorded again).</summary>
    public void Record(long step, long round, StreamPosition position, double loss, bool skipped, IEnumerable<string> ids) =>
        ledger?.WriteLine(new JsonObject
        {
            ["step"] = step, ["round"] = round, ["node"] = node,
            ["position"] = new JsonObject(position.Offsets.Select(kv => KeyValuePair.Create(kv.Key, (JsonNode?)kv.Value))),
            ["loss"] = double.IsFinite(loss) ? loss : null, ["skipped"] = skipped,
            ["ids"] = new JsonArray(ids.Select(i => (JsonNode)JsonValue.Create(i)!).ToArray()),
        }.ToJsonString());

    public void Dispose()
    {
        stream?.Stop.Shutdown();
        ledger?.Dispose();
    }
}
