using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;
using static TorchSharp.torch.nn;
using F = TorchSharp.torch.nn.functional;

namespace Mamo.Model;

/// <summary>What the momentum teacher gives the student: latent targets of the unmasked pair (pre-training), or its
/// ITC embeddings (momentum distillation when fine-tuning for retrieval). Each is null where the objective needs none.</summary>
public sealed class TeacherTargets : IDisposable
{
    /// <summary>[B, N, W] layer-normalised image-encoder features of every patch (the MIM target).</summary>
    public Tensor? PatchFeatures { get; init; }
    /// <summary>[B, 1 + N + L, W] the average of the top-K fusion layers, each layer-normalised (the MRM target).</summary>
    public Tensor? FusedLatents { get; init; }
    /// <summary>[B, E] the teacher's normalised ITC embeddings of the images and of the texts (distillation's).</summary>
    public Tensor? ImageEmbedding { get; init; }
    public Tensor? TextEmbedding { get; init; }

    public IEnumerable<Tensor> All => new[] { PatchFeatures, FusedLatents, ImageEmbedding, TextEmbedding }.OfType<Tensor>();

    public void Dispose() { foreach (var t in All) t.Dispose(); }
}

/// <summary>Each enabled loss by name, and the weighted total that is back-propagated: what any objective returns.</summary>
public sealed class MamoLoss : IDisposable
{
    public required Tensor Total { get; init; }
    public required IReadOnlyDictionary<string, Tensor> Terms { get; init; }
    /// <summary>[2, B] the ITM hard negatives drawn (row 0: an image for each text, row 1: a text for each image), so
    /// that another implementation can replay the step exactly (the PyTorch parity check); null without ITM.</summary>
    public Tensor? ItmNegatives { get; init; }
    /// <summary>Scores the objective keeps of its predictions (prequential accuracy), as plain numbers; null: none.</summary>
    public IReadOnlyDictionary<string, double>? Scores { get; init; }
    /// <summary>Each pair's prediction, made by this forward pass (before the step's update); null: none.</summary>
    public IReadOnlyList<string>? Predictions { get; init; }
    /// <summary>[B] bool: whether each text's most similar image in the batch (by ITC) is its own; null without ITC.</summary>
    public Tensor? TextToImageHits { get; init; }
    public void Dispose() { Total.Dispose(); foreach (var t in Terms.Values) t.Dispose(); ItmNegatives?.Dispose(); TextToImageHits?.Dispose(); }
}

/// <summary>MAMO's five losses of one step; a term whose weight is 0 is not computed (null).</summary>
public sealed record PretrainingLosses(Tensor? Itc, Tensor? Itm, Tensor? Mlm, Tensor? Mim, Tensor? Mrm)
{
    /// <summary>The weighted sum that is back-propagated.</summary>
    public Tensor Total(LossWeights w, Device device)
    {
        var total = zeros(1, device: device).squeeze();
        foreach (var (loss, weight) in new[] { (Itc, w.Itc), (Itm, w.Itm), (Mlm, w.Mlm), (Mim, w.Mim), (Mrm, w.Mrm) })
            if (loss is not null) total = total + weight * loss;
        return total;
    }

    /// <summary>The computed terms by name, for the logs and metrics.</summary>
    public Dictionary<string, Tensor> Named() =>
        new[] { ("itc", Itc), ("itm", Itm), ("mlm", Mlm), ("mim", Mim), ("mrm", Mrm) }
            .Where(t => t.Item2 is not null).ToDictionary(t => t.Item1, t => t.Item2!);
}

/// <summary>The feature transform before the MLM output layer, as BERT's: dense, GELU, LayerNorm (BERT's eps in the
/// bert layout, so that an imported MLM head predicts as it did).</summary>
public sealed class MlmTransform : Module<Tensor, Tensor>
{
    readonly Linear dense;
    readonly LayerNorm norm;

    public MlmTransform(int width, double eps = 1e-5) : base(nameof(MlmTransform))
    {
        dense = Linear(width, width);
        norm = LayerNorm(width, eps);
        RegisterComponents();
    }

