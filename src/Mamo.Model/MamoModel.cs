using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;
using static TorchSharp.torch.nn;
using F = TorchSharp.torch.nn.functional;

namespace Mamo.Model;

/// <summary>What the momentum teacher gives the student: latent targets of the unmasked pair.</summary>
public sealed class TeacherTargets : IDisposable
{
    /// <summary>[B, N, W] layer-normalised image-encoder features of every patch (the MIM target).</summary>
    public required Tensor PatchFeatures { get; init; }
    /// <summary>[B, 1 + N + L, W] the average of the top-K fusion layers, each layer-normalised (the MRM target).</summary>
    public required Tensor FusedLatents { get; init; }

    public void Dispose() { PatchFeatures.Dispose(); FusedLatents.Dispose(); }
}

/// <summary>Each enabled loss by name, and the weighted total that is back-propagated: what any objective returns.</summary>
public sealed class MamoLoss : IDisposable
{
    public required Tensor Total { get; init; }
    public required IReadOnlyDictionary<string, Tensor> Terms { get; init; }
    /// <summary>[2, B] the ITM hard negatives drawn (row 0: an image for each text, row 1: a text for each image), so
    /// that another implementation can replay the step exactly (the PyTorch parity check); null without ITM.</summary>
    public Tensor? ItmNegatives { get; init; }
    public void Dispose() { Total.Dispose(); foreach (var t in Terms.Values) t.Dispose(); ItmNegatives?.Dispose(); }
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

/// <summary>The feature transform before the MLM output layer, as BERT's: dense, GELU, LayerNorm.</summary>
public sealed class MlmTransform : Module<Tensor, Tensor>
{
    readonly Linear dense;
    readonly LayerNorm norm;

    public MlmTransform(int width) : base(nameof(MlmTransform))
    {
        dense = Linear(width, width);
        norm = LayerNorm(width);
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
        mlmTransform = new MlmTransform(w);
        mlmBias = Parameter(zeros(config.VocabSize));
        mimDecoder = new BlockStack(config.DecoderLayers, w, config.Heads, config.MlpRatio);
        mimHead = Linear(w, w);
        mrmHead = Linear(w, w);
        RegisterComponents();
        WeightInit.Apply(this, config.WeightInit);
    }

    /// <summary>Keeps the learnable temperature inside its range (as ALBEF does after each step); a clamp in the
    /// forward alone would leave it stuck outside, where its gradient is zero.</summary>
    public void ClampTemperature()
    {
        using var noGrad = no_grad();
        temperature.clamp_(Config.TemperatureMin, Config.TemperatureMax);
    }

    /// <summary>What the losses of one step share, each encoded once and only when a loss that reads it is on.</summary>
    sealed record Encodings
    {
        /// <summary>[B, 1 + Nv, W] the visible patches.</summary>
        public required Tensor ImageVisible { get; init; }
        // Alignment (ITC, ITM): the unmasked text with the image tokens they align on.
        public Tensor? ImageTokens { get; init; }        // [B, 1 + N(v), W]
        public Tensor? TextTokens { get; init; }         // [B, L, W]
        public Tensor? Similarity { get; init; }         // [B, B] image-to-text, over the temperature
        public Tensor? SameImage { get; init; }          // [B, B] pairs of one image
        // Masked modelling (MLM, MIM, MRM): the fused masked pair.
        public Tensor? Fused { get; init; }              // [B, 1 + N + L, W]
        public Tensor? MaskedText { get; init; }         // [M, W] the fused text at the masked word positions
    }

