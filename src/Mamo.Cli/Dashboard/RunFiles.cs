using System.Text;
using System.Text.Json.Nodes;
using Mamo.Actors.Pipeline;
using Mamo.Actors.Sources;
using Mamo.Data.Kafka;
using static Mamo.Actors.Pipeline.MetricsLine;

namespace Mamo.Cli.Dashboard;

/// <summary>
/// What the dashboard knows of a run, read from its folder only: metrics.jsonl, dead-letters.jsonl and (a cluster
/// run's) cluster.jsonl, followed as
/// they grow (a run in progress, or one that stopped days ago). Reading the files, not the actors, is what makes
/// history survive a restart and lets `mamo dashboard RUN_DIR` show exactly what the in-process dashboard shows.
/// Each complete new line becomes an event with a sequence number; a line still being written waits for its newline.
/// Lines that are not JSON objects are counted and skipped.
/// </summary>
public sealed class RunFiles
{
    public const string MetricsFile = "metrics.jsonl", DeadLetterFile = "dead-letters.jsonl";
    const int RecentDeadLetters = 20, RecentEvents = 4096, RecentRounds = 50;
    /// <summary>Process and Kafka lines kept for their charts, over the whole run.</summary>
    const int HistoryCap = 8192;

    readonly object gate = new(), polling = new();
    readonly FileFollower metrics, deadLetters, cluster;
    readonly LinkedList<(long Seq, JsonObject Event)> recent = new();
    long seq;

    // Train curves as columns: step, then each key a train line carries (NaN where a line lacks it).
    readonly List<double> trainSteps = [];
    readonly Dictionary<string, List<double>> trainColumns = [];
    readonly List<JsonObject> evals = [], checkpoints = [], publishes = [], configChanges = [];
    readonly Dictionary<string, JsonObject> probes = [];
    readonly List<string> thumbnailSets = [];
    readonly Dictionary<(int Set, int Image), byte[]> thumbnails = [];
    readonly Dictionary<string, long> deadLettersByReason = [];
    readonly LinkedList<JsonObject> latestDeadLetters = new();
    readonly Dictionary<string, JsonObject> kafka = [];
    readonly BoundedHistory<JsonObject> kafkaHistory = new(HistoryCap), processHistory = new(HistoryCap);
    readonly List<double> roundNumbers = [], roundSeconds = [];
    readonly LinkedList<JsonObject> latestRounds = new();
    readonly List<JsonObject> recoveries = [];
    JsonObject? lastTrain, start, state, process, members;
    // What the page and /metrics read, through the types that wrote it.
    TrainLine? lastTrainLine;
    StateLine? stateLine;
    ProcessLine? processLine;
    long? lastCheckpoint;
    readonly Dictionary<string, RetrievalEvalLine> lastEvals = [];
    readonly Dictionary<string, PartitionStatus> partitions = [];
    /// <summary>Records retention deleted unread, per partition: those of the processes before the current one, and
    /// the current one's count (a process counts from its start).</summary>
    readonly Dictionary<string, long> expiredBefore = [], expiredNow = [];
    int starts;

    public RunFiles(string runDir)
    {
        RunDir = runDir;
        metrics = new FileFollower(Path.Combine(runDir, MetricsFile));
        deadLetters = new FileFollower(Path.Combine(runDir, DeadLetterFile));
        cluster = new FileFollower(Path.Combine(runDir, Mamo.Actors.Cluster.RunHistory.JournalFile));
    }

    public string RunDir { get; }

    /// <summary>Lines of the run's files that were not JSON objects.</summary>
    public long Malformed { get; private set; }

    /// <summary>Whether metrics.jsonl has been read at least once.</summary>
    public bool Loaded { get; private set; }

    /// <summary>The newest state line's state (running, paused, restarting, stopped) and reason; null before one.</summary>
    public string? State { get { lock (gate) return stateLine?.State; } }
    public string? StateReason { get { lock (gate) return stateLine?.Reason; } }

    /// <summary>The sequence number of the newest event.</summary>
    public long Sequence { get { lock (gate) return seq; } }

