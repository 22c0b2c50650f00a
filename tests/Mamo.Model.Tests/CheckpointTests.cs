using TorchSharp;
using System.Buffers.Binary;
using CsCheck;
using static TorchSharp.torch;
using Xunit;

using static Mamo.Model.Tests.Pairs;
namespace Mamo.Model.Tests;

public class CheckpointTests : IDisposable
{
    readonly string dir = Path.Combine(Path.GetTempPath(), "mamo-ckpt-" + Guid.NewGuid().ToString("N"));
    public void Dispose() { if (Directory.Exists(dir)) Directory.Delete(dir, recursive: true); }

    [Fact]
    public void Round_trip_reproduces_weights_state_and_the_next_step_exactly()
    {
        using var scope = NewDisposeScope();
        var config = MamoConfig.Tiny;
        var optim = new OptimizerConfig { WarmupSteps = 2 };
        var (images, ids, attn) = Pairs.Make(config, 4, seed: 30);
        using var trainer = new MamoTrainer(config, optim, CPU, seed: 30);
        trainer.TrainStep(images, ids, attn);
        trainer.TrainStep(images, ids, attn);
        trainer.Save(dir, new Dictionary<string, string> { ["source"] = "manifest:a.jsonl@41" });

        using var restored = MamoTrainer.Load(dir, optim, CPU, seed: 30);
        Assert.Equal(2, restored.Step);
        Assert.Equal("manifest:a.jsonl@41", Checkpoint.ReadState(dir).Extra["source"]);
        Assert.Equal(config, restored.Config);
        foreach (var (a, b) in trainer.Student.parameters().Zip(restored.Student.parameters())) Assert.True(Same(a, b));
        foreach (var (a, b) in trainer.Teacher.parameters().Zip(restored.Teacher.parameters())) Assert.True(Same(a, b));

        var next = trainer.TrainStep(images, ids, attn);
        var nextRestored = restored.TrainStep(images, ids, attn);
        Assert.Equal(next.Loss, nextRestored.Loss);
        Assert.Equal(next.Terms, nextRestored.Terms);
        foreach (var (a, b) in trainer.Student.parameters().Zip(restored.Student.parameters())) Assert.True(Same(a, b));
        using var e1 = trainer.Teacher.ImageEmbedding(trainer.Teacher.EncodeImage(images));
        using var e2 = restored.Teacher.ImageEmbedding(restored.Teacher.EncodeImage(images));
        Assert.True(Same(e1, e2));
    }

    [Fact]
    public void Safetensors_files_and_tensors_over_2_gb_load_and_save()
    {
        // A 2 GiB tensor of zeros (a hole in a sparse file) with a small one after it, past the 2 GB mark.
        Directory.CreateDirectory(dir);
        var path = Path.Combine(dir, "big.safetensors");
        const long bigBytes = 1L << 31;
        var header = System.Text.Encoding.UTF8.GetBytes(
            $"{{\"big\":{{\"dtype\":\"F32\",\"shape\":[{bigBytes / 4}],\"data_offsets\":[0,{bigBytes}]}},\"tail\":{{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[{bigBytes},{bigBytes + 16}]}}}}");
        float[] tail = [1f, 2f, 3f, -4f];
        using (var file = new FileStream(path, FileMode.Create))
        {
            var length = new byte[8];
            BinaryPrimitives.WriteInt64LittleEndian(length, header.Length);
            file.Write(length);
            file.Write(header);
            file.Position = 8 + header.Length + bigBytes;
            foreach (var f in tail) file.Write(BitConverter.GetBytes(f));
        }

        var loaded = SafeTensors.Load(path);
        using var big = loaded["big"];
        using var small = loaded["tail"];
        Assert.Equal([bigBytes / 4], big.shape);
        Assert.Equal(0f, big[-1].item<float>());
        Assert.Equal(tail, small.data<float>().ToArray());

        // Saved again: the same layout, the tail at the same place past 2 GB.
        using (no_grad()) big[-1] = 5f;
        var again = Path.Combine(dir, "again.safetensors");
        SafeTensors.Save(again, [("big", big), ("tail", small)]);
        using var read = new FileStream(again, FileMode.Open);
        var prefix = new byte[8];
        read.ReadExactly(prefix);
        var dataStart = 8 + BinaryPrimitives.ReadInt64LittleEndian(prefix);
        Assert.Equal(dataStart + bigBytes + 16, read.Length);
        read.Position = dataStart + bigBytes - 4;
        var end = new byte[20];
        read.ReadExactly(end);
        Assert.Equal([5f, .. tail], Enumerable.Range(0, 5).Select(i => BitConverter.ToSingle(end, 4 * i)));
    }

