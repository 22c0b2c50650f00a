using System.Collections.Concurrent;
using Akka;
using Akka.Streams;
using Akka.Streams.Dsl;
using Confluent.Kafka;
using Mamo.Data;
using Mamo.Data.Kafka;
using Serilog;

namespace Mamo.Actors.Sources;

/// <summary>
/// Training records from Kafka topics (docs/KAFKA.md). One consumer lives as long as the run, on a thread of its own
/// (Confluent's consumer is used from one thread only). Offsets are never auto-committed: they are committed when the
/// checkpoint that includes their effect is durable, only for partitions this consumer still owns, and never below
/// the group's committed offset. A partition starts (a new stream, a pipeline restart, or a partition assigned again
/// after a rebalance) at the newer of this source's last durable position for it and the group's committed offset:
/// another member may have trained further while it was away. Records that cannot be used go to the dead-letter
/// topic with `error` and `source-offset` headers; the producer is flushed before the offsets behind them are committed.
/// A stream is offered each record once: one the consumer delivers again (a seek racing a fetch) is skipped, since the
/// stream already trains on it. A partition taken away and given back is read again after the last record the
/// pipeline took (Take): the stream dropped its records while it was away. Records the broker deleted before this
/// group read them (the group fell behind the topic's retention) are reported, per range and as a count per
/// partition, since nothing can train them any more.
/// </summary>
public sealed class KafkaTrainingSource : ITrainingSource
{
    /// <summary>Records that may wait between the consumer and the preprocess stage.</summary>
    const int QueueSize = 64;
    static readonly TimeSpan PollTimeout = TimeSpan.FromMilliseconds(200), FlushTimeout = TimeSpan.FromSeconds(30);

    readonly KafkaSpec spec;
    readonly IConsumer<byte[]?, byte[]?> consumer;
    static readonly TimeSpan CommittedTimeout = TimeSpan.FromSeconds(10);
    StreamPosition durable = StreamPosition.None;   // the consumer thread's: the checkpoints' positions, merged
    readonly IProducer<byte[]?, byte[]?> deadLetters;
    readonly string? deadLetterTopic;
    readonly SourceLimits limits;
    readonly CancellationTokenSource closing = new();
    readonly ConcurrentQueue<StreamPosition> commits = new();
    readonly ConcurrentDictionary<(string, long), Message<byte[]?, byte[]?>> unusable = new();
    readonly Thread thread;
    readonly object gate = new();
    (ISourceQueueWithComplete<Positioned> Queue, StreamPosition Resume)? attach;
    readonly ConcurrentDictionary<string, bool> assigned = new();
    /// <summary>Set by a rebalance (on the consumer thread, inside a poll): the loop settles the new partitions' pause state.</summary>
    bool reassigned;
    /// <summary>The consumer thread's: per partition, the offset after the last record offered to the current stream.</summary>
    readonly Dictionary<string, long> offeredUpTo = [];
    /// <summary>On the consumer thread: how often each partition was taken away, so an offer knows whether its
    /// partition went away while it waited.</summary>
    readonly Dictionary<string, long> timesAway = [];
    /// <summary>Why the consumer thread stopped; null while it runs. Under the gate.</summary>
    Exception? stopped;
    /// <summary>The consumer thread's: per partition, the first offset delivered in this process, where a partition
    /// with neither a durable nor a committed position starts again.</summary>
    readonly Dictionary<string, long> firstDelivered = [];
    /// <summary>The consumer thread's: per partition, the offset the next record should have (where it was started or
    /// the one after the last delivered); a record past it shows a gap, which retention may have made.</summary>
    readonly Dictionary<string, long> nextExpected = [];
    /// <summary>Per partition, records that retention deleted before this consumer read them, since it started.</summary>
    readonly ConcurrentDictionary<string, long> expired = new();

    /// <summary>The partitions this consumer owns now ("TOPIC/N").</summary>
    public IReadOnlyCollection<string> Assigned => assigned.Keys.Order().ToList();

    /// <summary>Refreshed on the consumer thread: where it stands in each partition it owns.</summary>
    volatile IReadOnlyList<PartitionStatus> partitions = [];
    readonly Dictionary<TopicPartition, long> committedByUs = [];
    DateTime statusAt;
    static readonly TimeSpan StatusEvery = TimeSpan.FromSeconds(1);

    public IReadOnlyList<PartitionStatus> Partitions => partitions;

