using System.Collections.Immutable;
using System.Text.Json;
using Mamo.Actors.Run;
using Mamo.Data;
using Mamo.Model;
using static TorchSharp.torch;

namespace Mamo.Actors.Pipeline;

/// <summary>Experience replay (Chaudhry et al. 2019, "On Tiny Episodic Memories in Continual Learning"): a reservoir of
/// past records in which every record of the stream so far is equally likely to be (Algorithm R), bounded by a count and
/// by its images' bytes. It is immutable: the batcher makes the next one with each batch, the batch carries it to the
/// trainer, and the checkpoint of that step saves it whole (the "replay" part), so a resumed run replays exactly what
/// the killed one would have. Where a record lands is drawn from the seed and its number in the stream, and a batch's
/// draw from the seed and its step: the records and that number are all the state there is. The reservoir holds the
/// records themselves (encoded images), not offsets: a Kafka source commits its offsets as without replay, and the
/// records it already acknowledged stay replayable.</summary>
public sealed class ReplayBuffer
{
    public const string Part = "replay";
    const int OfferSalt = 0x7e91a, DrawSalt = 0x0d7a3, PrepareSalt = 0x3e9a1;

    readonly ReplaySettings settings;
    readonly int seed;

    /// <summary>The records held, in the slots Algorithm R fills and replaces.</summary>
    public ImmutableList<ImageTextSample> Records { get; }
    /// <summary>Records offered so far: the stream the reservoir is uniform over.</summary>
    public long Seen { get; }
    /// <summary>The bytes of the records' encoded images.</summary>
    public long Bytes { get; }

    ReplayBuffer(ReplaySettings settings, int seed, ImmutableList<ImageTextSample> records, long seen, long bytes)
    {
        (this.settings, this.seed) = (settings, seed);
        (Records, Seen, Bytes) = (records, seen, bytes);
    }

    public static ReplayBuffer Empty(ReplaySettings settings, int seed) => new(settings, seed, [], 0, 0);

    /// <summary>The records each batch replays: fraction × batch size, as many as the reservoir holds.</summary>
    public int ToReplay(int batchSize) => Math.Min((int)Math.Round(settings.Fraction * batchSize), Records.Count);

    /// <summary>The reservoir after a batch's fresh records, in stream order: while it has room each goes in; after
    /// that the n-th record takes a random slot with probability capacity / n. Over the byte bound, random records
    /// leave until it holds; a record larger than the bound alone never enters.</summary>
    public ReplayBuffer Offer(IEnumerable<ImageTextSample> fresh)
    {
        var records = Records.ToBuilder();
        var (seen, bytes) = (Seen, Bytes);
        foreach (var record in fresh)
        {
            var random = new Random(Seeds.Mix(seed ^ OfferSalt, seen));
            seen++;
            if (record.Image.Length > settings.MaxBytes) continue;
            if (records.Count < settings.Capacity)
            {
                records.Add(record);
                bytes += record.Image.Length;
            }
            else if (random.NextInt64(seen) is var slot && slot < settings.Capacity)
            {
                bytes += record.Image.Length - records[(int)slot].Image.Length;
                records[(int)slot] = record;
            }
            bytes = Evict(records, bytes, random);
        }
        return new(settings, seed, records.ToImmutable(), seen, bytes);
    }

    long Evict(ImmutableList<ImageTextSample>.Builder records, long bytes, Random random)
    {
        while (bytes > settings.MaxBytes || records.Count > settings.Capacity)
        {
            var k = random.Next(records.Count);
            bytes -= records[k].Image.Length;
            records.RemoveAt(k);
        }
        return bytes;
    }

    /// <summary>Step <paramref name="step"/>'s replayed records: <paramref name="count"/> at most, of distinct ids (a
    /// file source's record may be held twice, from two epochs), none the id of a record the batch already holds.</summary>
    public IReadOnlyList<ImageTextSample> Draw(long step, int count, IReadOnlySet<string> exclude)
    {
        var slots = Enumerable.Range(0, Records.Count).ToArray();
        new Random(Seeds.Mix(seed ^ DrawSalt, step)).Shuffle(slots);
        var ids = new HashSet<string>(exclude);
        return slots.Select(i => Records[i]).Where(r => ids.Add(r.Id)).Take(count).ToList();
    }

    /// <summary>The crop and caption randomness of a replayed record: its step and slot in the batch, so that a record
    /// replayed twice is seen two ways, and a resume sees it the same way.</summary>
    public Random PrepareRandom(long step, int slot) => new(Seeds.Mix(Seeds.Mix(seed ^ PrepareSalt, step), slot));

    /// <summary>As a checkpoint part: the count seen, the images end to end with their lengths, and the rest of each
    /// record as JSON.</summary>
    public Checkpoint.Part ToPart()
    {
        var images = new byte[Bytes];
        var at = 0;
        foreach (var r in Records)
        {
            r.Image.CopyTo(images, at);
            at += r.Image.Length;
        }
        var meta = JsonSerializer.SerializeToUtf8Bytes(Records.Select(r => new Meta(r.Id, r.Captions, r.Position.Source, r.Position.Offset, r.Label)).ToList());
        return new Checkpoint.Part(Part,
        [
            ("seen", tensor(new[] { Seen })),
            ("image_bytes", tensor(Records.Select(r => (long)r.Image.Length).ToArray())),
            ("images", tensor(images)),
            ("records", tensor(meta)),
        ]);
    }

    sealed record Meta(string Id, IReadOnlyList<string> Captions, string Source, long Offset, string? Label);

    /// <summary>The reservoir a checkpoint part saved; past today's bounds (lowered since), random records leave.</summary>
    public static ReplayBuffer FromPart(IReadOnlyDictionary<string, Tensor> part, ReplaySettings settings, int seed)
    {
        var lengths = part["image_bytes"].data<long>().ToArray();
        var images = part["images"].data<byte>().ToArray();
        var meta = JsonSerializer.Deserialize<List<Meta>>(part["records"].data<byte>().ToArray()) ?? [];
        if (meta.Count != lengths.Length || lengths.Sum() != images.Length)
            throw new InvalidDataException($"the replay part holds {meta.Count} records and {lengths.Length} image lengths over {images.Length} bytes");
        var records = ImmutableList.CreateBuilder<ImageTextSample>();
        long at = 0;
        foreach (var (m, length) in meta.Zip(lengths))
        {
            records.Add(new ImageTextSample(m.Id, images[(int)at..(int)(at + length)], m.Captions, new SourcePosition(m.Source, m.Offset), m.Label));
            at += length;
        }
        var seen = part["seen"].data<long>()[0];
        var buffer = Empty(settings, seed);
        var bytes = buffer.Evict(records, at, new Random(Seeds.Mix(seed ^ OfferSalt, seen)));
        return new(settings, seed, records.ToImmutable(), seen, bytes);
    }

    /// <summary>The reservoir a checkpoint holds; empty where it holds none (a run that replays from now on).</summary>
    public static ReplayBuffer Load(string checkpoint, ReplaySettings settings, int seed)
    {
        if (!Checkpoint.Parts(Checkpoint.ReadState(checkpoint)).Contains(Part)) return Empty(settings, seed);
        var part = Checkpoint.LoadPart(Path.Combine(checkpoint, Checkpoint.PartFile(Part)));
        try { return FromPart(part, settings, seed); }
        finally { foreach (var t in part.Values) t.Dispose(); }
    }

    public override string ToString() => $"{Records.Count} records ({Bytes:N0} bytes of images) of {Seen:N0} seen";
}
