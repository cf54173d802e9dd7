"""The paper grid (configs/cifar10_paper.yaml) uses the settings of the code behind the REFINE paper's numbers."""

from __future__ import annotations

from pathlib import Path

import torch

from bench.core.models import build_model
from bench.core.registry import ATTACKS, DEFENSES
from bench.orchestration.config import load_config
from bench.orchestration.grid import compile_grid

REPO = Path(__file__).resolve().parent.parent
PAPER = REPO / "configs" / "cifar10_paper.yaml"
GRAY = [[247, 241, 130], [106, 201, 92], [153, 163, 20]]


def test_training_setup_is_the_reference_scripts() -> None:
    config = load_config(PAPER)
    assert config.train.crop_padding == 0  # horizontal flip only
    assert config.poison.pool == "all" and config.poison.rate == 0.1 and config.poison.target == 0
    (model,) = config.models
    net = build_model(model.name, num_classes=10, in_channels=3, **model.params)
    assert net.normalize.mean.flatten().tolist() == [torch.tensor(v).item() for v in (0.4914, 0.4822, 0.4465)]
    assert net.normalize.std.flatten().tolist() == [torch.tensor(v).item() for v in (0.2023, 0.1994, 0.2010)]


def test_attacks_use_the_reference_parameters() -> None:
    cells = compile_grid(load_config(PAPER))
    attacks = {cell.attack.name: ATTACKS.create(cell.attack.name, cell.attack.params) for cell in cells}
    for name in ("badnets", "physical_ba"):
        assert attacks[name].params.pattern == GRAY and attacks[name].patch_size(32) == 3
    lc = attacks["label_consistent"].params
    assert (lc.poison_rate, lc.trigger, lc.pattern, lc.random_start, lc.steps) == (0.25, "patch", GRAY, False, 100)
    assert attacks["wanet"].params.k == 32
    patch = attacks["adaptive_patch"].params
    assert patch.test_patches == 2 and patch.alphas == [0.5, 0.5, 0.2, 0.3]
    batt = attacks["batt"].params
    assert (batt.angle, batt.clean_degrees) == (16.0, 10.0)


def test_the_pool_enters_model_keys_only_when_it_is_not_the_default() -> None:
    """Grids that do not set the pool keep their cached models; ``pool: all`` trains other ones."""
    text = PAPER.read_text()
    assert "pool: all" in text
    plain = compile_grid(load_config(PAPER, ["poison.pool=non_target"]))
    explicit = compile_grid(load_config(PAPER, ["poison={rate: 0.1, target: 0}"]))
    pooled = compile_grid(load_config(PAPER))
    assert [c.model_key for c in plain] == [c.model_key for c in explicit]
    assert "pool" not in load_config(PAPER, ["poison.pool=non_target"]).poison.identity()
    assert not set(c.model_key for c in plain) & set(c.model_key for c in pooled)


def test_defenses_use_the_reference_code_settings() -> None:
    """REFINE, BDMAE and BTI-DBF run as their public code does where it differs from the paper's text."""
    cells = compile_grid(load_config(PAPER))
    defenses = {cell.defense.name: DEFENSES.create(cell.defense.name, cell.defense.params) for cell in cells}
    refine = defenses["refine"].params
    assert (refine.classification_loss, refine.io_space, refine.epochs, refine.milestones) == ("bce", "normalized", 150, None)
    bdmae = defenses["bdmae"].params
    assert (bdmae.initial_masks, bdmae.token_sampling, bdmae.per_image) == ("complementary", "nearest", False)
    for name, mode in (("btidbf_u", "unlearn"), ("btidbf_p", "purify")):
        btidbf = defenses[name].params
        assert (btidbf.mode, btidbf.clamp_output, btidbf.generator_base, btidbf.purify_norm_bound) == (mode, False, 32, 0.05)