    public string? PausedBecause => Volatile.Read(ref brokerDown) == 1 ? "Kafka broker unavailable" : null;

    /// <summary>Records are taken in the order they were offered (the pipeline keeps each partition's order). One whose
    /// partition was taken away since it was offered is not taken: its new owner reads it again from the committed
    /// offset; should the partition come back here, it is read again after the last record taken, and every record
    /// offered before it came back is dropped (it may already be on its way again). So a partition given back loses
    /// nothing and trains nothing twice.</summary>
    public bool Take(Positioned record)
    {
        var partition = record.At.Source;
        lock (taking)
        {
            inFlight[partition] = inFlight.GetValueOrDefault(partition) - 1;
            if (discard.GetValueOrDefault(partition) is > 0 and var n)
            {
                discard[partition] = n - 1;
                return false;
            }
            if (!assigned.ContainsKey(partition)) return false;
            takenUpTo[partition] = record.At.Offset + 1;
            return true;
        }
    }

    /// <summary>Per partition, under it: records offered to the stream and not yet taken or dropped; those to drop
    /// (offered before the partition came back); the offset after the last record taken.</summary>
    readonly object taking = new();
    readonly Dictionary<string, long> inFlight = [], discard = [], takenUpTo = [];

    public bool ReadWhole => false;

    public string Name => spec.ToString();

    /// <param name="consumerSettings">librdkafka consumer properties (SASL, TLS, ...) passed as they are; they win over the defaults.</param>
    /// <param name="deadLetterTopic">null: each record's topic + ".dlq"</param>
    public KafkaTrainingSource(KafkaSpec spec, IReadOnlyDictionary<string, string> consumerSettings, IReadOnlyDictionary<string, string> producerSettings,
        string? deadLetterTopic, SourceLimits limits)
    {
        this.spec = spec;
        this.deadLetterTopic = deadLetterTopic;
        this.limits = limits;
        // Both clients are built here: a librdkafka property they refuse is then an error at start-up, not a crash of
        // the consumer thread.
        consumer = KafkaProperties.Build(() => new ConsumerBuilder<byte[]?, byte[]?>(new ConsumerConfig(KafkaProperties.Merge(new Dictionary<string, string>
        {
            ["bootstrap.servers"] = spec.BootstrapServers,
            ["group.id"] = spec.Group ?? "mamo",
            ["enable.auto.commit"] = "false",
            // KIP-848's protocol (Kafka >= 4.0): a member that joins or leaves moves partitions within seconds; under
            // the classic protocol they sat idle for about 40 s here (docs/KAFKA.md). Brokers before 4.0: set classic.
            ["group.protocol"] = "consumer",
            ["auto.offset.reset"] = "earliest",
            ["fetch.max.bytes"] = "16777216",
            ["queued.max.messages.kbytes"] = "16384",   // librdkafka's prefetch; the stream's backpressure bounds the rest
            ["topic.metadata.refresh.interval.ms"] = "10000",   // a topic created after we subscribed is found within seconds
        }, consumerSettings)))
            .SetErrorHandler((_, e) => OnError(e))
            .SetLogHandler((_, m) => LogKafka(m))
            .SetPartitionsAssignedHandler((c, partitions) => OnAssigned(c, partitions))
            .SetPartitionsRevokedHandler((c, partitions) =>
            {
                Unassigned(partitions.Select(p => p.TopicPartition));
                Log.Information("Kafka partitions revoked: {Partitions}; their next owner reads them from the committed offsets",
                    string.Join(", ", partitions.Select(p => p.TopicPartition)));
            })
            .SetPartitionsLostHandler((c, partitions) =>
            {
                Unassigned(partitions.Select(p => p.TopicPartition));
                Log.Warning("Kafka partitions lost: {Partitions}; their next owner starts at the committed offsets", string.Join(", ", partitions.Select(p => p.TopicPartition)));
            })
            .Build());
        try
        {
            deadLetters = KafkaProperties.Build(() => new ProducerBuilder<byte[]?, byte[]?>(new ProducerConfig(KafkaProperties.Merge(new Dictionary<string, string>
                {
                    ["bootstrap.servers"] = spec.BootstrapServers, ["acks"] = "all", ["enable.idempotence"] = "true",
                }, producerSettings)))
                .SetLogHandler((_, m) => LogKafka(m)).Build());
        }
        catch
        {
            consumer.Dispose();
            throw;
        }
        thread = new Thread(Loop) { IsBackground = true, Name = "kafka-source" };
        thread.Start();
    }

