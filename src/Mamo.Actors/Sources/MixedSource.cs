using System.Collections.Immutable;
using System.Globalization;
using System.Text.RegularExpressions;
using Akka;
using Akka.Streams;
using Akka.Streams.Dsl;
using Akka.Streams.Stage;
using Mamo.Data;
using Mamo.Model;

namespace Mamo.Actors.Sources;

/// <summary>A source as `--source` names it, with its share of a mix: `SPEC?weight=W` (W > 0; 1 when left out). The
/// weight is taken out of the spec; the rest of its query (a Kafka group) stays.</summary>
public sealed record WeightedSource(string Spec, double Weight)
{
    static readonly Regex WeightParameter = new(@"([?&])weight=([^&]*)(&|$)", RegexOptions.CultureInvariant);

    /// <summary>Throws FormatException for a weight that is no positive number.</summary>
    public static WeightedSource Parse(string spec)
    {
        var m = WeightParameter.Match(spec);
        if (!m.Success) return new(spec, 1);
        if (!double.TryParse(m.Groups[2].Value, NumberStyles.Float, CultureInfo.InvariantCulture, out var weight) || !double.IsFinite(weight) || weight <= 0)
            throw new FormatException($"'{spec}': weight must be a positive number, got '{m.Groups[2].Value}'");
        var rest = spec[..m.Index] + (m.Groups[3].Value == "&" ? m.Groups[1].Value : "") + spec[(m.Index + m.Length)..];
        return new(rest, weight);
    }

    public override string ToString() => Weight == 1 ? Spec : $"{Spec}?weight={Weight.ToString(CultureInfo.InvariantCulture)}";
}

/// <summary>Several training sources as one stream: each record comes from source i with probability weight_i / Σ
/// weights, drawn from the seed and the number of records drawn so far, so a resume draws as the run would have gone
/// on. Each source keeps its own positions, under its index ("0:cursor", "1:topic/3"), and its draws are counted
/// ("mix:1" = the offset of the last record drawn from source 1), so the checkpoint holds both. A source with nothing
/// to read holds the mix back: the weights are kept, not bent towards whatever is ready. Dead letters are labelled by
/// the record's own place (its manifest, shard or topic). A file source in a mix is one partition like any other:
/// a mix runs on a single node.</summary>
public sealed class MixedSource(IReadOnlyList<(ITrainingSource Source, double Weight)> parts, int seed) : ITrainingSource
{
    const string CountPrefix = "mix:";
    const int DrawSalt = 0x31c5;

    public string Name => string.Join(" + ", parts.Select(p => $"{p.Source.Name} ({p.Weight / parts.Sum(x => x.Weight):P0})"));

    public bool ReadWhole => false;

    public Source<Positioned, NotUsed> Open(StreamPosition resume)
    {
        var counts = parts.Select((_, i) => (resume[CountPrefix + i] ?? -1) + 1).ToArray();
        var children = parts.Select((p, i) => p.Source.Open(Of(resume, i)).Select(r => r with { At = new SourcePosition($"{i}:{r.At.Source}", r.At.Offset) })).ToList();
        var total = parts.Sum(p => p.Weight);
        var cumulative = parts.Select(p => p.Weight / total).ToArray();
        for (int i = 1; i < cumulative.Length; i++) cumulative[i] += cumulative[i - 1];
        return Source.FromGraph(GraphDsl.Create(b =>
        {
            var mix = b.Add(new WeightedMix(cumulative, counts, seed ^ DrawSalt));
            for (int i = 0; i < children.Count; i++) b.From(children[i]).To(mix.In(i));
            return new SourceShape<Positioned>(mix.Out);
        }));
    }

    /// <summary>Source i's own positions within a mixed one.</summary>
    static StreamPosition Of(StreamPosition mixed, int i) => new(mixed.Offsets.Where(kv => kv.Key.StartsWith($"{i}:", StringComparison.Ordinal))
        .ToImmutableSortedDictionary(kv => kv.Key[(kv.Key.IndexOf(':') + 1)..], kv => kv.Value));

    /// <summary>The record as its own source placed it.</summary>
    static (int Index, Positioned Own) Split(Positioned record)
    {
        var colon = record.At.Source.IndexOf(':');
        return (int.Parse(record.At.Source[..colon], CultureInfo.InvariantCulture),
            record with { At = new SourcePosition(record.At.Source[(colon + 1)..], record.At.Offset), Mix = null });
    }

    public bool Take(Positioned record) => Split(record) is var (i, own) && parts[i].Source.Take(own);

    public bool DeadLetter(Positioned record, BadInput bad) => Split(record) is var (i, own) && parts[i].Source.DeadLetter(own, bad);

    public void Commit(StreamPosition durable)
    {
        for (int i = 0; i < parts.Count; i++) parts[i].Source.Commit(Of(durable, i));
    }

    public string? PausedBecause => parts.Select(p => p.Source.PausedBecause).FirstOrDefault(why => why is not null);

    public IReadOnlyList<PartitionStatus> Partitions => [.. parts.SelectMany((p, i) => p.Source.Partitions.Select(s => s with { Partition = $"{i}:{s.Partition}" }))];

    public void Dispose()
    {
        foreach (var (source, _) in parts) source.Dispose();
    }

    /// <summary>Pulls the next record from the source the draw names, and marks it with that source's count.</summary>
    sealed class WeightedMix(double[] cumulative, long[] counts, int seed) : GraphStage<UniformFanInShape<Positioned, Positioned>>
    {
        readonly double[] cumulative = cumulative;
        readonly long[] counts = counts;
        readonly int seed = seed;

        public override UniformFanInShape<Positioned, Positioned> Shape { get; } = new(cumulative.Length, "mix");

        protected override GraphStageLogic CreateLogic(Attributes inheritedAttributes) => new Logic(this);

        sealed class Logic : GraphStageLogic
        {
            readonly long[] counts;

            public Logic(WeightedMix stage) : base(stage.Shape)
            {
                counts = stage.counts.ToArray();
                var shape = stage.Shape;
                for (int i = 0; i < shape.Inlets.Count(); i++)
                {
                    var (inlet, index) = (shape.In(i), i);
                    SetHandler(inlet, onPush: () =>
                    {
                        var record = Grab(inlet);
                        Push(shape.Out, record with { Mix = new SourcePosition(CountPrefix + index, counts[index]++) });
                    });
                }
                SetHandler(shape.Out, onPull: () =>
                {
                    var u = new Random(Seeds.Mix(stage.seed, counts.Sum())).NextDouble();
                    var i = Array.FindIndex(stage.cumulative, c => u < c);
                    Pull(shape.In(i < 0 ? stage.cumulative.Length - 1 : i));   // u above the last sum by rounding
                });
            }
        }
    }
}
