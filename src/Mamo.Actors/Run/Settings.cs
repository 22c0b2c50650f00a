using Akka.Configuration;
using Akka.Configuration.Hocon;
using Mamo.Actors.Sources;
using Mamo.Data;
using Mamo.Model;

namespace Mamo.Actors.Run;

/// <summary>mamo.cluster: how the replicas of a cluster run synchronise (docs/CLUSTER.md).</summary>
/// <param name="StartReplicas">the replicas a fresh run's first round waits for (at least MinReplicas)</param>
public sealed record ClusterSettings(string Sync, int InnerSteps, OuterOptimizerConfig OuterOptimizer, int MinReplicas, int StartReplicas,
    TimeSpan RoundTimeout, string DeltaDType, int ChunkSize, int Window, string DataPlane, int DataPlanePort, ClusterTls? Tls = null, int HashEverySteps = 0)
{
    public const string DiLoCo = "diloco", EveryStep = "every-step";
    public const string Stream = "stream", Remoting = "remoting";
}

/// <summary>mamo.cluster.tls: remoting over TLS with mutual authentication. Certificate: this node's PKCS#12 file (its
/// key inside); Ca: the certificate of the authority that signed every node's, the only one a peer may chain to.</summary>
public sealed record ClusterTls(string Certificate, string Password, string Ca)
{
    /// <summary>Where the password comes from when the settings leave it empty: a file or a command line need not hold it.</summary>
    public const string PasswordVariable = "MAMO_TLS_PASSWORD";
}

/// <summary>mamo.replay: experience replay (Pipeline/ReplayBuffer, docs/LEARNING.md). Fraction 0: off.</summary>
/// <param name="Fraction">the share of each batch drawn from the reservoir</param>
/// <param name="Capacity">the most records the reservoir holds</param>
/// <param name="MaxBytes">the most bytes of encoded images it holds</param>
public sealed record ReplaySettings(double Fraction, int Capacity, long MaxBytes)
{
    public bool On => Fraction > 0;
}

/// <summary>mamo.finetune: what `mamo finetune` trains (docs/FINETUNE.md). Task "" is pre-training.</summary>
/// <param name="Prompt">classify's text for every image; null: each record's own caption</param>
/// <param name="Labels">a closed label set; null: open</param>
public sealed record FineTuneSettings(string Task, string LabelField, string? Prompt, IReadOnlyList<string>? Labels, int Window, double Fading,
    IReadOnlyList<string> ForgettingSets, double DistillAlpha, bool Probe)
{
    public const string Classify = "classify", Retrieval = "retrieval";
    public bool IsFineTuning => Task.Length > 0;
}

/// <summary>A configuration key or value that cannot be used; the message names the key.</summary>
public sealed class SettingsException(string message, string? key = null) : Exception(message)
{
    /// <summary>The full key the error is about ("mamo.batch-size"), where it is about one: its origin is then named.</summary>
    public string? Key { get; } = key;
}

