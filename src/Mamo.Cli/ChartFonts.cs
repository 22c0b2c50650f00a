using ScottPlot;
using SkiaSharp;

namespace Mamo.Cli;

/// <summary>
/// The SkiaSharp native build this project ships (NoDependencies) has no fontconfig, so Skia finds no system font
/// by name and ScottPlot would draw charts without any text. This registers a sans-serif TrueType file by path.
/// </summary>
public static class ChartFonts
{
    const string Name = "mamo-sans";
    static readonly string[] Folders =
    [
        "/usr/share/fonts", "/usr/local/share/fonts",
        Path.Combine(Environment.GetFolderPath(Environment.SpecialFolder.UserProfile), ".local", "share", "fonts"),
        Path.Combine(Environment.GetFolderPath(Environment.SpecialFolder.UserProfile), ".fonts"),
    ];
    // (regular, bold) files of common sans-serif families, the most widespread on Linux first.
    static readonly (string Regular, string Bold)[] Preferred =
    [
        ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf"),
        ("LiberationSans-Regular.ttf", "LiberationSans-Bold.ttf"),
        ("NotoSans-Regular.ttf", "NotoSans-Bold.ttf"),
    ];
    static readonly Lazy<string?> Registered = new(Register);

    /// <summary>Registers the font once and makes it ScottPlot's default; returns its file, or null when there is none (charts then have no text).</summary>
    public static string? Ensure() => Registered.Value;

    static string? Register()
    {
        var files = Folders.Where(Directory.Exists)
            .SelectMany(d => Directory.EnumerateFiles(d, "*.ttf", SearchOption.AllDirectories))
            .ToLookup(Path.GetFileName);
        var (regular, bold) = Preferred
            .Select(p => (files[p.Regular].FirstOrDefault(), files[p.Bold].FirstOrDefault()))
            .FirstOrDefault(p => p.Item1 is not null);
        regular ??= files.SelectMany(f => f).FirstOrDefault();
        if (regular is null) return null;
        Fonts.FontResolvers.Insert(0, new FileResolver(SKTypeface.FromFile(regular), SKTypeface.FromFile(bold ?? regular)));
        Fonts.Default = Name;
        return regular;
    }

    /// <summary>Answers every style of <see cref="Name"/> with the regular or the bold file.</summary>
    sealed class FileResolver(SKTypeface regular, SKTypeface bold) : IFontResolver
    {
        public SKTypeface? CreateTypeface(string fontName, FontWeight weight, FontSlant slant, FontSpacing width) =>
            fontName == Name ? (weight >= FontWeight.Bold ? bold : regular) : null;

        public SKTypeface? CreateTypeface(string fontName, bool isBold, bool isItalic) =>
            CreateTypeface(fontName, isBold ? FontWeight.Bold : FontWeight.Normal, FontSlant.Upright, FontSpacing.Normal);
    }
}
