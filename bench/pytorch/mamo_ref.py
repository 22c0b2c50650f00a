"""MAMO (arXiv 2210.04183) in PyTorch eager: a line-by-line reference for the C# model in src/Mamo.Model.

Two uses:
  mamo_ref.py bench  --config CONFIG.json --batch-size 32 --steps 10 --threads 2 [--json]
      times the same training step as `mamo bench step` (teacher targets, student forward/backward with all
      five losses, AdamW, EMA) on a synthetic batch of the same shapes;
  mamo_ref.py timm-vit DIR
      loads the ViT that `mamo bench export-vit --out DIR` wrote under timm's names, by those names, and compares its
      image encoder's output with C#'s (the import, position resizing included); exits 1 at 1e-4 or more;
  mamo_ref.py parity DIR
      loads what `mamo bench export --out DIR` wrote (weights, batch, masks, ITM negatives, C#'s outputs),
      replays the step and prints the max relative difference of every loss, embedding, teacher target and
      gradient, and of the weights after AdamW and EMA; exits 1 if any differs by 1e-4 or more.

CONFIG.json is a MamoConfig as C# serialises it (PascalCase keys). Module attribute names follow the C# fields,
so a state_dict key is exactly TorchSharp's parameter name (image.blocks.blocks.0.attn.qkv.weight, ...).
Written for Debian's python3-torch 1.13, which has no fused scaled_dot_product_attention.
"""
import argparse
import copy
import json
import math
import random
import struct
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Config:
    """A MamoConfig read from C#'s JSON."""

    def __init__(self, d):
        self.__dict__.update(d)
        self.GridSize = self.ImageSize // self.PatchSize
        self.NumPatches = self.GridSize ** 2
        # Python's round() is banker's rounding, as C#'s Math.Round.
        if hasattr(self, "ImageMaskRatio"):  # a model config alone (export-vit) has no pre-training settings
            self.NumVisiblePatches = max(1, self.NumPatches - round(self.NumPatches * self.ImageMaskRatio))

    @staticmethod
    def load(path):
        with open(path) as f:
            return Config(json.load(f))


# ---------------------------------------------------------------------------------------------------- modules

def trunc_normal(*shape):
    return nn.Parameter(nn.init.trunc_normal_(torch.empty(*shape), std=0.02))


class SelfAttention(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x, bias):
        """x [B, L, W]; bias: additive key mask [B, 1, 1, L] (0 or -inf), or None."""
        b, l, w = x.shape
        q, k, v = self.qkv(x).view(b, l, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)  # [B, H, L, D] each
        # torch 1.13 has no fused scaled_dot_product_attention: the explicit form, as nanoGPT's fallback.
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))                         # [B, H, L, L]
        if bias is not None:
            att = att + bias
        y = att.softmax(dim=-1) @ v                                                              # [B, H, L, D]
        return self.proj(y.transpose(1, 2).reshape(b, l, w))


class Mlp(nn.Module):
    """The feed-forward network of a block: fc, GELU, proj (nanoGPT's MLP)."""

    def __init__(self, width, hidden):
        super().__init__()
        self.fc = nn.Linear(width, hidden)
        self.proj = nn.Linear(hidden, width)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, width, heads, mlp_ratio, eps=1e-5):
        super().__init__()
        self.ln1 = nn.LayerNorm(width, eps=eps)
        self.attn = SelfAttention(width, heads)
        self.ln2 = nn.LayerNorm(width, eps=eps)
        self.mlp = Mlp(width, mlp_ratio * width)

    def forward(self, x, bias):
        x = x + self.attn(self.ln1(x), bias)
        return x + self.mlp(self.ln2(x))


class BlockStack(nn.Module):
    def __init__(self, layers, width, heads, mlp_ratio, eps=1e-5):
        super().__init__()
        self.blocks = nn.ModuleList([Block(width, heads, mlp_ratio, eps) for _ in range(layers)])
        self.lnFinal = nn.LayerNorm(width, eps=eps)

    def forward(self, x, bias, keep_hidden=False):
        """Returns the normed output and, when asked for, each block's output (before the final norm)."""
        hidden = []
        for block in self.blocks:
            x = block(x, bias)
            if keep_hidden:
                hidden.append(x)
        return self.lnFinal(x), hidden


def padding_bias(attention_mask, dtype):
    """[B, L] of 1 (keep) / 0 (pad) -> additive key bias [B, 1, 1, L]."""
    bias = torch.zeros(attention_mask.shape, dtype=dtype).masked_fill(attention_mask.eq(0), float("-inf"))
    return bias[:, None, None, :]