    public override Tensor forward(Tensor x)
    {
        using var scope = NewDisposeScope();
        return norm.forward(F.gelu(dense.forward(x))).MoveToOuterDisposeScope();
    }
}

/// <summary>The MAMO model: image, text and fusion encoders, ITC projections and the heads of the five objectives.
/// The student and the momentum teacher are two instances of this class.</summary>
public sealed class MamoModel : Module
{
    public MamoConfig Config { get; }
    public Device Device => temperature.device;

    readonly ImageEncoder image;
    readonly TextEncoder text;
    readonly FusionEncoder fusion;
    readonly Linear imageProjection, textProjection;
    readonly Parameter temperature;
    readonly Linear itmHead;
    readonly MlmTransform mlmTransform;
    readonly Parameter mlmBias;
    readonly BlockStack mimDecoder;
    readonly Linear mimHead, mrmHead;

    public MamoModel(MamoConfig config) : base(nameof(MamoModel))
    {
        // Every model draws its initial weights from torch's one global generator, under its lock (see Seeds).
        lock (Seeds.GlobalGenerator)
        {
            config.Validate();
            Config = config;
            var w = config.Width;
            image = new ImageEncoder(config);
            text = new TextEncoder(config);
            fusion = new FusionEncoder(config);
            imageProjection = Linear(w, config.EmbedDim);
            textProjection = Linear(w, config.EmbedDim);
            temperature = Parameter(tensor((float)config.TemperatureInit));
            itmHead = Linear(w, 2);
            mlmTransform = new MlmTransform(w, config.TextLayout == TextLayouts.Bert ? TextLayouts.BertEps : 1e-5);
            mlmBias = Parameter(zeros(config.VocabSize));
            mimDecoder = new BlockStack(config.DecoderLayers, w, config.Heads, config.MlpRatio);
            mimHead = Linear(w, w);
            mrmHead = Linear(w, w);
            RegisterComponents();
            WeightInit.Apply(this, config.WeightInit);
        }
    }

    /// <summary>A model initialised from <paramref name="seed"/>. Initialisation draws from torch's one global
    /// generator, so models built at once on two threads (a cluster node's coordinator, its replica and their
    /// teachers) would interleave their draws: building every model under one lock keeps a seed's weights the same in
    /// every process.</summary>
    public static MamoModel Seeded(MamoConfig config, int seed) => Seeds.FromGlobal(seed, () => new MamoModel(config));

    /// <summary>Keeps the learnable temperature inside its range (as ALBEF does after each step); a clamp in the
    /// forward alone would leave it stuck outside, where its gradient is zero.</summary>
    public void ClampTemperature()
    {
        using var noGrad = no_grad();
        using TorchSharp.Scalar min = Config.TemperatureMin, max = Config.TemperatureMax;   // explicit: they outlive the call
        temperature.clamp_(min, max);
    }

    /// <summary>What the losses of one step share, each encoded once and only when a loss that reads it is on. Where
    /// the batch is one replica's shard of a global batch, the alignment sees every replica's features (the others'
    /// without gradient) and each loss is this shard's share of the global batch's loss.</summary>
    sealed record Encodings
    {
        /// <summary>[B, 1 + Nv, W] the visible patches.</summary>
        public required Tensor ImageVisible { get; init; }
        /// <summary>Pairs in the global batch, and this shard's first row and pairs in it (B).</summary>
        public required long Pairs { get; init; }
        public required long Before { get; init; }
        public required long Rows { get; init; }
        /// <summary>Masked words in the global batch.</summary>
        public required long MaskedWords { get; init; }
        // Alignment (ITC, ITM): the unmasked text with the image tokens they align on.
        public Tensor? ImageTokens { get; init; }        // [B, 1 + N(v), W]
        public Tensor? TextTokens { get; init; }         // [B, L, W]
        public Tensor? ImageToText { get; init; }        // [G, G] logits, a row per image of the global batch
        public Tensor? TextToImage { get; init; }        // [G, G] logits, a row per text
        public Tensor? SameImage { get; init; }          // [G, G] pairs of one image
        // Masked modelling (MLM, MIM, MRM): the fused masked pair.
        public Tensor? Fused { get; init; }              // [B, 1 + N + L, W]
        public Tensor? MaskedText { get; init; }         // [M, W] the fused text at the masked word positions

