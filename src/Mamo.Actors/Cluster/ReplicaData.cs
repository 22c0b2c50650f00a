using System.Text.Json.Nodes;
using Mamo.Data;
using Mamo.Model;
using Serilog;
using static TorchSharp.torch;

namespace Mamo.Actors.Cluster;

/// <summary>What a trainer replica reads and records, whichever the sync: the batches of a cursor range of the file
/// source (the coordinator assigns the ranges) and, with --ledger, one line per batch it trained on.</summary>
public sealed class ReplicaData(MamoSettings settings, TrainingSamples samples, SamplePreparer preparer, string node, string nodeDir) : IDisposable
{
    /// <summary>A collated batch with the identity of each image and the cursor of its last sample.</summary>
    public sealed record Prepared(Batch Batch, Tensor ImageKeys, long LastCursor) : IDisposable
    {
        public void Dispose() { Batch.Dispose(); ImageKeys.Dispose(); }
    }

    readonly StreamWriter? ledger = settings.Ledger ? OpenLedger(nodeDir) : null;

    static StreamWriter OpenLedger(string dir)
    {
        Directory.CreateDirectory(dir);
        return new StreamWriter(new FileStream(Path.Combine(dir, Metrics.LedgerFile), FileMode.Append, FileAccess.Write, FileShare.Read)) { AutoFlush = true };
    }

    /// <summary>The batches of cursors [cursor, cursor + steps · batchSize); a sample that does not decode is a dead
    /// letter in the log, and a batch left with fewer than <paramref name="atLeast"/> pairs is not trained on.</summary>
    public IEnumerable<Prepared> Batches(long cursor, int steps, int batchSize, int atLeast)
    {
        foreach (var group in samples.From(cursor).Take(steps * batchSize).Chunk(batchSize))
        {
            var prepared = new List<PreparedSample>(group.Length);
            foreach (var (c, sample) in group)
            {
                if (preparer.TryPrepareForTraining(sample, TrainingGraph.SampleRandom(settings.Seed, TrainingSamples.CursorPartition, c), out var p, out var bad))
                    prepared.Add(p!);
                else Log.Warning("dead letter: {Reason} at {Location}", bad!.Reason, bad.Location);
            }
            if (prepared.Count < atLeast) continue;
            var batch = Collator.Collate(prepared, settings.Model.ImageSize);
            yield return new Prepared(batch, tensor(batch.Ids.Select(Seeds.StableHash).ToArray()), group[^1].Cursor);
        }
    }

    /// <summary>The ledger's line for a batch this node trained on (at least once: a step that is given again is
    /// recorded again).</summary>
    public void Record(long step, long round, long lastCursor, double loss, bool skipped, IEnumerable<string> ids) =>
        ledger?.WriteLine(new JsonObject
        {
            ["step"] = step, ["round"] = round, ["node"] = node,
            ["position"] = new JsonObject { [TrainingSamples.CursorPartition] = lastCursor },
            ["loss"] = double.IsFinite(loss) ? loss : null, ["skipped"] = skipped,
            ["ids"] = new JsonArray(ids.Select(i => (JsonNode)JsonValue.Create(i)!).ToArray()),
        }.ToJsonString());

    public void Dispose() => ledger?.Dispose();
}