    /// <remarks>Once the consumer thread has stopped (an error it could not get past), every stream fails at once with
    /// that error: the run's restarts, then the node's supervisor, start a new consumer, where a stream that waits on a
    /// dead one would stall the run.</remarks>
    public Source<Positioned, NotUsed> Open(StreamPosition resume) =>
        Source.Queue<Positioned>(QueueSize, OverflowStrategy.Backpressure)
            .MapMaterializedValue(queue =>
            {
                lock (gate)
                {
                    if (stopped is { } e) queue.Fail(new InvalidOperationException("the Kafka consumer stopped: " + e.Message, e));
                    else attach = (queue, resume);
                }
                return NotUsed.Instance;
            });

    public bool DeadLetter(Positioned record, BadInput bad)
    {
        var (partition, offset) = (record.At.Source, record.At.Offset);
        var message = unusable.TryRemove((partition, offset), out var raw) ? raw
            : record.Item is SampleItem { Sample: var s } ? KafkaRecords.ToMessage(s) : null;
        if (message is null) return true;
        var topic = partition[..partition.LastIndexOf('/')];
        var dlq = KafkaRecords.DeadLetter(message.Key, message.Value, message.Headers, bad.Reason, $"{partition}@{offset}");
        deadLetters.Produce(deadLetterTopic ?? topic + ".dlq", dlq, report =>
        {
            if (report.Error.IsError) Log.Error("dead letter for {Partition}@{Offset} not written: {Error}", partition, offset, report.Error.Reason);
        });
        return true;
    }

    public void Commit(StreamPosition durable) => commits.Enqueue(durable);

    void Loop()
    {
        ISourceQueueWithComplete<Positioned>? queue = null;
        string? lastConsumeError = null;
        consumer.Subscribe(spec.Topics);
        try
        {
            while (!closing.IsCancellationRequested)
            {
                CommitDurable(consumer);
                RefreshStatus(consumer);
                lock (gate)
                {
                    if (attach is { } next)
                    {
                        attach = null;
                        queue = next.Queue;
                        offeredUpTo.Clear();
                        lock (taking)
                        {
                            inFlight.Clear();
                            discard.Clear();
                            takenUpTo.Clear();
                        }
                        durable = durable.Merge(next.Resume);
                        // Only to real offsets: a logical one (Unset, Beginning) resets the partition asynchronously,
                        // and a record fetched meanwhile was seen delivered twice.
                        foreach (var start in StartOffsets(consumer, consumer.Assignment))
                        {
                            var at = start.Offset.Value >= 0 ? start.Offset.Value
                                : firstDelivered.GetValueOrDefault(KafkaRecords.PartitionKey(start.Topic, start.Partition.Value), -1);
                            if (at < 0) continue;
                            Rewind(consumer, new TopicPartitionOffset(start.TopicPartition, new Offset(at)));
                            nextExpected[KafkaRecords.PartitionKey(start.Topic, start.Partition.Value)] = at;
                        }
                        consumer.Resume(consumer.Assignment);
                    }
                }
                if (queue is not null && queue.WatchCompletionAsync().IsCompleted)
                {
                    queue = null;   // the stream ended (stop, restart): hold still until the next one opens
                    consumer.Pause(consumer.Assignment);
                }
                if (reassigned)
                {
                    // A rebalance gave this member partitions: they follow the stream's state, paused without one.
                    reassigned = false;
                    if (queue is null) consumer.Pause(consumer.Assignment);
                    else consumer.Resume(consumer.Assignment);
                }
                ConsumeResult<byte[]?, byte[]?>? record;
                try { record = consumer.Consume(PollTimeout); }
                catch (ConsumeException e)
                {
                    if (!PausedBy(e.Error) && e.Error.Reason != lastConsumeError) Log.Warning("Kafka consume error: {Reason}", e.Error.Reason);
                    lastConsumeError = e.Error.Reason;
                    continue;
                }
                if (record is null || record.IsPartitionEOF) continue;
                BrokerBack();
                lastConsumeError = null;
                var partition = KafkaRecords.PartitionKey(record.Topic, record.Partition.Value);
                firstDelivered.TryAdd(partition, record.Offset.Value);
                CheckGap(consumer, record.TopicPartition, partition, record.Offset.Value);
                if (queue is null)
                {
                    // Delivered while no stream runs (a partition assigned meanwhile): put it back for the next one.
                    Rewind(consumer, record.TopicPartitionOffset);
                    consumer.Pause([record.TopicPartition]);
                    continue;
                }
                if (record.Offset.Value < offeredUpTo.GetValueOrDefault(partition, long.MinValue))
                {
                    Log.Debug("Kafka delivered {Partition}@{Offset} again; the stream already has it", partition, record.Offset.Value);
                    continue;
                }
                var item = KafkaRecords.Read(record.Topic, record.Partition.Value, record.Offset.Value, record.Message.Key, record.Message.Value, record.Message.Headers, limits);
                if (item is BadItem) unusable[(partition, record.Offset.Value)] = record.Message;
                var away = timesAway.GetValueOrDefault(partition);
                if (!Offer(consumer, queue, new Positioned(new SourcePosition(partition, record.Offset.Value), item)))
                {
                    unusable.TryRemove((partition, record.Offset.Value), out _);
                    Rewind(consumer, record.TopicPartitionOffset);   // not taken: the next stream starts with it
                }
                else
                {
                    // A partition that went away while the offer waited (a rebalance runs inside the wait's polls): the
                    // record is on its way but does not count as offered, or the partition's next owner, this member
                    // again, would skip reading it. Where the partition is back already, it is one of those to drop.
                    var stayed = timesAway.GetValueOrDefault(partition) == away;
                    if (stayed) offeredUpTo[partition] = record.Offset.Value + 1;
                    lock (taking)
                    {
                        inFlight[partition] = inFlight.GetValueOrDefault(partition) + 1;
                        if (!stayed && assigned.ContainsKey(partition)) discard[partition] = discard.GetValueOrDefault(partition) + 1;
                    }
                }
            }
            CommitDurable(consumer);
        }
        catch (Exception e)
        {
            Log.Error(e, "the Kafka consumer stopped");
            lock (gate)
            {
                stopped = e;
                (attach?.Queue ?? queue)?.Fail(e);
            }
        }
        finally
        {
            try { consumer.Close(); } catch (KafkaException e) { Log.Warning("Kafka consumer close: {Reason}", e.Error.Reason); }
        }
    }