        /// <summary>[G] this shard's rows of the global batch; null when the batch is the whole.</summary>
        public Tensor? Own { get; init; }
        bool Sharded => Own is not null;

        /// <summary>Per-row losses of the global batch reduced to this shard's share: its own rows count, the others'
        /// carry only the gradient that flows into this shard's features (their value is another replica's).</summary>
        public Tensor Share(Tensor rowLosses) => Own is null ? rowLosses : where(Own, rowLosses, rowLosses - rowLosses.detach());

        /// <summary>[B, B] a global matrix's block of this shard's rows and columns.</summary>
        public Tensor OwnBlock(Tensor global) => Sharded ? global[(int)Before..(int)(Before + Rows), (int)Before..(int)(Before + Rows)] : global;
    }

    /// <summary>The pre-training forward: the shared encodings once, then every enabled term where it is named.</summary>
    /// <param name="images">[B, 3, S, S]</param>
    /// <param name="tokenIds">[B, L] unmasked</param>
    /// <param name="attentionMask">[B, L]</param>
    /// <param name="mask">the joint mask of this batch</param>
    /// <param name="objective">the loss weights and what the alignment sees</param>
    /// <param name="targets">the teacher's targets; required when MIM or MRM is on, or distillation (its embeddings)</param>
    /// <param name="imageKeys">[B] identity of each image, so a duplicate is never taken as a negative; null: all distinct</param>
    /// <param name="generator">draws the ITM hard negatives, so a seeded step is reproducible; null: a generator of
    /// seed 0, never torch's global one (a draw from that on one thread changes a model being built on another)</param>
    /// <param name="shard">where this batch is one replica's share of a global batch; null: it is the whole</param>
    public MamoLoss Forward(Tensor images, Tensor tokenIds, Tensor attentionMask, JointMask mask, PretrainingConfig objective, TeacherTargets? targets,
        Tensor? imageKeys = null, Generator? generator = null, IBatchShard? shard = null)
    {
        var (lw, distillAlpha) = (objective.Weights, objective.DistillAlpha);
        if ((lw.Mim > 0 || lw.Mrm > 0) && targets is null) throw new ArgumentException("MIM and MRM need the teacher's targets");
        if (distillAlpha > 0 && (targets?.ImageEmbedding is null || shard is not null))
            throw new ArgumentException("momentum distillation needs the teacher's embeddings of a whole batch");
        using var scope = NewDisposeScope();
        using var own = generator is null ? new Generator(0, images.device) : null;
        var e = Encode(images, tokenIds, attentionMask, mask, objective, imageKeys, shard);
        Tensor? negatives = null;
        var losses = new PretrainingLosses(
            Itc: lw.Itc > 0 ? Itc(e, distillAlpha > 0 ? DistilledPositives(e, targets!, distillAlpha) : null) : null,
            Itm: lw.Itm > 0 ? Itm(e, attentionMask, objective.ItmNegativeGroup, generator ?? own!, out negatives) : null,
            Mlm: lw.Mlm > 0 ? Mlm(e, mask) : null,
            Mim: lw.Mim > 0 ? Mim(e, mask, targets!) : null,
            Mrm: lw.Mrm > 0 ? Mrm(e, mask, targets!) : null);
        var total = losses.Total(lw, images.device).MoveToOuterDisposeScope();
        var terms = losses.Named();
        foreach (var t in terms.Values) t.MoveToOuterDisposeScope();
        negatives?.MoveToOuterDisposeScope();
        return new MamoLoss { Total = total, Terms = terms, ItmNegatives = negatives, TextToImageHits = TextToImageHits(e)?.MoveToOuterDisposeScope() };
    }