    /// <summary>The pre-training forward: the shared encodings once, then every enabled term where it is named.</summary>
    /// <param name="images">[B, 3, S, S]</param>
    /// <param name="tokenIds">[B, L] unmasked</param>
    /// <param name="attentionMask">[B, L]</param>
    /// <param name="mask">the joint mask of this batch</param>
    /// <param name="objective">the loss weights and what the alignment sees</param>
    /// <param name="targets">the teacher's targets; required when MIM or MRM is on</param>
    /// <param name="imageKeys">[B] identity of each image, so a duplicate is never taken as a negative; null: all distinct</param>
    /// <param name="generator">draws the ITM hard negatives, so a seeded step is reproducible</param>
    public MamoLoss Forward(Tensor images, Tensor tokenIds, Tensor attentionMask, JointMask mask, PretrainingConfig objective, TeacherTargets? targets,
        Tensor? imageKeys = null, Generator? generator = null)
    {
        var lw = objective.Weights;
        if ((lw.Mim > 0 || lw.Mrm > 0) && targets is null) throw new ArgumentException("MIM and MRM need the teacher's targets");
        using var scope = NewDisposeScope();
        var e = Encode(images, tokenIds, attentionMask, mask, objective, imageKeys);
        Tensor? negatives = null;
        var losses = new PretrainingLosses(
            Itc: lw.Itc > 0 ? Itc(e) : null,
            Itm: lw.Itm > 0 ? Itm(e, attentionMask, generator, out negatives) : null,
            Mlm: lw.Mlm > 0 ? Mlm(e, mask) : null,
            Mim: lw.Mim > 0 ? Mim(e, mask, targets!) : null,
            Mrm: lw.Mrm > 0 ? Mrm(e, mask, targets!) : null);
        var total = losses.Total(lw, images.device).MoveToOuterDisposeScope();
        var terms = losses.Named();
        foreach (var t in terms.Values) t.MoveToOuterDisposeScope();
        negatives?.MoveToOuterDisposeScope();
        return new MamoLoss { Total = total, Terms = terms, ItmNegatives = negatives };
    }