    /// <summary>Seeks a partition back to a record the stream did not take. One revoked meanwhile (librdkafka: "Erroneous
    /// state") is no longer this member's to rewind: its next owner, this one included, reads it from the committed offset.</summary>
    static void Rewind(IConsumer<byte[]?, byte[]?> consumer, TopicPartitionOffset to)
    {
        try { consumer.Seek(to); }
        catch (KafkaException e) { Log.Debug("Kafka: {Partition} not rewound to {Offset}: {Reason}", to.TopicPartition, to.Offset, e.Error.Reason); }
    }

    /// <summary>Partitions taken away (on the consumer thread, within Consume). Their records still in the stream are
    /// no longer this member's (Take); should a partition come back to this member, it reads it again after the last
    /// record taken, and none of it counts as already offered, or a record dropped while it was away would be lost.</summary>
    void Unassigned(IEnumerable<TopicPartition> partitions)
    {
        foreach (var p in partitions)
        {
            var key = KafkaRecords.PartitionKey(p.Topic, p.Partition.Value);
            assigned.TryRemove(key, out _);
            offeredUpTo.Remove(key);
            timesAway[key] = timesAway.GetValueOrDefault(key) + 1;
        }
    }

    IEnumerable<TopicPartitionOffset> OnAssigned(IConsumer<byte[]?, byte[]?> c, List<TopicPartition> partitions)
    {
        lock (taking)
            foreach (var p in partitions)
            {
                var key = KafkaRecords.PartitionKey(p.Topic, p.Partition.Value);
                assigned[key] = true;
                // Offered before it came back: on the way still, and read again after the last record taken.
                discard[key] = Math.Max(0, inFlight.GetValueOrDefault(key));
            }
        reassigned = true;
        lock (gate) if (attach is { } next) durable = durable.Merge(next.Resume);
        var starts = StartOffsets(c, partitions);
        foreach (var start in starts)
        {
            var key = KafkaRecords.PartitionKey(start.Topic, start.Partition.Value);
            if (start.Offset.Value >= 0) nextExpected[key] = start.Offset.Value;
            else nextExpected.Remove(key);   // where auto.offset.reset puts it: no gap to see before its first record
        }
        Log.Information("Kafka partitions assigned: {Partitions}", string.Join(", ", starts));
        return starts;
    }