class ImageEncoder(nn.Module):
    """ViT that, given the visible patch indices, encodes only those patches (as in MAE)."""

    def __init__(self, c):
        super().__init__()
        self.numPatches = c.NumPatches
        self.patchEmbed = nn.Conv2d(3, c.Width, c.PatchSize, stride=c.PatchSize)
        self.clsToken = trunc_normal(1, 1, c.Width)
        self.positionEmbedding = trunc_normal(1, 1 + c.NumPatches, c.Width)
        self.maskToken = trunc_normal(1, 1, c.Width)
        self.blocks = BlockStack(c.ImageLayers, c.Width, c.Heads, c.MlpRatio, getattr(c, "ImageNormEps", 1e-5))

    def forward(self, images, visible):
        """images [B, 3, S, S]; visible [B, Nv] or None -> [B, 1 + Nv, W] ([CLS] first)."""
        x = self.patchEmbed(images).flatten(2).transpose(1, 2) + self.positionEmbedding[:, 1:]  # [B, N, W]
        if visible is not None:
            x = x.gather(1, visible[..., None].expand(-1, -1, x.shape[2]))                      # [B, Nv, W]
        cls = (self.clsToken + self.positionEmbedding[:, :1]).expand(x.shape[0], -1, -1)
        return self.blocks(torch.cat([cls, x], 1), None)[0]

    def fill_masked(self, encoded, visible):
        """[B, 1 + Nv, W] -> [B, 1 + N, W]: a masked patch becomes [MASK] + its position embedding."""
        b, _, w = encoded.shape
        full = (self.maskToken + self.positionEmbedding[:, 1:]).expand(b, self.numPatches, w)
        full = full.scatter(1, visible[..., None].expand(-1, -1, w), encoded[:, 1:])
        return torch.cat([encoded[:, :1], full], 1)


class TextEncoder(nn.Module):
    """BERT-style: word + position embeddings, a norm, then blocks."""

    def __init__(self, c):
        super().__init__()
        self.wordEmbedding = nn.Embedding(c.VocabSize, c.Width)
        nn.init.normal_(self.wordEmbedding.weight, std=0.02)
        self.positionEmbedding = trunc_normal(1, c.MaxTextLength, c.Width)
        self.embeddingNorm = nn.LayerNorm(c.Width)
        self.blocks = BlockStack(c.TextLayers, c.Width, c.Heads, c.MlpRatio)

    def forward(self, token_ids, attention_mask):
        """[B, L] -> [B, L, W] ([CLS] first)."""
        x = self.embeddingNorm(self.wordEmbedding(token_ids) + self.positionEmbedding[:, :token_ids.shape[1]])
        return self.blocks(x, padding_bias(attention_mask, x.dtype))[0]


class FusionEncoder(nn.Module):
    """Self-attention over [image ; text], with a modality embedding per part."""

    def __init__(self, c):
        super().__init__()
        self.modalityEmbedding = trunc_normal(2, c.Width)
        self.blocks = BlockStack(c.FusionLayers, c.Width, c.Heads, c.MlpRatio)

    def forward(self, image, text, text_mask, keep_hidden=False):
        """image [B, Li, W], text [B, Lt, W], text_mask [B, Lt] -> [B, Li + Lt, W] (and each layer's, if asked)."""
        x = torch.cat([image + self.modalityEmbedding[0], text + self.modalityEmbedding[1]], 1)
        image_mask = torch.ones(image.shape[0], image.shape[1], dtype=text_mask.dtype)
        return self.blocks(x, padding_bias(torch.cat([image_mask, text_mask], 1), x.dtype), keep_hidden)


NEGATIVE_FLOOR = 1e-6  # keeps every other image a possible negative when softmax underflows


def sample_hard_negatives(sim, same):
    """ALBEF: one negative per row, drawn in proportion to softmax similarity, never the row's own image."""
    weights = F.softmax(sim.float(), 1).nan_to_num(0, 0, 0) + NEGATIVE_FLOOR
    weights = weights.masked_fill(same, 0)
    empty = weights.sum(1, keepdim=True).eq(0)
    weights = torch.where(empty, torch.ones_like(weights), weights)
    return torch.multinomial(weights, 1).squeeze(1)


class MlmTransform(nn.Module):
    """The feature transform before the MLM output layer, as BERT's: dense, GELU, LayerNorm."""

    def __init__(self, width):
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, x):
        return self.norm(F.gelu(self.dense(x)))