    /// <summary>Reads what the files gained since the last call; returns how many events that made.</summary>
    public int Poll()
    {
        lock (polling)   // the poll loop and a /metrics scrape may both ask
        {
            var added = 0;
            foreach (var line in metrics.ReadNewLines()) added += Add(line, deadLetter: false);
            foreach (var line in deadLetters.ReadNewLines()) added += Add(line, deadLetter: true);
            foreach (var line in cluster.ReadNewLines()) added += Add(line, deadLetter: false);
            Loaded |= metrics.Exists;
            return added;
        }
    }

    int Add(string line, bool deadLetter)
    {
        var o = ParseObject(line);
        lock (gate)
        {
            if (o is null)
            {
                Malformed++;
                return 0;
            }
            if (deadLetter) o["kind"] = "dead_letter";
            var kind = Text(o, "kind");
            switch (kind)
            {
                case "train": AddTrain(o); break;
                case "eval": AddEval(o); break;
                case "probe": probes[Text(o, "set") ?? ""] = o; break;
                case "thumbnail": AddThumbnail(o); return 0;   // pixels are served, not streamed
                case "checkpoint": checkpoints.Add(o); lastCheckpoint = CheckpointLine.Parse(o)?.Step ?? lastCheckpoint; break;
                case "publish": publishes.Add(o); break;
                case "config": configChanges.Add(o); break;
                case "start": start = o; starts++; Fold(expiredNow, expiredBefore); break;
                case "state": (state, stateLine) = (o, StateLine.Parse(o) ?? stateLine); break;
                case "process": (process, processLine) = (o, ProcessLine.Parse(o) ?? processLine); processHistory.Add(o); break;
                case "kafka": AddKafka(o); break;
                case "dead_letter": AddDeadLetter(o); break;
                case "members": members = o; break;
                case "round": AddRound(o); break;
                case "recovery": recoveries.Add(o); break;
                case "recovered": Recovered(o); break;
            }
            recent.AddLast((++seq, o));
            if (recent.Count > RecentEvents) recent.RemoveFirst();
            return 1;
        }
    }

    void AddTrain(JsonObject o)
    {
        if (TrainLine.Parse(o) is not { } line) return;
        (lastTrain, lastTrainLine) = (o, line);
        trainSteps.Add(line.Step);
        foreach (var (key, value) in o)
        {
            if (key is "kind" or "step" or "time" || Number(value) is not { } v) continue;
            if (!trainColumns.TryGetValue(key, out var column))
                trainColumns[key] = column = [.. Enumerable.Repeat(double.NaN, trainSteps.Count - 1)];
            column.Add(v);
        }
        foreach (var column in trainColumns.Values)
            if (column.Count < trainSteps.Count) column.Add(double.NaN);
    }

    void AddEval(JsonObject o)
    {
        evals.Add(o);
        if (RetrievalEvalLine.Parse(o) is { } line) lastEvals[line.Set] = line;
    }

    void AddThumbnail(JsonObject o)
    {
        if (ThumbnailLine.Parse(o) is not { } line)
        {
            if (o["png"] is not null) Malformed++;
            return;
        }
        var index = thumbnailSets.IndexOf(line.Set);
        if (index < 0) { thumbnailSets.Add(line.Set); index = thumbnailSets.Count - 1; }
        thumbnails[(index, line.Image)] = line.Png;
    }

    void AddKafka(JsonObject o)
    {
        kafkaHistory.Add(o);
        foreach (var p in KafkaLine.Parse(o).Partitions)
        {
            partitions[p.Partition] = p;
            expiredNow[p.Partition] = Math.Max(expiredNow.GetValueOrDefault(p.Partition), p.Expired);
        }
        if (o["partitions"] is not JsonObject all) return;
        foreach (var (name, p) in all)
            if (p is JsonObject po) kafka[name] = po;
    }

    static void Fold(Dictionary<string, long> from, Dictionary<string, long> into)
    {
        foreach (var (key, n) in from) into[key] = into.GetValueOrDefault(key) + n;
        from.Clear();
    }

    void AddRound(JsonObject o)
    {
        if (Number(o, "round") is not { } round) return;
        roundNumbers.Add(round);
        roundSeconds.Add(Number(o, "seconds") ?? double.NaN);
        latestRounds.AddFirst(o);
        if (latestRounds.Count > RecentRounds) latestRounds.RemoveLast();
    }

