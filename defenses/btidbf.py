"""BTI-DBF (Xu et al., ICLR 2024, "Towards Reliable and Efficient Backdoor Trigger Inversion via
Decoupling Benign Features"): invert the backdoor by decoupling benign features, then remove it.

The model is split at its last spatial feature map, ``f = f2 o f1`` (:meth:`Classifier.feature_map`
and :meth:`Classifier.head_from_map`). On the defender's benign data (5% of the training set):

0. **Generator.** The public code's U-Net G (:func:`bench.nn.unet.btidbf_unet`: base 32,
   4 levels and a 512-channel bottleneck, instance norm, leaky ReLU 0.01, transposed-convolution
   upsampling, no output activation) is pre-trained towards the identity: same predictions (soft-label cross-entropy),
   same features, and a small image distance (weight 100 while the normalised MSE is > 0.1, else 0.01).
   Instance norm discards each image's channel means, so G reaches the identity only slowly
   (normalised MSE 0.37 after 400 steps at base 8, against 0.14 for batch norm after 100):
   short, CPU-sized runs set ``generator_norm: batch``.
1. **Decoupling benign features.** A mask ``m = tanh(theta) / 2 + 0.5`` over the feature map
   minimises ``CE(f2(m * f1(x)), y) - CE(f2((1 - m) * f1(x)), y)`` (+ ``mask_l1 * mean(m)``):
   ``m`` keeps what the model needs for the true class (benign features) and ``1 - m`` holds
   what it does not -- where a backdoor lives. The public code only logs ``|m|_1``
   (``mask_l1: 0``); a positive weight moves features that clean data never uses -- backdoor
   features among them -- into ``1 - m``, which small models need (see the CPU config).
2. **Inversion.** G maximises the change of the backdoor features ``(1 - m) * f1`` between x and
   G(x) while keeping the benign ones: loss ``-MSE_backdoor + 0.01 MSE_benign``, replaced by the
   image MSE whenever the image MSE exceeds ``norm_bound`` or the benign-feature MSE exceeds
   ``feat_bound``. The target label is the most frequent prediction on G(x + noise).
3. **Defence**, ``rounds`` times (re-running 1-2 on the defended model each round; from the
   second round G is also pushed towards the detected target):
   - (U) *unlearning*: fine-tune a copy of the model (Adam 1e-4) on batches where 10% of the
     images are replaced by G(x), with their labels, plus a feature-consistency term;
   - (P) *purification*: train a purifier U-Net P (initialised at the identity generator) on
     the mixed batches plus Gaussian ``noise`` through the frozen model: CE, the distance
     between the features of P(mixed + noise) and those of the *clean* batch, and the image
     fidelity MSE(P(mixed + noise), x) weighted 100 while above ``purify_norm_bound`` (0.05),
     else 1; predict ``f(P(x + noise))``. In (P) the mask, the inversion and the target
     detection use the frozen model; from the second round G's images pass through P during
     the inversion (the public code's ``pur_gen(bd_gen(x))``).

Every phase (0, 1, 2 and the training of 3) runs in the harness's one training loop
(:func:`bench.nn.loop.fit_loop`) with its own batches, loss and Adam optimizer: no host read inside
an epoch (the public code's weight switches are chosen on the device, with the same numbers), bf16
autocast and channels_last on CUDA, and a loss that turns non-finite fails the fit with one line
naming the phase. Every phase keeps each epoch's ragged last batch, as the public code's loaders do.

All image distances and the ``noise`` (0.03) live in the classifier's normalised input space, as
in the public code (so its bounds 0.3, 3 and 0.05 keep their meaning). G and P take and return
pixel images; their output is not clamped to [0, 1] -- in the public code nothing clamps
between the generator and the classifier -- unless ``clamp_output: true``.

Labels: the public code trains the mask and the unlearning/purification with the benign set's
true labels; ``use_labels: false`` uses the frozen model's predictions instead (label-free).
Variants: ``btidbf`` with ``mode: unlearn|purify``, or the names ``btidbf_u`` and ``btidbf_p``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn
from tqdm.auto import tqdm

from bench.core.data import ImageSet
from bench.core.device import to_float
from bench.core.params import PluginParams
from bench.core.registry import DEFENSES
from bench.core.seeding import derive_seed, generator
from bench.nn import augment
from bench.nn.loop import Batches, fit_loop, make_optimizer
from bench.nn.unet import btidbf_unet
from defenses.base import Defense, DefenseContext

# --------------------------------------------------------------------------- building blocks


class PixelGenerator(nn.Module):
    """A U-Net applied in the classifier's normalised space: pixel images in, pixel images out.

    The output is the U-Net's raw output mapped back to pixels -- not clamped to [0, 1] unless
    ``clamp``: in the public code G's and P's outputs go to the classifier as they are.
    """

    def __init__(self, unet: nn.Module, mean: Tensor, std: Tensor, clamp: bool = False) -> None:
        super().__init__()
        self.unet = unet
        self.clamp = clamp
        self.register_buffer("mean", mean.detach().clone().view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", std.detach().clone().view(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor, noise: float = 0.0, gen: torch.Generator | None = None) -> Tensor:
        z = (x - self.mean) / self.std
        if noise > 0:
            z = z + noise * torch.randn(z.shape, generator=gen, device=z.device, dtype=z.dtype)
        out = self.unet(z) * self.std + self.mean
        return out.clamp(0, 1) if self.clamp else out

    def normalised_mse(self, a: Tensor, b: Tensor) -> Tensor:
        """MSE between two image batches measured in the normalised space."""
        return ((a - b) / self.std).pow(2).mean()


def fidelity_term(image_mse: Tensor, bound: float, above: float, below: float) -> Tensor:
    """The public code's switched image-fidelity term: ``above * mse`` while the image MSE exceeds
    ``bound`` (pull hard back towards the input), else ``below * mse``.

    The switch is chosen on the device (no host read per step); the weight is a constant of the
    step, so the value and the gradient are exactly those of ``above * mse`` or ``below * mse``.
    """
    return torch.where(image_mse.detach() > bound, above, below) * image_mse


def feature_mask(theta: Tensor) -> Tensor:
    """The soft mask ``tanh(theta) / 2 + 0.5``, in (0, 1)."""
    return torch.tanh(theta) / 2 + 0.5


def decoupling_loss(mask: Tensor, feats: Tensor, labels: Tensor, f2: Callable[[Tensor], Tensor], l1: float = 0.0) -> Tensor:
    """``CE(f2(m * z), y) - CE(f2((1 - m) * z), y) + l1 * mean(m)`` (lower is better decoupled)."""
    loss = F.cross_entropy(f2(mask * feats), labels) - F.cross_entropy(f2((1 - mask) * feats), labels)
    return loss + l1 * mask.mean() if l1 else loss


@dataclass
class Split:
    """A classifier cut at its feature map: ``logits = f2(f1(x))`` for images x in [0, 1]."""

    f1: Callable[[Tensor], Tensor]
    f2: Callable[[Tensor], Tensor]

    def __call__(self, x: Tensor) -> Tensor:
        return self.f2(self.f1(x))


def switched_inversion_loss(pixel: Tensor, benign: Tensor, backdoor: Tensor, norm_bound: float,
                            feat_bound: float) -> Tensor:  # fmt: skip
    """The inversion's objective ``-backdoor + 0.01 * benign``, replaced by the image distance
    ``pixel`` while that exceeds ``norm_bound`` or ``benign`` exceeds ``feat_bound`` (the public
    code). Chosen on the device: the branch not taken gets an exactly zero gradient, so the
    value and the update equal those of the branch taken alone."""
    outside = (pixel.detach() > norm_bound) | (benign.detach() > feat_bound)
    return torch.where(outside, pixel, -backdoor + 0.01 * benign)


# --------------------------------------------------------------------------- the defense


@DEFENSES.register("btidbf")
class BTIDBF(Defense):
    """Backdoor trigger inversion by decoupling benign features; unlearning (U) or purification (P)."""

    trainable = True
    version = 2  # the public code's generator, unclamped output, (P)'s loss and inversion route

    class Params(PluginParams):
        mode: Literal["unlearn", "purify"] = Field("unlearn", description="unlearn (U): fine-tune a copy of the model; purify (P): train an input purifier")
        benign_fraction: float = Field(0.05, gt=0, lt=1, description="share of the training set used as benign data")
        use_labels: bool = Field(True, description="train with the benign labels (public code); false: the model's predictions")
        generator_base: int = Field(32, ge=1, description="base width of the generator and purifier U-Nets")
        generator_depth: int = Field(4, ge=1, description="down/up levels of the U-Nets")
        generator_norm: Literal["instance", "batch", "none"] = Field("instance", description="normalisation in the U-Nets")
        batch_size: int = Field(128, ge=1, description="batch size of every phase")
        crop_padding: int = Field(4, ge=0, description="padding of the random crop augmentation")
        flip: bool = Field(True, description="random horizontal flip augmentation")
        pretrain_epochs: int = Field(50, ge=0, description="epochs pre-training the generator towards the identity")
        gen_lr: float = Field(1e-3, gt=0, description="Adam lr of the generator")
        mask_epochs: int = Field(20, ge=0, description="epochs learning the benign-feature mask, per round")
        mask_lr: float = Field(1e-2, gt=0, description="Adam lr of the feature mask")
        mask_l1: float = Field(0.0, ge=0, description="weight of the mask's mean (sparsity); the public code: 0")
        invert_epochs: int = Field(30, ge=0, description="epochs inverting the trigger, per round")
        norm_bound: float = Field(0.3, gt=0, description="largest image MSE (normalised space) of the inversion")
        feat_bound: float = Field(3.0, gt=0, description="largest benign-feature MSE of the inversion")
        noise: float = Field(0.03, ge=0, description="Gaussian noise (normalised space) added before G and P")
        clamp_output: bool = Field(False, description="clamp G's and P's output images to [0, 1]; the public code does not")
        rounds: int = Field(5, ge=1, description="rounds of mask, inversion and defence")
        defend_epochs: int = Field(30, ge=0, description="epochs of unlearning or purifier training, per round")
        unlearn_lr: float = Field(1e-4, gt=0, description="Adam lr of the unlearning (U)")
        purify_lr: float = Field(1e-3, gt=0, description="Adam lr of the purifier (P)")
        purify_norm_bound: float = Field(
            0.05, gt=0, description="(P) image MSE (normalised space) above which the fidelity term weighs 100, else 1")
        poison_share: float = Field(0.1, gt=0, le=1, description="share of each defence batch replaced by G(x)")
        early_stop: bool = Field(False, description="stop when the detected target changes between rounds")

    params: Params

    def __init__(self, params: PluginParams | Mapping[str, Any] | None = None, **raw: Any) -> None:
        super().__init__(params, **raw)
        self._generator: PixelGenerator | None = None  # the inverted backdoor generator G
        self._purifier: PixelGenerator | None = None  # (P) only
        self._unlearned: nn.Module | None = None  # (U) only
        self._target: int | None = None
        self._mask: Tensor | None = None
        self._gen: torch.Generator | None = None

    @property
    def mode(self) -> str:
        return self.params.mode

    # ------------------------------------------------------------------ plumbing
    def bind(self, model: nn.Module, device: torch.device, seed: int = 0, ctx: DefenseContext | None = None) -> None:
        if not (hasattr(model, "feature_map") and hasattr(model, "head_from_map")):
            self.fail("the model must expose feature_map() and head_from_map()")
        super().bind(model, device, seed, ctx)
        self._gen = generator(seed, "btidbf", device=device)

    @property
    def classifier(self) -> nn.Module:
        """(U): the unlearned copy once fitted; otherwise the frozen model."""
        return self._unlearned if self._unlearned is not None else super().classifier

    @property
    def _frozen(self) -> nn.Module:
        assert self.model is not None, "bind() first"
        return self.model

    def new_generator(self) -> PixelGenerator:
        """G or P: the public code's U-Net (:func:`bench.nn.unet.btidbf_unet`; instance norm by default)."""
        p = self.params
        channels = self._frozen.normalize.mean.shape[1]
        unet = btidbf_unet(channels, base=p.generator_base, depth=p.generator_depth, norm=p.generator_norm)
        norm = self._frozen.normalize
        return PixelGenerator(unet, norm.mean, norm.std, clamp=p.clamp_output).to(self.device)

    def _batches(self, x: Tensor, y: Tensor | None, gen: torch.Generator) -> Batches[Any]:
        """Every phase's data: shuffled, augmented (random crop + flip, per image) float batches of
        the uint8 images ``x`` -- with their labels ``y`` when given -- keeping the ragged last
        batch, as the public code's data loader does."""
        p = self.params

        def prepare(idx: Tensor) -> Any:
            images = augment.crop_and_flip(to_float(x[idx]), gen, p.crop_padding, p.flip)
            return images if y is None else (images, y[idx])

        return Batches(x.shape[0], p.batch_size, gen, prepare, drop_last=False)

    def _job(self, stage: str) -> str:
        """A phase's name in the progress bar and in the error of a non-finite loss."""
        return f"{self.name} ({self.mode}): {stage}"

    # ------------------------------------------------------------------ phases
    def pretrain_generator(self, g: PixelGenerator, x: Tensor, gen: torch.Generator) -> None:
        """Step 0: G towards the identity (same predictions, same features, close pixels)."""
        model = self._frozen

        def loss_fn(images: Tensor) -> Tensor:
            out = g(images)
            with torch.no_grad():
                clean_feats = model.feature_map(images)
                clean_probs = model.head_from_map(clean_feats).softmax(1)
            feats = model.feature_map(out)
            loss = F.cross_entropy(model.head_from_map(feats), clean_probs) + F.mse_loss(feats, clean_feats)
            return loss + fidelity_term(g.normalised_mse(out, images), 0.1, above=100.0, below=0.01)

        opt = make_optimizer("adam", g.parameters(), self.device, lr=self.params.gen_lr)
        fit_loop(opt, self._batches(x, None, gen), loss_fn, self.params.pretrain_epochs, device=self.device,
                 job=self._job("pretrain generator"), hint="lower gen_lr", train=[g], frozen=[model])  # fmt: skip

    def learn_mask(self, split: Split, x: Tensor, y: Tensor, gen: torch.Generator) -> Tensor:
        """Step 1: the benign-feature mask m in (0, 1), shaped like one feature map (C, h, w)."""
        with torch.no_grad():
            shape = split.f1(to_float(x[:1])).shape[1:]
        theta = torch.randn(shape, generator=gen, device=self.device).requires_grad_(True)

        def loss_fn(batch: tuple[Tensor, Tensor]) -> Tensor:
            images, labels = batch
            with torch.no_grad():
                feats = split.f1(images)
            return decoupling_loss(feature_mask(theta), feats, labels, split.f2, self.params.mask_l1)

        opt = make_optimizer("adam", [theta], self.device, lr=self.params.mask_lr)
        fit_loop(opt, self._batches(x, y, gen), loss_fn, self.params.mask_epochs, device=self.device,
                 job=self._job("decouple benign features"), hint="lower mask_lr", frozen=[self._frozen],
                 postfix=lambda: {"mask": f"{feature_mask(theta).mean().item():.3f}"})  # fmt: skip
        return feature_mask(theta).detach()

    def invert(
        self, g: PixelGenerator, opt: torch.optim.Optimizer, split: Split, mask: Tensor, x: Tensor,
        gen: torch.Generator, target: int | None, through: nn.Module | None = None,
    ) -> None:  # fmt: skip
        """Step 2: G changes the backdoor features (1 - m) and keeps the benign ones (m).

        ``through`` (P from the second round, as in the public code): the generated images pass
        through the current purifier before the model sees them, and the image distance is that
        of the purified image, so G looks for what the purifier does not yet remove. The clean
        features stay those of the unpurified images.
        """
        p = self.params

        def loss_fn(images: Tensor) -> tuple[Tensor, Tensor]:
            out = g(images) if through is None else through(g(images))
            with torch.no_grad():
                clean = split.f1(images)
            feats = split.f1(out)
            benign = F.mse_loss(mask * feats, mask * clean)
            backdoor = F.mse_loss((1 - mask) * feats, (1 - mask) * clean)
            loss = switched_inversion_loss(g.normalised_mse(out, images), benign, backdoor, p.norm_bound, p.feat_bound)
            if target is not None:
                wanted = torch.full((images.shape[0],), target, dtype=torch.long, device=images.device)
                loss = loss + F.cross_entropy(split.f2(feats), wanted)
            return loss, backdoor

        fit_loop(opt, self._batches(x, None, gen), loss_fn, p.invert_epochs, device=self.device,
                 job=self._job("invert trigger"), hint="lower gen_lr", train=[g],
                 frozen=[self._frozen] if through is None else [self._frozen, through], show="backdoor_mse")  # fmt: skip

    @torch.no_grad()
    def detect_target(self, g: PixelGenerator, split: Split, x: Tensor, num_classes: int) -> int:
        """The most frequent prediction on generated images G(x + noise)."""
        counts = torch.zeros(num_classes, dtype=torch.long, device=self.device)
        for start in range(0, x.shape[0], 512):
            out = g(to_float(x[start : start + 512]), self.params.noise, self._gen)
            counts += torch.bincount(split(out).argmax(1), minlength=num_classes)
        return int(counts.argmax().item())

    @torch.no_grad()
    def _mixed(self, g: PixelGenerator, images: Tensor) -> Tensor:
        """The batch with ``int(poison_share * n) + 1`` random images replaced by G(x), as in the public code."""
        n = images.shape[0]
        k = min(n, int(self.params.poison_share * n) + 1)
        pick = torch.randperm(n, generator=self._gen, device=images.device)[:k]
        mixed = images.clone()
        mixed[pick] = g(images[pick])
        return mixed

    def mixed_batch_loss(self, split: Split, g: PixelGenerator, images: Tensor, labels: Tensor) -> Tensor:
        """(U) step 3's loss: CE on the mixed batch, plus the distance between the features of the
        mixed and the clean batch (both through the model being unlearned)."""
        mixed = self._mixed(g, images)
        clean_feats = split.f1(images)
        mixed_feats = split.f1(mixed)
        return F.cross_entropy(split.f2(mixed_feats), labels) + F.mse_loss(mixed_feats, clean_feats)

    def purify_loss(self, purifier: PixelGenerator, g: PixelGenerator, images: Tensor, labels: Tensor) -> Tensor:
        """(P) step 3's loss, as in the public code: the purifier sees the mixed batch plus Gaussian
        ``noise``; CE of the frozen model on the purified batch, the distance between its features
        and those of the *clean* batch, and the image fidelity ``MSE(P(mixed + noise), x)``
        weighted 100 while it exceeds ``purify_norm_bound``, else 1."""
        model = self._frozen
        purified = purifier(self._mixed(g, images), self.params.noise, self._gen)
        with torch.no_grad():
            clean_feats = model.feature_map(images)
        feats = model.feature_map(purified)
        fidelity = fidelity_term(purifier.normalised_mse(purified, images), self.params.purify_norm_bound, 100.0, 1.0)
        return F.cross_entropy(model.head_from_map(feats), labels) + F.mse_loss(feats, clean_feats) + fidelity

    def defend(self, loss_fn: Callable[[Tensor, Tensor], Tensor], trainable: nn.Module, opt: torch.optim.Optimizer,
               x: Tensor, y: Tensor, gen: torch.Generator) -> None:  # fmt: skip
        """Step 3: train the unlearned model (U) or the purifier (P) with ``loss_fn(images, labels)``."""
        unlearn = self.mode == "unlearn"
        fit_loop(opt, self._batches(x, y, gen), lambda batch: loss_fn(*batch), self.params.defend_epochs,
                 device=self.device, job=self._job("unlearn" if unlearn else "train purifier"),
                 hint="lower unlearn_lr" if unlearn else "lower purify_lr", train=[trainable], frozen=[self._frozen])  # fmt: skip

    # ------------------------------------------------------------------ fit
    def _pretrained_generator(self, x: Tensor) -> PixelGenerator:
        """Step 0's G, a shared artifact (:meth:`DefenseContext.cached`): it depends on the model,
        the benign images and the generator settings, not on the mode or the later phases, so the
        (U) and (P) defenses of one model pre-train it once. It is initialised and trained from its
        own seeded streams, so a loaded G and a freshly trained one continue identically."""
        p = self.params

        def build() -> dict[str, Tensor]:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(derive_seed(self.seed, "btidbf-generator-init"))
                g = self.new_generator()
            self.pretrain_generator(g, x, generator(self.seed, "btidbf-pretrain", device=self.device))
            return {k: v.detach().cpu() for k, v in g.state_dict().items()}

        parts = {"version": self.version}
        parts |= {name: getattr(p, name) for name in ("generator_base", "generator_depth", "generator_norm", "clamp_output",
                                                     "pretrain_epochs", "gen_lr", "batch_size", "crop_padding", "flip")}  # fmt: skip
        artifact = self.ctx.cached("btidbf-generator", parts, build, scope="model")
        g = self.new_generator()
        g.load_state_dict(artifact.value)
        return g.eval()

    def fit_epochs(self) -> int:
        p = self.params
        return p.pretrain_epochs + p.rounds * (p.mask_epochs + p.invert_epochs + p.defend_epochs)

    def fit(self, benign: ImageSet, gen: torch.Generator) -> None:
        frozen = self._frozen
        device_gen = torch.Generator(device=self.device).manual_seed(int(torch.randint(2**62, (1,), generator=gen)))
        x = benign.x.to(self.device)
        if self.params.use_labels:
            y = benign.y.to(self.device)
        else:
            with torch.no_grad():
                y = torch.cat([frozen(to_float(x[i : i + 512])).argmax(1) for i in range(0, x.shape[0], 512)])
        g = self._pretrained_generator(x)
        g_opt = make_optimizer("adam", g.parameters(), self.device, lr=self.params.gen_lr)
        loss_fn: Callable[[Tensor, Tensor], Tensor]
        if self.mode == "unlearn":
            trainable: nn.Module = copy.deepcopy(frozen).eval()  # the shared frozen model stays untouched
            split = Split(trainable.feature_map, trainable.head_from_map)  # (U) inverts on the unlearned copy
            opt = make_optimizer("adam", trainable.parameters(), self.device, lr=self.params.unlearn_lr)
            loss_fn = lambda images, labels: self.mixed_batch_loss(split, g, images, labels)  # noqa: E731
        else:
            purifier = self.new_generator()
            purifier.load_state_dict(g.state_dict())  # the purifier starts at the identity too
            trainable = purifier.eval()
            split = Split(frozen.feature_map, frozen.head_from_map)  # (P): the mask and G on the frozen model
            opt = make_optimizer("adam", trainable.parameters(), self.device, lr=self.params.purify_lr)
            loss_fn = lambda images, labels: self.purify_loss(purifier, g, images, labels)  # noqa: E731
        num_classes = benign.num_classes
        target: int | None = None
        mask = None
        for round_ in tqdm(range(self.params.rounds), desc=f"btidbf ({self.mode})", leave=False, disable=None):
            trainable.requires_grad_(False)  # steps 1-2 only differentiate through it
            mask = self.learn_mask(split, x, y, device_gen)
            through = trainable if self.mode == "purify" and round_ > 0 else None
            self.invert(g, g_opt, split, mask, x, device_gen, target, through)
            found = self.detect_target(g, split, x, num_classes)
            if target is None:
                target = found
            elif self.params.early_stop and found != target:
                break
            trainable.requires_grad_(True)
            self.defend(loss_fn, trainable, opt, x, y, device_gen)
        trainable.requires_grad_(False)
        self._generator, self._target, self._mask = g, target, mask
        self._install(trainable.eval())

    def _install(self, trainable: nn.Module) -> None:
        if self.mode == "unlearn":
            self._unlearned = trainable
        else:
            assert isinstance(trainable, PixelGenerator)
            self._purifier = trainable

    # ------------------------------------------------------------------ state
    def state(self) -> dict[str, Any]:
        assert self._generator is not None, "fit() first"
        trained = self._unlearned if self.mode == "unlearn" else self._purifier
        assert trained is not None
        return {
            "trained": {k: v.cpu() for k, v in trained.state_dict().items()},
            "generator": {k: v.cpu() for k, v in self._generator.state_dict().items()},
            "target": -1 if self._target is None else self._target,
            "mask": self._mask.cpu() if self._mask is not None else torch.empty(0),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        g = self.new_generator()
        g.load_state_dict(state["generator"])
        self._generator = g.eval()
        self._target = None if int(state["target"]) < 0 else int(state["target"])
        self._mask = state["mask"].to(self.device) if state["mask"].numel() else None
        if self.mode == "unlearn":
            trained: nn.Module = copy.deepcopy(self._frozen)  # never touch the shared frozen model
        else:
            trained = self.new_generator()
        trained.load_state_dict(state["trained"])
        trained.requires_grad_(False)
        self._install(trained.to(self.device).eval())

    # ------------------------------------------------------------------ inference
    @property
    def detected_target(self) -> int | None:
        return self._target

    def findings(self) -> dict[str, Any]:
        return {"detected_target": self._target}

    @torch.no_grad()
    def invert_images(self, x: Tensor) -> Tensor:
        """The inverted poisoned version G(x) of images in [0, 1]."""
        assert self._generator is not None, "fit() first"
        return self._generator(x)

    @torch.no_grad()
    def illustrations(self, clean: Tensor, poisoned: Tensor) -> dict[str, Tensor]:
        """``inverted`` = G(clean): what the inversion believes the backdoored version of each clean
        original looks like, to set beside the real poisoned image; for (P) also ``purified``: what
        the purifier feeds the model for the poisoned image (its noise from a stream of its own).
        (U) changes the model, not its inputs, so it has no purified row."""
        rows = {"inverted": self.invert_images(clean)}
        if self.mode == "purify":
            assert self._purifier is not None, "fit() or load_state() first"
            gen = generator(self.seed, "btidbf-illustrations", device=self.device)
            rows["purified"] = self._purifier(poisoned, self.params.noise, gen)
        return rows

    def transform(self, x: Tensor) -> Tensor:
        if self.mode == "unlearn":
            return x
        assert self._purifier is not None, "fit() or load_state() first"
        return self._purifier(x, self.params.noise, self._gen)


@DEFENSES.register("btidbf_u")
class BTIDBFUnlearn(BTIDBF):
    """BTI-DBF (U): unlearn the inverted backdoor by fine-tuning a copy of the model."""

    class Params(BTIDBF.Params):
        mode: Literal["unlearn"] = Field("unlearn", description="fixed: unlearn (U)")

    params: Params


@DEFENSES.register("btidbf_p")
class BTIDBFPurify(BTIDBF):
    """BTI-DBF (P): purify inputs with a U-Net trained against the inverted backdoor."""

    class Params(BTIDBF.Params):
        mode: Literal["purify"] = Field("purify", description="fixed: purify (P)")

    params: Params