    /// <summary>[B] each of this shard's texts: is its most similar image of the global batch one of its own image?</summary>
    static Tensor? TextToImageHits(Encodings e)
    {
        if (e.TextToImage is null) return null;
        using var noGrad = no_grad();
        var own = e.TextToImage[(int)e.Before..(int)(e.Before + e.Rows)];
        var best = own.argmax(1, keepdim: true);
        return e.SameImage![(int)e.Before..(int)(e.Before + e.Rows)].gather(1, best).squeeze(1);
    }

    /// <summary>ALBEF's ITC targets under distillation: alpha times the softmax of the teacher's similarities (at the
    /// student's temperature), plus (1 - alpha) times the true pairs. Rows: [image → text targets, text → image targets].</summary>
    (Tensor ImageToText, Tensor TextToImage) DistilledPositives(Encodings e, TeacherTargets targets, double alpha)
    {
        using var noGrad = no_grad();
        var truth = e.SameImage!.to(e.ImageToText!.dtype);
        truth = truth / truth.sum(1, keepdim: true);
        var sim = targets.ImageEmbedding!.matmul(targets.TextEmbedding!.t()) / temperature.clamp(Config.TemperatureMin, Config.TemperatureMax);
        return (alpha * F.softmax(sim, 1) + (1 - alpha) * truth, alpha * F.softmax(sim.t(), 1) + (1 - alpha) * truth);
    }

    Encodings Encode(Tensor images, Tensor tokenIds, Tensor attentionMask, JointMask mask, PretrainingConfig objective, Tensor? imageKeys, IBatchShard? shard)
    {
        var (c, lw) = (Config, objective.Weights);
        long b = images.shape[0], n = c.NumPatches, maskedWords = mask.MaskedTokenPositions.shape[0];
        var imageVisible = image.forward(images, mask.Visible);
        Tensor? imageTokens = null, textTokens = null, imageFeat = null, textFeat = null;
        var keys = imageKeys ?? arange(b, device: images.device);
        var align = lw.Itc > 0 || lw.Itm > 0;
        if (align)
        {
            imageTokens = objective.AlignOnVisiblePatches ? imageVisible : image.forward(images, null);
            textTokens = text.forward(tokenIds, attentionMask);
            imageFeat = F.normalize(imageProjection.forward(imageTokens[.., 0]), dim: -1);
            textFeat = F.normalize(textProjection.forward(textTokens[.., 0]), dim: -1);
        }

        // The global batch: this shard's rows among every replica's (one all-gather per step), or this batch alone.
        long pairs = b, before = 0, globalMaskedWords = maskedWords;
        if (shard is not null)
        {
            using var counts = tensor(new float[] { b, maskedWords }, new long[] { 1, 2 });
            var gathered = shard.AllGather(align ? [counts, imageFeat!.detach(), textFeat!.detach(), keys] : [counts]);
            var perReplica = gathered[0].cpu().data<float>().ToArray();
            pairs = (long)gathered[0][.., 0].sum().item<float>();
            globalMaskedWords = (long)gathered[0][.., 1].sum().item<float>();
            for (int r = 0; r < shard.Index; r++) before += (long)perReplica[2 * r];
            if (align)
            {
                Tensor Spliced(Tensor all, Tensor own) => cat(new[] { all[..(int)before], own, all[(int)(before + b)..] }, 0);
                imageFeat = Spliced(gathered[1].to(images.device), imageFeat!);
                textFeat = Spliced(gathered[2].to(images.device), textFeat!);
                keys = gathered[3].to(images.device);
            }
        }
        var rows = arange(pairs, device: images.device);
        using TorchSharp.Scalar first = before, end = before + b;   // explicit: an implicit Scalar may be finalised during the call
        var e = new Encodings
        {
            ImageVisible = imageVisible, Pairs = pairs, Before = before, Rows = b, MaskedWords = globalMaskedWords,
            Own = pairs == b ? null : rows.ge(first).logical_and(rows.lt(end)),
        };
        if (align)
        {
            // Each row learns the temperature once across the replicas: through its own rows only.
            using TorchSharp.Scalar min = c.TemperatureMin, max = c.TemperatureMax;
            var temp = temperature.clamp(min, max);
            var rowTemp = e.Own is null ? temp : where(e.Own, temp, temp.detach()).unsqueeze(1);
            var cosine = imageFeat!.matmul(textFeat!.t());
            e = e with
            {
                ImageTokens = imageTokens, TextTokens = textTokens,
                ImageToText = cosine / rowTemp, TextToImage = cosine.t() / rowTemp,
                SameImage = keys.unsqueeze(1).eq(keys.unsqueeze(0)),
            };
        }
        if (lw.Mlm > 0 || lw.Mim > 0 || lw.Mrm > 0)
        {
            var textMasked = text.forward(mask.MaskedTokenIds, attentionMask);
            var fused = fusion.forward(image.FillMasked(imageVisible, mask.Visible), textMasked, attentionMask);
            e = e with { Fused = fused, MaskedText = fused[.., (int)(1 + n)..].reshape(-1, c.Width).index_select(0, mask.MaskedTokenPositions) };
        }
        return e;
    }