    /// <summary>Closes the open recovery of the same loss with the seconds it took.</summary>
    void Recovered(JsonObject o)
    {
        var open = recoveries.LastOrDefault(r => Text(r, "lost") == Text(o, "lost") && r["seconds"] is null);
        if (open is not null) open["seconds"] = o["seconds"]?.DeepClone();
    }

    void AddDeadLetter(JsonObject o)
    {
        var reason = Reason(DeadLetterLine.Parse(o)?.Reason ?? "unknown");
        deadLettersByReason[reason] = deadLettersByReason.GetValueOrDefault(reason) + 1;
        latestDeadLetters.AddFirst(o);
        if (latestDeadLetters.Count > RecentDeadLetters) latestDeadLetters.RemoveLast();
    }

    /// <summary>A dead letter's reason class: the text before the first colon, numbers as N ("malformed JSON on line
    /// 6: ..." → "malformed JSON on line N"), so that a label has few values however the details vary.</summary>
    public static string Reason(string reason)
    {
        var colon = reason.IndexOf(':');
        var head = Digits.Replace((colon > 0 ? reason[..colon] : reason).Trim(), "N");
        return head.Length is > 0 and <= 64 ? head : "other";
    }

    static readonly System.Text.RegularExpressions.Regex Digits = new(@"\d+", System.Text.RegularExpressions.RegexOptions.Compiled);

    /// <summary>Events after <paramref name="after"/> still held (the newest few thousand).</summary>
    public IReadOnlyList<(long Seq, JsonObject Event)> EventsAfter(long after)
    {
        lock (gate) return recent.Where(e => e.Seq > after).ToList();
    }

    /// <summary>A thumbnail of an evaluation image, by the index of its set in <see cref="Snapshot"/>'s
    /// thumbnail_sets and its index in the set.</summary>
    public byte[]? Thumbnail(int set, int image)
    {
        lock (gate) return thumbnails.GetValueOrDefault((set, image));
    }

    /// <summary>The whole state for a page that has just opened, with train curves downsampled to at most
    /// <paramref name="maxPoints"/> rows.</summary>
    public JsonObject Snapshot(int maxPoints)
    {
        lock (gate)
        {
            var keys = trainColumns.Keys.Order(StringComparer.Ordinal).ToList();
            var (x, ys) = Downsampling.MinMax(trainSteps, keys.Select(k => (IReadOnlyList<double>)trainColumns[k]).ToList(), maxPoints);
            var train = new JsonObject { ["step"] = Numbers(x) };
            for (var i = 0; i < keys.Count; i++) train[keys[i]] = Numbers(ys[i]);
            return new JsonObject
            {
                ["seq"] = seq,
                ["run_dir"] = Path.GetFullPath(RunDir),
                ["start"] = start?.DeepClone(),
                ["starts"] = starts,
                ["state"] = state?.DeepClone(),
                ["last_train"] = lastTrain?.DeepClone(),
                ["train"] = train,
                ["train_points"] = trainSteps.Count,
                ["evals"] = Clone(evals),
                ["probes"] = new JsonObject(probes.Select(p => KeyValuePair.Create(p.Key, (JsonNode?)p.Value.DeepClone()))),
                ["thumbnail_sets"] = new JsonArray(thumbnailSets.Select(s => (JsonNode)JsonValue.Create(s)!).ToArray()),
                ["checkpoints"] = Clone(checkpoints),
                ["publishes"] = Clone(publishes),
                ["config_changes"] = Clone(configChanges),
                ["kafka"] = new JsonObject(kafka.Select(p => KeyValuePair.Create(p.Key, (JsonNode?)p.Value.DeepClone()))),
                ["kafka_history"] = Clone(Downsampling.Every(kafkaHistory.Items, maxPoints)),
                ["process"] = process?.DeepClone(),
                ["process_history"] = Clone(Downsampling.Every(processHistory.Items, maxPoints)),
                ["dead_letters"] = new JsonObject
                {
                    ["total"] = deadLettersByReason.Values.Sum(),
                    ["by_reason"] = new JsonObject(deadLettersByReason.Select(r => KeyValuePair.Create(r.Key, (JsonNode?)r.Value))),
                    ["latest"] = Clone(latestDeadLetters),
                },
                ["malformed"] = Malformed,
                ["cluster"] = roundNumbers.Count == 0 && members is null && recoveries.Count == 0 ? null : Cluster(maxPoints),
            };
        }
    }

