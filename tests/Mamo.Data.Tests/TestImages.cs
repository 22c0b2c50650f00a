using System.Buffers.Binary;
using System.Text;
using SkiaSharp;

namespace Mamo.Data.Tests;

/// <summary>Real encoded images made in-test with SkiaSharp, and hand-made bytes where an encoder is not available.</summary>
internal static class TestImages
{
    public static byte[] Encode(SKBitmap bitmap, SKEncodedImageFormat format, int quality = 100)
    {
        using var data = bitmap.Encode(format, quality);
        return data.ToArray();
    }

    /// <summary>A bitmap filled with one colour, alpha included (unpremultiplied).</summary>
    public static SKBitmap Solid(int width, int height, SKColor colour)
    {
        var bitmap = new SKBitmap(new SKImageInfo(width, height, SKColorType.Rgba8888, SKAlphaType.Unpremul));
        bitmap.Erase(colour);
        return bitmap;
    }

    public static byte[] SolidPng(int width, int height, SKColor colour)
    {
        using var bitmap = Solid(width, height, colour);
        return Encode(bitmap, SKEncodedImageFormat.Png);
    }

    /// <summary>A gradient with a transparent corner: something whose bytes are worth mutating.</summary>
    public static byte[] PatternPng(int size)
    {
        using var bitmap = new SKBitmap(new SKImageInfo(size, size, SKColorType.Rgba8888, SKAlphaType.Unpremul));
        for (var y = 0; y < size; y++)
            for (var x = 0; x < size; x++)
                bitmap.SetPixel(x, y, new SKColor((byte)(x * 255 / size), (byte)(y * 255 / size), 128, (byte)(x < size / 4 ? 0 : 255)));
        return Encode(bitmap, SKEncodedImageFormat.Png);
    }

    /// <summary>GIF89a, 1x1, two-colour global table (red, black), one pixel of index 0: red.</summary>
    public static readonly byte[] RedPixelGif =
    [
        .. "GIF89a"u8, 0x01, 0x00, 0x01, 0x00, 0x80, 0x00, 0x00,
        0xFF, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x2C, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00, 0x01, 0x00, 0x00,
        0x02, 0x02, 0x44, 0x01, 0x00,
        0x3B,
    ];

    /// <summary>
    /// A PNG that claims width x height in a valid IHDR (correct CRC) followed by a tiny IDAT and IEND: a decompression
    /// bomb's header, without the bomb.
    /// </summary>
    public static byte[] PngHeader(int width, int height)
    {
        var output = new MemoryStream();
        output.Write([0x89, (byte)'P', (byte)'N', (byte)'G', 0x0D, 0x0A, 0x1A, 0x0A]);
        var ihdr = new byte[13];
        BinaryPrimitives.WriteInt32BigEndian(ihdr.AsSpan(0), width);
        BinaryPrimitives.WriteInt32BigEndian(ihdr.AsSpan(4), height);
        ihdr[8] = 8;   // bit depth
        ihdr[9] = 6;   // colour type RGBA
        WriteChunk(output, "IHDR", ihdr);
        WriteChunk(output, "IDAT", [0x78, 0x9C, 0x63, 0x00, 0x00, 0x00, 0x01, 0x00, 0x01]);
        WriteChunk(output, "IEND", []);
        return output.ToArray();
    }

    private static void WriteChunk(Stream output, string type, byte[] data)
    {
        Span<byte> word = stackalloc byte[4];
        BinaryPrimitives.WriteInt32BigEndian(word, data.Length);
        output.Write(word);
        var typeAndData = Encoding.ASCII.GetBytes(type).Concat(data).ToArray();
        output.Write(typeAndData);
        BinaryPrimitives.WriteUInt32BigEndian(word, Crc32(typeAndData));
        output.Write(word);
    }

    /// <summary>The CRC-32 PNG uses (ISO-HDLC polynomial, reflected).</summary>
    private static uint Crc32(byte[] bytes)
    {
        var crc = 0xFFFFFFFFu;
        foreach (var b in bytes)
        {
            crc ^= b;
            for (var k = 0; k < 8; k++) crc = (crc & 1) != 0 ? (crc >> 1) ^ 0xEDB88320u : crc >> 1;
        }
        return ~crc;
    }
}
