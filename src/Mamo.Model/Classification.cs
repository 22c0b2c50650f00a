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
/// <param name="Seed">seeds the head's weights, each class's row apart, so a resumed run grows the rows an
/// uninterrupted one would</param>
/// <param name="Probe">a frozen linear probe: a linear head, and a backbone that does not train (the baseline)</param>
public sealed record ClassificationConfig(IReadOnlyList<string>? Labels = null, int Window = 1000, double Fading = 0.995, string? Prompt = null, int Seed = 0,
    bool Probe = false);

/// <summary>ALBEF's SNLI-VE head: an MLP on the fused [CLS] (or, for a linear probe, its output layer alone). Its
/// output layer grows a row per new class, so a label first seen on the stream adds a class (class-incremental
/// learning) without touching the others.</summary>
public sealed class ClassifierHead : Module<Tensor, Tensor>
{
    const double InitStd = 0.02;
    readonly Linear? hidden;
    readonly Parameter weight, bias;   // [C, W], [C]
    readonly int seed;

    /// <param name="seed">the hidden layer and each class's row draw from their own seed (Seeds.Mix(seed, class)), not
    /// from the process's generator</param>
    /// <param name="linear">no hidden layer: a linear probe</param>
    public ClassifierHead(int width, int classes, int seed, bool linear = false) : base(nameof(ClassifierHead))
    {
        this.seed = seed;
        weight = Parameter(Rows(0, classes, width));
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

    /// <summary>[count, W] the initial rows of classes first..first+count, each from its class's seed.</summary>
    Tensor Rows(int first, int count, int width)
    {
        using var scope = NewDisposeScope();
        var rows = Enumerable.Range(first, count).Select(c =>
        {
            using var g = new Generator((ulong)Seeds.Mix(seed, c));
            return randn(1, width, generator: g) * InitStd;
        }).ToArray();
        return (count == 0 ? empty(0, width) : cat(rows)).MoveToOuterDisposeScope();
    }

    public int Classes => (int)weight.shape[0];

    public override Tensor forward(Tensor fusedCls) => F.linear(hidden is null ? fusedCls : F.relu(hidden.forward(fusedCls)), weight, bias);

    /// <summary>Adds output rows up to <paramref name="classes"/>, in place (the parameters keep their identity, so the
    /// optimiser follows them: AdamW.Apply gives the new rows zero moments). The old rows are unchanged.</summary>
    public void Grow(int classes)
    {
        if (classes <= Classes) return;
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var added = classes - Classes;
        var rows = Rows(Classes, added, (int)weight.shape[1]).to(weight.device);
        weight.set_(cat(new[] { weight.detach(), rows }).contiguous());
        bias.set_(cat(new[] { bias.detach(), zeros(added, device: bias.device) }));
        weight.grad = null;   // a gradient of the old shape cannot take the next backward's
        bias.grad = null;
    }
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
/// prediction. The label map and the prequential sums are objective state, saved with every checkpoint.</summary>
public sealed class OnlineClassification : IObjective
{
    public const string HeadPart = "head";
    public const string LabelsKey = "finetune.labels", PrequentialKey = "finetune.prequential", PromptKey = "finetune.prompt", ProbeKey = "finetune.probe";

    readonly ClassifierHead head;
    readonly List<string> labels = [];
    readonly Dictionary<string, int> classOf = [];
    readonly bool closed;
    readonly Prequential prequential;
    readonly string? prompt;
    readonly bool probe;

    public OnlineClassification(MamoConfig config, ClassificationConfig classification)
    {
        prompt = classification.Prompt;
        probe = classification.Probe;
        closed = classification.Labels is not null;
        foreach (var label in classification.Labels ?? []) AddClass(label);
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
    public int Admit(string label) => classOf.TryGetValue(label, out var c) ? c : closed ? -1 : AddClass(label);

    int AddClass(string label)
    {
        if (classOf.TryGetValue(label, out var c)) return c;
        classOf[label] = labels.Count;
        labels.Add(label);
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
        var classes = batch.Labels!.Select(l => Admit(l ?? throw new ArgumentException("an unlabelled pair reached the classifier"))).ToArray();
        if (classes.Contains(-1)) throw new ArgumentException("a label outside the closed label set reached the classifier");
        head.Grow(labels.Count);
        var logits = Logits(student, batch.Images.to(device), batch.TokenIds.to(device), batch.AttentionMask.to(device));
        var predicted = logits.detach().argmax(1).cpu().data<long>().ToArray();
        for (int i = 0; i < classes.Length; i++) prequential.Add(predicted[i] == classes[i]);
        var classify = F.cross_entropy(logits, tensor(classes.Select(c => (long)c).ToArray(), device: device));
        return new MamoLoss
        {
            Total = classify.clone().MoveToOuterDisposeScope(),
            Terms = new Dictionary<string, Tensor> { ["classify"] = classify.MoveToOuterDisposeScope() },
            Scores = prequential.Scores(),
            Predictions = predicted.Select(p => labels[(int)p]).ToArray(),
        };
    }

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
            if (closed && !savedLabels.SequenceEqual(labels))
                throw new InvalidDataException($"the checkpoint's labels [{string.Join(", ", savedLabels)}] are not finetune.labels [{string.Join(", ", labels)}]");
            foreach (var label in savedLabels) AddClass(label);
            head.Grow(labels.Count);
        }
        if (state.TryGetValue(PrequentialKey, out var p)) prequential.Load(p);
    }

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
