using System.Text;
using System.Text.Json;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;
using static TorchSharp.torch.nn;
using F = TorchSharp.torch.nn.functional;

namespace Mamo.Model;

/// <summary>Online classification settings (finetune.* keys).</summary>
/// <param name="Labels">a closed label set, in class order; null: open, each new label adds a class</param>
/// <param name="Window">records in the sliding window of the prequential accuracy</param>
/// <param name="Fading">the fading factor of the prequential accuracy (Gama, Sebastião and Rodrigues 2013)</param>
/// <param name="Prompt">the text paired with every image (saved with the checkpoint, so `mamo predict` pairs the same);
/// null: each record's caption</param>
/// <param name="Seed">seeds the hidden layer of the head's MLP</param>
/// <param name="Probe">a frozen linear probe: a linear head, and a backbone that does not train (the baseline)</param>
public sealed record ClassificationConfig(IReadOnlyList<string>? Labels = null, int Window = 1000, double Fading = 0.995, string? Prompt = null, int Seed = 0,
    bool Probe = false);

/// <summary>ALBEF's SNLI-VE head: an MLP on the fused [CLS] (or, for a linear probe, its output layer alone). Its
/// output layer grows a row per new class, so a label first seen on the stream adds a class (class-incremental
/// learning) without touching the others. Every class's row starts at zero, as ViT's fine-tuning head does: a row's
/// start is then the same wherever and whenever its class appears (a resumed run, another replica).</summary>
public sealed class ClassifierHead : Module<Tensor, Tensor>
{
    const double InitStd = 0.02;
    readonly Linear? hidden;
    readonly Parameter weight, bias;   // [C, W], [C]

    /// <param name="seed">the hidden layer draws from its own seed, not from the process's generator</param>
    /// <param name="linear">no hidden layer: a linear probe</param>
    public ClassifierHead(int width, int classes, int seed, bool linear = false) : base(nameof(ClassifierHead))
    {
        weight = Parameter(zeros(classes, width));
        bias = Parameter(zeros(classes));
        if (!linear)
        {
            lock (Seeds.GlobalGenerator) hidden = Linear(width, width);   // its default init, overwritten below
            using var noGrad = no_grad();
            using var g = new Generator((ulong)Seeds.Mix(seed, -1));
            hidden.weight!.copy_(randn(width, width, generator: g) * InitStd);
            hidden.bias!.zero_();
        }
        RegisterComponents();
    }

    public int Classes => (int)weight.shape[0];

    public override Tensor forward(Tensor fusedCls) => F.linear(hidden is null ? fusedCls : F.relu(hidden.forward(fusedCls)), weight, bias);

    /// <summary>Adds zero rows up to <paramref name="classes"/>, in place (the parameters keep their identity, so the
    /// optimiser follows them: AdamW.Apply gives the new rows zero moments). The old rows are unchanged.</summary>
    public void Grow(int classes)
    {
        if (classes <= Classes) return;
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var added = classes - Classes;
        weight.set_(cat(new[] { weight.detach(), zeros(added, weight.shape[1], device: weight.device) }).contiguous());
        bias.set_(cat(new[] { bias.detach(), zeros(added, device: bias.device) }));
        weight.grad = null;   // a gradient of the old shape cannot take the next backward's
        bias.grad = null;
    }

    /// <summary>The parameters with a row per class (the output layer's), by name.</summary>
    public static readonly IReadOnlySet<string> PerClass = new HashSet<string> { "weight", "bias" };
}

/// <summary>Test-then-train scores over a labelled stream (river's progressive validation): each record is predicted
/// before the step that learns from it. Accuracy three ways: cumulative, over the last <c>Window</c> records, and with
/// a fading factor. Its state is plain numbers, saved in the checkpoint, so a resumed run continues the same sums.</summary>
public sealed class Prequential(int window, double fading)
{
    long seen, correct;
    double fadedCorrect, fadedSeen;
    readonly Queue<bool> recent = new();
    int recentCorrect;

    public void Add(bool hit)
    {
        seen++;
        if (hit) correct++;
        fadedCorrect = fading * fadedCorrect + (hit ? 1 : 0);
        fadedSeen = fading * fadedSeen + 1;
        recent.Enqueue(hit);
        if (hit) recentCorrect++;
        if (recent.Count > window && recent.Dequeue()) recentCorrect--;
    }

