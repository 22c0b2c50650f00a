using System.Text;
using Confluent.Kafka;
using CsCheck;
using Mamo.Data.Kafka;
using Xunit;

namespace Mamo.Data.Tests;

/// <summary>The Kafka record format and address parser: round trips, every rejection reason, and fuzzing.</summary>
public class KafkaRecordsTests
{
    static readonly byte[] Png = [0x89, (byte)'P', (byte)'N', (byte)'G'];

    [Fact]
    public void A_sample_round_trips_through_a_record()
    {
        var sample = new ImageTextSample("1f600", Png, ["grinning face", "a happy face"], new SourcePosition("m", 0));
        var message = KafkaRecords.ToMessage(sample, "image/png");
        var item = Assert.IsType<SampleItem>(KafkaRecords.Read("pairs", 2, 41, message.Key, message.Value, message.Headers, SourceLimits.Default));
        Assert.Equal(("1f600", new SourcePosition("pairs/2", 41)), (item.Sample.Id, item.Sample.Position));
        Assert.Equal(sample.Captions, item.Sample.Captions);
        Assert.Equal(Png, item.Sample.Image);
        Assert.Null(item.Sample.Label);

        // A labelled sample carries its label in the header `label`, and a label that is not UTF-8 is a dead letter.
        var labelled = KafkaRecords.ToMessage(sample with { Label = "Smileys & Emotion" });
        Assert.Equal("Smileys & Emotion", Assert.IsType<SampleItem>(KafkaRecords.Read("pairs", 0, 1, labelled.Key, labelled.Value, labelled.Headers, SourceLimits.Default)).Sample.Label);
        labelled.Headers.Remove(KafkaRecords.LabelHeader);
        labelled.Headers.Add(KafkaRecords.LabelHeader, [0xC3, 0x28]);
        var bad = Assert.IsType<BadItem>(KafkaRecords.Read("pairs", 0, 2, labelled.Key, labelled.Value, labelled.Headers, SourceLimits.Default));
        Assert.Contains("invalid UTF-8 in label header", bad.Bad.Reason);
    }

    [Theory]
    [InlineData("empty", "empty value")]
    [InlineData("uncaptioned", "no 'caption' header")]
    [InlineData("bad-caption", "invalid UTF-8 in caption header")]
    [InlineData("bad-key", "invalid UTF-8 in key")]
    [InlineData("blank", "empty captions")]
    [InlineData("huge", "exceeds")]
    public void An_unusable_record_is_a_dead_letter_with_its_reason(string kind, string reason)
    {
        Headers Caption(byte[] value) => [new Header(KafkaRecords.CaptionHeader, value)];
        var ok = Caption("a caption"u8.ToArray());
        var (key, value, headers) = kind switch
        {
            "empty" => ("k"u8.ToArray(), Array.Empty<byte>(), ok),
            "uncaptioned" => ("k"u8.ToArray(), Png, new Headers()),
            "bad-caption" => ("k"u8.ToArray(), Png, Caption([0xC3, 0x28])),
            "bad-key" => (new byte[] { 0xFF }, Png, ok),
            "blank" => ("k"u8.ToArray(), Png, Caption("   "u8.ToArray())),
            _ => ("k"u8.ToArray(), new byte[101], ok),
        };
        var bad = Assert.IsType<BadItem>(KafkaRecords.Read("t", 0, 7, key, value, headers, SourceLimits.Default with { MaxImageBytes = 100 }));
        Assert.Contains(reason, bad.Bad.Reason);
        Assert.Equal("t/0@7", bad.Bad.Location);
    }