    /// <summary>ITC: symmetric InfoNCE over the global batch; each row's positives are spread over duplicates of its
    /// image, or (momentum distillation) given.</summary>
    static Tensor Itc(Encodings e, (Tensor ImageToText, Tensor TextToImage)? distilled = null)
    {
        var positives = e.SameImage!.to(e.ImageToText!.dtype);
        positives = positives / positives.sum(1, keepdim: true);
        var lossI2T = -(F.log_softmax(e.ImageToText!, 1) * (distilled?.ImageToText ?? positives)).sum(1);   // [G] one per image
        var lossT2I = -(F.log_softmax(e.TextToImage!, 1) * (distilled?.TextToImage ?? positives)).sum(1);   // [G] one per text
        return Over(e.Share(lossI2T).sum() + e.Share(lossT2I).sum(), 2 * e.Pairs);
    }

    /// <summary>ITM: match or not on the fused [CLS], over the true pairs and one hard negative per image and per text,
    /// drawn from this shard's own pairs (as ALBEF draws them on each GPU).</summary>
    Tensor Itm(Encodings e, Tensor attentionMask, int group, Generator generator, out Tensor negatives)
    {
        var (imageTokens, textTokens) = (e.ImageTokens!, e.TextTokens!);
        var b = imageTokens.shape[0];
        Tensor negImage, negText;
        using (no_grad())
        {
            // One uniform per row of the global batch, so the draws do not depend on how replicas split it.
            var ownRows = (int)e.Before..(int)(e.Before + b);
            var forText = rand(e.Pairs, generator: generator, device: imageTokens.device)[ownRows];
            var forImage = rand(e.Pairs, generator: generator, device: imageTokens.device)[ownRows];
            var same = e.OwnBlock(e.SameImage!);
            negImage = SampleHardNegatives(e.OwnBlock(e.TextToImage!), same, group, forText);     // for each text, an image
            negText = SampleHardNegatives(e.OwnBlock(e.ImageToText!), same, group, forImage);     // for each image, a text
            negatives = stack(new[] { negImage, negText });
        }
        var itmImage = cat(new[] { imageTokens, imageTokens.index_select(0, negImage), imageTokens }, 0);
        var itmText = cat(new[] { textTokens, textTokens, textTokens.index_select(0, negText) }, 0);
        var itmMask = cat(new[] { attentionMask, attentionMask, attentionMask.index_select(0, negText) }, 0);
        var fusedCls = fusion.forward(itmImage, itmText, itmMask)[.., 0];                   // [3B, W]
        var labels = cat(new[] { ones(b, int64, imageTokens.device), zeros(2 * b, int64, imageTokens.device) });
        return Over(F.cross_entropy(itmHead.forward(fusedCls), labels, reduction: Reduction.Sum), 3 * e.Pairs);
    }