    public long Seen => seen;
    public double Cumulative => seen == 0 ? 0 : (double)correct / seen;
    public double Windowed => recent.Count == 0 ? 0 : (double)recentCorrect / recent.Count;
    public double Faded => fadedSeen == 0 ? 0 : fadedCorrect / fadedSeen;

    public Dictionary<string, double> Scores() => new()
    {
        ["preq_acc"] = Cumulative, ["preq_acc_window"] = Windowed, ["preq_acc_faded"] = Faded,
    };

    sealed record Saved(long Seen, long Correct, double FadedCorrect, double FadedSeen, string Recent);

    public string Save() => JsonSerializer.Serialize(new Saved(seen, correct, fadedCorrect, fadedSeen, new string(recent.Select(h => h ? '1' : '0').ToArray())));

    public void Load(string json)
    {
        var s = JsonSerializer.Deserialize<Saved>(json) ?? throw new InvalidDataException("empty prequential state");
        (seen, correct, fadedCorrect, fadedSeen) = (s.Seen, s.Correct, s.FadedCorrect, s.FadedSeen);
        recent.Clear();
        foreach (var c in s.Recent.TakeLast(window)) recent.Enqueue(c == '1');
        recentCorrect = recent.Count(h => h);
    }
}

/// <summary>Online fine-tuning for classification: cross-entropy of a head on the fused [CLS] of each image with its
/// text (a fixed prompt by default, chosen before the batch reaches here), training the backbone and the head. The
/// logits of the step's forward pass, made with the weights before its update, are the record's prequential
/// prediction. The label map and the prequential sums are objective state, saved with every checkpoint. On a shard of
/// a global batch (every-step), the labels of the whole batch are admitted first, in its row order, so every replica
/// has the same classes.</summary>
public sealed class OnlineClassification : IObjective
{
    public const string HeadPart = "head";
    public const string LabelsKey = "finetune.labels", PrequentialKey = "finetune.prequential", PromptKey = "finetune.prompt", ProbeKey = "finetune.probe";
    const string AdmittedKey = "finetune.admitted", HitsKey = "finetune.hits";

    readonly ClassifierHead head;
    readonly List<string> labels = [];
    readonly Dictionary<string, int> classOf = [];
    readonly IReadOnlyList<string>? closedSet;
    readonly Prequential prequential;
    readonly string? prompt;
    readonly bool probe;
    /// <summary>Since StartObserving: the labels admitted and each prediction's hit; null: not observing.</summary>
    (List<string> Admitted, StringBuilder Hits)? observed;

    public OnlineClassification(MamoConfig config, ClassificationConfig classification)
    {
        prompt = classification.Prompt;
        probe = classification.Probe;
        closedSet = classification.Labels;
        foreach (var label in closedSet ?? []) AddClass(label);
        head = new ClassifierHead(config.Width, labels.Count, classification.Seed, linear: probe);
        prequential = new Prequential(classification.Window, classification.Fading);
        Parts = new Dictionary<string, Module> { [HeadPart] = head };
    }

    public static Func<MamoConfig, IObjective> With(ClassificationConfig classification) => c => new OnlineClassification(c, classification);

    public double? TeacherMomentum => null;
    public bool NeedsTargets => false;
    public TeacherTargets Targets(MamoModel teacher, StepInput batch) => throw new InvalidOperationException("classification keeps no teacher");
    public IReadOnlyDictionary<string, Module> Parts { get; }
    public IReadOnlyList<string> Labels => labels;
    public ClassifierHead Head => head;
    public Prequential Prequential => prequential;

    public IEnumerable<(string Name, Parameter Parameter)> TrainedParameters(MamoModel student) =>
        (probe ? [] : student.named_parameters()).Concat(head.named_parameters().Select(p => (HeadPart + "." + p.name, p.parameter)));

    /// <summary>The class of a label, adding it to an open set; -1 for a label a closed set does not know.</summary>
    public int Admit(string label) => classOf.TryGetValue(label, out var c) ? c : closedSet is not null ? -1 : AddClass(label);

    int AddClass(string label)
    {
        if (classOf.TryGetValue(label, out var c)) return c;
        classOf[label] = labels.Count;
        labels.Add(label);
        observed?.Admitted.Add(label);
        return labels.Count - 1;
    }