    JsonObject Cluster(int maxPoints)
    {
        var (x, ys) = Downsampling.MinMax(roundNumbers, [roundSeconds], maxPoints);
        return new JsonObject
        {
            ["members"] = members?["members"]?.DeepClone(),
            ["rounds"] = roundNumbers.Count,
            ["round_seconds"] = new JsonObject { ["round"] = Numbers(x), ["seconds"] = Numbers(ys[0]) },
            ["latest_rounds"] = Clone(latestRounds),
            ["recoveries"] = Clone(recoveries),
        };
    }

    /// <summary>The values /metrics reports, as of the files read so far.</summary>
    public MetricValues Values()
    {
        lock (gate)
        {
            var t = lastTrainLine;
            var terms = t is null ? new Dictionary<string, double>() : new Dictionary<string, double>(t.Terms) { ["total"] = t.Loss };
            var recalls = new List<(string Set, string Direction, int K, double Value)>();
            foreach (var (set, e) in lastEvals)
            {
                var m = e.Metrics;
                foreach (var (direction, k, r) in new[] { ("image_to_text", 1, m.Tr1), ("image_to_text", 5, m.Tr5), ("image_to_text", 10, m.Tr10),
                             ("text_to_image", 1, m.Ir1), ("text_to_image", 5, m.Ir5), ("text_to_image", 10, m.Ir10) })
                    recalls.Add((set, direction, k, r / 100));
            }
            var lags = partitions.Values.Where(p => p.Lag is not null)
                .Select(p =>
                {
                    var (topic, part) = KafkaRecords.SplitPartitionKey(p.Partition);
                    return (topic, part, (double)p.Lag!.Value);
                })
                .ToList();
            var expired = expiredBefore.Keys.Union(expiredNow.Keys).ToDictionary(k => k, k => expiredBefore.GetValueOrDefault(k) + expiredNow.GetValueOrDefault(k));
            return new MetricValues(t?.Step, terms, t?.PairsPerSecond, t?.LearningRate, recalls, new Dictionary<string, long>(deadLettersByReason), lags, expired,
                lastCheckpoint, processLine?.RssBytes, processLine?.GcHeapBytes, processLine?.CpuSeconds, Math.Max(0, starts - 1),
                roundNumbers.Count == 0 ? null : roundNumbers[^1]);
        }
    }

    static JsonArray Clone(IEnumerable<JsonObject> items) => new(items.Select(i => (JsonNode)i.DeepClone()).ToArray());

    static JsonArray Numbers(IEnumerable<double> values) =>
        new(values.Select(v => double.IsFinite(v) ? JsonValue.Create(v) : null).Cast<JsonNode?>().ToArray());

    /// <summary>Reads the lines appended to a file since the last call. A file that does not exist yet is empty; one
    /// that shrank (replaced) is read again from the start.</summary>
    sealed class FileFollower(string path)
    {
        long offset;
        readonly List<byte> partial = [];

        public bool Exists => File.Exists(path);

        public List<string> ReadNewLines()
        {
            var lines = new List<string>();
            if (!File.Exists(path)) return lines;
            using var stream = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.ReadWrite | FileShare.Delete);
            if (stream.Length < offset)
            {
                offset = 0;
                partial.Clear();
            }
            stream.Seek(offset, SeekOrigin.Begin);
            var buffer = new byte[64 * 1024];
            int read;
            while ((read = stream.Read(buffer, 0, buffer.Length)) > 0)
            {
                offset += read;
                var start = 0;
                for (var i = 0; i < read; i++)
                {
                    if (buffer[i] != (byte)'\n') continue;
                    partial.AddRange(buffer.AsSpan(start, i - start));
                    var line = Encoding.UTF8.GetString(partial.ToArray()).TrimEnd('\r');
                    partial.Clear();
                    if (line.Length > 0) lines.Add(line);
                    start = i + 1;
                }
                partial.AddRange(buffer.AsSpan(start, read - start));
            }
            return lines;
        }
    }
}