    Encodings Encode(Tensor images, Tensor tokenIds, Tensor attentionMask, JointMask mask, PretrainingConfig objective, Tensor? imageKeys)
    {
        var (c, lw) = (Config, objective.Weights);
        long b = images.shape[0], n = c.NumPatches;
        var imageVisible = image.forward(images, mask.Visible);
        var e = new Encodings { ImageVisible = imageVisible };
        if (lw.Itc > 0 || lw.Itm > 0)
        {
            var imageTokens = objective.AlignOnVisiblePatches ? imageVisible : image.forward(images, null);
            var textTokens = text.forward(tokenIds, attentionMask);
            var imageFeat = F.normalize(imageProjection.forward(imageTokens[.., 0]), dim: -1);
            var textFeat = F.normalize(textProjection.forward(textTokens[.., 0]), dim: -1);
            var keys = imageKeys ?? arange(b, device: images.device);
            e = e with
            {
                ImageTokens = imageTokens, TextTokens = textTokens,
                Similarity = imageFeat.matmul(textFeat.t()) / temperature.clamp(c.TemperatureMin, c.TemperatureMax),
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

    /// <summary>ITC: symmetric InfoNCE; each row's positives are spread over duplicates of its image.</summary>
    static Tensor Itc(Encodings e)
    {
        var sim = e.Similarity!;
        var positives = e.SameImage!.to(sim.dtype);
        positives = positives / positives.sum(1, keepdim: true);
        var lossI2T = -(F.log_softmax(sim, 1) * positives).sum(1).mean();
        var lossT2I = -(F.log_softmax(sim.t(), 1) * positives).sum(1).mean();
        return (lossI2T + lossT2I) / 2;
    }

    /// <summary>ITM: match or not on the fused [CLS], over the true pairs and one hard negative per image and per text.</summary>
    Tensor Itm(Encodings e, Tensor attentionMask, Generator? generator, out Tensor negatives)
    {
        var (imageTokens, textTokens) = (e.ImageTokens!, e.TextTokens!);
        var b = imageTokens.shape[0];
        Tensor negImage, negText;
        using (no_grad())
        {
            negImage = SampleHardNegatives(e.Similarity!.t(), e.SameImage!, generator);    // for each text, an image
            negText = SampleHardNegatives(e.Similarity!, e.SameImage!, generator);         // for each image, a text
            negatives = stack(new[] { negImage, negText });
        }
        var itmImage = cat(new[] { imageTokens, imageTokens.index_select(0, negImage), imageTokens }, 0);
        var itmText = cat(new[] { textTokens, textTokens, textTokens.index_select(0, negText) }, 0);
        var itmMask = cat(new[] { attentionMask, attentionMask, attentionMask.index_select(0, negText) }, 0);
        var fusedCls = fusion.forward(itmImage, itmText, itmMask)[.., 0];                   // [3B, W]
        var labels = cat(new[] { ones(b, int64, imageTokens.device), zeros(2 * b, int64, imageTokens.device) });
        return F.cross_entropy(itmHead.forward(fusedCls), labels);
    }

    /// <summary>MLM: the masked words, predicted over the vocabulary through the tied word embeddings.</summary>
    Tensor Mlm(Encodings e, JointMask mask)
    {
        var logits = F.linear(mlmTransform.forward(e.MaskedText!), text.WordEmbeddings, mlmBias);   // [M, V]
        return F.cross_entropy(logits, mask.MaskedTokenLabels);
    }

    /// <summary>MIM (explicit target): the teacher image encoder's features of each masked patch, through a decoder.</summary>
    Tensor Mim(Encodings e, JointMask mask, TeacherTargets targets)
    {
        var n = Config.NumPatches;
        var patchIndex = mask.Masked.unsqueeze(-1).expand(-1, -1, Config.Width);                  // [B, Nm, W]
        var decoded = mimHead.forward(mimDecoder.forward(e.Fused![.., 1..(1 + n)], null));          // [B, N, W]
        return F.mse_loss(decoded.gather(1, patchIndex), targets.PatchFeatures.gather(1, patchIndex));
    }

    /// <summary>MRM (implicit target): the teacher's fused latents at every masked position of both modalities.</summary>
    Tensor Mrm(Encodings e, JointMask mask, TeacherTargets targets)
    {
        var (n, w) = (Config.NumPatches, Config.Width);
        var predicted = mrmHead.forward(e.Fused!);
        var target = targets.FusedLatents;
        var imageIndex = (mask.Masked + 1).unsqueeze(-1).expand(-1, -1, w);
        var imageLoss = F.mse_loss(predicted.gather(1, imageIndex), target.gather(1, imageIndex));
        var textLoss = F.mse_loss(
            predicted[.., (1 + n)..].reshape(-1, w).index_select(0, mask.MaskedTokenPositions),
            target[.., (1 + n)..].reshape(-1, w).index_select(0, mask.MaskedTokenPositions));
        return (imageLoss + textLoss) / 2;
    }

    /// <summary>Keeps every other image a possible negative even when softmax underflows to 0.</summary>
    const float NegativeFloor = 1e-6f;

    /// <summary>ALBEF's hard negatives: one per row, drawn in proportion to softmax similarity, never the row's own image.</summary>
    static Tensor SampleHardNegatives(Tensor sim, Tensor same, Generator? generator)
    {
        using var scope = NewDisposeScope();
        var weights = F.softmax(sim.to(float32), 1).nan_to_num(0, 0, 0) + NegativeFloor;
        weights = weights.masked_fill(same, 0);
        // A row whose every candidate is the same image has no true negative: fall back to uniform.
        var empty = weights.sum(1, keepdim: true).eq(0);
        weights = where(empty, ones_like(weights), weights);
        return multinomial(weights, 1, generator: generator).squeeze(1).MoveToOuterDisposeScope();
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
        return F.softmax(itmHead.forward(FusedCls(imageTokens, textTokens, attentionMask)), -1)[.., 1].MoveToOuterDisposeScope();
    }
}