    /// <summary>[B, C] the class logits of each pair.</summary>
    public Tensor Logits(MamoModel model, Tensor images, Tensor tokenIds, Tensor attentionMask)
    {
        using var scope = NewDisposeScope();
        Tensor fused;
        using (probe ? no_grad() : null)   // a probe's backbone is frozen: no graph through it
            fused = model.FusedCls(model.EncodeImage(images), model.EncodeText(tokenIds, attentionMask), attentionMask);
        return head.forward(fused).MoveToOuterDisposeScope();
    }

    /// <summary>The predicted label of each pair, in batches, without gradients.</summary>
    public string[] Predict(MamoModel model, Tensor images, Tensor tokenIds, Tensor attentionMask, int batchSize) =>
        PredictWithProbability(model, images, tokenIds, attentionMask, batchSize).Select(p => p.Label).ToArray();

    /// <summary>The predicted label of each pair and the softmax probability the head gives it.</summary>
    public (string Label, double Probability)[] PredictWithProbability(MamoModel model, Tensor images, Tensor tokenIds, Tensor attentionMask, int batchSize)
    {
        var device = model.Device;
        var predicted = new List<(string, double)>();
        model.eval();
        head.eval();
        using var noGrad = no_grad();
        for (int start = 0; start < images.shape[0]; start += batchSize)
        {
            using var scope = NewDisposeScope();
            var end = (int)Math.Min(images.shape[0], start + batchSize);
            var (probability, best) = F.softmax(Logits(model, images[start..end].to(device), tokenIds[start..end].to(device), attentionMask[start..end].to(device)), 1).max(1);
            var p = probability.cpu().data<float>().ToArray();
            predicted.AddRange(best.cpu().data<long>().ToArray().Select((c, i) => (labels[(int)c], (double)p[i])));
        }
        return predicted.ToArray();
    }

    public MamoLoss Loss(MamoModel student, StepInput batch, TeacherTargets? targets, int seed)
    {
        using var scope = NewDisposeScope();
        var device = student.Device;
        var own = batch.Labels!.Select(l => l ?? throw new ArgumentException("an unlabelled pair reached the classifier")).ToList();
        // A shard admits the global batch's labels in its row order, as one process would: every replica's classes agree.
        var rows = batch.Shard is { } shard ? GatherLabels(shard, own) : own;
        if (rows.Select(Admit).Contains(-1)) throw new ArgumentException("a label outside the closed label set reached the classifier");
        var classes = own.Select(Admit).ToArray();
        head.Grow(labels.Count);
        var logits = Logits(student, batch.Images.to(device), batch.TokenIds.to(device), batch.AttentionMask.to(device));
        var predicted = logits.detach().argmax(1).cpu().data<long>().ToArray();
        for (int i = 0; i < classes.Length; i++) Record(predicted[i] == classes[i]);
        var truth = tensor(classes.Select(c => (long)c).ToArray(), device: device);
        // A shard's share of the global batch's mean: its rows' sum over all the rows.
        var classify = batch.Shard is null ? F.cross_entropy(logits, truth) : F.cross_entropy(logits, truth, reduction: Reduction.Sum) / rows.Count;
        return new MamoLoss
        {
            Total = classify.clone().MoveToOuterDisposeScope(),
            Terms = new Dictionary<string, Tensor> { ["classify"] = classify.MoveToOuterDisposeScope() },
            Scores = prequential.Scores(),
            Predictions = predicted.Select(p => labels[(int)p]).ToArray(),
        };
    }

    void Record(bool hit)
    {
        prequential.Add(hit);
        observed?.Hits.Append(hit ? '1' : '0');
    }

    /// <summary>Every replica's labels of the global batch, in its row order: lengths first, then the UTF-8 bytes padded to
    /// the longest (one all-gather each; bytes travel exactly as float32).</summary>
    static List<string> GatherLabels(IBatchShard shard, IReadOnlyList<string> own)
    {
        using var scope = NewDisposeScope();
        var bytes = own.Select(Encoding.UTF8.GetBytes).ToList();
        var lengths = shard.AllGather([tensor(bytes.Select(b => (float)b.Length).ToArray(), new long[] { own.Count, 1 })])[0].data<float>().ToArray();
        var width = (int)lengths.DefaultIfEmpty(0).Max();
        var padded = new float[own.Count * width];
        for (int i = 0; i < bytes.Count; i++)
            for (int j = 0; j < bytes[i].Length; j++) padded[i * width + j] = bytes[i][j];
        var all = shard.AllGather([tensor(padded, new long[] { own.Count, width })])[0].data<float>().ToArray();
        return lengths.Select((n, i) => Encoding.UTF8.GetString(all.Skip(i * width).Take((int)n).Select(f => (byte)f).ToArray())).ToList();
    }