/// <summary>What /metrics reports; null: not known yet.</summary>
public sealed record MetricValues(double? Step, IReadOnlyDictionary<string, double> Loss, double? PairsPerSecond, double? LearningRate,
    IReadOnlyList<(string Set, string Direction, int K, double Value)> Recall, IReadOnlyDictionary<string, long> DeadLetters,
    IReadOnlyList<(string Topic, string Partition, double Lag)> KafkaLag, IReadOnlyDictionary<string, long> KafkaExpired, double? CheckpointStep, double? ResidentBytes, double? GcHeapBytes,
    double? CpuSeconds, int ProcessRestarts, double? ClusterRound);

/// <summary>A series that arrives every few seconds for as long as a run lives (weeks), kept bounded at an even
/// resolution over the whole run: past the cap every other point goes and from then on only every other new one is
/// kept (the stride doubles). The newest item is always the last, on the stride or not.</summary>
public sealed class BoundedHistory<T>(int cap)
{
    readonly List<T> items = [];
    long seen;
    long stride = 1;
    bool lastOffStride;

    public IReadOnlyList<T> Items => items;

    /// <summary>Seen items between two kept ones.</summary>
    public long Stride => stride;

    public void Add(T item)
    {
        if (lastOffStride) items.RemoveAt(items.Count - 1);
        var index = seen++;
        items.Add(item);
        lastOffStride = index % stride != 0;
        if (items.Count <= cap) return;
        // Item k on the stride was seen k·stride-th: the even k are those on the doubled stride.
        var onStride = lastOffStride ? items.Count - 1 : items.Count;
        var kept = items.Take(onStride).Where((_, k) => k % 2 == 0).ToList();
        stride *= 2;
        lastOffStride = index % stride != 0;
        if (lastOffStride) kept.Add(item);
        items.Clear();
        items.AddRange(kept);
    }
}

/// <summary>Days of points drawn on a screen a few thousand pixels wide: server-side downsampling that keeps each
/// bucket's extremes, so a spike survives however far the view is zoomed out.</summary>
public static class Downsampling
{
    /// <summary>
    /// At most <paramref name="maxPoints"/> rows of aligned columns. Rows are cut into maxPoints/2 buckets of
    /// consecutive rows; each bucket becomes two rows, at its first and last x: the first holds each column's
    /// minimum over the bucket, the second its maximum (NaNs ignored). Fewer rows than that come back as they are.
    /// </summary>
    public static (List<double> X, List<List<double>> Ys) MinMax(IReadOnlyList<double> x, IReadOnlyList<IReadOnlyList<double>> ys, int maxPoints)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(maxPoints, 2);
        if (x.Count <= maxPoints) return ([.. x], ys.Select(y => y.ToList()).ToList());
        var buckets = maxPoints / 2;
        var outX = new List<double>(buckets * 2);
        var outYs = ys.Select(_ => new List<double>(buckets * 2)).ToList();
        for (var b = 0; b < buckets; b++)
        {
            int from = (int)((long)b * x.Count / buckets), to = (int)((long)(b + 1) * x.Count / buckets);   // [from, to)
            outX.Add(x[from]);
            outX.Add(x[to - 1]);
            for (var c = 0; c < ys.Count; c++)
            {
                double min = double.NaN, max = double.NaN;
                for (var i = from; i < to; i++)
                {
                    var v = ys[c][i];
                    if (double.IsNaN(v)) continue;
                    if (double.IsNaN(min) || v < min) min = v;
                    if (double.IsNaN(max) || v > max) max = v;
                }
                outYs[c].Add(min);
                outYs[c].Add(max);
            }
        }
        return (outX, outYs);
    }

    /// <summary>Every k-th item, and the last, so that at most about <paramref name="maxPoints"/> remain.</summary>
    public static List<T> Every<T>(IReadOnlyList<T> items, int maxPoints)
    {
        if (items.Count <= maxPoints) return [.. items];
        var k = (items.Count + maxPoints - 1) / maxPoints;
        var kept = new List<T>();
        for (var i = 0; i < items.Count; i += k) kept.Add(items[i]);
        if ((items.Count - 1) % k != 0) kept.Add(items[^1]);
        return kept;
    }
}