    [Fact]
    public void Safetensors_layout_is_the_standard_one()
    {
        Directory.CreateDirectory(dir);
        var path = Path.Combine(dir, "t.safetensors");
        using (var a = tensor(new[] { 1f, 2f, 3f, 4f }, new long[] { 2, 2 }))
            SafeTensors.Save(path, new[] { ("a", a) }, new Dictionary<string, string> { ["format"] = "pt" });
        var bytes = File.ReadAllBytes(path);
        long n = BinaryPrimitives.ReadInt64LittleEndian(bytes);
        var header = System.Text.Encoding.UTF8.GetString(bytes, 8, (int)n);
        Assert.Contains("\"a\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0,16]}", header);
        Assert.Equal(0, (8 + n) % 8);
        Assert.Equal(8 + n + 16, bytes.Length);
        Assert.Equal(3f, BitConverter.ToSingle(bytes, (int)(8 + n + 8)));
        var loaded = SafeTensors.Load(path, out var meta);
        Assert.Equal("pt", meta["format"]);
        Assert.Equal(new[] { 1f, 2f, 3f, 4f }, loaded["a"].data<float>().ToArray());
    }

    [Theory]
    [InlineData("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", "overlaps")]
    [InlineData("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,16]}}", "twice")]
    [InlineData("{\"a\":{\"dtype\":\"F32\",\"shape\":[4611686018427387904,4],\"data_offsets\":[0,16]}}", "malformed")]
    [InlineData("{\"a\":{\"dtype\":\"U8X\",\"shape\":[2],\"data_offsets\":[0,2]}}", "unsupported dtype")]
    [InlineData("[1,2,3]", "not a JSON object")]
    public void A_hostile_header_is_refused(string header, string reason)
    {
        Directory.CreateDirectory(dir);
        var path = Path.Combine(dir, "hostile.safetensors");
        var json = System.Text.Encoding.UTF8.GetBytes(header);
        var bytes = new byte[8 + json.Length + 16];
        BinaryPrimitives.WriteInt64LittleEndian(bytes, json.Length);
        json.CopyTo(bytes, 8);
        File.WriteAllBytes(path, bytes);
        var e = Assert.Throws<InvalidDataException>(() => SafeTensors.Load(path));
        Assert.Contains(reason, e.Message);
    }

    [Fact]
    public void A_damaged_safetensors_file_gives_a_clear_error_never_a_crash()
    {
        Directory.CreateDirectory(dir);
        var good = Path.Combine(dir, "good.safetensors");
        using (var a = arange(12, float32).reshape(3, 4))
        using (var b = arange(5, int64))
            SafeTensors.Save(good, new[] { ("a", a), ("b", b) });
        var original = File.ReadAllBytes(good);
        int read = 0, refused = 0;
        // About one file in six is whole, so that damage to the tensor bytes alone is read back.
        Gen.Select(Gen.Int[0, original.Length - 1].Array[1, 8], Gen.Byte.Array[1, 8], Gen.Int[original.Length / 2, original.Length * 6 / 5])
            .Sample((positions, values, cut) =>
            {
                var path = Path.Combine(dir, Guid.NewGuid().ToString("N"));   // CsCheck samples in parallel
                var bytes = (byte[])original.Clone();
                for (int i = 0; i < positions.Length; i++) bytes[positions[i]] = values[i % values.Length];
                File.WriteAllBytes(path, bytes[..Math.Min(cut, bytes.Length)]);
                try
                {
                    foreach (var t in SafeTensors.Load(path).Values) t.Dispose();
                    Interlocked.Increment(ref read);
                }
                catch (InvalidDataException) { Interlocked.Increment(ref refused); }
                finally { File.Delete(path); }
            }, iter: 2000);
        Assert.True(read > 0 && refused > 0, $"{read} read, {refused} refused");   // the fuzz reached both outcomes
    }
}
