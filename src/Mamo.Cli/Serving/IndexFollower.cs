using System.Text.RegularExpressions;
using Confluent.Kafka;
using Mamo.Data.Kafka;

namespace Mamo.Cli.Serving;

/// <summary>
/// The search service's catalogue: follows a published embeddings topic and its versions topic (docs/KAFKA.md,
/// "Versions") from their beginning, gathers each version's vectors, and searches a version only once it is whole:
/// its "complete" record has come, and the vectors gathered are exactly the ones it counts (number and ids checksum).
/// Until then the version before stays the one searched, so a search never mixes two versions, nor searches part of
/// one. A version abandoned is dropped. The model of a version is made ready (ModelVersions, through
/// <c>prepare</c>) before searches switch to it, so that the query is embedded with the catalogue's version.
/// </summary>
public sealed partial class IndexFollower : IDisposable
{
    /// <summary>When searches move to a new version. <see cref="FirstVector"/> breaks the rule on purpose: it searches a
    /// version from its first vector, part of it, before it is complete; the end-to-end test shows it catches that.</summary>
    public enum SwitchRule { Complete, FirstVector }

    /// <summary>The most versions gathered at once; an older one beyond is dropped (a newer one supersedes it).</summary>
    const int MaxGathering = 4;
    static readonly TimeSpan Poll = TimeSpan.FromMilliseconds(200);

    sealed class Gathering(string version)
    {
        public readonly string Version = version;
        public readonly Dictionary<(string Id, string Modality), float[]> Vectors = new();
        public long? Step = StepOf(version);
        public VersionRecord? Complete;
        public (int Count, VersionRecord? Complete) Checked;   // what the checksum was last computed for
        public SearchIndex? Built;   // whole, waiting for its model
        public bool Waited;   // said once
    }

    readonly KafkaSpec spec;
    readonly string versionsTopic;
    readonly SwitchRule rule;
    readonly Func<string, bool> prepare;
    readonly Action<string> log;
    readonly IConsumer<byte[]?, byte[]?> consumer;
    readonly Dictionary<string, Gathering> gathering = new();
    readonly CancellationTokenSource stopping = new();
    readonly Thread worker;
    SearchIndex? current, previous;
    long skipped;

    /// <summary>The version searched now; null: none is complete yet.</summary>
    public SearchIndex? Current => Volatile.Read(ref current);

    /// <summary>Records of the topics that were not an embedding or a version record (each logged).</summary>
    public long Skipped => Interlocked.Read(ref skipped);

    /// <summary>The topic followed, as kafka://HOST:PORT/TOPIC.</summary>
    public string Name => spec.ToString();

    /// <param name="prepare">makes the version's model ready to embed queries; false: not yet (its checkpoint has not been
    /// seen), asked again shortly</param>
    /// <exception cref="FormatException">not one topic, or a consumer group named (every service reads every partition)</exception>
    /// <exception cref="ArgumentException">a librdkafka property it refuses</exception>
    public IndexFollower(KafkaSpec spec, IReadOnlyDictionary<string, string> consumerSettings, SwitchRule rule, Func<string, bool> prepare,
        Action<string> log)
    {
        if (spec.Topics.Count != 1) throw new FormatException($"'{spec}': an index follows exactly one embeddings topic");
        if (spec.Group is not null) throw new FormatException($"'{spec}': an index reads every partition of the topic itself; ?group= does not apply");
        this.spec = spec;
        versionsTopic = EmbeddingSinks.VersionsTopic(spec.Topics[0]);
        this.rule = rule;
        this.prepare = prepare;
        this.log = log;
        consumer = KafkaProperties.Build(() => new ConsumerBuilder<byte[]?, byte[]?>(new ConsumerConfig(KafkaProperties.Merge(new Dictionary<string, string>
        {
            ["bootstrap.servers"] = spec.BootstrapServers,
            ["group.id"] = $"mamo-serve-{Guid.NewGuid():N}",   // its own: it reads everything, commits nothing
            ["group.protocol"] = "consumer",
            ["enable.auto.commit"] = "false",
            ["auto.offset.reset"] = "earliest",
            ["topic.metadata.refresh.interval.ms"] = "5000",   // topics created after it started are found within seconds
        }, consumerSettings))).SetLogHandler((_, _) => { }).Build());
        consumer.Subscribe([spec.Topics[0], versionsTopic]);
        worker = new Thread(Run) { IsBackground = true, Name = "mamo-serve-index" };
        worker.Start();
    }

