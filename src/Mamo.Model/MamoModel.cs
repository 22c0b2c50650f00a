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

/// <summary>Each enabled loss by name, and the weighted total that is back-propagated.</summary>
public sealed class MamoLoss : IDisposable
{
    public required Tensor Total { get; init; }
    public required IReadOnlyDictionary<string, Tensor> Terms { get; init; }
    /// <summary>[2, B] the ITM hard negatives drawn (row 0: an image for each text, row 1: a text for each image), so
    /// that another implementation can replay the step exactly (the PyTorch parity check); null without ITM.</summary>
    public Tensor? ItmNegatives { get; init; }
    public void Dispose() { Total.Dispose(); foreach (var t in Terms.Values) t.Dispose(); ItmNegatives?.Dispose(); }
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
    readonly Sequential mlmTransform;
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
        mlmTransform = Sequential(Linear(w, w), GELU(), LayerNorm(w));
        mlmBias = Parameter(zeros(config.VocabSize));
        mimDecoder = new BlockStack(config.DecoderLayers, w, config.Heads, config.MlpRatio);
        mimHead = Linear(w, w);
        mrmHead = Linear(w, w);
        RegisterComponents();
    }

    /// <summary>Keeps the learnable temperature inside its range (as ALBEF does after each step); a clamp in the
    /// forward alone would leave it stuck outside, where its gradient is zero.</summary>
    public void ClampTemperature()
    {
        using var noGrad = no_grad();
        temperature.clamp_(Config.TemperatureMin, Config.TemperatureMax);
    }

    /// <summary>The pre-training forward: every enabled term, computed where it is named.</summary>
    /// <param name="images">[B, 3, S, S]</param>
    /// <param name="tokenIds">[B, L] unmasked</param>
    /// <param name="attentionMask">[B, L]</param>
    /// <param name="mask">the joint mask of this batch</param>
    /// <param name="targets">the teacher's targets; required when MIM or MRM is on</param>
    /// <param name="imageKeys">[B] identity of each image, so a duplicate is never taken as a negative; null: all distinct</param>
    /// <param name="generator">draws the ITM hard negatives, so a seeded step is reproducible</param>
    public MamoLoss Forward(Tensor images, Tensor tokenIds, Tensor attentionMask, JointMask mask, TeacherTargets? targets,
        Tensor? imageKeys = null, Generator? generator = null)
    {
        var c = Config;
        var lw = c.Weights;
        using var scope = NewDisposeScope();
        var terms = new Dictionary<string, Tensor>();
        Tensor? itmNegatives = null;
        long b = images.shape[0], n = c.NumPatches;
        var imageVisible = image.forward(images, mask.Visible);                    // [B, 1 + Nv, W]

        if (lw.Itc > 0 || lw.Itm > 0)
        {
            var imageTokens = c.AlignOnVisiblePatches ? imageVisible : image.forward(images, null);
            var textTokens = text.forward(tokenIds, attentionMask);                 // [B, L, W]
            var imageFeat = F.normalize(imageProjection.forward(imageTokens[.., 0]), dim: -1);
            var textFeat = F.normalize(textProjection.forward(textTokens[.., 0]), dim: -1);
            var temp = temperature.clamp(c.TemperatureMin, c.TemperatureMax);
            var simI2T = imageFeat.matmul(textFeat.t()) / temp;                     // [B, B]
            var keys = imageKeys ?? arange(b, device: images.device);
            var same = keys.unsqueeze(1).eq(keys.unsqueeze(0));                     // [B, B] pairs of one image

            if (lw.Itc > 0)
            {
                // Symmetric InfoNCE; each row's positives are spread over duplicates of its image.
                var positives = same.to(simI2T.dtype);
                positives = positives / positives.sum(1, keepdim: true);
                var lossI2T = -(F.log_softmax(simI2T, 1) * positives).sum(1).mean();
                var lossT2I = -(F.log_softmax(simI2T.t(), 1) * positives).sum(1).mean();
                terms["itc"] = (lossI2T + lossT2I) / 2;
            }
            if (lw.Itm > 0)
            {
                Tensor negImage, negText;
                using (no_grad())
                {
                    negImage = SampleHardNegatives(simI2T.t(), same, generator);                // for each text, an image
                    negText = SampleHardNegatives(simI2T, same, generator);                     // for each image, a text
                    itmNegatives = stack(new[] { negImage, negText });
                }
                var itmImage = cat(new[] { imageTokens, imageTokens.index_select(0, negImage), imageTokens }, 0);
                var itmText = cat(new[] { textTokens, textTokens, textTokens.index_select(0, negText) }, 0);
                var itmMask = cat(new[] { attentionMask, attentionMask, attentionMask.index_select(0, negText) }, 0);
                var fusedCls = fusion.forward(itmImage, itmText, itmMask)[.., 0];     // [3B, W]
                var labels = cat(new[] { ones(b, int64, images.device), zeros(2 * b, int64, images.device) });
                terms["itm"] = F.cross_entropy(itmHead.forward(fusedCls), labels);
            }
        }

        if (lw.Mlm > 0 || lw.Mim > 0 || lw.Mrm > 0)
        {
            if ((lw.Mim > 0 || lw.Mrm > 0) && targets is null)
                throw new ArgumentException("MIM and MRM need the teacher's targets");
            var textMasked = text.forward(mask.MaskedTokenIds, attentionMask);       // [B, L, W]
            var imageFull = image.FillMasked(imageVisible, mask.Visible);           // [B, 1 + N, W]
            var fused = fusion.forward(imageFull, textMasked, attentionMask);        // [B, 1 + N + L, W]
            var fusedText = fused[.., (int)(1 + n)..].reshape(-1, c.Width);         // [B * L, W]
            var maskedText = fusedText.index_select(0, mask.MaskedTokenPositions);  // [M, W]
            var patchIndex = mask.Masked.unsqueeze(-1).expand(-1, -1, c.Width);      // [B, Nm, W]

            if (lw.Mlm > 0)
            {
                var logits = F.linear(mlmTransform.forward(maskedText), text.WordEmbeddings, mlmBias); // [M, V]
                terms["mlm"] = F.cross_entropy(logits, mask.MaskedTokenLabels);
            }
            if (lw.Mim > 0)
            {
                var decoded = mimHead.forward(mimDecoder.forward(fused[.., 1..(int)(1 + n)], null)); // [B, N, W]
                terms["mim"] = F.mse_loss(decoded.gather(1, patchIndex), targets!.PatchFeatures.gather(1, patchIndex));
            }
            if (lw.Mrm > 0)
            {
                var predicted = mrmHead.forward(fused);
                var target = targets!.FusedLatents;
                var imageIndex = (mask.Masked + 1).unsqueeze(-1).expand(-1, -1, c.Width);
                var imageLoss = F.mse_loss(predicted.gather(1, imageIndex), target.gather(1, imageIndex));
                var textLoss = F.mse_loss(
                    predicted[.., (int)(1 + n)..].reshape(-1, c.Width).index_select(0, mask.MaskedTokenPositions),
                    target[.., (int)(1 + n)..].reshape(-1, c.Width).index_select(0, mask.MaskedTokenPositions));
                terms["mrm"] = (imageLoss + textLoss) / 2;
            }
        }

        var weights = new Dictionary<string, double> { ["itc"] = lw.Itc, ["itm"] = lw.Itm, ["mlm"] = lw.Mlm, ["mim"] = lw.Mim, ["mrm"] = lw.Mrm };
        Tensor total = zeros(1, device: images.device).squeeze();
        foreach (var (name, loss) in terms) total = total + weights[name] * loss;
        total.MoveToOuterDisposeScope();
        foreach (var t in terms.Values) t.MoveToOuterDisposeScope();
        itmNegatives?.MoveToOuterDisposeScope();
        return new MamoLoss { Total = total, Terms = terms, ItmNegatives = itmNegatives };
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

    /// <summary>The teacher's targets for an unmasked pair. Call on the teacher, under no_grad.</summary>
    public TeacherTargets Targets(Tensor images, Tensor tokenIds, Tensor attentionMask)
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var imageTokens = image.forward(images, null);
        var textTokens = text.forward(tokenIds, attentionMask);
        var (_, hidden) = fusion.Forward(imageTokens, textTokens, attentionMask, keepHidden: true);
        var shape = new long[] { Config.Width };
        var topK = hidden[^Config.MrmTopK..].Select(h => F.layer_norm(h, shape)).ToArray();
        var latents = stack(topK).mean(new long[] { 0 });
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