    [Fact]
    public void Reading_any_bytes_gives_a_sample_or_a_dead_letter_never_an_exception()
    {
        var header = Gen.Select(Gen.Int[0, 2].Select(i => new[] { KafkaRecords.CaptionHeader, KafkaRecords.ContentTypeHeader, "other" }[i]), Gen.Byte.Array[0, 40],
            (k, v) => new Header(k, v));
        var gen = Gen.Select(Gen.Byte.Array[0, 40].Null(), Gen.Byte.Array[0, 200].Null(), header.Array[0, 6]);
        int read = 0, refused = 0;
        gen.Sample((key, value, headers) =>
        {
            var hs = new Headers();
            foreach (var h in headers) hs.Add(h);
            var item = KafkaRecords.Read("t", 0, 0, key, value, hs, SourceLimits.Default);
            if (item is SampleItem { Sample.Captions.Count: > 0 }) Interlocked.Increment(ref read);
            else if (item is BadItem { Bad.Reason.Length: > 0 }) Interlocked.Increment(ref refused);
            else return false;
            return true;
        }, iter: 20_000);
        Assert.True(read > 0 && refused > 0, $"{read} read, {refused} refused");   // the fuzz reached both outcomes
    }

    [Theory]
    [InlineData("kafka://127.0.0.1:9092/pairs", "127.0.0.1:9092", "pairs", null)]
    [InlineData("kafka://a:1,b:2/x,y.z?group=g-1", "a:1,b:2", "x|y.z", "g-1")]
    public void Addresses_parse(string spec, string servers, string topics, string? group)
    {
        var k = KafkaSpec.Parse(spec);
        Assert.Equal((servers, topics, group), (k.BootstrapServers, string.Join('|', k.Topics), k.Group));
        Assert.Equal(spec, KafkaSpec.Parse(k.ToString()).ToString());
    }

    [Theory]
    [InlineData("kafka://host/topic")]
    [InlineData("kafka://host:9092/")]
    [InlineData("kafka://host:9092/bad topic")]
    [InlineData("kafka://host:9092/t?grp=x")]
    [InlineData("http://host:9092/t")]
    public void A_bad_address_is_a_format_error_that_shows_the_form(string spec) =>
        Assert.Contains("kafka://", Assert.Throws<FormatException>(() => KafkaSpec.Parse(spec)).Message);

    [Fact]
    public void Parsing_any_text_succeeds_or_says_what_is_wrong()
    {
        // Good addresses with up to three characters replaced, inserted or deleted: some stay good, most do not.
        string[] good = ["kafka://a:1/t", "kafka://host:9092,b:2/x,y.z?group=g-1", "kafka://127.0.0.1:9092/pairs"];
        var edit = Gen.Select(Gen.Int[0, 2], Gen.Int[0, 100], Gen.Char["kafk:/.,?=&ag0123 \u00e9"]);
        var specs = Gen.Select(Gen.Int[0, good.Length - 1], edit.Array[0, 3], (g, edits) => edits.Aggregate(good[g], (s, e) =>
        {
            var at = e.Item2 % (s.Length + 1);
            return e.Item1 switch
            {
                0 when at < s.Length => s[..at] + e.Item3 + s[(at + 1)..],
                1 => s[..at] + e.Item3 + s[at..],
                _ when at < s.Length => s[..at] + s[(at + 1)..],
                _ => s,
            };
        }));
        int read = 0, refused = 0;
        specs.Sample(spec =>
        {
            try
            {
                if (KafkaSpec.Parse(spec).Topics.Count == 0) return false;
                Interlocked.Increment(ref read);
                return true;
            }
            catch (FormatException e)
            {
                Interlocked.Increment(ref refused);
                return e.Message.Length > 0;
            }
        }, iter: 20_000);
        Assert.True(read > 0 && refused > 0, $"{read} read, {refused} refused");   // the fuzz reached both outcomes
    }

    [Fact]
    public void Embeddings_encode_as_float32_little_endian()
    {
        var vector = new[] { 1f, -0.5f, 3.25e-3f };
        var bytes = EmbeddingSinks.Encode(vector);
        Assert.Equal(new byte[] { 0, 0, 0x80, 0x3F }, bytes[..4]);
        Assert.Equal(vector, EmbeddingSinks.Decode(bytes));
        Assert.Throws<FormatException>(() => EmbeddingSinks.Decode(new byte[5]));
    }
}