    /// <summary>A record past the expected offset: compaction and transaction markers leave such gaps too, so only the
    /// part below the partition's first offset still held (its low watermark) was deleted by retention.</summary>
    void CheckGap(IConsumer<byte[]?, byte[]?> c, TopicPartition tp, string partition, long offset)
    {
        var expected = nextExpected.GetValueOrDefault(partition, offset);
        nextExpected[partition] = Math.Max(expected, offset + 1);
        if (offset <= expected) return;
        long low;
        try { low = c.QueryWatermarkOffsets(tp, CommittedTimeout).Low.Value; }
        catch (KafkaException e)
        {
            Log.Warning("Kafka {Partition}: offsets {From}..{To} were not delivered, and the broker did not say why ({Reason})",
                partition, expected, offset - 1, e.Error.Reason);
            return;
        }
        var deletedTo = Math.Min(low, offset);
        if (deletedTo <= expected) return;
        expired.AddOrUpdate(partition, deletedTo - expected, (_, n) => n + deletedTo - expected);
        Log.Warning("Kafka {Partition}: records {From}..{To} ({Count}) were deleted by the broker's retention before this " +
            "group read them; the group fell behind the topic (raise retention, or add replicas)", partition, expected, deletedTo - 1, deletedTo - expected);
    }

    /// <summary>Where each partition starts: after this source's last durable position for it, at the group's committed
    /// offset, or after the last record this stream's pipeline took (a partition given back), whichever is newest; with
    /// none, where auto.offset.reset says. What an earlier stream had
    /// read but not trained on is read again.</summary>
    List<TopicPartitionOffset> StartOffsets(IConsumer<byte[]?, byte[]?> c, IReadOnlyCollection<TopicPartition> partitions)
    {
        if (partitions.Count == 0) return [];
        Dictionary<TopicPartition, Offset> committed;
        try { committed = c.Committed(partitions, CommittedTimeout).ToDictionary(x => x.TopicPartition, x => x.Offset); }
        catch (KafkaException e)
        {
            Log.Warning("Kafka committed offsets unknown ({Reason}): partitions start after this source's checkpoint", e.Error.Reason);
            committed = [];
        }
        return partitions.Select(tp =>
        {
            var key = KafkaRecords.PartitionKey(tp.Topic, tp.Partition.Value);
            long? afterTaken;
            lock (taking) afterTaken = takenUpTo.TryGetValue(key, out var t) ? t : null;
            long? group = committed.TryGetValue(tp, out var o) && o != Offset.Unset ? o.Value : null;
            var start = new[] { durable[key] + 1, group, afterTaken }.Max();
            return new TopicPartitionOffset(tp, start is { } x ? new Offset(x) : Offset.Unset);
        }).ToList();
    }

    /// <summary>Waits while the stream backpressures. An offer made as the stream stops may never be answered, so the
    /// wait also ends when the stream has ended or the source closes: the record then counts as not taken.</summary>
    bool Offer(IConsumer<byte[]?, byte[]?> consumer, ISourceQueueWithComplete<Positioned> queue, Positioned item)
    {
        var waited = false;
        try
        {
            var offer = queue.OfferAsync(item);
            var ended = queue.WatchCompletionAsync();
            while (!offer.Wait(PollTimeout))
            {
                if (ended.IsCompleted || closing.IsCancellationRequested) return false;
                // The stream is full (the trainer is busy, or a cluster replica waits for its round): keep polling with
                // every partition paused, so that group rebalances and commits go on. Without it the group waits for
                // this member for its session timeout (about 40 s) before it may move any partition.
                waited = true;
                consumer.Pause(consumer.Assignment);
                try
                {
                    if (consumer.Consume(TimeSpan.Zero) is { IsPartitionEOF: false } early)
                        Rewind(consumer, early.TopicPartitionOffset);   // fetched before the pause: read again after it
                }
                catch (ConsumeException e)
                {
                    if (!PausedBy(e.Error)) Log.Debug("Kafka consume error while the stream is full: {Reason}", e.Error.Reason);
                }
                CommitDurable(consumer);
                RefreshStatus(consumer);
            }
            return offer.Result is QueueOfferResult.Enqueued;
        }
        catch (AggregateException) { return false; }   // the stream failed or detached
        catch (Exception e) when (e is StreamDetachedException or InvalidOperationException) { return false; }
        finally
        {
            if (waited) consumer.Resume(consumer.Assignment);
        }
    }