    public IReadOnlyDictionary<string, double> Scores() => prequential.Scores();

    public IReadOnlyDictionary<string, string> SaveState() => new Dictionary<string, string>
    {
        [LabelsKey] = JsonSerializer.Serialize(labels), [PrequentialKey] = prequential.Save(), [PromptKey] = JsonSerializer.Serialize(prompt),
        [ProbeKey] = probe ? "true" : "false",
    };

    /// <summary>A checkpoint's classifier, to predict with: its label map and head (on <paramref name="device"/>), as it
    /// was trained (prompt, probe or MLP head).</summary>
    public static OnlineClassification Load(string dir, MamoConfig config, Device device)
    {
        var state = Checkpoint.ReadState(dir).Extra;
        var classifier = new OnlineClassification(config, new ClassificationConfig(Prompt: SavedPrompt(state), Probe: state.TryGetValue(ProbeKey, out var p) && p == "true"));
        try
        {
            classifier.LoadState(state);
            Checkpoint.LoadModel(dir, Checkpoint.PartFile(HeadPart), classifier.Head);
            classifier.Head.to(device);
            return classifier;
        }
        catch
        {
            classifier.Dispose();
            throw;
        }
    }

    /// <summary>The prompt a checkpoint's classifier was trained with; null: captions (or not a classifier's checkpoint).</summary>
    public static string? SavedPrompt(IReadOnlyDictionary<string, string> state) =>
        state.TryGetValue(PromptKey, out var p) ? JsonSerializer.Deserialize<string?>(p) : null;

    public void LoadState(IReadOnlyDictionary<string, string> state)
    {
        if (state.TryGetValue(LabelsKey, out var saved))
        {
            var savedLabels = JsonSerializer.Deserialize<List<string>>(saved) ?? [];
            // A closed set must be the saved one, in the same order: its classes are the head's rows.
            if (closedSet is not null && !savedLabels.SequenceEqual(closedSet))
                throw new InvalidDataException($"the checkpoint's labels [{string.Join(", ", savedLabels)}] are not finetune.labels [{string.Join(", ", closedSet)}]");
            labels.Clear();
            classOf.Clear();
            foreach (var label in savedLabels)
            {
                classOf[label] = labels.Count;
                labels.Add(label);
            }
            head.Grow(labels.Count);
        }
        if (state.TryGetValue(PrequentialKey, out var p)) prequential.Load(p);
    }

    public void StartObserving() => observed = ([], new StringBuilder());

    public IReadOnlyDictionary<string, string> Observations() => observed is not var (admitted, hits) ? new Dictionary<string, string>()
        : new Dictionary<string, string> { [AdmittedKey] = JsonSerializer.Serialize(admitted), [HitsKey] = hits.ToString() };

    public void Replay(IReadOnlyDictionary<string, string> observations)
    {
        foreach (var label in Admitted(observations)) Admit(label);
        head.Grow(labels.Count);
        foreach (var hit in observations.GetValueOrDefault(HitsKey, "")) Record(hit == '1');
    }

    /// <summary>A replica's head rows are the classes it started its round with, then the ones it admitted: each moves
    /// to its label's row here.</summary>
    public Tensor Align(string name, Tensor value, IReadOnlyDictionary<string, string> observations)
    {
        if (!name.StartsWith(HeadPart + ".") || !ClassifierHead.PerClass.Contains(name[(HeadPart.Length + 1)..])) return value;
        var admitted = Admitted(observations);
        var started = (int)value.shape[0] - admitted.Count;
        if (started < 0 || started > labels.Count) throw new InvalidDataException($"'{name}' has {value.shape[0]} rows for {admitted.Count} admitted labels");
        using var scope = NewDisposeScope();
        var rows = Enumerable.Range(0, started).Concat(admitted.Select(l => classOf.TryGetValue(l, out var c) ? c
            : throw new InvalidDataException($"label '{l}' was not replayed"))).Select(c => (long)c).ToArray();
        var shape = value.shape.ToArray();
        shape[0] = labels.Count;
        return zeros(shape, value.dtype, value.device).index_copy_(0, tensor(rows, device: value.device), value).MoveToOuterDisposeScope();
    }

