"""A masked autoencoder (He et al., 2022) that restores masked image tokens, for BDMAE.

BDMAE restores chosen image patches with a masked autoencoder and watches how the frozen
classifier reacts. This module provides the autoencoder: a ViT encoder that sees only the
visible patches, and a light decoder that predicts the pixels of every patch.

Two things differ from a training-only MAE implementation, both because BDMAE needs them:

- **Masks are given, per image, with any number of hidden tokens.** BDMAE restores regions of
  different sizes in different images of one batch. The encoder gathers each image's visible
  tokens, pads the batch to the longest, and excludes the padding with an attention mask, so an
  image's restoration never depends on the rest of its batch.
- **Inputs and outputs are images in [0, 1].** Normalisation (ImageNet statistics, as the
  reference MAE checkpoints expect) happens inside, and :meth:`MaskedAutoencoder.restore`
  composites the prediction into the masked patches only.

Parameter names follow the reference MAE implementation (``patch_embed.proj``, ``cls_token``,
``pos_embed``, ``blocks.i.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``,
``decoder_embed``, ``mask_token``, ``decoder_pos_embed``, ``decoder_blocks.i.*``,
``decoder_norm``, ``decoder_pred``), so its published ``state_dict`` files load unchanged when
the architecture arguments match (ViT-B/16: ``img_size=224, patch_size=16, embed_dim=768,
depth=12, num_heads=12, decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16``).
Use a checkpoint trained without ``norm_pix_loss`` (the "visualize" ones): BDMAE needs pixels.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass as pydantic_dataclass
from torch import Tensor, nn

from bench.core.device import to_float
from bench.core.errors import BenchError
from bench.nn import augment
from bench.nn.loop import Batches, LoopOptions, fit_loop, make_optimizer

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------- positional embedding


def sincos_pos_embed(dim: int, grid: int, cls_token: bool = True) -> Tensor:
    """Fixed 2-D sine-cosine position embedding of a ``grid x grid`` token map, (1, [1+]grid^2, dim).

    Half of the channels encode the row, half the column; the class token gets zeros.
    """
    if dim % 4:
        raise ValueError(f"the embedding width must be a multiple of 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4.0))
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                indexing="ij")  # fmt: skip

    def encode(pos: Tensor) -> Tensor:
        angles = pos.reshape(-1, 1) * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    emb = torch.cat([encode(cols), encode(rows)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=torch.float64), emb], dim=0)
    return emb.float().unsqueeze(0)


# --------------------------------------------------------------------------- transformer pieces


class Attention(nn.Module):
    """Multi-head self-attention whose keys can be masked out per sample."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, key_valid: Tensor | None = None) -> Tensor:
        n, length, dim = x.shape
        qkv = self.qkv(x).reshape(n, length, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        mask = None if key_valid is None else key_valid[:, None, None, :]
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(n, length, dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block (attention, then MLP, each with a residual)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, key_valid: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.norm1(x), key_valid)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


# --------------------------------------------------------------------------- the autoencoder


@pydantic_dataclass(config=ConfigDict(extra="forbid", allow_inf_nan=False))
class MAEConfig:
    """Architecture of a :class:`MaskedAutoencoder` (a small ViT by default, for 32-px images)."""

    img_size: int = Field(32, ge=1)
    patch_size: int = Field(4, ge=1)
    in_chans: int = Field(3, ge=1)
    embed_dim: int = Field(192, ge=4, multiple_of=4)
    depth: int = Field(6, ge=1)
    num_heads: int = Field(3, ge=1)
    decoder_embed_dim: int = Field(128, ge=4, multiple_of=4)
    decoder_depth: int = Field(2, ge=1)
    decoder_num_heads: int = Field(4, ge=1)
    mlp_ratio: float = Field(4.0, gt=0)

    def __post_init__(self) -> None:
        if self.img_size % self.patch_size:
            raise ValueError(f"patch_size {self.patch_size} must divide img_size {self.img_size}")


class MaskedAutoencoder(nn.Module):
    """ViT masked autoencoder on images in [0, 1]; masks are (N, L) bools, True = hidden."""

    def __init__(self, config: MAEConfig | None = None) -> None:
        super().__init__()
        cfg = config or MAEConfig()
        self.config = cfg
        self.patch_size = cfg.patch_size
        self.grid = cfg.img_size // cfg.patch_size
        self.num_tokens = self.grid**2
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if cfg.in_chans == 3 else ((0.5,) * cfg.in_chans, (0.25,) * cfg.in_chans)
        # Not part of the state dict: reference checkpoints do not carry them.
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, cfg.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.pos_embed = nn.Parameter(sincos_pos_embed(cfg.embed_dim, self.grid), requires_grad=False)
        self.blocks = nn.ModuleList(Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=1e-6)

        self.decoder_embed = nn.Linear(cfg.embed_dim, cfg.decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(sincos_pos_embed(cfg.decoder_embed_dim, self.grid), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            Block(cfg.decoder_embed_dim, cfg.decoder_num_heads, cfg.mlp_ratio) for _ in range(cfg.decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(cfg.decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(cfg.decoder_embed_dim, cfg.patch_size**2 * cfg.in_chans)
        self._init_weights()

    def _init_weights(self) -> None:
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    # ------------------------------------------------------------------ patches
    def patchify(self, x: Tensor) -> Tensor:
        """(N, C, H, W) -> (N, L, p*p*C), patches in row-major order."""
        n, c, _, _ = x.shape
        p, g = self.patch_size, self.grid
        return x.reshape(n, c, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(n, g * g, p * p * c)

    def unpatchify(self, patches: Tensor) -> Tensor:
        """(N, L, p*p*C) -> (N, C, H, W)."""
        n = patches.shape[0]
        p, g = self.patch_size, self.grid
        c = patches.shape[-1] // (p * p)
        return patches.reshape(n, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(n, c, g * p, g * p)

    def token_mask_to_pixels(self, mask: Tensor) -> Tensor:
        """(N, L) token mask -> (N, 1, H, W) float pixel mask."""
        n = mask.shape[0]
        grid = mask.float().view(n, 1, self.grid, self.grid)
        return grid.repeat_interleave(self.patch_size, 2).repeat_interleave(self.patch_size, 3)

    # ------------------------------------------------------------------ forward
    def encode(self, x: Tensor, mask: Tensor, visible_count: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Encode the visible tokens of normalised images; returns (latent, token ids, valid).

        ``visible_count``: the number of visible tokens when every image has that many (training masks
        do), which spares the host the two synchronisations that find the longest row.
        """
        n = x.shape[0]
        tokens = self.patch_embed(x) + self.pos_embed[:, 1:]
        keep = ~mask
        counts = keep.sum(1)
        longest = int(counts.max().item()) if visible_count is None else visible_count
        # Visible tokens first, in their original order; padding ids point at hidden tokens.
        order = torch.argsort(mask.to(torch.int8), dim=1, stable=True)[:, :longest]
        visible = tokens.gather(1, order[..., None].expand(-1, -1, tokens.shape[-1]))
        valid = torch.arange(longest, device=x.device)[None] < counts[:, None]
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(n, -1, -1)
        seq = torch.cat([cls, visible], dim=1)
        valid = torch.cat([torch.ones(n, 1, dtype=torch.bool, device=x.device), valid], dim=1)
        key_valid = None if visible_count is not None or bool(valid.all()) else valid
        for block in self.blocks:
            seq = block(seq, key_valid)
        return self.norm(seq), order, valid

    def decode(self, latent: Tensor, order: Tensor, valid: Tensor) -> Tensor:
        """Predict every token's normalised pixels (N, L, p*p*C) from the encoded visible tokens."""
        n = latent.shape[0]
        z = self.decoder_embed(latent)
        full = self.mask_token.expand(n, self.num_tokens, -1).clone()
        rows = torch.arange(n, device=z.device)[:, None].expand_as(order)
        vis = valid[:, 1:]
        full[rows[vis], order[vis]] = z[:, 1:][vis]
        seq = torch.cat([z[:, :1], full], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            seq = block(seq)
        return self.decoder_pred(self.decoder_norm(seq))[:, 1:]

    def forward(self, images: Tensor, mask: Tensor, visible_count: int | None = None) -> Tensor:
        """Predicted pixels of every token, normalised, (N, L, p*p*C), for images in [0, 1]
        (``visible_count``: see :meth:`encode`)."""
        x = (images - self.mean) / self.std
        latent, order, valid = self.encode(x, mask, visible_count)
        return self.decode(latent, order, valid)

    def loss(self, images: Tensor, mask: Tensor, visible_count: int | None = None) -> Tensor:
        """Mean squared error on the hidden tokens, in normalised pixel space (MAE's objective)."""
        pred = self(images, mask, visible_count)
        target = self.patchify((images - self.mean) / self.std)
        per_token = (pred - target).pow(2).mean(-1)
        m = mask.float()
        return (per_token * m).sum() / m.sum().clamp(min=1)

    @torch.no_grad()
    def reconstruct(self, images: Tensor, mask: Tensor) -> Tensor:
        """The decoder's full image prediction in [0, 1] (every token predicted)."""
        pred = self.unpatchify(self(images, mask))
        return (pred * self.std + self.mean).clamp(0, 1)

    @torch.no_grad()
    def restore(self, images: Tensor, mask: Tensor) -> Tensor:
        """``x * (1 - m) + MAE(x) * m``: hidden tokens replaced by their restoration."""
        pixels = self.token_mask_to_pixels(mask)
        return images * (1 - pixels) + self.reconstruct(images, mask) * pixels


def hidden_count(num_tokens: int, ratio: float) -> int:
    """How many of ``num_tokens`` tokens a :func:`random_token_masks` mask of ``ratio`` hides."""
    return int(round(ratio * num_tokens))


def random_token_masks(n: int, num_tokens: int, ratio: float, gen: torch.Generator, device: torch.device) -> Tensor:
    """(n, num_tokens) bool masks hiding ``round(ratio * num_tokens)`` tokens, drawn per row."""
    hidden = hidden_count(num_tokens, ratio)
    noise = torch.rand(n, num_tokens, generator=gen, device=device)
    ranks = noise.argsort(dim=1).argsort(dim=1)
    return ranks < hidden


def complementary_token_masks(count: int, n: int, num_tokens: int, ratio: float, gen: torch.Generator,
                              device: torch.device) -> Tensor:  # fmt: skip
    """(count, n, num_tokens) bool: BDMAE's official initial masks, the same for every image.

    Random permutations of the tokens are laid end to end and cut into consecutive windows of
    ``round(ratio * num_tokens)`` tokens, one per mask: every token is hidden exactly once per
    permutation the windows span (at ratio 0.5, masks 2i and 2i+1 are complements), so the masks
    of a round cover the grid evenly instead of independently at random. A window across two
    permutations may hold a token twice and then hides fewer tokens, as in the official code.
    """
    hidden = int(round(ratio * num_tokens))
    perms = -(-count * hidden // num_tokens)  # ceil
    stream = torch.cat([torch.randperm(num_tokens, generator=gen, device=gen.device) for _ in range(perms)])
    masks = torch.zeros(count, num_tokens, dtype=torch.bool, device=gen.device)
    for i in range(count):
        masks[i, stream[i * hidden : (i + 1) * hidden]] = True
    return masks.to(device)[:, None, :].expand(count, n, num_tokens)


# --------------------------------------------------------------------------- loading and training


def load_mae_weights(model: MaskedAutoencoder, path: str | Path) -> None:
    """Load a reference-format MAE checkpoint: a state dict, or a dict holding it under ``model``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise BenchError(f"MAE weights file {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise BenchError(f"cannot read MAE weights {path}: {err}") from None
    state = payload.get("model", payload) if isinstance(payload, dict) else None
    if not isinstance(state, dict):
        raise BenchError(f"MAE weights {path}: expected a state dict (optionally under 'model')")
    wanted = model.state_dict()
    missing = [k for k in wanted if k not in state]
    mismatched = [k for k in wanted if k in state and tuple(state[k].shape) != tuple(wanted[k].shape)]
    if missing or mismatched:
        raise BenchError(
            f"MAE weights {path} do not fit the configured architecture "
            f"(missing {missing[:3]}, shape mismatch {mismatched[:3]}); set the defense's 'mae' parameters to match"
        )
    model.load_state_dict({k: state[k] for k in wanted})


@pydantic_dataclass(config=ConfigDict(extra="forbid", allow_inf_nan=False))
class MAERecipe:
    """MAE pre-training recipe (He et al.): AdamW, betas (0.9, 0.95), weight decay 0.05, base lr
    1.5e-4 per 256 images, cosine decay after a linear warm-up, mask ratio 0.75, random resized
    crop (0.2-1) and flip. ``epochs`` is small by the paper's standard (800) because the
    autoencoder here is small and trained on the defender's benign split only.
    """

    epochs: int = Field(200, ge=1, description="training epochs")
    batch_size: int = Field(256, ge=1, description="batch size")
    blr: float = Field(1.5e-4, gt=0, description="base learning rate per 256 images")
    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay")
    warmup_epochs: int = Field(10, ge=0, description="epochs of linear lr warm-up")
    mask_ratio: float = Field(0.75, gt=0, lt=1, description="share of tokens hidden per training image")
    min_crop: float = Field(0.2, gt=0, le=1, description="smallest area of the random resized crop")
    flip: bool = Field(True, description="random horizontal flip")
    amp: bool = Field(True, description="bf16 autocast on CUDA")
    compile: bool = Field(False, description="torch.compile the loss (the autoencoder's passes); not measured faster")


class WarmupCosine(torch.optim.lr_scheduler.LRScheduler):
    """Linear warm-up to ``base`` over ``warmup`` steps, then half-cosine decay to 0 at ``total``;
    stepped once per optimizer step."""

    def __init__(self, optimizer: torch.optim.Optimizer, base: float, warmup: int, total: int) -> None:
        self.base, self.warmup, self.total = base, warmup, total
        super().__init__(optimizer)

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.base * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        return self.base * 0.5 * (1 + math.cos(math.pi * progress))

    def get_lr(self) -> list[float]:
        return [self.lr_at(self.last_epoch)] * len(self.optimizer.param_groups)


def train_mae(
    model: MaskedAutoencoder, images: Tensor, recipe: MAERecipe, device: torch.device, gen: torch.Generator
) -> MaskedAutoencoder:
    """Pre-train ``model`` on uint8 ``images`` (N, C, H, W) with random masking; returns it in eval mode."""
    model.to(device)
    images = images.to(device)
    n = images.shape[0]
    hidden = hidden_count(model.num_tokens, recipe.mask_ratio)

    def prepare(idx: Tensor) -> tuple[Tensor, Tensor]:
        x = augment.random_resized_crop(to_float(images[idx]), gen, scale=(recipe.min_crop, 1.0))
        if recipe.flip:
            x = augment.random_flip(x, gen)
        return x, random_token_masks(x.shape[0], model.num_tokens, recipe.mask_ratio, gen, device)

    def loss(batch: tuple[Tensor, Tensor]) -> Tensor:
        return model.loss(*batch, visible_count=model.num_tokens - hidden)

    batches = Batches(n, min(recipe.batch_size, n), gen, prepare)
    lr = recipe.blr * batches.batch_size / 256
    decay = [p for name, p in model.named_parameters() if p.requires_grad and p.ndim > 1 and "token" not in name]
    no_decay = [p for name, p in model.named_parameters() if p.requires_grad and (p.ndim <= 1 or "token" in name)]
    optimizer = make_optimizer("adamw", [{"params": decay, "weight_decay": recipe.weight_decay},
                                         {"params": no_decay, "weight_decay": 0.0}], device, lr=lr, betas=(0.9, 0.95))  # fmt: skip
    steps = len(batches)
    schedule = WarmupCosine(optimizer, lr, recipe.warmup_epochs * steps, recipe.epochs * steps)
    fit_loop(optimizer, batches, loss, recipe.epochs, device=device, job="bdmae: train MAE", hint="lower mae_train.blr",
             train=[model], scheduler=schedule, options=LoopOptions.of(recipe))  # fmt: skip
    return model