    void CommitDurable(IConsumer<byte[]?, byte[]?> consumer)
    {
        StreamPosition? latest = null;
        while (commits.TryDequeue(out var p)) latest = latest is null ? p : latest.Merge(p);
        if (latest is null) return;
        durable = durable.Merge(latest);
        var owned = consumer.Assignment.ToHashSet();
        var offsets = latest.Offsets
            .Select(kv => (Key: kv.Key, Slash: kv.Key.LastIndexOf('/'), Last: kv.Value))
            .Where(x => x.Slash > 0 && int.TryParse(x.Key[(x.Slash + 1)..], out _))
            .Select(x => new TopicPartitionOffset(x.Key[..x.Slash], new Partition(int.Parse(x.Key[(x.Slash + 1)..])), new Offset(x.Last + 1)))
            .Where(o => owned.Contains(o.TopicPartition))
            .ToList();
        if (offsets.Count == 0) return;
        try
        {
            // Never backwards: another member may have committed further while this one had the partition away.
            var group = consumer.Committed(offsets.Select(o => o.TopicPartition), CommittedTimeout).ToDictionary(x => x.TopicPartition, x => x.Offset);
            offsets = offsets.Where(o => !group.TryGetValue(o.TopicPartition, out var g) || g == Offset.Unset || o.Offset.Value > g.Value).ToList();
            if (offsets.Count == 0) return;
            deadLetters.Flush(FlushTimeout);   // dead letters before the offsets that skip them
            consumer.Commit(offsets);
            foreach (var o in offsets) committedByUs[o.TopicPartition] = o.Offset.Value;
            Log.Debug("committed Kafka offsets {Offsets}", string.Join(", ", offsets));
        }
        catch (KafkaException e)
        {
            Log.Warning("Kafka offsets not committed ({Reason}); the checkpoint holds them, and the next checkpoint commits again", e.Error.Reason);
        }
    }

    /// <summary>Position and end offsets as the client last saw them (no broker round trip): the lag the dashboard shows.</summary>
    void RefreshStatus(IConsumer<byte[]?, byte[]?> consumer)
    {
        if (DateTime.UtcNow - statusAt < StatusEvery) return;
        statusAt = DateTime.UtcNow;
        var list = new List<PartitionStatus>();
        foreach (var tp in consumer.Assignment.OrderBy(tp => tp.Topic).ThenBy(tp => tp.Partition.Value))
        {
            long? position = null, end = null;
            try
            {
                var p = consumer.Position(tp);
                if (p != Offset.Unset) position = p.Value;
                var w = consumer.GetWatermarkOffsets(tp);
                if (w.High != Offset.Unset) end = w.High.Value;
            }
            catch (KafkaException) { }
            long? lag = position is { } a && end is { } b ? Math.Max(0, b - a) : null;
            var key = KafkaRecords.PartitionKey(tp.Topic, tp.Partition.Value);
            list.Add(new PartitionStatus(key, position, end, lag, committedByUs.TryGetValue(tp, out var c) ? c : null,
                expired.GetValueOrDefault(key)));
        }
        partitions = list;
    }

    int brokerDown;

    /// <summary>A broker that cannot be reached pauses the run (the dashboard's state), whichever way librdkafka tells
    /// it: to the error callback, or with a consume. False for any other error.</summary>
    bool PausedBy(Error e)
    {
        if (e.Code is not (ErrorCode.Local_AllBrokersDown or ErrorCode.Local_Transport or ErrorCode.Local_Resolve or ErrorCode.BrokerNotAvailable)) return false;
        if (Interlocked.Exchange(ref brokerDown, 1) == 0)
            Log.Warning("Kafka broker unavailable ({Reason}): training pauses until it returns; nothing is lost", e.Reason);
        return true;
    }

    void OnError(Error e)
    {
        if (!PausedBy(e)) Log.Warning("Kafka: {Reason} ({Code})", e.Reason, e.Code);
    }

    void BrokerBack()
    {
        if (Interlocked.Exchange(ref brokerDown, 0) == 1) Log.Warning("Kafka broker reachable again: training resumes");
    }

    static void LogKafka(LogMessage m)
    {
        if (m.Level <= SyslogLevel.Warning) Log.Debug("librdkafka {Facility}: {Message}", m.Facility, m.Message);
    }

    public void Dispose()
    {
        closing.Cancel();
        thread.Join();
        consumer.Dispose();
        deadLetters.Flush(FlushTimeout);
        deadLetters.Dispose();
        closing.Dispose();
    }
}