    /// <summary>MLM: the masked words, predicted over the vocabulary through the tied word embeddings.</summary>
    Tensor Mlm(Encodings e, JointMask mask) =>
        Over(F.cross_entropy(WordLogits(e.MaskedText!), mask.MaskedTokenLabels, reduction: Reduction.Sum), e.MaskedWords);

    /// <summary>[M, V] the MLM head's scores over the vocabulary for fused text features [M, W].</summary>
    public Tensor WordLogits(Tensor fusedText) => F.linear(mlmTransform.forward(fusedText), text.WordEmbeddings, mlmBias);

    /// <summary>MIM (explicit target): the teacher image encoder's features of each masked patch, through a decoder.</summary>
    Tensor Mim(Encodings e, JointMask mask, TeacherTargets targets)
    {
        var (n, w) = (Config.NumPatches, Config.Width);
        var patchIndex = mask.Masked.unsqueeze(-1).expand(-1, -1, w);                              // [B, Nm, W]
        var decoded = mimHead.forward(mimDecoder.forward(e.Fused![.., 1..(1 + n)], null));          // [B, N, W]
        return Over(F.mse_loss(decoded.gather(1, patchIndex), targets.PatchFeatures!.gather(1, patchIndex), Reduction.Sum),
            e.Pairs * mask.Masked.shape[1] * w);
    }

    /// <summary>MRM (implicit target): the teacher's fused latents at every masked position of both modalities.</summary>
    Tensor Mrm(Encodings e, JointMask mask, TeacherTargets targets)
    {
        var (n, w) = (Config.NumPatches, Config.Width);
        var predicted = mrmHead.forward(e.Fused!);
        var target = targets.FusedLatents!;
        var imageIndex = (mask.Masked + 1).unsqueeze(-1).expand(-1, -1, w);
        var imageLoss = Over(F.mse_loss(predicted.gather(1, imageIndex), target.gather(1, imageIndex), Reduction.Sum), e.Pairs * mask.Masked.shape[1] * w);
        var textLoss = Over(F.mse_loss(
            predicted[.., (1 + n)..].reshape(-1, w).index_select(0, mask.MaskedTokenPositions),
            target[.., (1 + n)..].reshape(-1, w).index_select(0, mask.MaskedTokenPositions), Reduction.Sum), e.MaskedWords * w);
        return (imageLoss + textLoss) / 2;
    }

    /// <summary>A sum over a count of the global batch (at least 1), as its mean. The scalar is explicit and lives
    /// through the call: an implicit one can be finalised while the native division still reads it.</summary>
    static Tensor Over(Tensor sum, long count)
    {
        using TorchSharp.Scalar n = (double)Math.Max(1, count);
        return sum.div(n);
    }

    /// <summary>Keeps every other image a possible negative even when softmax underflows to 0.</summary>
    const float NegativeFloor = 1e-6f;

    /// <summary>ALBEF's hard negatives: one per row, drawn in proportion to softmax similarity among the row's group
    /// (<paramref name="group"/> consecutive pairs, 0: all), never the row's own image; inverse-CDF sampling of
    /// <paramref name="uniform"/>, one draw in [0, 1) per row.</summary>
    static Tensor SampleHardNegatives(Tensor sim, Tensor same, int group, Tensor uniform)
    {
        using var scope = NewDisposeScope();
        var b = sim.shape[0];
        var groupOf = group > 0 ? arange(b, device: sim.device).div(group, rounding_mode: RoundingMode.floor) : zeros(b, int64, sim.device);
        var inGroup = groupOf.unsqueeze(1).eq(groupOf.unsqueeze(0));
        var weights = F.softmax(sim.masked_fill(inGroup.logical_not(), float.NegativeInfinity).to(float32), 1).nan_to_num(0, 0, 0) + NegativeFloor;
        weights = weights.masked_fill(same.logical_or(inGroup.logical_not()), 0);
        // A row whose every candidate is the same image has no true negative: fall back to uniform over its group.
        var empty = weights.sum(1, keepdim: true).eq(0);
        weights = where(empty, inGroup.to(float32), weights);
        var cdf = weights.cumsum(1);
        var target = ((1 - uniform.to(float32)) * cdf.select(1, -1)).unsqueeze(1);      // in (0, total]: never a zero-weight column
        return cdf.lt(target).sum(1).clamp_max(b - 1).MoveToOuterDisposeScope();
    }

