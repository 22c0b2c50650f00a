using System.Threading.Channels;
using Akka;
using Akka.Streams;
using Akka.Streams.Dsl;
using Akka.Streams.Stage;
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

    readonly Channel<Assignment> assignments = Channel.CreateUnbounded<Assignment>(new() { SingleReader = true });
    readonly object gate = new();
    /// <summary>What applied rounds trained: the cluster checkpoints' positions, which the coordinator sends before the
    /// next round starts.</summary>
    StreamPosition applied = StreamPosition.None;

    public string Name => source.Name;
    public bool ReadWhole => source.ReadWhole;
    /// <summary>Decided once, when a record takes its place in a round (below): a round trains exactly the records it
    /// was assigned.</summary>
    public bool Take(Positioned record) => true;
    public bool DeadLetter(Positioned record, BadInput bad) => source.DeadLetter(record, bad);
    public void Commit(StreamPosition durable)
    {
        lock (gate) applied = applied.Merge(durable);
        source.Commit(durable);
    }
    public string? PausedBecause => source.PausedBecause;
    public IReadOnlyList<PartitionStatus> Partitions => source.Partitions;

    /// <summary>The records of the rounds assigned to the pipeline's link.</summary>
    public Source<Positioned, NotUsed> Open(StreamPosition resume)
    {
        if (source.ReadWhole)
            return ChannelSource.FromReader(assignments.Reader).ConcatMany(a => source.Open(TrainingSamples.BeforeCursor(a.Cursor)).Take(a.Records)
                .ZipWithIndex().Select(x => x.Item1 with { Round = a.Round, EndsRound = x.Item2 == a.Records - 1 }));
        lock (gate) applied = applied.Merge(resume);
        return source.Open(resume).Via(new Placing(assignments.Reader, Takes));
    }

    /// <summary>Whether a stream's record, about to take a place in a round, is this replica's to train: its partition
    /// is still the node's, and no applied round trained it. A partition the group moved here starts at the committed
    /// offset, which may lag what its last owner's applied rounds reached (their checkpoint was not durable yet, or its
    /// offsets not committed): those records are skipped, not trained twice. What the last owner trained in a round not
    /// applied (it died) is trained here.</summary>
    bool Takes(Positioned record)
    {
        if (!source.Take(record)) return false;   // its new owner trains it
        lock (gate) return !(applied[record.At.Source] >= record.At.Offset);
    }

    /// <summary>Adds a round's share to the stream.</summary>
    public void Assign(Assignment assignment) => assignments.Writer.TryWrite(assignment);

    /// <summary>No more rounds: the stream ends after the last one assigned.</summary>
    public void Complete() => assignments.Writer.TryComplete();

    /// <summary>The node's source belongs to the run's inputs, which dispose it.</summary>
    public void Dispose() { }

    /// <summary>Gives each record of a stream its place in the assigned rounds. A record is pulled only once a place
    /// waits for it, so that whether it is taken is decided then, with the positions of the rounds applied so far
    /// (a Zip would hold one record, judged before its round was given).</summary>
    sealed class Placing(ChannelReader<Assignment> rounds, Func<Positioned, bool> takes) : GraphStage<FlowShape<Positioned, Positioned>>
    {
        readonly ChannelReader<Assignment> rounds = rounds;
        readonly Func<Positioned, bool> takes = takes;
        readonly Inlet<Positioned> records = new("records");
        readonly Outlet<Positioned> placed = new("placed");
        FlowShape<Positioned, Positioned>? shape;

        public override FlowShape<Positioned, Positioned> Shape => shape ??= new(records, placed);

        protected override GraphStageLogic CreateLogic(Attributes inheritedAttributes) => new Logic(this);

        sealed class Logic : GraphStageLogic
        {
            Assignment? round;
            int taken;

            public Logic(Placing stage) : base(stage.Shape)
            {
                var given = GetAsyncCallback<Assignment?>(a =>
                {
                    if (a is null) CompleteStage();   // no more rounds
                    else
                    {
                        (round, taken) = (a, 0);
                        Pull(stage.records);
                    }
                });
                SetHandler(stage.records, onPush: () =>
                {
                    var record = Grab(stage.records);
                    if (!stage.takes(record))
                    {
                        Pull(stage.records);
                        return;
                    }
                    var r = round!;
                    var ends = ++taken == r.Records;
                    if (ends) round = null;
                    Push(stage.placed, record with { Round = r.Round, EndsRound = ends });
                });
                SetHandler(stage.placed, onPull: () =>
                {
                    if (round is not null) Pull(stage.records);
                    else stage.rounds.ReadAsync().AsTask().ContinueWith(t => given(t.IsCompletedSuccessfully ? t.Result : null), TaskScheduler.Default);
                });
            }
        }
    }
}