    void Run()
    {
        var said = new HashSet<ErrorCode>();
        while (!stopping.IsCancellationRequested)
        {
            ConsumeResult<byte[]?, byte[]?>? record;
            try { record = consumer.Consume(Poll); }
            catch (ConsumeException e) when (!e.Error.IsFatal)
            {
                if (said.Add(e.Error.Code)) log($"index: {Name}: {e.Error.Reason} (retrying)");
                continue;
            }
            catch (ObjectDisposedException) { return; }
            catch (KafkaException e)
            {
                log($"index: {Name}: {e.Error.Reason}; the index stays at {Current?.Version ?? "no version"}");
                return;
            }
            if (record?.Message is { } message)
            {
                try
                {
                    if (record.Topic == versionsTopic) OnVersion(VersionRecord.Parse(message.Value ?? []));
                    else if (EmbeddingSinks.ReadEmbedding(message.Key, message.Value, message.Headers) is { } embedding) OnVector(embedding);
                }
                catch (FormatException e)
                {
                    Interlocked.Increment(ref skipped);
                    log($"index: skipped {record.TopicPartitionOffset}: {e.Message}");
                }
            }
            Switch();
        }
    }

    void OnVersion(VersionRecord r)
    {
        if (Behind(r.Step)) return;
        var g = Gather(r.Version);
        g.Step = r.Step;
        switch (r.State)
        {
            case VersionRecord.Complete: g.Complete = r; break;
            case VersionRecord.Abandoned:
                log($"index: {r.Version} was abandoned ({r.Reason}); searches stay at {Current?.Version ?? "no version"}");
                Drop(g);
                break;
            default:   // started (again, where a publisher restarts it): whatever came before is published again
                g.Complete = null;
                break;
        }
    }

    void OnVector(EmbeddingRecord e)
    {
        if (StepOf(e.ModelVersion) is { } step && Behind(step)) return;
        Gather(e.ModelVersion).Vectors[(e.Id, e.Modality)] = e.Vector;
    }

    /// <summary>A version at or before the one searched: nothing to gather (but, breaking the rule, more of the one searched).</summary>
    bool Behind(long step) => Current is { } c && (step < c.Step || (step == c.Step && rule == SwitchRule.Complete));

    Gathering Gather(string version)
    {
        if (gathering.TryGetValue(version, out var g)) return g;
        gathering[version] = g = new Gathering(version);
        if (gathering.Count > MaxGathering)
        {
            var oldest = gathering.Values.MinBy(v => v.Step ?? long.MinValue)!;   // a version of no known step goes first
            log($"index: gave up gathering {oldest.Version}: {MaxGathering} newer versions are being published");
            Drop(oldest);
        }
        return g;
    }

    void Drop(Gathering g)
    {
        g.Built?.Dispose();
        gathering.Remove(g.Version);
    }

    /// <summary>Moves searches to the newest version that is whole and whose model is ready.</summary>
    void Switch()
    {
        foreach (var g in gathering.Values.Where(g => g.Step is not null).OrderByDescending(g => g.Step).ToList())
        {
            if (g.Built is null && !IsWhole(g)) continue;
            g.Built ??= SearchIndex.Build(g.Version, g.Step!.Value, g.Vectors);
            if (g.Version != Current?.Version && !prepare(g.Version))
            {
                if (!g.Waited) log($"index: {g.Version} is whole; searches move to it once its checkpoint is found in the run folder");
                g.Waited = true;
                continue;
            }
            Publish(g.Built);
            g.Built = null;
            foreach (var old in gathering.Values.Where(o => o.Step < g.Step).ToList()) Drop(old);
            if (rule == SwitchRule.Complete) Drop(g);
            return;
        }
    }

    bool IsWhole(Gathering g)
    {
        if (rule == SwitchRule.FirstVector) return g.Vectors.Count > (Current is { } c0 && c0.Version == g.Version ? c0.Items.Values.Sum() : 0);
        if (g.Complete is not { } c || g.Vectors.Count != c.Records || g.Checked == (g.Vectors.Count, c)) return false;
        g.Checked = (g.Vectors.Count, c);   // a vector that replaces one of the same id changes no id: checked once
        if (VersionRecord.IdsChecksum(g.Vectors.Keys) == c.IdsSha256) return true;
        log($"index: {g.Version} holds {c.Records} vectors, as its complete record says, but not the ids it names; it is not searched");
        return false;
    }

    void Publish(SearchIndex index)
    {
        var was = Interlocked.Exchange(ref current, index);
        // The one before stays a while: a request may be searching it now. The one before that goes.
        previous?.Dispose();
        previous = was;
        if (was?.Version != index.Version) log($"index: searching {index.Version} ({string.Join(", ", index.Items.Select(i => $"{i.Value} {i.Key}"))})");
    }

    static long? StepOf(string version) => StepName().Match(version) is { Success: true } m ? long.Parse(m.Groups[1].Value) : null;

    [GeneratedRegex(@"^step-(\d{1,18})$")] private static partial Regex StepName();

    public void Dispose()
    {
        stopping.Cancel();
        worker.Join();
        consumer.Close();
        consumer.Dispose();
        foreach (var g in gathering.Values) g.Built?.Dispose();
        previous?.Dispose();
        current?.Dispose();
        stopping.Dispose();
    }
}