/// <summary>The run's settings: hocon/mamo.conf defaults, then --config FILE, then each --set key=value.
/// A key that the defaults do not define is an error, and so is a value of the wrong type or range.</summary>
public sealed record MamoSettings
{
    public required Config Config { get; init; }
    public required string Preset { get; init; }
    public required string Device { get; init; }
    public required int Seed { get; init; }
    public required string RunDir { get; init; }
    /// <summary>The source as given (sources mixed: each, joined by " + ").</summary>
    public required string Source { get; init; }
    /// <summary>The sources to train from, with their weights: one, or several that a MixedSource mixes.</summary>
    public required IReadOnlyList<WeightedSource> Sources { get; init; }
    public required long MaxSteps { get; init; }
    public required TimeSpan TimeBudget { get; init; }
    public required int BatchSize { get; init; }
    public required int TorchThreads { get; init; }
    public required bool Ledger { get; init; }
    /// <summary>The architecture (the preset, and how its weights start).</summary>
    public required MamoConfig Model { get; init; }
    /// <summary>MAMO's objective: masking, momentum, MRM's layers and the loss weights (model.* and loss-weights.* keys).</summary>
    public required PretrainingConfig Pretraining { get; init; }
    public required OptimizerConfig Optimizer { get; init; }
    public required int PreprocessParallelism { get; init; }
    public required int BufferedBatches { get; init; }
    public required long MaxImageBytes { get; init; }
    public required long MaxImagePixels { get; init; }
    /// <summary>Crop, flip and RandAugment of training images (data.*), at the model's image size.</summary>
    public required ImageTransformOptions TrainImages { get; init; }
    public required long MaxInMemoryBytes { get; init; }
    public required bool TeacherPipelined { get; init; }
    public required int EvalEverySteps { get; init; }
    public required IReadOnlyList<string> EvalSets { get; init; }
    public required int EvalK { get; init; }
    public required int EvalBatchSize { get; init; }
    public required int CheckpointEverySteps { get; init; }
    public required TimeSpan CheckpointEvery { get; init; }
    public required int KeepLast { get; init; }
    public required TimeSpan CheckpointWriteTimeout { get; init; }
    public required int MaxNonFiniteSteps { get; init; }
    public required int MaxRestarts { get; init; }
    public required TimeSpan MinBackoff { get; init; }
    public required TimeSpan MaxBackoff { get; init; }
    /// <summary>supervision.fail-at-step: the step at which the trainer throws once per process; null: never.</summary>
    public required long? FailAtStep { get; init; }
    public required int MetricsEverySteps { get; init; }
    /// <summary>How often process, Kafka and state lines go to metrics.jsonl (the dashboard's view between steps).</summary>
    public required TimeSpan MetricsSampleEvery { get; init; }
    /// <summary>librdkafka properties passed as they are (SASL, TLS, timeouts).</summary>
    public required IReadOnlyDictionary<string, string> KafkaConsumer { get; init; }
    public required IReadOnlyDictionary<string, string> KafkaProducer { get; init; }
    /// <summary>Null: each record's topic + ".dlq".</summary>
    public required string? DeadLetterTopic { get; init; }
    /// <summary>Null: no embeddings published.</summary>
    public required string? PublishOutput { get; init; }
    public required string PublishInput { get; init; }
    public required string PublishModality { get; init; }
    public required int PublishBatchSize { get; init; }
    public required ClusterSettings Cluster { get; init; }
    public required FineTuneSettings FineTune { get; init; }
    public required ReplaySettings Replay { get; init; }

    /// <summary>The held-out and publish defaults are the built-in emoji sets: a run on any other source evaluates and
    /// publishes only what the user names, or a run on a Kafka topic would be judged, and publish, on emoji.</summary>
    static MamoSettings WithoutDemoDefaults(MamoSettings s, Config user)
    {
        if (s.Sources.All(x => x.Spec.StartsWith("dataset:", StringComparison.Ordinal))) return s;
        if (s.PublishOutput is not null && !user.HasPath("mamo.publish.input"))
            throw new SettingsException($"'mamo.publish.output' is set and 'mamo.publish.input' is not: name the items to embed (manifest:PATH or dataset:NAME); " +
                                        $"the default, {s.PublishInput}, is demo data", "mamo.publish.output");
        return s with
        {
            EvalSets = user.HasPath("mamo.eval.sets") ? s.EvalSets : [],
            FineTune = s.FineTune with { ForgettingSets = user.HasPath("mamo.finetune.forgetting-sets") ? s.FineTune.ForgettingSets : [] },
        };
    }

    /// <summary>Where a key's value came from: "--set KEY=VALUE", "FILE:LINE", "run folder, RECORD:LINE", "default (LAYER)" or "default".</summary>
    public Func<string, string> Origin { get; init; } = _ => "default";

    public static Config Defaults() => Embedded("mamo.conf");

    static Config Embedded(string name)
    {
        using var stream = typeof(MamoSettings).Assembly.GetManifestResourceStream(name)
            ?? throw new InvalidOperationException($"{name} is not embedded");
        using var reader = new StreamReader(stream);
        return ConfigurationFactory.ParseString(reader.ReadToEnd());
    }