class MamoModel(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        w = c.Width
        self.image = ImageEncoder(c)
        self.text = TextEncoder(c)
        self.fusion = FusionEncoder(c)
        self.imageProjection = nn.Linear(w, c.EmbedDim)
        self.textProjection = nn.Linear(w, c.EmbedDim)
        self.temperature = nn.Parameter(torch.tensor(float(c.TemperatureInit)))
        self.itmHead = nn.Linear(w, 2)
        self.mlmTransform = MlmTransform(w)
        self.mlmBias = nn.Parameter(torch.zeros(c.VocabSize))
        self.mimDecoder = BlockStack(c.DecoderLayers, w, c.Heads, c.MlpRatio)
        self.mimHead = nn.Linear(w, w)
        self.mrmHead = nn.Linear(w, w)

    def clamp_temperature(self):
        with torch.no_grad():
            self.temperature.clamp_(self.c.TemperatureMin, self.c.TemperatureMax)

    def forward(self, images, token_ids, attention_mask, mask, targets, image_keys=None, negatives=None):
        """The pre-training forward, every enabled term computed where it is named.
        mask: the joint mask (visible, masked, masked_token_ids, masked_token_positions, masked_token_labels);
        targets: the teacher's (patch_features, fused_latents); negatives: [2, B] ITM negatives to replay, or
        None to draw them. Returns (total, {term: loss}, negatives drawn or replayed)."""
        c, lw = self.c, self.c.Weights
        terms = {}
        b, n, w = images.shape[0], c.NumPatches, c.Width
        image_visible = self.image(images, mask["visible"])                                      # [B, 1 + Nv, W]

        if lw["Itc"] > 0 or lw["Itm"] > 0:
            image_tokens = image_visible if c.AlignOnVisiblePatches else self.image(images, None)
            text_tokens = self.text(token_ids, attention_mask)                                   # [B, L, W]
            image_feat = F.normalize(self.imageProjection(image_tokens[:, 0]), dim=-1)
            text_feat = F.normalize(self.textProjection(text_tokens[:, 0]), dim=-1)
            temp = self.temperature.clamp(c.TemperatureMin, c.TemperatureMax)
            sim_i2t = image_feat @ text_feat.t() / temp                                          # [B, B]
            keys = image_keys if image_keys is not None else torch.arange(b)
            same = keys[:, None].eq(keys[None, :])                                               # pairs of one image

            if lw["Itc"] > 0:
                positives = same.to(sim_i2t.dtype)
                positives = positives / positives.sum(1, keepdim=True)
                loss_i2t = -(F.log_softmax(sim_i2t, 1) * positives).sum(1).mean()
                loss_t2i = -(F.log_softmax(sim_i2t.t(), 1) * positives).sum(1).mean()
                terms["itc"] = (loss_i2t + loss_t2i) / 2
            if lw["Itm"] > 0:
                if negatives is None:
                    with torch.no_grad():
                        negatives = torch.stack([sample_hard_negatives(sim_i2t.t(), same),   # for each text, an image
                                                 sample_hard_negatives(sim_i2t, same)])      # for each image, a text
                neg_image, neg_text = negatives[0], negatives[1]
                itm_image = torch.cat([image_tokens, image_tokens.index_select(0, neg_image), image_tokens], 0)
                itm_text = torch.cat([text_tokens, text_tokens, text_tokens.index_select(0, neg_text)], 0)
                itm_mask = torch.cat([attention_mask, attention_mask, attention_mask.index_select(0, neg_text)], 0)
                fused_cls = self.fusion(itm_image, itm_text, itm_mask)[0][:, 0]                  # [3B, W]
                labels = torch.cat([torch.ones(b, dtype=torch.long), torch.zeros(2 * b, dtype=torch.long)])
                terms["itm"] = F.cross_entropy(self.itmHead(fused_cls), labels)

        if lw["Mlm"] > 0 or lw["Mim"] > 0 or lw["Mrm"] > 0:
            text_masked = self.text(mask["masked_token_ids"], attention_mask)                    # [B, L, W]
            image_full = self.image.fill_masked(image_visible, mask["visible"])                  # [B, 1 + N, W]
            fused = self.fusion(image_full, text_masked, attention_mask)[0]                      # [B, 1 + N + L, W]
            positions = mask["masked_token_positions"]
            masked_text = fused[:, 1 + n:].reshape(-1, w).index_select(0, positions)             # [M, W]
            patch_index = mask["masked"][..., None].expand(-1, -1, w)                            # [B, Nm, W]

            if lw["Mlm"] > 0:
                logits = F.linear(self.mlmTransform(masked_text), self.text.wordEmbedding.weight, self.mlmBias)  # [M, V]
                terms["mlm"] = F.cross_entropy(logits, mask["masked_token_labels"])
            if lw["Mim"] > 0:
                decoded = self.mimHead(self.mimDecoder(fused[:, 1:1 + n], None)[0])               # [B, N, W]
                terms["mim"] = F.mse_loss(decoded.gather(1, patch_index), targets["patch_features"].gather(1, patch_index))
            if lw["Mrm"] > 0:
                predicted = self.mrmHead(fused)
                target = targets["fused_latents"]
                image_index = (mask["masked"] + 1)[..., None].expand(-1, -1, w)
                image_loss = F.mse_loss(predicted.gather(1, image_index), target.gather(1, image_index))
                text_loss = F.mse_loss(predicted[:, 1 + n:].reshape(-1, w).index_select(0, positions),
                                       target[:, 1 + n:].reshape(-1, w).index_select(0, positions))
                terms["mrm"] = (image_loss + text_loss) / 2

        weights = {"itc": lw["Itc"], "itm": lw["Itm"], "mlm": lw["Mlm"], "mim": lw["Mim"], "mrm": lw["Mrm"]}
        total = torch.zeros(())
        for name, loss in terms.items():
            total = total + weights[name] * loss
        return total, terms, negatives

    @torch.no_grad()
    def targets(self, images, token_ids, attention_mask):
        """The teacher's targets for the unmasked pair: MIM patch features and MRM fused latents."""
        image_tokens = self.image(images, None)
        text_tokens = self.text(token_ids, attention_mask)
        _, hidden = self.fusion(image_tokens, text_tokens, attention_mask, keep_hidden=True)
        shape = (self.c.Width,)
        top_k = [F.layer_norm(h, shape) for h in hidden[-self.c.MrmTopK:]]
        return {"patch_features": F.layer_norm(image_tokens[:, 1:], shape), "fused_latents": torch.stack(top_k).mean(0)}

    # inference embeddings, as MamoModel.ImageEmbedding(EncodeImage(...)) and TextEmbedding(EncodeText(...))
    def image_embedding(self, images):
        return F.normalize(self.imageProjection(self.image(images, None)[:, 0]), dim=-1)

    def text_embedding(self, token_ids, attention_mask):
        return F.normalize(self.textProjection(self.text(token_ids, attention_mask)[:, 0]), dim=-1)


# ------------------------------------------------------------------------------------------- masking, training

def sample_joint_mask(c, token_ids, attention_mask, rng):
    """JointMasking.Sample: 75% of patches and 25% of word tokens (BERT 80/10/10), drawn on the host."""
    b, l = token_ids.shape
    n, nv = c.NumPatches, c.NumVisiblePatches
    visible, masked = [], []
    for _ in range(b):
        order = list(range(n))
        rng.shuffle(order)
        visible.append(sorted(order[:nv]))
        masked.append(sorted(order[nv:]))
    ids = token_ids.tolist()
    keep = attention_mask.tolist()
    masked_ids = [row[:] for row in ids]
    positions, labels = [], []
    special = {c.ClsTokenId, c.SepTokenId, c.PadTokenId}
    for i in range(b):
        candidates = [t for t in range(l) if ids[i][t] not in special and keep[i][t] != 0]
        if not candidates or c.TextMaskRatio == 0:
            continue
        count = max(1, round(len(candidates) * c.TextMaskRatio))
        rng.shuffle(candidates)
        for t in sorted(candidates[:count]):
            positions.append(i * l + t)
            labels.append(ids[i][t])
            u = rng.random()
            if u < 0.8:
                masked_ids[i][t] = c.MaskTokenId
            elif u < 0.9:
                masked_ids[i][t] = rng.randrange(c.VocabSize)
    return {
        "visible": torch.tensor(visible, dtype=torch.long), "masked": torch.tensor(masked, dtype=torch.long),
        "masked_token_ids": torch.tensor(masked_ids, dtype=torch.long),
        "masked_token_positions": torch.tensor(positions, dtype=torch.long),
        "masked_token_labels": torch.tensor(labels, dtype=torch.long),
    }


class AdamW:
    """The C# AdamW (src/Mamo.Model/AdamW.cs): decoupled decay on weight matrices only (not on biases, norms,
    embeddings, learned tokens or the temperature), written out per parameter like the C# loop."""

    def __init__(self, named_parameters, o):
        self.o = o
        self.params = [(name, p) for name, p in named_parameters if p.requires_grad]
        self.m = [torch.zeros_like(p) for _, p in self.params]
        self.v = [torch.zeros_like(p) for _, p in self.params]
        self.decays = [p.dim() >= 2 and "Embedding" not in name and "Token" not in name for name, p in self.params]
        self.step = 0

    def zero_grad(self):
        for _, p in self.params:
            p.grad = None

    def clip_gradients(self):
        clip = self.o["ClipNorm"] if self.o["ClipNorm"] > 0 else float("inf")
        return float(nn.utils.clip_grad_norm_([p for _, p in self.params], clip))

    def learning_rate_at(self, step):
        o = self.o
        if step < o["WarmupSteps"]:
            return o["LearningRate"] * (step + 1) / o["WarmupSteps"]
        progress = min(1.0, (step - o["WarmupSteps"]) / max(1, o["DecaySteps"]))
        return o["MinLearningRate"] + 0.5 * (o["LearningRate"] - o["MinLearningRate"]) * (1 + math.cos(math.pi * progress))

    @torch.no_grad()
    def apply(self, lr):
        o = self.o
        self.step += 1
        bias1, bias2 = 1 - o["Beta1"] ** self.step, 1 - o["Beta2"] ** self.step
        for i, (_, p) in enumerate(self.params):
            g = p.grad
            if g is None:
                continue
            if self.decays[i]:
                p.mul_(1 - lr * o["WeightDecay"])
            self.m[i].mul_(o["Beta1"]).add_(g, alpha=1 - o["Beta1"])
            self.v[i].mul_(o["Beta2"]).addcmul_(g, g, value=1 - o["Beta2"])
            denom = (self.v[i] / bias2).sqrt_().add_(o["Epsilon"])
            p.addcdiv_(self.m[i], denom, value=-lr / bias1)


@torch.no_grad()
def momentum_update(teacher, student, decay):
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.mul_(decay).add_(s, alpha=1 - decay)


def create_teacher(student):
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad = False
    return teacher.eval()


OPTIMIZER_DEFAULTS = {  # OptimizerConfig's defaults
    "LearningRate": 3e-4, "MinLearningRate": 3e-5, "WarmupSteps": 200, "DecaySteps": 20000, "WeightDecay": 0.02,
    "Beta1": 0.9, "Beta2": 0.98, "Epsilon": 1e-6, "ClipNorm": 1.0,
}


class Trainer:
    """MamoTrainer.TrainStep: teacher targets, student losses, AdamW, then the EMA update."""

    def __init__(self, c, optimizer=OPTIMIZER_DEFAULTS, seed=1):
        torch.manual_seed(seed)
        self.c, self.seed, self.step = c, seed, 0
        self.student = MamoModel(c)
        self.teacher = create_teacher(self.student)
        self.optimizer = AdamW(self.student.named_parameters(), optimizer)

    def train_step(self, images, token_ids, attention_mask, image_keys=None):
        lw = self.c.Weights
        targets = self.teacher.targets(images, token_ids, attention_mask) if lw["Mim"] > 0 or lw["Mrm"] > 0 else None
        lr = self.optimizer.learning_rate_at(self.step)
        mask = sample_joint_mask(self.c, token_ids, attention_mask, random.Random(self.seed * 1_000_003 + self.step))
        self.student.train()
        self.optimizer.zero_grad()
        total, terms, _ = self.student(images, token_ids, attention_mask, mask, targets, image_keys)
        loss = total.item()
        terms = {k: v.item() for k, v in terms.items()}
        self.step += 1
        if math.isfinite(loss):
            total.backward()
            grad_norm = self.optimizer.clip_gradients()
            if math.isfinite(grad_norm):
                self.optimizer.apply(lr)
                self.student.clamp_temperature()
        momentum_update(self.teacher, self.student, self.c.MomentumDecay)
        return loss, terms


# --------------------------------------------------------------------------------------------------- bench

def step_flops(c, batch, text_length, masked_tokens):
    """StepFlops.Count in BenchCommand.cs: matmul FLOPs (2·m·n·k) of the teacher's and the student's forward;
    a step is teacher + 3 × student (backward ≈ 2 × forward)."""
    w, b, l, n, nv, lw = c.Width, batch, text_length, c.NumPatches, c.NumVisiblePatches, c.Weights

    def blocks(layers, pairs, tokens):
        return layers * ((8 + 4 * c.MlpRatio) * pairs * tokens * w * w + 4 * pairs * tokens * tokens * w)

    patch_embed = 2 * b * n * w * 3 * c.PatchSize * c.PatchSize
    student = patch_embed + blocks(c.ImageLayers, b, 1 + nv)
    if lw["Itc"] > 0 or lw["Itm"] > 0:
        image_tokens = 1 + nv
        if not c.AlignOnVisiblePatches:
            student += patch_embed + blocks(c.ImageLayers, b, 1 + n)
            image_tokens = 1 + n
        student += blocks(c.TextLayers, b, l) + 2 * (2 * b * w * c.EmbedDim) + 2 * b * b * c.EmbedDim
        if lw["Itm"] > 0:
            student += blocks(c.FusionLayers, 3 * b, image_tokens + l) + 2 * 3 * b * w * 2
    if lw["Mlm"] > 0 or lw["Mim"] > 0 or lw["Mrm"] > 0:
        student += blocks(c.TextLayers, b, l) + blocks(c.FusionLayers, b, 1 + n + l)
        if lw["Mlm"] > 0:
            student += 2 * masked_tokens * w * w + 2 * masked_tokens * w * c.VocabSize
        if lw["Mim"] > 0:
            student += blocks(c.DecoderLayers, b, n) + 2 * b * n * w * w
        if lw["Mrm"] > 0:
            student += 2 * b * (1 + n + l) * w * w
    teacher = 0.0
    if lw["Mim"] > 0 or lw["Mrm"] > 0:
        teacher = patch_embed + blocks(c.ImageLayers, b, 1 + n) + blocks(c.TextLayers, b, l) + blocks(c.FusionLayers, b, 1 + n + l)
    return teacher, student


def peak_matmul_gflops(seconds, size=1024):
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(3):
        a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or count == 0:
        a @ b
        count += 1
    return 2.0 * size ** 3 * count / (time.perf_counter() - start) / 1e9


def bench(args):
    torch.set_num_threads(args.threads)
    c = Config.load(args.config)
    b, l = args.batch_size, c.MaxTextLength
    trainer = Trainer(c, seed=1)
    images = torch.randn(b, 3, c.ImageSize, c.ImageSize)
    token_ids = torch.randint(1000, c.VocabSize, (b, l))
    token_ids[:, 0] = c.ClsTokenId
    attention_mask = torch.ones(b, l, dtype=torch.long)
    for _ in range(args.warmup):
        trainer.train_step(images, token_ids, attention_mask)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        trainer.train_step(images, token_ids, attention_mask)
        times.append((time.perf_counter() - start) * 1000)
    times.sort()
    median = times[len(times) // 2]
    masked = len(sample_joint_mask(c, token_ids, attention_mask, random.Random(0))["masked_token_positions"])
    teacher, student = step_flops(c, b, l, masked)
    flops = teacher + 3 * student
    achieved = flops / (median / 1000) / 1e9
    peak = peak_matmul_gflops(args.peak_seconds)
    report = {
        "parameters": sum(p.numel() for p in trainer.student.parameters()), "batch": b,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "steps": args.steps,
        "median_ms": median, "min_ms": times[0], "max_ms": times[-1], "pairs_per_s": b * 1000 / median,
        "teacher_forward_gflop": teacher / 1e9, "student_forward_gflop": student / 1e9, "step_gflop": flops / 1e9,
        "achieved_gflops": achieved, "peak_gflops": peak, "mfu": achieved / peak,
    }
    if args.json:
        print(json.dumps(report))
    else:
        print(f"torch {torch.__version__}, {report['parameters']:,} parameters, batch {b}, {torch.get_num_threads()} threads, cpu")
        print(f"step ms: median {median:.1f}, min {times[0]:.1f}, max {times[-1]:.1f} over {args.steps} steps; {b * 1000 / median:.1f} pairs/s")
        print(f"model FLOPs per step {flops / 1e9:.1f} GFLOP; achieved {achieved:.1f} GFLOP/s; "
              f"peak fp32 matmul {peak:.1f} GFLOP/s; MFU {100 * achieved / peak:.1f}%")


# -------------------------------------------------------------------------------------------------- parity

DTYPES = {"F32": torch.float32, "F64": torch.float64, "I64": torch.int64, "I32": torch.int32}


def load_safetensors(path):
    """safetensors by hand: an 8-byte little-endian header length, a JSON header, then raw little-endian bytes."""
    with open(path, "rb") as f:
        data = f.read()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    start = 8 + length
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        dtype = DTYPES[entry["dtype"]]
        flat = torch.frombuffer(bytearray(data[start + begin:start + end]), dtype=dtype) if end > begin else torch.empty(0, dtype=dtype)
        tensors[name] = flat.reshape(entry["shape"])
    return tensors


def load_weights(model, path):
    saved = load_safetensors(path)
    own = dict(model.named_parameters())
    if set(saved) != set(own):
        raise SystemExit(f"{path}: names differ from the reference model's: only in file {sorted(set(saved) - set(own))[:5]}, "
                         f"only in model {sorted(set(own) - set(saved))[:5]}")
    with torch.no_grad():
        for name, p in own.items():
            p.copy_(saved[name])


def relative_difference(ours, theirs):
    """max |ours - theirs| / max |theirs|, in float64."""
    ours, theirs = ours.detach().double(), theirs.detach().double()
    return ((ours - theirs).abs().max() / theirs.abs().max().clamp_min(1e-30)).item()


def parity(args):
    torch.set_num_threads(args.threads)
    d = args.dir.rstrip("/")
    c = Config.load(f"{d}/config.json")
    with open(f"{d}/step.json") as f:
        info = json.load(f)
    batch = load_safetensors(f"{d}/batch.safetensors")
    draws = load_safetensors(f"{d}/draws.safetensors")
    expected = load_safetensors(f"{d}/expected.safetensors")
    student, teacher = MamoModel(c), MamoModel(c)
    load_weights(student, f"{d}/student.safetensors")
    load_weights(teacher, f"{d}/teacher.safetensors")
    for p in teacher.parameters():
        p.requires_grad = False
    teacher.eval()
    images, token_ids, attention_mask, keys = batch["images"], batch["token_ids"], batch["attention_mask"], batch["image_keys"]

    rows = []  # (what, max relative difference)

    def compare(what, ours, theirs):
        rows.append((what, relative_difference(ours, theirs)))

    targets = teacher.targets(images, token_ids, attention_mask)
    compare("teacher.patch_features", targets["patch_features"], expected["teacher.patch_features"])
    compare("teacher.fused_latents", targets["fused_latents"], expected["teacher.fused_latents"])

    student.train()
    total, terms, _ = student(images, token_ids, attention_mask, draws, targets, keys, negatives=draws["itm_negatives"])
    compare("loss.total", total, expected["loss.total"])
    for name, loss in terms.items():
        compare(f"loss.{name}", loss, expected[f"loss.{name}"])
    total.backward()
    with torch.no_grad():
        compare("image_embedding", student.image_embedding(images), expected["image_embedding"])
        compare("text_embedding", student.text_embedding(token_ids, attention_mask), expected["text_embedding"])
    grads = [(name, relative_difference(p.grad, expected[f"grad.{name}"])) for name, p in student.named_parameters()]
    worst = max(grads, key=lambda g: g[1])
    rows.append((f"gradients (worst of {len(grads)}: {worst[0]})", worst[1]))

    own_norm = torch.stack([p.grad.norm() for p in student.parameters()]).norm().item()
    rows.append(("grad norm (before clipping)", abs(own_norm - info["grad_norm"]) / info["grad_norm"]))

    # The rest of the step (clip, AdamW, temperature clamp, EMA) on C#'s gradients, so that what is compared is
    # the optimiser alone: AdamW's first step is lr·g/(|g| + eps), which turns a 1e-6 relative difference in a
    # gradient near eps into a much larger one in the update of a weight that starts at 0 (a bias).
    for name, p in student.named_parameters():
        p.grad = expected[f"grad.{name}"].clone()
    optimizer = AdamW(student.named_parameters(), info["optimizer"])
    optimizer.clip_gradients()
    optimizer.apply(info["learning_rate"])
    student.clamp_temperature()
    momentum_update(teacher, student, info["momentum_decay"])
    for which, model in (("student", student), ("teacher", teacher)):
        after = load_safetensors(f"{d}/{which}_step1.safetensors")
        diffs = [(name, relative_difference(p, after[name])) for name, p in model.named_parameters()]
        worst = max(diffs, key=lambda x: x[1])
        rows.append((f"{which} weights after AdamW + EMA (worst: {worst[0]})", worst[1]))

    print(f"parity of {d}: {c.ImageSize}px, width {c.Width}, batch {images.shape[0]}, torch {torch.__version__}, "
          f"max relative difference = max|py - c#| / max|c#|, gate < {args.tolerance:g}")
    failed = False
    for what, diff in rows:
        bad = not diff < args.tolerance
        failed |= bad
        print(f"  {what:<68} {diff:.3e}  {'FAIL' if bad else 'ok'}")
    print("parity FAILED" if failed else "parity ok")
    return 1 if failed else 0


# timm's VisionTransformer state dict (timm/models/vision_transformer.py) -> this ImageEncoder's attribute names.
TIMM_NAMES = {
    "cls_token": "clsToken", "pos_embed": "positionEmbedding",
    "patch_embed.proj.weight": "patchEmbed.weight", "patch_embed.proj.bias": "patchEmbed.bias",
    "norm.weight": "blocks.lnFinal.weight", "norm.bias": "blocks.lnFinal.bias",
}
TIMM_BLOCK_NAMES = {"norm1": "ln1", "attn.qkv": "attn.qkv", "attn.proj": "attn.proj", "norm2": "ln2", "mlp.fc1": "mlp.fc", "mlp.fc2": "mlp.proj"}


def from_timm(name):
    if name in TIMM_NAMES:
        return TIMM_NAMES[name]
    parts = name.split(".")
    if parts[0] == "blocks":
        inner, leaf = ".".join(parts[2:-1]), parts[-1]
        return f"blocks.blocks.{parts[1]}.{TIMM_BLOCK_NAMES[inner]}.{leaf}"
    return None  # head.*: the classifier is not part of the encoder


def timm_vit(args):
    """Loads timm.safetensors by timm's names into the reference ImageEncoder (the position grid resized as timm's
    resample_abs_pos_embed does: bicubic, align_corners=False, class token kept) and compares its output with C#'s."""
    torch.set_num_threads(args.threads)
    d = args.dir.rstrip("/")
    c = Config.load(f"{d}/config.json")
    encoder = ImageEncoder(c).eval()
    own = dict(encoder.named_parameters())
    loaded = set()
    with torch.no_grad():
        for name, value in load_safetensors(f"{d}/timm.safetensors").items():
            target = from_timm(name)
            if target is None:
                continue
            if target == "positionEmbedding" and value.shape != own[target].shape:
                g = int(round(math.sqrt(value.shape[1] - 1)))
                grid = value[:, 1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
                grid = F.interpolate(grid, size=(c.GridSize, c.GridSize), mode="bicubic", align_corners=False)
                value = torch.cat([value[:, :1], grid.permute(0, 2, 3, 1).reshape(1, c.NumPatches, -1)], 1)
            own[target].copy_(value)
            loaded.add(target)
    missing = sorted(set(own) - loaded - {"maskToken"})
    if missing:
        raise SystemExit(f"timm.safetensors lacks {missing[:5]}")
    expected = load_safetensors(f"{d}/expected.safetensors")
    with torch.no_grad():
        ours = encoder(expected["images"], None)
    diff = relative_difference(ours, expected["features"])
    ok = diff < args.tolerance
    print(f"timm-vit parity of {d}: {c.ImageSize}px, width {c.Width}, {c.ImageLayers} blocks, eps {c.ImageNormEps:g}, torch {torch.__version__}: "
          f"max|py - c#| / max|c#| = {diff:.3e} ({'ok' if ok else 'FAIL'}, gate < {args.tolerance:g})")
    return 0 if ok else 1


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="time the training step")
    b.add_argument("--config", required=True, help="MamoConfig JSON (from `mamo bench step --steps 0 --json`)")
    b.add_argument("--batch-size", type=int, default=32)
    b.add_argument("--steps", type=int, default=10)
    b.add_argument("--warmup", type=int, default=3)
    b.add_argument("--threads", type=int, default=2)
    b.add_argument("--peak-seconds", type=float, default=1.0)
    b.add_argument("--json", action="store_true")
    p = sub.add_parser("parity", help="replay a step exported by `mamo bench export` and compare")
    p.add_argument("dir")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tolerance", type=float, default=1e-4)
    v = sub.add_parser("timm-vit", help="load a ViT by timm's names and compare with `mamo bench export-vit`'s output")
    v.add_argument("dir")
    v.add_argument("--threads", type=int, default=2)
    v.add_argument("--tolerance", type=float, default=1e-4)
    args = parser.parse_args()
    return {"bench": bench, "parity": parity, "timm-vit": timm_vit}[args.command](args)


if __name__ == "__main__":
    sys.exit(main() or 0)