    static List<string> Admitted(IReadOnlyDictionary<string, string> observations) =>
        observations.TryGetValue(AdmittedKey, out var a) ? JsonSerializer.Deserialize<List<string>>(a) ?? [] : [];

    public void Dispose() => head.Dispose();
}

/// <summary>Accuracy, macro-F1 and a per-class table of predictions against the truth.</summary>
public sealed record ClassificationReport(double Accuracy, double MacroF1, IReadOnlyDictionary<string, ClassScores> PerClass, int Examples)
{
    public static ClassificationReport Of(IReadOnlyList<string> truth, IReadOnlyList<string> predicted)
    {
        if (truth.Count != predicted.Count) throw new ArgumentException($"{truth.Count} labels but {predicted.Count} predictions");
        var classes = truth.Distinct().OrderBy(c => c, StringComparer.Ordinal).ToList();
        var perClass = new SortedDictionary<string, ClassScores>(StringComparer.Ordinal);
        foreach (var c in classes)
        {
            int tp = 0, fp = 0, fn = 0;
            for (int i = 0; i < truth.Count; i++)
            {
                bool isTrue = truth[i] == c, isPredicted = predicted[i] == c;
                if (isTrue && isPredicted) tp++;
                else if (isPredicted) fp++;
                else if (isTrue) fn++;
            }
            double precision = tp + fp == 0 ? 0 : (double)tp / (tp + fp), recall = tp + fn == 0 ? 0 : (double)tp / (tp + fn);
            var f1 = precision + recall == 0 ? 0 : 2 * precision * recall / (precision + recall);
            perClass[c] = new ClassScores(precision, recall, f1, tp + fn);
        }
        var accuracy = truth.Count == 0 ? 0 : (double)truth.Zip(predicted).Count(p => p.First == p.Second) / truth.Count;
        // Macro-F1 over the classes of the truth, as scikit-learn's with labels = the true classes.
        var macroF1 = perClass.Count == 0 ? 0 : perClass.Values.Average(v => v.F1);
        return new ClassificationReport(accuracy, macroF1, perClass, truth.Count);
    }
}

public sealed record ClassScores(double Precision, double Recall, double F1, int Support);

/// <summary>The zero-shot baseline: each image takes the class whose prompt ("an emoji of the group X") it matches
/// best, by ITC similarity or by ITM's match probability; nothing is trained.</summary>
public static class ZeroShot
{
    /// <param name="promptIds">[C, L] one prompt per class</param>
    /// <returns>each image's class index</returns>
    public static int[] Classify(MamoModel model, Tensor images, Tensor promptIds, Tensor promptMask, bool itm, int batchSize)
    {
        var device = model.Device;
        model.eval();
        using var noGrad = no_grad();
        using var scope = NewDisposeScope();
        var (ids, mask) = (promptIds.to(device), promptMask.to(device));
        var textTokens = model.EncodeText(ids, mask);
        var textEmbedding = model.TextEmbedding(textTokens);
        long classes = ids.shape[0];
        var predicted = new List<int>();
        for (int start = 0; start < images.shape[0]; start += batchSize)
        {
            using var batchScope = NewDisposeScope();
            var end = (int)Math.Min(images.shape[0], start + batchSize);
            var imageTokens = model.EncodeImage(images[start..end].to(device));
            Tensor scores;
            if (!itm) scores = model.ImageEmbedding(imageTokens).matmul(textEmbedding.t());   // [b, C]
            else
            {
                long b = end - start;
                // Every (image, class prompt) pair: images repeated per class, prompts tiled per image.
                var pairImages = imageTokens.repeat_interleave(classes, 0);
                var pairText = textTokens.repeat(b, 1, 1);
                var pairMask = mask.repeat(b, 1);
                scores = model.MatchProbability(pairImages, pairText, pairMask).reshape(b, classes);
            }
            predicted.AddRange(scores.argmax(1).cpu().data<long>().ToArray().Select(c => (int)c));
        }
        return predicted.ToArray();
    }
}