    /// <summary>Layers the user's configuration over the defaults and checks every key and value.</summary>
    /// <param name="layers">embedded files (finetune.conf) between the defaults and the user's settings, the first on top</param>
    public static MamoSettings Load(string? configFile = null, IEnumerable<string>? sets = null, IEnumerable<string>? layers = null)
    {
        var defaults = Defaults();
        var taskLayers = (layers ?? []).Select(l => (Name: l, Config: Embedded(l))).ToList();
        foreach (var layer in Enumerable.Reverse(taskLayers)) defaults = layer.Config.WithFallback(defaults);
        var user = ConfigurationFactory.Empty;
        HoconSource? file = null;
        if (configFile is not null)
        {
            if (!File.Exists(configFile)) throw new SettingsException($"config file not found: {configFile}");
            (user, file) = HoconSource.Parse(File.ReadAllText(configFile), configFile);
        }
        var setOf = new Dictionary<string, string>();   // each key a --set gave, and that --set
        foreach (var set in sets ?? [])
        {
            var eq = set.IndexOf('=');
            if (eq <= 0) throw new SettingsException($"--set expects key=value, got '{set}'");
            var key = set[..eq].Trim();
            if (!key.StartsWith("mamo.")) key = "mamo." + key;
            var value = set[(eq + 1)..].Trim();
            Config parsed;
            try { parsed = HoconSource.Parse($"{key} = {value}", $"--set {set}").Config; }
            catch (SettingsException) when (value.Length > 0 && value[0] is not ('"' or '{' or '['))
            {
                // A bare URL or path (kafka://host:9092/t, jsonl:/x) is not valid HOCON: take it as the string it is.
                parsed = HoconSource.Parse($"{key} = \"{value.Replace("\\", "\\\\").Replace("\"", "\\\"")}\"", $"--set {set}").Config;
            }
            user = parsed.WithFallback(user);
            setOf[key] = set;
        }
        // Where each key's value came from: the --set that gave it, its line in the file, the run folder's record, a
        // task's layer, or the defaults.
        string? SetBy(string key) => setOf.Where(s => key == s.Key || key.StartsWith(s.Key + ".")).Select(s => $"--set {s.Value}").LastOrDefault();
        var (recorded, record) = Recorded(user.WithFallback(defaults), defaults);
        string Origin(string key) =>
            SetBy(key)
            ?? (file is not null && user.HasPath(key) ? file.Where(key) : null)
            ?? (record is not null && recorded.HasPath(key) ? $"run folder, {record.Where(key)}" : null)
            ?? taskLayers.Where(l => l.Config.HasPath(key)).Select(l => $"default ({l.Name})").FirstOrDefault()
            ?? "default";
        try
        {
            CheckKeys(user.Root, defaults.Root, "");
            var given = user.WithFallback(recorded);
            return WithoutDemoDefaults(FromConfig(given.WithFallback(defaults)) with { Origin = Origin }, given);
        }
        catch (SettingsException e) when (e.Key is { } key && (SetBy(key) ?? file?.Where(key)) is { } origin)
        {
            // A bad key or value is the user's: from a --set, or else from the file (the defaults are valid).
            throw new SettingsException($"{origin}: {e.Message}", key);
        }
    }

    static readonly HashSet<string> PassThrough = ["mamo.kafka.consumer", "mamo.kafka.producer"];

    /// <summary>What the run folder recorded (RunConfig.File), as the layer under the user's settings: a resume goes on
    /// with the values the run ran with, and changes only what the user names again (RunConfig logs each change). Empty
    /// for a new run (no complete checkpoint). Leaves out what cannot be taken back: a secret recorded as redacted (the
    /// user's file or the defaults give it) and a key that is no longer a setting.</summary>
    static (Config Layer, HoconSource? Source) Recorded(Config resolved, Config defaults)
    {
        var runDir = resolved.GetString("mamo.run-dir");
        var path = Path.Combine(runDir, RunConfig.File);
        if (string.IsNullOrWhiteSpace(runDir) || !File.Exists(path) || !Checkpoint.Complete(runDir).Any()) return (ConfigurationFactory.Empty, null);
        bool Kept(string line)
        {
            if (line.StartsWith('#') || line.Split(" = ", 2) is not [var key, var value]) return false;
            if (value == $"\"{RunConfig.Redacted}\"") return false;
            return PassThrough.Any(p => key.StartsWith(p + ".", StringComparison.Ordinal)) || defaults.HasPath(key);
        }
        // Lines left out become blank, so that each origin names the line of the file as it is.
        var text = string.Join('\n', File.ReadLines(path).Select(l => Kept(l) ? l : ""));
        try { return HoconSource.Parse(text, path); }
        catch (SettingsException e) { throw new SettingsException($"the run folder's record cannot be read ({e.Message}); fix or delete it to resume with the settings given"); }
    }

    /// <summary>A pass-through block as flat librdkafka properties: `sasl.mechanism = PLAIN` and
    /// `"sasl.mechanism" = PLAIN` both give "sasl.mechanism".</summary>
    static Dictionary<string, string> Flatten(Config c, string path)
    {
        var flat = new Dictionary<string, string>();
        void Walk(HoconValue value, string prefix)
        {
            if (value.IsObject())
                foreach (var (k, v) in value.GetObject().Items) Walk(v, prefix.Length == 0 ? k : prefix + "." + k);
            else if (value.IsString() || !value.IsArray()) flat[prefix] = value.GetString();
            else throw new SettingsException($"'{path}.{prefix}' must be a single value");
        }
        if (c.HasPath(path)) Walk(c.GetValue(path), "");
        return flat;
    }

    static void CheckKeys(HoconValue user, HoconValue defaults, string path)
    {
        if (!user.IsObject()) return;
        var known = defaults.IsObject() ? defaults.GetObject().Items : new Dictionary<string, HoconValue>();
        foreach (var (key, value) in user.GetObject().Items)
        {
            var full = path.Length == 0 ? key : path + "." + key;
            if (path.Length == 0 && key == "akka") continue;   // Akka's own settings pass through
            if (PassThrough.Contains(full)) continue;           // librdkafka's properties, checked by librdkafka
            if (!known.TryGetValue(key, out var def))
                throw new SettingsException($"unknown configuration key '{full}'", full);
            if (value.IsObject() != def.IsObject())
                throw new SettingsException($"'{full}' must be {(def.IsObject() ? "an object" : "a value")}", full);
            CheckKeys(value, def, full);
        }
    }

    static MamoSettings FromConfig(Config c)
    {
        T Get<T>(string key, Func<string, T> read, Func<T, bool>? valid = null, string? rule = null)
        {
            T value;
            try { value = read("mamo." + key); }
            catch (Exception e) when (e is not SettingsException)
            {
                throw new SettingsException($"'mamo.{key}' has a bad value '{c.GetString("mamo." + key)}': {e.Message}", "mamo." + key);
            }
            if (valid is not null && !valid(value)) throw new SettingsException($"'mamo.{key}' = {value}: {rule}", "mamo." + key);
            return value;
        }
        int Int(string key, int min) => Get(key, k => c.GetInt(k), v => v >= min, $"must be >= {min}");
        long Long(string key, long min) => Get(key, k => c.GetLong(k), v => v >= min, $"must be >= {min}");
        double Ratio(string key) => Get(key, k => c.GetDouble(k), v => v is >= 0 and < 1, "must lie in [0, 1)");
        double NonNegative(string key) => Get(key, k => c.GetDouble(k), v => v >= 0 && double.IsFinite(v), "must be a finite number >= 0");
        bool Bool(string key) => Get(key, k => c.GetBoolean(k));
        TimeSpan Duration(string key) => Get(key, k => c.GetTimeSpan(k), v => v >= TimeSpan.Zero, "must not be negative");
        long Bytes(string key) => Get(key, k => c.GetByteSize(k) ?? throw new FormatException("not a size"), v => v > 0, "must be positive");
        string Str(string key) => Get(key, k => c.GetString(k), v => !string.IsNullOrWhiteSpace(v), "must not be empty");
        // One source, or a list of them to mix, each SPEC?weight=W.
        static IReadOnlyList<WeightedSource> WeightedSources(Config c)
        {
            const string key = "mamo.source";
            List<string?> specs;
            try { specs = c.GetValue(key) is { } v && v.IsArray() ? [.. c.GetStringList(key)] : [c.GetString(key)]; }
            catch (Exception e) { throw new SettingsException($"'{key}' has a bad value: {e.Message}", key); }
            if (specs.Count == 0 || specs.Any(string.IsNullOrWhiteSpace)) throw new SettingsException($"'{key}' must name a source, or a list of them", key);
            try { return specs.Select(x => WeightedSource.Parse(x!)).ToList(); }
            catch (FormatException e) { throw new SettingsException($"'{key}': {e.Message}", key); }
        }
        static ClusterTls? Tls(Config c)
        {
            var certificate = c.GetString("mamo.cluster.tls.certificate");
            var ca = c.GetString("mamo.cluster.tls.ca");
            if (string.IsNullOrEmpty(certificate))
                return string.IsNullOrEmpty(ca) ? null : throw new SettingsException("'mamo.cluster.tls.ca' is set but 'mamo.cluster.tls.certificate' is not");
            if (!File.Exists(certificate)) throw new SettingsException($"'mamo.cluster.tls.certificate': no file {certificate}");
            if (string.IsNullOrEmpty(ca)) throw new SettingsException("'mamo.cluster.tls.ca' must name the CA certificate the nodes' certificates chain to");
            if (!File.Exists(ca)) throw new SettingsException($"'mamo.cluster.tls.ca': no file {ca}");
            var password = c.GetString("mamo.cluster.tls.password") is { Length: > 0 } p ? p : Environment.GetEnvironmentVariable(ClusterTls.PasswordVariable) ?? "";
            return new ClusterTls(certificate, password, ca);
        }

        var preset = Get("preset", k => c.GetString(k), v => MamoConfig.PresetNames.Contains(v), $"must be {string.Join(", ", MamoConfig.PresetNames)}");
        var weights = new LossWeights(NonNegative("loss-weights.itc"), NonNegative("loss-weights.itm"), NonNegative("loss-weights.mlm"),
            NonNegative("loss-weights.mim"), NonNegative("loss-weights.mrm"));
        var model = MamoConfig.Preset(preset) with
        {
            WeightInit = Get("model.weight-init", k => c.GetString(k), v => v is WeightInit.Bert or WeightInit.Torch, $"must be {WeightInit.Bert} or {WeightInit.Torch}"),
            TextLayout = Get("model.text-layout", k => c.GetString(k), v => v is "preset" or TextLayouts.PreLn or TextLayouts.Bert,
                $"must be {TextLayouts.PreLn}, {TextLayouts.Bert} or preset") is not "preset" and var layout ? layout : MamoConfig.Preset(preset).TextLayout,
        };
        var pretraining = new PretrainingConfig
        {
            ImageMaskRatio = Ratio("model.image-mask-ratio"),
            TextMaskRatio = Ratio("model.text-mask-ratio"),
            MomentumDecay = Get("model.momentum-decay", k => c.GetDouble(k), v => v is >= 0 and <= 1, "must lie in [0, 1]"),
            MrmTopK = Int("model.mrm-top-k", 1),
            AlignOnVisiblePatches = Bool("model.align-on-visible-patches"),
            ItmNegativeGroup = Int("model.itm-negative-group", 0),
            Weights = weights,
        };
        try
        {
            model.Validate();
            pretraining.Validate(model);
        }
        catch (ArgumentException e) { throw new SettingsException($"model settings: {e.Message}"); }

        var optimizer = new OptimizerConfig
        {
            LearningRate = NonNegative("optimizer.learning-rate"),
            MinLearningRate = NonNegative("optimizer.min-learning-rate"),
            WarmupSteps = Int("optimizer.warmup-steps", 1),
            Schedule = Get("optimizer.schedule", k => c.GetString(k), v => OptimizerConfig.Schedules.Contains(v), $"must be {string.Join(", ", OptimizerConfig.Schedules)}"),
            DecaySteps = Int("optimizer.decay-steps", 1),
            CooldownSteps = Int("optimizer.cooldown-steps", 0),
            TotalSteps = Long("max-steps", 0),
            RewarmAt = Get("optimizer.rewarm-at", k => c.GetLongList(k).ToList(), v => v.All(x => x > 0), "must list steps > 0"),
            WeightDecay = NonNegative("optimizer.weight-decay"),
            Beta1 = Ratio("optimizer.beta1"),
            Beta2 = Ratio("optimizer.beta2"),
            Epsilon = Get("optimizer.epsilon", k => c.GetDouble(k), v => v > 0, "must be positive"),
            ClipNorm = NonNegative("optimizer.clip-norm"),
        };
        if (optimizer.Schedule == OptimizerConfig.WarmupStableDecay && optimizer.TotalSteps > 0 && optimizer.CooldownSteps > optimizer.TotalSteps)
            throw new SettingsException($"'mamo.optimizer.cooldown-steps' ({optimizer.CooldownSteps}) must not exceed max-steps ({optimizer.TotalSteps})");
        if (optimizer.MinLearningRate > optimizer.LearningRate)
            throw new SettingsException($"'mamo.optimizer.min-learning-rate' ({optimizer.MinLearningRate}) must not exceed 'mamo.optimizer.learning-rate' ({optimizer.LearningRate})");
        var cropMin = Get("data.crop-min-scale", k => c.GetDouble(k), v => v is > 0 and <= 1, "must lie in (0, 1]");
        var cropMax = Get("data.crop-max-scale", k => c.GetDouble(k), v => v >= cropMin && v <= 1, "must lie in [crop-min-scale, 1]");

        var sources = WeightedSources(c);

        var minReplicas = Int("cluster.min-replicas", 1);
        var minBackoff = Duration("supervision.min-backoff");
        var maxBackoff = Get("supervision.max-backoff", k => c.GetTimeSpan(k), v => v >= minBackoff, "must be >= supervision.min-backoff");

        return new MamoSettings
        {
            Config = c,
            Preset = preset,
            Device = Str("device"),
            Seed = Get("seed", k => c.GetInt(k)),
            RunDir = Str("run-dir"),
            Source = string.Join(" + ", sources),
            Sources = sources,
            MaxSteps = Long("max-steps", 0),
            TimeBudget = Duration("time-budget"),
            BatchSize = Get("batch-size", k => c.GetInt(k), v => v >= 2, "must be >= 2 (ITC and ITM need in-batch negatives)"),
            TorchThreads = Int("torch-threads", 0),
            Ledger = Bool("ledger"),
            Model = model,
            Pretraining = pretraining,
            Optimizer = optimizer,
            PreprocessParallelism = Int("data.preprocess-parallelism", 1),
            BufferedBatches = Int("data.buffered-batches", 1),
            MaxImageBytes = Bytes("data.max-image-bytes"),
            MaxImagePixels = Long("data.max-image-pixels", 1),
            TrainImages = new ImageTransformOptions(
                ImageSize: model.ImageSize,
                MinCropScale: cropMin,
                MaxCropScale: cropMax,
                HorizontalFlip: Bool("data.horizontal-flip"),
                AugmentOps: Int("data.random-augment.ops", 0),
                AugmentMagnitude: Get("data.random-augment.magnitude", k => c.GetInt(k), v => v is >= 0 and <= RandAugment.MaxMagnitude,
                    $"must lie in [0, {RandAugment.MaxMagnitude}]")),
            MaxInMemoryBytes = Bytes("data.max-in-memory-bytes"),
            TeacherPipelined = Bool("teacher.pipelined"),
            EvalEverySteps = Int("eval.every-steps", 0),
            EvalSets = Get("eval.sets", k => c.GetStringList(k).ToList()),
            EvalK = Int("eval.k", 0),
            EvalBatchSize = Int("eval.batch-size", 1),
            CheckpointEverySteps = Int("checkpoint.every-steps", 0),
            CheckpointEvery = Duration("checkpoint.every"),
            KeepLast = Int("checkpoint.keep-last", 1),
            CheckpointWriteTimeout = Get("checkpoint.write-timeout", k => c.GetTimeSpan(k), v => v > TimeSpan.Zero, "must be positive"),
            MaxNonFiniteSteps = Int("supervision.max-nonfinite-steps", 1),
            MaxRestarts = Int("supervision.max-restarts", 0),
            MinBackoff = minBackoff,
            MaxBackoff = maxBackoff,
            FailAtStep = Long("supervision.fail-at-step", 0) is > 0 and var fail ? fail : null,
            MetricsEverySteps = Int("metrics.every-steps", 1),
            MetricsSampleEvery = Get("metrics.sample-every", k => c.GetTimeSpan(k), v => v > TimeSpan.Zero, "must be positive"),
            KafkaConsumer = Flatten(c, "mamo.kafka.consumer"),
            KafkaProducer = Flatten(c, "mamo.kafka.producer"),
            DeadLetterTopic = c.GetString("mamo.kafka.dead-letter-topic") is { Length: > 0 } dlq ? dlq : null,
            PublishOutput = Get("publish.output", k => c.GetString(k), v => v.Length == 0 || Mamo.Data.Kafka.KafkaSpec.IsKafka(v) || v.StartsWith("jsonl:"),
                "must be kafka://HOST:PORT/TOPIC, jsonl:PATH or empty") is { Length: > 0 } output ? output : null,
            PublishInput = Str("publish.input"),
            PublishModality = Get("publish.modality", k => c.GetString(k), v => v is "image" or "text" or "both", "must be image, text or both"),
            PublishBatchSize = Int("publish.batch-size", 1),
            FineTune = new FineTuneSettings(
                Get("finetune.task", k => c.GetString(k), v => v is "" or FineTuneSettings.Classify or FineTuneSettings.Retrieval, "must be classify or retrieval"),
                Str("finetune.label-field"),
                Get("finetune.text", k => c.GetString(k), v => v is "prompt" or "caption", "must be prompt or caption") == "prompt" ? Str("finetune.prompt") : null,
                Get("finetune.labels", k => c.GetStringList(k).ToList(), v => v.Distinct().Count() == v.Count, "must not repeat a label") is { Count: > 0 } closed ? closed : null,
                Int("finetune.window", 1),
                Get("finetune.fading", k => c.GetDouble(k), v => v is > 0 and <= 1, "must lie in (0, 1]"),
                Get("finetune.forgetting-sets", k => c.GetStringList(k).ToList()),
                Get("finetune.distill-alpha", k => c.GetDouble(k), v => v is >= 0 and < 1, "must lie in [0, 1)"),
                Bool("finetune.probe")),
            Replay = new ReplaySettings(Get("replay.fraction", k => c.GetDouble(k), v => v is >= 0 and < 1, "must lie in [0, 1)"),
                Int("replay.capacity", 1),
                Get("replay.max-bytes", k => c.GetByteSize(k) ?? throw new FormatException("not a size"), v => v is > 0 and <= 1L << 30, "must lie in (0, 1 GiB]")),
            Cluster = new ClusterSettings(
                Get("cluster.sync", k => c.GetString(k), v => v is ClusterSettings.DiLoCo or ClusterSettings.EveryStep, $"must be {ClusterSettings.DiLoCo} or {ClusterSettings.EveryStep}"),
                Int("cluster.inner-steps", 1),
                new OuterOptimizerConfig(NonNegative("cluster.outer-optimizer.learning-rate"), Ratio("cluster.outer-optimizer.momentum"),
                    Bool("cluster.outer-optimizer.nesterov")),
                minReplicas,
                Math.Max(Int("cluster.start-replicas", 0), minReplicas),
                Get("cluster.round-timeout", k => c.GetTimeSpan(k), v => v > TimeSpan.Zero, "must be positive"),
                Get("cluster.delta-dtype", k => c.GetString(k), v => Mamo.Actors.Cluster.WeightTransfer.DTypes.ContainsKey(v), "must be float32, bfloat16 or float16"),
                (int)Get("cluster.chunk-size", k => c.GetByteSize(k) ?? throw new FormatException("not a size"), v => v is >= 1024 and <= 384 * 1024,
                    "must lie in [1 KiB, 384 KiB]: one chunk and its framing fit hocon/cluster.conf's 512 KiB frame"),
                Int("cluster.window", 1),
                Get("cluster.data-plane", k => c.GetString(k), v => v is ClusterSettings.Stream or ClusterSettings.Remoting, $"must be {ClusterSettings.Stream} or {ClusterSettings.Remoting}"),
                Get("cluster.data-plane-port", k => c.GetInt(k), v => v is >= 0 and <= 65535, "must lie in [0, 65535] (0: any free port)"),
                Tls(c),
                Get("cluster.hash-every-steps", k => c.GetInt(k), v => v >= 0, "must be 0 (never) or more")),
        };
    }
}
