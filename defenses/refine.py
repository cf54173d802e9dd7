"""REFINE (Chen et al., ICLR 2025): inversion-free backdoor defense by model reprogramming.

The frozen, possibly backdoored model ``f`` is wrapped between two learned/fixed modules:

- an **input transformation** ``T``: the public code's U-Net (:func:`bench.nn.unet.refine_unet`,
  widths c..8c; by default the paper's c = 64 for small images such as CIFAR's 32 px and c = 32
  for 224-px ones) whose output is clamped to [0, 1] and fed to ``f``. Models take [0, 1] images
  and normalise inside (see :mod:`bench.core.models`), so by default (``io_space: pixel``, as the
  paper describes it) ``T`` works in plain pixel space on both sides;
- an **output mapping** ``pi``: a fixed random permutation of the K classes with no fixed point
  (a derangement). The remapped score vector puts ``f``'s score of class ``j`` at ``pi(j)``.

``T`` is trained on the defender's benign data *without its labels*: the pseudo-label of an
image is ``f``'s own arg-max on it, and the loss is

    CE(pi(f(clamp(T(x)))), f(x).argmax()) + supcon_weight * SupCon(normalize(flatten(clamp(T(x)))))

with positives = same pseudo-label. Because ``pi`` has no fixed point, ``T`` must move every
input far enough from its original appearance that ``f`` predicts a *different* class, which
pi maps back: the trigger's pixel pattern does not survive that transformation. The defended
prediction is ``pi(argmax f(clamp(T(x))))``; :meth:`Refine.predict` returns remapped logits,
whose arg-max is exactly that label.

Faithful details (from the paper and its public code): the pseudo-label is computed on the same
augmented image that ``T`` sees; augmentation is random resized crop (0.8-1.0), horizontal flip,
random grayscale 0.2; the contrastive loss contrasts two copies of each transformed image, as
the public code does (each image is its own extra positive); the ragged last batch is dropped;
without explicit ``milestones`` the lr is multiplied by ``gamma`` after epochs ``epochs - 50``
and ``epochs - 20``, the public code's rule ([100, 130] at 150 epochs; see :func:`milestones_for`).

Where the public code differs from the paper's text, its choice is one value away:

- ``io_space: normalized`` -- the public code feeds ``T`` the *normalised* image and hands its
  clamped [0, 1] output to ``f`` *as if it were normalised*, so in pixel terms ``f`` only ever
  sees ``mean + std * clamp(T(x), 0, 1)``: values between the channel mean and mean + std.
  Here ``T`` gets ``(x - mean) / std`` (the model's own statistics) and its clamped output is
  mapped to exactly those pixels before the model normalises them again; the contrastive loss
  sees the clamped output, as there;
- ``classification_loss: bce`` -- binary cross-entropy on the remapped softmax against the
  one-hot pseudo-label instead of the paper's cross-entropy;
- ``optimizer: adam`` -- the Adam optimiser of the BackdoorBox implementation instead of SGD.

Ablations are parameters: ``remap: false`` (identity output mapping; the loss then asks ``T`` to
keep ``f``'s prediction) and ``supcon_weight: 0`` (no contrastive term).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt, field_validator
from torch import Tensor, nn

from bench.core.data import ImageSet
from bench.core.device import full_precision, to_float
from bench.core.errors import BenchError
from bench.core.params import PluginParams
from bench.core.registry import DEFENSES
from bench.core.seeding import derive_seed, generator
from bench.nn import augment
from bench.nn.loop import Batches, LoopOptions, fit_loop, make_optimizer
from bench.nn.losses import supcon_loss
from bench.nn.train import TrainRecipe, make_scheduler
from bench.nn.unet import UNet, refine_unet
from defenses.base import Defense, DefenseContext


def derangement(k: int, gen: torch.Generator) -> Tensor:
    """A uniformly random permutation of ``range(k)`` with no fixed point (rejection sampling).

    About e ~ 2.7 draws on average whatever ``k``; the same generator state gives the same result.
    """
    if k < 2:
        raise BenchError(f"refine: the output mapping needs at least 2 classes, got {k}")
    identity = torch.arange(k)
    while True:
        perm = torch.randperm(k, generator=gen, device=gen.device).cpu()
        if not bool((perm == identity).any()):
            return perm


def remap(scores: Tensor, perm: Tensor) -> Tensor:
    """Output mapping: ``out[..., perm[j]] = scores[..., j]`` (class j's score moves to pi(j))."""
    return scores[..., torch.argsort(perm.to(scores.device))]


def unmap(scores: Tensor, perm: Tensor) -> Tensor:
    """Inverse of :func:`remap`: ``out[..., j] = scores[..., perm[j]]``."""
    return scores[..., perm.to(scores.device)]


def milestones_for(epochs: int, given: list[int] | None = None) -> list[int]:
    """The epochs after which the lr decays: ``given``, else the public code's ``[epochs - 50, epochs - 20]``.

    For fits of 50 epochs or fewer the rule yields milestones <= 0; those are dropped (a fit of
    21-50 epochs decays once, at ``epochs - 20``; one of 20 or fewer never), which is what the
    public code's scheduler does with negative milestones. (A milestone of exactly 0 would there
    decay the lr before the first step; dropping it keeps the configured lr instead.)
    """
    if given is not None:
        return list(given)
    return [m for m in (epochs - 50, epochs - 20) if m > 0]


def refine_augment(x: Tensor, gen: torch.Generator, crop_scale: tuple[float, float], flip: bool,
                   grayscale: float) -> Tensor:  # fmt: skip
    """REFINE's train-time augmentation, per image: resized crop, flip, grayscale."""
    x = augment.random_resized_crop(x, gen, scale=crop_scale)
    if flip:
        x = augment.random_flip(x, gen)
    return augment.random_grayscale(x, gen, p=grayscale) if grayscale > 0 else x


@DEFENSES.register("refine")
class Refine(Defense):
    """U-Net input transformation + fixed derangement of the labels, trained label-free (REFINE)."""

    trainable = True
    version = 2  # the public code's U-Net (UNetLittle), io_space, the milestone rule
    # The share of benign data is the knob of the benign-data sweep (a new fit per value).
    intensity_param = "benign_fraction"

    class Params(PluginParams):
        width: int | None = Field(None, ge=1, description="U-Net base width c; null: 64 up to 64-px images, else 32 (the paper's)")
        epochs: int = Field(150, ge=1, description="training epochs over the benign data")
        batch_size: int = Field(256, ge=2, description="batch size (the ragged last batch is dropped)")
        optimizer: Literal["sgd", "adam"] = Field("sgd", description="sgd (the paper) or adam (BackdoorBox)")
        lr: float = Field(0.01, gt=0, description="learning rate")
        momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum (Adam: beta1)")
        weight_decay: float = Field(5e-4, ge=0, description="weight decay")
        milestones: list[PositiveInt] | None = Field(
            None, description="epochs after which the lr is multiplied by gamma; null: [epochs - 50, epochs - 20] (public code)")
        gamma: float = Field(0.8, gt=0, le=1, description="lr factor at each milestone")
        supcon_weight: float = Field(0.1, ge=0, description="weight lambda of the supervised contrastive term (0: ablation)")
        temperature: float = Field(0.07, gt=0, description="temperature of the contrastive loss")
        remap: bool = Field(True, description="use the output mapping (false: ablation, identity mapping)")
        classification_loss: Literal["ce", "bce"] = Field("ce", description="ce (the paper) or bce on the remapped softmax (public code)")
        io_space: Literal["pixel", "normalized"] = Field(
            "pixel", description="pixel: T maps pixels to pixels (the paper); normalized: T sees normalised images and its "
            "clamped output is read as normalised, i.e. pixels in [mean, mean + std] (public code)")
        crop_scale: tuple[float, float] = Field((0.8, 1.0), description="area range [low, high] of the random resized crop")
        flip: bool = Field(True, description="random horizontal flip during training")
        grayscale: float = Field(0.2, ge=0, le=1, description="probability of a random grayscale image during training")
        benign_fraction: float = Field(0.2, gt=0, lt=1, description="share of the training set used as benign data")
        amp: bool = Field(True, description="bf16 autocast on CUDA")
        cpu_bf16: bool = Field(False, description="bf16 autocast on the CPU too (off: fp32)")
        channels_last: bool = Field(True, description="channels_last U-Net, frozen model and batches on CUDA")
        compile: bool = Field(False, description="torch.compile the loss (the U-Net and model passes); not measured faster")

        @field_validator("crop_scale")
        @classmethod
        def _ordered(cls, value: tuple[float, float]) -> tuple[float, float]:
            if not 0 < value[0] <= value[1] <= 1:
                raise ValueError("must be [low, high] with 0 < low <= high <= 1")
            return value

    params: Params

    def __init__(self, params: PluginParams | Mapping[str, Any] | None = None, **raw: Any) -> None:
        super().__init__(params, **raw)
        self._unet: UNet | None = None
        self._perm: Tensor | None = None
        self._stats: tuple[Tensor, Tensor] | None = None  # the model's (mean, std), io_space: normalized
        self._fit_loss = float("nan")

    def bind(self, model: nn.Module, device: torch.device, seed: int = 0, ctx: DefenseContext | None = None) -> None:
        self._stats = None
        if self.params.io_space == "normalized":
            norm = getattr(model, "normalize", None)
            mean, std = getattr(norm, "mean", None), getattr(norm, "std", None)
            if not (isinstance(mean, Tensor) and isinstance(std, Tensor)):
                self.fail("io_space: normalized needs a model whose 'normalize' layer has 'mean' and 'std'")
            self._stats = (mean.detach().to(device).view(1, -1, 1, 1), std.detach().to(device).view(1, -1, 1, 1))
        super().bind(model, device, seed, ctx)

    # ------------------------------------------------------------------ modules
    def unet_width(self, image_size: int) -> int:
        """The U-Net's base width c: ``width`` if set, else the paper's choice for this image size.

        The paper uses c = 64 on 32-px CIFAR-10 and c = 32 on 224-px ImageNet, where every
        feature map is 49x larger; images up to 64 px count as small.
        """
        if self.params.width is not None:
            return self.params.width
        return 64 if image_size <= 64 else 32

    def _build_unet(self, channels: int, width: int) -> UNet:
        """A U-Net initialised from the defense seed, so a fit is reproducible end to end."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.seed, "refine-unet"))
            unet = refine_unet(channels, width)
        return unet.to(self.device)

    def _draw_permutation(self, num_classes: int) -> Tensor:
        return derangement(num_classes, generator(self.seed, "refine-permutation"))

    @property
    def permutation(self) -> Tensor:
        """The output mapping pi as a tensor (``pi[j]`` = where class j's score goes)."""
        if self._perm is None:
            raise BenchError("refine: fit() or load_state() the defense first")
        return self._perm

    def _map(self, logits: Tensor) -> Tensor:
        return remap(logits, self.permutation) if self.params.remap else logits

    # ------------------------------------------------------------------ the defended model
    def _unet_input(self, x: Tensor) -> Tensor:
        """What T sees of pixel images: the pixels, or (io_space: normalized) the normalised images."""
        if self._stats is None:
            return x
        mean, std = self._stats
        return (x - mean) / std

    def _to_pixels(self, clamped: Tensor) -> Tensor:
        """The pixel images the model gets for T's clamped output (read as normalised when io_space is)."""
        if self._stats is None:
            return clamped
        mean, std = self._stats
        return mean + std * clamped

    def _clamped(self, x: Tensor) -> Tensor:
        """clamp(T(input), 0, 1) for pixel images ``x``; the U-Net must exist."""
        assert self._unet is not None
        return self._unet(self._unet_input(x)).clamp(0, 1)

    def transform(self, x: Tensor) -> Tensor:
        """The pixel images the frozen model sees: clamp(T(x), 0, 1), or with io_space: normalized
        ``mean + std * clamp(T((x - mean) / std), 0, 1)`` (also what features()/t-SNE see)."""
        if self._unet is None:
            raise BenchError("refine: fit() or load_state() the defense first")
        self._unet.eval()
        return self._to_pixels(self._clamped(x))

    def predict(self, x: Tensor) -> Tensor:
        """Remapped logits: their arg-max is pi(argmax f(clamp(T(x))))."""
        return self._map(super().predict(x))

    # ------------------------------------------------------------------ training
    def _optimizer(self) -> torch.optim.Optimizer:
        assert self._unet is not None
        params, p = self._unet.parameters(), self.params
        if p.optimizer == "adam":
            return make_optimizer("adam", params, self.device, lr=p.lr, betas=(p.momentum, 0.999), weight_decay=p.weight_decay)
        return make_optimizer("sgd", params, self.device, lr=p.lr, momentum=p.momentum, weight_decay=p.weight_decay)

    def _loss(self, x: Tensor) -> Tensor:
        """REFINE's objective on one augmented batch ``x``; never looks at ground-truth labels."""
        assert self.model is not None and self._unet is not None
        with torch.no_grad():
            pseudo = self.model(x).argmax(1)
        transformed = self._clamped(x)  # what the contrastive term compares, as in the public code
        scores = self._map(self.model(self._to_pixels(transformed)))
        if self.params.classification_loss == "ce":
            loss = F.cross_entropy(scores.float(), pseudo)
        else:
            with full_precision(scores):  # CUDA autocast refuses binary cross-entropy
                target = F.one_hot(pseudo, scores.shape[1]).float()
                loss = F.binary_cross_entropy(scores.float().softmax(1), target)
        if self.params.supcon_weight > 0:
            z = F.normalize(transformed.flatten(1).float(), dim=1)
            loss = loss + self.params.supcon_weight * supcon_loss(torch.stack([z, z], 1), pseudo, self.params.temperature)
        return loss

    def fit_epochs(self) -> int:
        return self.params.epochs

    def fit(self, benign: ImageSet, gen: torch.Generator) -> None:
        """Train T on the benign images (their labels are never read) for ``epochs`` epochs."""
        assert self.model is not None, "bind() the defense to a model first"
        images = benign.x.to(self.device)
        n = images.shape[0]
        if n < 2:
            raise BenchError(f"refine: needs at least 2 benign images, got {n}")
        self._perm = self._draw_permutation(benign.num_classes)
        self._unet = self._build_unet(images.shape[1], self.unet_width(max(images.shape[-2:])))
        p = self.params
        gen = torch.Generator(device=self.device).manual_seed(int(torch.randint(2**62, (1,), generator=gen)))

        def prepare(idx: Tensor) -> Tensor:
            return refine_augment(to_float(images[idx]), gen, p.crop_scale, p.flip, p.grayscale)

        # The ragged last batch is dropped, as the public code does.
        batches = Batches(n, min(p.batch_size, n), gen, prepare)
        recipe = TrainRecipe(epochs=p.epochs, batch_size=batches.batch_size, lr=p.lr, momentum=p.momentum,
                             weight_decay=p.weight_decay, schedule="multistep",
                             milestones=milestones_for(p.epochs, p.milestones), gamma=p.gamma)  # fmt: skip
        optimizer = self._optimizer()
        scheduler = make_scheduler(optimizer, recipe, len(batches))
        # The last epoch's mean loss, for diagnostics.
        self._fit_loss = fit_loop(optimizer, batches, self._loss, p.epochs, device=self.device, job=self.name,
                                  hint="lower lr (or try optimizer: adam)", train=[self._unet], frozen=[self.model],
                                  scheduler=scheduler, options=LoopOptions.of(p))  # fmt: skip
        self._warn_if_saturated(images[: min(n, 256)])

    @torch.no_grad()
    def _warn_if_saturated(self, sample: Tensor) -> None:
        """Say so when the U-Net's raw output sits outside [0, 1] almost everywhere.

        The clamp then passes no gradient and the defended model sees a constant image: a fit
        that died (seen with SGD at the paper's lr on small models) rather than a defense that
        works. The run goes on -- its metrics show the damage -- but the cause is named.
        """
        assert self._unet is not None
        raw = self._unet(self._unet_input(to_float(sample)))
        live = float(((raw > 0) & (raw < 1)).float().mean())
        if live < 0.01:
            print(f"warning: refine: {100 * live:.1f}% of the U-Net's output pixels lie inside [0, 1] after "
                  "fitting, so the clamp passes no gradient and the transformed images are constant; "
                  "try a lower lr or optimizer: adam", file=sys.stderr)  # fmt: skip

    # ------------------------------------------------------------------ cached state
    def state(self) -> dict[str, Any]:
        if self._unet is None or self._perm is None:
            raise BenchError("refine: nothing to save before fit()")
        return {
            "unet": {k: v.detach().cpu() for k, v in self._unet.state_dict().items()},
            "permutation": self._perm.cpu(),
            "channels": int(self._unet.stem[0].in_channels),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        # The weights say which width was built (it may differ from ``width`` when that is None).
        width = int(state["unet"]["stem.0.weight"].shape[0])
        self._unet = self._build_unet(int(state["channels"]), width)
        self._unet.load_state_dict(state["unet"])
        self._unet.eval()
        self._perm = state["permutation"].to(torch.int64).cpu()
