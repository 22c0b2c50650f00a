using System.Collections.Concurrent;
using Akka;
using Akka.Streams.Dsl;
using Mamo.Data;
using Mamo.Data.Datasets;
using Mamo.Model;
using Mamo.Actors.Run;

namespace Mamo.Actors.Sources;

/// <summary>A file source (built-in dataset, manifest, WebDataset shards) held in memory and replayed epoch after
/// epoch in a new seeded order each time: a stream with no end, as a live feed has none. A sample's place in
/// that stream is its cursor (epoch * N + index), so a checkpoint's cursor says exactly where to resume. Images are
/// decoded where they are prepared, once per epoch: one that cannot be is a dead letter there, reported once, and
/// comes round again as a known dead letter, so that every cursor keeps its sample.</summary>
public sealed class TrainingSamples : ITrainingSource
{
    /// <summary>The one partition of a file source's stream.</summary>
    public const string CursorPartition = "cursor";

    readonly IReadOnlyList<ImageTextSample> samples;
    readonly int seed;
    /// <summary>Samples (by index) that came back as dead letters, with why.</summary>
    readonly ConcurrentDictionary<int, BadInput> bad = new();

    public string Name { get; }
    public int Count => samples.Count;
    public bool ReadWhole => true;

    TrainingSamples(string name, IReadOnlyList<ImageTextSample> samples, int seed)
    {
        Name = name;
        this.samples = samples;
        this.seed = seed;
    }

    /// <summary>Reads the whole source; records that cannot be read go to onBad, once, and are left out.</summary>
    public static TrainingSamples Load(string spec, int seed, long maxBytes, Action<BadInput> onBad, Action<string>? log = null,
        string labelField = ManifestSource.LabelField)
    {
        var source = Open(spec, log, labelField);
        var kept = new List<ImageTextSample>();
        long bytes = 0;
        foreach (var item in source.Read(null, CancellationToken.None))
        {
            switch (item)
            {
                case BadItem b:
                    onBad(b.Bad);
                    break;
                case SampleItem { Sample: var s }:
                    bytes += s.Image.Length;
                    if (bytes > maxBytes)
                        throw new SettingsException($"source '{spec}' holds more than mamo.data.max-in-memory-bytes ({maxBytes} bytes) of images; raise it, or stream the data from Kafka");
                    kept.Add(s);
                    break;
            }
        }
        if (kept.Count == 0) throw new SettingsException($"source '{spec}' has no usable samples");
        return new TrainingSamples(source.Name, kept, seed);
    }

    /// <summary>The position just before cursor <paramref name="cursor"/>: where a stream that starts there resumes.</summary>
    public static StreamPosition BeforeCursor(long cursor) => StreamPosition.None.Advance(new SourcePosition(CursorPartition, cursor - 1));

    /// <summary>dataset:NAME[/SPLIT] (the train split unless named), manifest:PATH or wds:GLOB.</summary>
    public static IImageTextSource Open(string spec, Action<string>? log = null, string labelField = ManifestSource.LabelField)
    {
        var colon = spec.IndexOf(':');
        var (kind, arg) = colon > 0 ? (spec[..colon], spec[(colon + 1)..]) : ("", spec);
        return kind switch
        {
            "dataset" => new ManifestSource(DatasetFile(arg, BuiltinDatasets.TrainSplit, log), labelField: labelField),
            "manifest" => File.Exists(arg) ? new ManifestSource(arg, labelField: labelField) : throw new SettingsException($"manifest not found: {arg}"),
            "wds" => new WebDatasetSource(arg),
            _ => throw new SettingsException($"unknown source '{spec}': use dataset:NAME[/SPLIT], manifest:PATH, wds:GLOB or kafka://HOST:PORT/TOPIC{Guess(spec)}"),
        };
    }

    /// <summary>What a bare path most likely meant.</summary>
    static string Guess(string spec) =>
        spec.Contains(':') ? ""
        : spec.EndsWith(".tar", StringComparison.Ordinal) || spec.Contains('*') || spec.Contains('{') ? $" (did you mean 'wds:{spec}'?)"
        : File.Exists(spec) ? $" (did you mean manifest:{spec}?)" : "";

    /// <summary>An evaluation set spec (dataset:NAME/SPLIT or manifest:PATH) as a manifest path.</summary>
    public static string EvalManifest(string spec, Action<string>? log = null)
    {
        if (spec.StartsWith("dataset:")) return DatasetFile(spec["dataset:".Length..], BuiltinDatasets.TestSplit, log);
        if (spec.StartsWith("manifest:")) return spec["manifest:".Length..];
        throw new SettingsException($"unknown eval set '{spec}': use dataset:NAME/SPLIT or manifest:PATH");
    }

    /// <summary>NAME[/SPLIT] of a built-in dataset as its manifest, fetched first if needed.</summary>
    static string DatasetFile(string nameAndSplit, string defaultSplit, Action<string>? log)
    {
        var parts = nameAndSplit.Split('/', 2);
        try { return BuiltinDatasets.Ensure(parts[0], log: log).File(parts.Length > 1 ? parts[1] : defaultSplit); }
        catch (Exception e) when (e is ArgumentException or KeyNotFoundException) { throw new SettingsException(e.Message); }
    }

    public Source<Positioned, NotUsed> Open(StreamPosition resume) =>
        Source.From(Indexed((resume[CursorPartition] ?? -1) + 1).Select(x => new Positioned(new SourcePosition(CursorPartition, x.Cursor),
            bad.TryGetValue(x.Index, out var known) ? new BadItem(known) : new SampleItem(samples[x.Index]))));

    /// <summary>Remembers the sample, so that later epochs know it; it is reported the first time only.</summary>
    public bool DeadLetter(Positioned record, BadInput why) => bad.TryAdd(IndexAt(record.At.Offset), why);

    /// <summary>Files need no acknowledgement: the checkpoint's cursor is the whole story.</summary>
    public void Commit(StreamPosition durable) { }

    public void Dispose() { }

    /// <summary>Every sample from cursor `first` on, forever.</summary>
    public IEnumerable<(long Cursor, ImageTextSample Sample)> From(long first) => Indexed(first).Select(x => (x.Cursor, samples[x.Index]));

    IEnumerable<(long Cursor, int Index)> Indexed(long first)
    {
        long n = samples.Count;
        for (long epoch = first / n; ; epoch++)
        {
            var order = Order(epoch);
            for (long i = epoch == first / n ? first % n : 0; i < n; i++)
                yield return (epoch * n + i, order[i]);
        }
    }

    int IndexAt(long cursor) => Order(cursor / samples.Count)[cursor % samples.Count];

    int[] Order(long epoch)
    {
        var order = Enumerable.Range(0, samples.Count).ToArray();
        new Random(Seeds.Mix(seed, epoch)).Shuffle(order);
        return order;
    }
}
