using Akka;
using Akka.Streams;
using Akka.Streams.Dsl;
using Mamo.Actors.Sources;
using Mamo.Data;

namespace Mamo.Actors.Cluster;

/// <summary>A replica's source: the node's own, read as its coordinator assigns it. An assignment is a round's share
/// of the data: a cursor range of a file source (every node holds it whole), or the next records of the node's
/// partitions of a Kafka stream (the consumer group splits those between the nodes). Its records carry their round,
/// and the last one ends it. Nothing is read before it is assigned, beyond what the node's source buffers. One per
/// pipeline: a pipeline that starts again gets a new one, so nothing assigned to the one before reaches it.</summary>
public sealed class AssignedSource(ITrainingSource source) : ITrainingSource
{
    /// <summary>A round's share: records [Cursor, Cursor + Records) of a source read whole, or the next Records of a stream.</summary>
    public sealed record Assignment(Round Round, long Cursor, int Records);

    /// <summary>Rounds assigned ahead of the trainer: a few at most (the coordinator gives one at a time).</summary>
    const int AssignmentsAhead = 16;
    readonly object gate = new();
    ISourceQueueWithComplete<Assignment>? queue;
    readonly List<Assignment> early = [];
    bool completed;

    public string Name => source.Name;
    public bool ReadWhole => source.ReadWhole;
    /// <summary>Decided once, when a record takes its place in a round (below): a round trains exactly the records
    /// it was assigned. One whose partition moves away after that is trained here and may be again by its new owner,
    /// which reads from the committed offset: twice, never lost, and no round comes up short.</summary>
    public bool Owns(Positioned record) => true;
    public bool DeadLetter(Positioned record, BadInput bad) => source.DeadLetter(record, bad);
    public void Commit(StreamPosition durable) => source.Commit(durable);
    public string? PausedBecause => source.PausedBecause;
    public IReadOnlyList<PartitionStatus> Partitions => source.Partitions;

    /// <summary>The records of the rounds assigned to the pipeline's link.</summary>
    public Source<Positioned, NotUsed> Open(StreamPosition resume)
    {
        var assignments = Source.Queue<Assignment>(AssignmentsAhead, OverflowStrategy.Backpressure).MapMaterializedValue(q =>
        {
            lock (gate)
            {
                queue = q;
                foreach (var a in early) q.OfferAsync(a);
                early.Clear();
                if (completed) q.Complete();
            }
            return NotUsed.Instance;
        });
        if (source.ReadWhole)
            return assignments.ConcatMany(a => source.Open(TrainingSamples.BeforeCursor(a.Cursor)).Take(a.Records).ZipWithIndex()
                .Select(x => x.Item1 with { Round = a.Round, EndsRound = x.Item2 == a.Records - 1 }));
        // A stream's records, each paired with a place in the assigned rounds: none is read past what was assigned. One
        // of a partition a rebalance moved away (read before the move) takes no place: its new owner trains it.
        var places = assignments.SelectMany(a => Enumerable.Range(0, a.Records).Select(i => (a.Round, Ends: i == a.Records - 1)));
        return source.Open(resume).Where(source.Owns).Zip(places).Select(x => x.Item1 with { Round = x.Item2.Round, EndsRound = x.Item2.Ends });
    }

    /// <summary>Adds a round's share to the stream.</summary>
    public void Assign(Assignment assignment)
    {
        lock (gate)
        {
            if (queue is null) early.Add(assignment);
            else queue.OfferAsync(assignment);
        }
    }

    /// <summary>No more rounds: the stream ends after the last one assigned.</summary>
    public void Complete()
    {
        lock (gate)
        {
            completed = true;
            queue?.Complete();
        }
    }

    /// <summary>The node's source belongs to the run's inputs, which dispose it.</summary>
    public void Dispose() { }
}
