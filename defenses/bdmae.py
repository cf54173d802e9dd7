"""BDMAE (Sun et al., 2023, "Mask and Restore: Blind Backdoor Defense at Test Time with Masked
Autoencoder"): find the trigger's tokens per image, then restore them with a masked autoencoder.

For each test image x with prediction y0 = f(x), on the autoencoder's token grid:

1. **Initial scores.** ``init_rounds x init_masks`` random masks hiding ``mask_ratio`` of the
   tokens are restored. The *label* score of a token is the share of masks that hide it *and*
   change the prediction; the *structural* score is 1 - SSIM (11x11 Gaussian, sigma 1.5)
   between x and the mean restoration so far, averaged within each token and over the rounds.
   A trigger is what the model reacts to and what the autoencoder cannot reproduce.
2. **Topology-aware refinement** (each score separately, ``refine_rounds`` times): take the
   top-K tokens (structural: K = #tokens scoring >= ``struct_threshold``; label: K = mean score
   x #tokens), grow a connected region of K/2 of them from a seed drawn by score (neighbours get
   a ``topo_bonus``), restore only that region. If the prediction returns to y0 unchanged, the
   region is not the trigger: its scores drop by ``refine_step`` and the rest of the top-K rise;
   if it changes, the opposite. Triggers are compact, so scores concentrate on one blob.
3. **Purification.** Fused score S = alpha S_struct + (1 - alpha) S_label. Tokens above each of
   the thresholds 0.6, 0.55, ..., 0.4 are restored (thresholds are raised, x1/0.99 steps, until
   less than ``max_restore`` of the tokens pass the lowest one, and the count is capped there);
   the restorations are averaged and the frozen model classifies the result.

All of it runs per image by default: the official code sizes K and the purification thresholds
from batch means (``per_image: false``), which makes an image's result depend on its
batch-mates. Two more official details are options too: ``initial_masks: complementary`` (one
set of masks for the whole batch, consecutive windows over random token permutations, so a
round's masks cover the grid evenly; see :func:`bench.nn.mae.complementary_token_masks`) and
``token_sampling: nearest`` (the structural score of a token is the dissimilarity map sampled by
nearest-neighbour resizing to the token grid rather than averaged over the token). ``max_restore`` is the intensity knob; it does not
affect the fitted state (the autoencoder), so sweeping it never retrains.

The autoencoder. The paper restores with an ImageNet-pretrained MAE (ViT-B/16 at 224 px);
``mae_weights`` loads such a file (see :mod:`bench.nn.mae` for the format; set ``mae`` to its
architecture, e.g. ``{img_size: 224, patch_size: 16, embed_dim: 768, depth: 12, num_heads: 12,
decoder_embed_dim: 512, decoder_depth: 8, decoder_num_heads: 16}``; images are then resized to
224 and back). Without one, a small MAE is trained on the defender's benign images (labels
unused) at the data's own resolution -- 4-px patches on 32-px images, an 8x8 token grid, rather
than resizing to 224 -- which is the offline deviation from the paper. Everything else is label-free.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, ValidationError, field_validator
from torch import Tensor
from tqdm.auto import tqdm

from bench.core.data import ImageSet
from bench.core.params import PluginParams
from bench.core.plugin import DatasetMeta
from bench.core.registry import DEFENSES
from bench.core.seeding import derive_seed, generator
from bench.nn.mae import (
    MAEConfig,
    MAERecipe,
    MaskedAutoencoder,
    complementary_token_masks,
    load_mae_weights,
    random_token_masks,
    train_mae,
)
from bench.nn.ssim import ssim_map
from defenses.base import Defense, DefenseContext


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in chunks (pretrained MAE weights are hundreds of MB)."""
    digest = hashlib.sha256()
    with open(Path(path).expanduser(), "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------- token-grid helpers


def grid_adjacency(grid: int, device: torch.device | None = None) -> Tensor:
    """(L, L) bool: 4-neighbourhood of a ``grid x grid`` token map in row-major order."""
    idx = torch.arange(grid * grid, device=device)
    row, col = idx // grid, idx % grid
    drow = (row[:, None] - row[None, :]).abs()
    dcol = (col[:, None] - col[None, :]).abs()
    return (drow + dcol) == 1


def top_k_mask(scores: Tensor, k: Tensor) -> Tensor:
    """(N, L) bool selecting each row's ``k[i]`` highest scores (ties broken by position)."""
    ranks = torch.argsort(torch.argsort(scores, dim=1, descending=True, stable=True), dim=1)
    return ranks < k[:, None]


def grow_regions(
    scores: Tensor, allowed: Tensor, sizes: Tensor, adjacency: Tensor, gen: torch.Generator, bonus: float
) -> Tensor:
    """Grow one region of ``sizes[i]`` tokens inside ``allowed[i]`` per row (N, L) -> bool (N, L).

    Each step takes the argmax of ``u * (score + bonus * is_neighbour)`` over allowed, unselected
    tokens (u uniform): high scores and contact with the region are preferred, with randomness.
    The first step has no neighbours, so the seed is a score-weighted random draw.
    """
    n, length = scores.shape
    selected = torch.zeros(n, length, dtype=torch.bool, device=scores.device)
    frontier = torch.zeros(n, length, device=scores.device)
    blocked = (~allowed).float() * 100
    for step in range(int(sizes.max().item()) if sizes.numel() else 0):
        active = step < sizes
        u = torch.rand(n, length, generator=gen, device=scores.device)
        priority = u * (scores + bonus * frontier) - blocked - selected.float() * 100
        pick = priority.argmax(1)
        chosen = F.one_hot(pick, length).bool() & active[:, None]
        selected |= chosen
        frontier = (frontier + adjacency[pick].float() * active[:, None].float()).clamp(max=1)
        frontier = frontier * (~selected).float()
    return selected


def refine_scores(
    scores: Tensor,
    k: Tensor,
    restore_and_predict: Callable[[Tensor, Tensor], Tensor],
    y0: Tensor,
    adjacency: Tensor,
    rounds: int,
    step: float,
    bonus: float,
    gen: torch.Generator,
    on_round: Callable[[], None] | None = None,
) -> Tensor:
    """Topology-aware refinement (see the module docstring); returns the refined scores.

    ``restore_and_predict(mask, rows)`` restores the tokens ``mask`` hides in the images selected
    by the bool vector ``rows`` and returns the model's labels for them.
    """
    scores = scores.clone()
    for _ in range(rounds):
        top = top_k_mask(scores, k)
        region = grow_regions(scores, top, k // 2, adjacency, gen, bonus)
        rest = top & ~region
        pred = y0.clone()
        rows = region.any(1)  # restoring nothing leaves x, hence y0: skip those rows
        if bool(rows.any()):
            pred[rows] = restore_and_predict(region[rows], rows)
        beta = torch.where(pred == y0, step, -step).to(scores.dtype)[:, None]
        scores = scores - beta * region.float() + beta * rest.float()
        if on_round is not None:
            on_round()
    return scores


def token_structural_scores(dissimilarity: Tensor, grid: int, sampling: str = "mean") -> Tensor:
    """(N, H, W) pixel dissimilarity -> (N, grid**2) per-token scores: the mean over each token's
    pixels, or (``nearest``, the official code) ``F.interpolate(..., mode="nearest")`` to the
    grid, which samples pixel ``floor(i * H / grid)`` of each row and column (a token's top-left
    pixel when H is a multiple of the grid)."""
    if sampling == "nearest":
        return F.interpolate(dissimilarity[:, None], size=(grid, grid), mode="nearest").flatten(1)
    return F.adaptive_avg_pool2d(dissimilarity[:, None], grid).flatten(1)


def batch_mean_k(k: Tensor) -> Tensor:
    """Every image's K replaced by ``int(mean K)`` over the batch, as the official code sizes it."""
    return torch.full_like(k, int(k.float().mean().item()))


def purification_masks(scores: Tensor, start: float, step: float, count: int, cap: float, shrink_steps: int = 200,
                       per_image: bool = True) -> Tensor:  # fmt: skip
    """(count, N, L) bool masks of the tokens to restore at each threshold, nested, per image.

    Thresholds are ``start, start - step, ...`` (0.6 .. 0.4). While at least ``cap`` of an
    image's tokens pass the lowest one, all of that image's thresholds are raised (the distance
    to 1 shrinks by 1 % per step, at most ``shrink_steps`` times); each mask also holds at most
    ``floor(cap * L)`` tokens, so ``cap`` bounds the restored area. With ``per_image: False``
    (the official code) the share that stops the raising is the batch's and each threshold's
    token count is the batch mean (truncated), the same for every image.
    """
    n, length = scores.shape
    distance = 1 - start + step * torch.arange(count, device=scores.device, dtype=scores.dtype)  # 0.4 .. 0.6
    shrink = 0.99 ** torch.arange(shrink_steps + 1, device=scores.device, dtype=scores.dtype)
    lowest = 1 - shrink * distance[-1]  # (S+1,)
    share = (scores[:, None, :] >= lowest[None, :, None]).float().mean(-1)  # (N, S+1)
    if not per_image:
        share = share.mean(0, keepdim=True).expand(n, -1)
    ok = share < cap
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full_like(ok[:, 0], shrink_steps, dtype=torch.long))
    thresholds = 1 - shrink[first][:, None] * distance[None, :]  # (N, count)
    k = (scores[:, None, :] >= thresholds[:, :, None]).sum(-1)  # (N, count)
    if not per_image:
        k = k.float().mean(0, keepdim=True).long().expand(n, -1)
    k = k.clamp(max=int(cap * length))
    return torch.stack([top_k_mask(scores, k[:, i]) for i in range(count)])


# --------------------------------------------------------------------------- the defense


@DEFENSES.register("bdmae")
class BDMAE(Defense):
    """Masked-autoencoder restoration of the tokens that trigger a prediction change (intensity: max_restore)."""

    intensity_param = "max_restore"
    trainable = True
    version = 2  # options for the official initial masks, token sampling and batch-level K
    intensity_affects_fit = False

    class Params(PluginParams):
        max_restore: float = Field(0.25, ge=0, le=1, description="largest share of tokens restored per image (intensity)")
        mask_ratio: float = Field(0.75, gt=0, lt=1, description="share of tokens hidden by each random mask of the initial scores")
        init_rounds: int = Field(5, ge=1, description="rounds of random masks for the initial scores")
        init_masks: int = Field(5, ge=1, description="random masks per round")
        refine_rounds: int = Field(10, ge=0, description="rounds of topology-aware refinement (each score)")
        refine_step: float = Field(0.05, ge=0, description="score change per refinement round")
        topo_bonus: float = Field(0.5, ge=0, description="priority bonus of tokens next to the growing region")
        struct_threshold: float = Field(0.2, description="structural score from which a token counts as suspicious")
        alpha: float = Field(0.5, ge=0, le=1, description="weight of the structural score in the fused score")
        threshold_start: float = Field(0.6, description="highest purification threshold")
        threshold_step: float = Field(0.05, gt=0, description="distance between purification thresholds")
        num_thresholds: int = Field(5, ge=1, description="purification thresholds (restorations averaged)")
        initial_masks: Literal["random", "complementary"] = Field(
            "random", description="random: independent masks per image; complementary: the official masks, shared by the "
            "batch, consecutive windows over random token permutations")
        token_sampling: Literal["mean", "nearest"] = Field(
            "mean", description="structural token score: mean over the token's pixels, or nearest (official: "
            "F.interpolate nearest to the token grid)")
        per_image: bool = Field(
            True, description="K and the purification thresholds per image; false: from batch means (official code; an "
            "image's result then depends on its batch-mates)")
        mae_weights: str | None = Field(None, description="a pretrained MAE state-dict file; null: train a small MAE on the benign data")
        mae: dict[str, Any] = Field({}, description="MAE architecture settings overriding the data's defaults (see bench.nn.mae.MAEConfig)")
        mae_train: MAERecipe = Field(default_factory=MAERecipe, description="MAE training recipe (see bench.nn.mae.MAERecipe)")
        benign_fraction: float | None = Field(
            None, gt=0, lt=1, description="share of the training set used as benign data; null: the whole holdout")

        @field_validator("mae_weights")
        @classmethod
        def _weights_exist(cls, value: str | None) -> str | None:
            if value is not None and not Path(value).expanduser().is_file():
                raise ValueError("must be an existing MAE weights file or null")
            return value

        @field_validator("mae")
        @classmethod
        def _known_settings(cls, value: dict[str, Any]) -> dict[str, Any]:
            unknown = sorted(set(value) - {f.name for f in fields(MAEConfig)})
            if unknown:
                raise ValueError(f"must only hold MAEConfig settings ({', '.join(f.name for f in fields(MAEConfig))}); "
                                 f"unknown: {', '.join(unknown)}")  # fmt: skip
            return value

    params: Params

    def __init__(self, params: PluginParams | Mapping[str, Any] | None = None, **raw: Any) -> None:
        super().__init__(params, **raw)
        self._mae: MaskedAutoencoder | None = None
        self._mae_ref: dict[str, str] | None = None
        self._gen: torch.Generator | None = None

    # ------------------------------------------------------------------ fitting
    def bind(self, model: torch.nn.Module, device: torch.device, seed: int = 0, ctx: DefenseContext | None = None) -> None:
        super().bind(model, device, seed, ctx)
        self._gen = generator(seed, "bdmae", device=device)

    def mae_config(self, channels: int, size: int) -> MAEConfig:
        """The autoencoder's architecture: the data's size and channels unless ``mae`` says otherwise."""
        params = {"img_size": size, "in_chans": channels, "patch_size": 4 if size < 100 else 16, **self.params.mae}
        try:
            return MAEConfig(**params)
        except (TypeError, ValidationError, ValueError) as err:
            first = err.errors()[0]["msg"].removeprefix("Value error, ") if isinstance(err, ValidationError) else err
            self.fail(f"bad MAE architecture {params}: {first}")

    def check(self, meta: DatasetMeta) -> None:
        if meta.height != meta.width:
            self.fail(f"square images are needed for the token grid, got {meta.height}x{meta.width}")
        self.mae_config(meta.channels, meta.height)

    def fit_epochs(self) -> int:
        """MAE training epochs; 0 with given weights (BDMAE's real cost is at test time)."""
        return 0 if self.params.mae_weights else self.params.mae_train.epochs

    def fit(self, benign: ImageSet, gen: torch.Generator) -> None:
        """Get the autoencoder: the given weights, or one trained on the benign images.

        It does not depend on the backdoored model, so it is a shared artifact
        (:meth:`DefenseContext.cached`): the grid trains it once per (benign data, seed, settings)
        and every model's defense state refers to it instead of carrying a copy.
        """
        _, c, h, w = benign.x.shape
        if h != w:
            self.fail(f"square images are needed for the token grid, got {h}x{w}")
        config = self.mae_config(c, h)
        weights = self.params.mae_weights

        def build() -> dict[str, Tensor]:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(derive_seed(self.seed, "bdmae-mae"))
                mae = MaskedAutoencoder(config)
            if weights:
                load_mae_weights(mae, weights)
            else:
                train_mae(mae, benign.x, self.params.mae_train, self.device, gen)
            return {k: v.detach().cpu() for k, v in mae.state_dict().items()}

        if weights:
            parts = {"config": asdict(config), "weights": file_digest(weights)}
            artifact = self.ctx.cached("bdmae-mae", parts, build, scope="global")
        else:
            parts = {"config": asdict(config), "recipe": asdict(self.params.mae_train)}
            artifact = self.ctx.cached("bdmae-mae", parts, build, scope="data")
        self._install(config, artifact.value, {"kind": artifact.kind, "key": artifact.key})

    def _install(self, config: MAEConfig, weights: dict[str, Tensor], ref: dict[str, str]) -> None:
        mae = MaskedAutoencoder(config)
        mae.load_state_dict(weights)
        self._mae = mae.to(self.device).eval()
        self._mae_ref = ref

    def state(self) -> dict[str, Any]:
        """The architecture and a reference to the shared autoencoder artifact (not its weights)."""
        assert self._mae is not None and self._mae_ref is not None, "fit() first"
        return {"config": asdict(self._mae.config), "mae": dict(self._mae_ref)}

    def load_state(self, state: dict[str, Any]) -> None:
        ref = state["mae"]
        self._install(MAEConfig(**state["config"]), self.ctx.load(ref["kind"], ref["key"]), ref)

    # ------------------------------------------------------------------ restoration
    def restore(self, x: Tensor, mask: Tensor) -> Tensor:
        """Replace the tokens hidden by ``mask`` (N, L) with the autoencoder's restoration."""
        assert self._mae is not None, "fit() or load_state() first"
        mae = self._mae
        size = mae.config.img_size
        if x.shape[-1] == size and x.shape[1] == mae.config.in_chans:
            return mae.restore(x, mask)
        inner = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        if inner.shape[1] != mae.config.in_chans:
            inner = inner.mean(1, keepdim=True).expand(-1, mae.config.in_chans, -1, -1)
        rec = mae.reconstruct(inner, mask)
        rec = F.interpolate(rec, size=x.shape[-2:], mode="bilinear", align_corners=False, antialias=True)
        if rec.shape[1] != x.shape[1]:
            rec = rec.mean(1, keepdim=True).expand_as(x)
        pixels = F.interpolate(mae.token_mask_to_pixels(mask), size=x.shape[-2:], mode="nearest")
        return x * (1 - pixels) + rec * pixels

    def pixel_mask(self, mask: Tensor, size: tuple[int, int]) -> Tensor:
        assert self._mae is not None
        return F.interpolate(self._mae.token_mask_to_pixels(mask), size=size, mode="nearest")

    def _labels(self, x: Tensor) -> Tensor:
        assert self.model is not None
        return self.model(x).argmax(1)

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def token_scores(self, x: Tensor, bar: Any = None) -> tuple[Tensor, Tensor, Tensor]:
        """Refined (structural, label) scores (N, L) and the original predictions y0."""
        assert self._mae is not None and self._gen is not None, "bind() and fit() first"
        mae, gen, p = self._mae, self._gen, self.params
        n, length, grid = x.shape[0], mae.num_tokens, mae.grid
        tick = bar.update if bar is not None else (lambda *a: None)
        y0 = self._labels(x)
        changed = torch.zeros(n, length, device=x.device)
        restored_sum = torch.zeros_like(x)
        restored_count = torch.zeros(n, 1, *x.shape[-2:], device=x.device)
        structural = torch.zeros(n, length, device=x.device)
        for _ in range(p.init_rounds):
            shared = (complementary_token_masks(p.init_masks, n, length, p.mask_ratio, gen, x.device)
                      if p.initial_masks == "complementary" else None)  # fmt: skip
            for i in range(p.init_masks):
                mask = random_token_masks(n, length, p.mask_ratio, gen, x.device) if shared is None else shared[i]
                restored = self.restore(x, mask)
                flipped = (self._labels(restored) != y0).float()
                changed += mask.float() * flipped[:, None]
                pixels = self.pixel_mask(mask, x.shape[-2:])
                restored_sum += restored * pixels
                restored_count += pixels
                tick()
            mean_restoration = torch.where(restored_count > 0, restored_sum / restored_count.clamp(min=1), x)
            dissimilarity = 1 - ssim_map(x, mean_restoration)
            structural += token_structural_scores(dissimilarity, grid, p.token_sampling)
        structural /= p.init_rounds
        label = changed / (p.init_rounds * p.init_masks)

        adjacency = grid_adjacency(grid, x.device)

        def restore_and_predict(mask: Tensor, rows: Tensor) -> Tensor:
            return self._labels(self.restore(x[rows], mask))

        refine = dict(restore_and_predict=restore_and_predict, y0=y0, adjacency=adjacency, rounds=p.refine_rounds,
                      step=p.refine_step, bonus=p.topo_bonus, gen=gen, on_round=tick)  # fmt: skip
        k_struct = (structural >= p.struct_threshold).sum(1)
        k_label = (label.mean(1) * length).long()
        if not p.per_image:
            k_struct = batch_mean_k(k_struct)
            k_label = torch.full_like(k_label, int(label.mean().item() * length))
        structural = refine_scores(structural, k_struct, **refine)
        label = refine_scores(label, k_label, **refine)
        return structural, label, y0

    @torch.no_grad()
    def transform(self, x: Tensor) -> Tensor:
        """The purified images: the averaged restorations of each image's top-scoring tokens."""
        p = self.params
        passes = p.init_rounds * p.init_masks + 2 * p.refine_rounds + p.num_thresholds
        with tqdm(total=passes, desc=f"bdmae: purify {x.shape[0]} images", leave=False, disable=None) as bar:
            structural, label, _ = self.token_scores(x, bar)
            fused = p.alpha * structural + (1 - p.alpha) * label
            masks = purification_masks(fused, p.threshold_start, p.threshold_step, p.num_thresholds,
                                       p.max_restore, per_image=p.per_image)  # fmt: skip
            total = torch.zeros_like(x)
            count = torch.zeros(x.shape[0], 1, *x.shape[-2:], device=x.device)
            for mask in masks:
                if bool(mask.any()):
                    pixels = self.pixel_mask(mask, x.shape[-2:])
                    total += self.restore(x, mask) * pixels
                    count += pixels
                bar.update()
        return torch.where(count > 0, total / count.clamp(min=1), x)
