using Mamo.Actors.Pipeline;
using Mamo.Actors.Sources;
using Mamo.Data;
using Mamo.Data.Datasets;
using Mamo.Data.Kafka;
using Mamo.Model;
using Serilog;
using TorchSharp;
using static TorchSharp.torch;

namespace Mamo.Actors.Run;

/// <summary>What a run opens before it trains, in either mode, and holds for its whole life while the pipeline's
/// actors come and go: the device, the tokenizer, the training source (where the process trains), the held-out sets
/// (where it evaluates) and the publish set (where it publishes). Opening checks the settings they need, so a bad
/// source, set or sink is a settings error at start.</summary>
public sealed class RunInputs : IDisposable
{
    public required Device Device { get; init; }
    public required TextTokenizer Tokenizer { get; init; }
    public required DecodeLimits Limits { get; init; }
    /// <summary>Null where the process does not train (a cluster node without the trainer role), or until it opens it.</summary>
    public ITrainingSource? Source { get; private set; }
    /// <summary>Dead letters found while the source was read, which the first pipeline reports.</summary>
    public List<BadInput> LoadBad { get; } = [];
    public List<HeldOutSet> HeldOut { get; } = [];
    /// <summary>Empty where the run publishes nothing (or the process does not).</summary>
    public IReadOnlyList<EmbeddingItem> PublishItems { get; private set; } = [];

    /// <summary>Opens what a process of the run needs: the source where it trains, the held-out sets where it
    /// evaluates, the publish set where it publishes.</summary>
    public static RunInputs Open(MamoSettings s, TrainingTask task, bool train = true, bool evaluate = true, bool publish = true)
    {
        if (s.TorchThreads > 0) torch.set_num_threads(s.TorchThreads);
        Action<string> log = m => Log.Information("{Message}", m);
        var limits = new DecodeLimits(s.MaxImageBytes, s.MaxImagePixels);
        var inputs = new RunInputs
        {
            Device = OpenDevice(s.Device),
            Tokenizer = new TextTokenizer(BuiltinDatasets.EnsureVocab(log: log)),
            Limits = limits,
        };
        try
        {
            if (train) inputs.OpenSource(s);
            if (evaluate && task.Evaluates) task.LoadHeldOut(new HeldOutLoader(s, inputs.Tokenizer, limits, log), inputs.HeldOut);
            if (publish && s.PublishOutput is not null) inputs.PublishItems = PreparePublishSet(s, task, inputs.Tokenizer, limits, log);
            return inputs;
        }
        catch
        {
            inputs.Dispose();
            throw;
        }
    }

    /// <summary>The preparer of training records: decode, crop and augment, tokenise.</summary>
    public SamplePreparer TrainingPreparer(MamoSettings s) => new(new ImageTransform(s.TrainImages), Tokenizer, s.Model.MaxTextLength, Limits);

    /// <summary>Opens the training source (a cluster node: once it has joined, so that its Kafka consumer joins the group
    /// only then); what it finds bad while it reads goes to LoadBad.</summary>
    public void OpenSource(MamoSettings s) => Source = OpenSource(s, LoadBad.Add, m => Log.Information("{Message}", m));

    /// <summary>The one source, or the mix of several (MixedSource).</summary>
    static ITrainingSource OpenSource(MamoSettings s, Action<BadInput> onBad, Action<string> log)
    {
        if (s.Sources.Count == 1) return OpenSource(s, s.Sources[0].Spec, onBad, log);
        var parts = new List<(ITrainingSource, double)>();
        try
        {
            foreach (var source in s.Sources) parts.Add((OpenSource(s, source.Spec, onBad, log), source.Weight));
        }
        catch
        {
            foreach (var (opened, _) in parts) opened.Dispose();
            throw;
        }
        var mixed = new MixedSource(parts, s.Seed);
        Log.Information("mixing {Sources}", mixed.Name);
        return mixed;
    }

    /// <summary>kafka://... streams from Kafka; dataset:, manifest: and wds: sources are read into memory.</summary>
    static ITrainingSource OpenSource(MamoSettings s, string source, Action<BadInput> onBad, Action<string> log)
    {
        if (KafkaSpec.IsKafka(source))
        {
            KafkaSpec spec;
            try { spec = KafkaSpec.Parse(source); }
            catch (FormatException e) { throw new SettingsException($"'mamo.source': {e.Message}"); }
            Log.Information("training from Kafka {Source}", spec);
            try
            {
                return new KafkaTrainingSource(spec, s.KafkaConsumer, s.KafkaProducer, s.DeadLetterTopic,
                    SourceLimits.Default with { MaxImageBytes = s.MaxImageBytes });
            }
            catch (ArgumentException e) { throw new SettingsException($"'mamo.kafka': {e.Message}"); }
        }
        var samples = TrainingSamples.Load(source, s.Seed, s.MaxInMemoryBytes, onBad, log, s.FineTune.LabelField);
        Log.Information("training on {Count} samples from {Source}", samples.Count, samples.Name);
        return samples;
    }

    /// <summary>`publish.output`, with clear errors for a bad address or producer setting.</summary>
    public static IEmbeddingSink OpenSink(MamoSettings s)
    {
        try { return EmbeddingSinks.Open(s.PublishOutput!, s.KafkaProducer); }
        catch (FormatException e) { throw new SettingsException($"'mamo.publish.output': {e.Message}"); }
        catch (ArgumentException e) { throw new SettingsException($"'mamo.kafka.producer': {e.Message}"); }
    }

    /// <summary>The set whose embeddings go out after each checkpoint, prepared once, as the task publishes it.</summary>
    static List<EmbeddingItem> PreparePublishSet(MamoSettings s, TrainingTask task, TextTokenizer tokenizer, DecodeLimits limits, Action<string> log)
    {
        var preparer = SamplePreparer.ForEvaluation(s.Model.ImageSize, s.Model.MaxTextLength, tokenizer, limits);
        var (samples, bad) = ManifestSource.ReadAll(TrainingSamples.EvalManifest(s.PublishInput, log));
        var items = EmbeddingItem.PrepareAll(samples, preparer, bad).Select(i => task.ForPublishing(i, tokenizer, s.Model.MaxTextLength)).ToList();
        foreach (var b in bad) Log.Warning("publish set: skipped {Location}: {Reason}", b.Location, b.Reason);
        if (items.Count == 0) throw new SettingsException($"'mamo.publish.input' {s.PublishInput} has no usable item");
        Log.Information("publishing embeddings of {Count} items ({Modality}) to {Output} after each checkpoint", items.Count, s.PublishModality, s.PublishOutput);
        return items;
    }

    /// <summary>cpu, cuda or cuda:N, with a clear error where CUDA is absent.</summary>
    public static Device OpenDevice(string name)
    {
        if (name.StartsWith("cuda") && !torch.cuda.is_available())
            throw new SettingsException($"device '{name}' asked for, but CUDA is not available: " +
                (TorchBackend.IsCuda ? "this build uses TorchSharp-cuda-linux, but no CUDA device or driver was found" : "this build uses libtorch-cpu; build with `dotnet build -p:TorchBackend=cuda` (TorchSharp-cuda-linux) on a machine with CUDA"));
        try { return torch.device(name); }
        catch (Exception e) { throw new SettingsException($"bad device '{name}': {e.Message}"); }
    }

    public void Dispose()
    {
        Source?.Dispose();
        foreach (var set in HeldOut) set.Dispose();
    }
}