    /// <summary>The teacher's targets for an unmasked pair: MRM averages the top <paramref name="topK"/> fusion layers.
    /// Call on the teacher.</summary>
    public TeacherTargets Targets(Tensor images, Tensor tokenIds, Tensor attentionMask, int topK)
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var imageTokens = image.forward(images, null);
        var textTokens = text.forward(tokenIds, attentionMask);
        var (_, hidden) = fusion.Forward(imageTokens, textTokens, attentionMask, keepHidden: true);
        var shape = new long[] { Config.Width };
        var latents = stack(hidden[^topK..].Select(h => F.layer_norm(h, shape)).ToArray()).mean(new long[] { 0 });
        var patches = F.layer_norm(imageTokens[.., 1..], shape);
        return new TeacherTargets { PatchFeatures = patches.MoveToOuterDisposeScope(), FusedLatents = latents.MoveToOuterDisposeScope() };
    }

    /// <summary>The teacher's ITC embeddings of an unmasked batch: momentum distillation's targets. Call on the teacher.</summary>
    public TeacherTargets Embeddings(Tensor images, Tensor tokenIds, Tensor attentionMask)
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        return new TeacherTargets
        {
            ImageEmbedding = ImageEmbedding(image.forward(images, null)).MoveToOuterDisposeScope(),
            TextEmbedding = TextEmbedding(text.forward(tokenIds, attentionMask)).MoveToOuterDisposeScope(),
        };
    }

    // ---- Inference ----

    /// <summary>[B, 1 + N, W] image encoder output over all patches.</summary>
    public Tensor EncodeImage(Tensor images) => image.forward(images, null);

    /// <summary>[B, L, W] text encoder output.</summary>
    public Tensor EncodeText(Tensor tokenIds, Tensor attentionMask) => text.forward(tokenIds, attentionMask);

    /// <summary>[B, E] normalised image embedding in ITC space.</summary>
    public Tensor ImageEmbedding(Tensor imageTokens) => F.normalize(imageProjection.forward(imageTokens[.., 0]), dim: -1);

    /// <summary>[B, E] normalised text embedding in ITC space.</summary>
    public Tensor TextEmbedding(Tensor textTokens) => F.normalize(textProjection.forward(textTokens[.., 0]), dim: -1);

    /// <summary>[B, W] the fused [CLS] feature of given pairs.</summary>
    public Tensor FusedCls(Tensor imageTokens, Tensor textTokens, Tensor attentionMask) =>
        fusion.forward(imageTokens, textTokens, attentionMask)[.., 0];

    /// <summary>[B] ITM probability that each given pair matches.</summary>
    public Tensor MatchProbability(Tensor imageTokens, Tensor textTokens, Tensor attentionMask)
    {
        using var scope = NewDisposeScope();
        return F.softmax(MatchLogits(imageTokens, textTokens, attentionMask), -1)[.., 1].MoveToOuterDisposeScope();
    }

    /// <summary>[B, 2] ITM logits (no match, match) of given pairs.</summary>
    public Tensor MatchLogits(Tensor imageTokens, Tensor textTokens, Tensor attentionMask) =>
        itmHead.forward(FusedCls(imageTokens, textTokens, attentionMask));

    /// <summary>The image encoder, whose position embeddings resize to larger images.</summary>
    public ImageEncoder Image => image;

    /// <summary>The text encoder, whose hidden states the import's parity test compares with the original model's.</summary>
    public TextEncoder Text => text;

    /// <summary>The fusion encoder, whose attention Grad-CAM reads.</summary>
    public FusionEncoder Fusion => fusion;
}
