"""BDMAE's pieces: SSIM map, the masked autoencoder, token-grid refinement, purification masks, and
the official code's variants (complementary initial masks, nearest token sampling, batch-level K)."""

from __future__ import annotations

from collections import deque

import pytest
import torch
from torch import Tensor, nn

from bench.core.data import subsample
from bench.core.device import to_float
from bench.core.errors import BenchError
from bench.core.models import build_model
from bench.nn import mae as mae_nn
from bench.nn.mae import (
    MAEConfig,
    MAERecipe,
    MaskedAutoencoder,
    load_mae_weights,
    random_token_masks,
    train_mae,
)
from bench.nn.ssim import ssim_map
from defenses.base import MissingArtifactError
from defenses.bdmae import (
    BDMAE,
    batch_mean_k,
    grid_adjacency,
    grow_regions,
    purification_masks,
    refine_scores,
    token_structural_scores,
    top_k_mask,
)

TINY_MAE = {"embed_dim": 32, "depth": 1, "num_heads": 2, "decoder_embed_dim": 16, "decoder_depth": 1, "decoder_num_heads": 2}


def connected(region: Tensor, grid: int) -> bool:
    """Whether the True tokens of a flat (L,) mask form one 4-connected component."""
    cells = {int(i) for i in torch.nonzero(region).flatten()}
    if not cells:
        return True
    start = next(iter(cells))
    seen, queue = {start}, deque([start])
    while queue:
        r, c = divmod(queue.popleft(), grid)
        for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            rr, cc = r + dr, c + dc
            j = rr * grid + cc
            if 0 <= rr < grid and 0 <= cc < grid and j in cells and j not in seen:
                seen.add(j)
                queue.append(j)
    return seen == cells


# --------------------------------------------------------------------------- SSIM


def test_ssim_map_is_one_for_identical_images_and_drops_where_they_differ() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=gen)
    same = ssim_map(x, x)
    assert same.shape == (2, 32, 32)
    assert torch.allclose(same, torch.ones_like(same), atol=1e-4)
    y = x.clone()
    y[:, :, 28:, 28:] = 1.0  # a white corner patch, like BadNets
    diff = ssim_map(x, y)
    assert diff[:, 29:, 29:].mean() < 0.6
    assert diff[:, :16, :16].min() > 0.999  # far from the patch nothing changes


# --------------------------------------------------------------------------- the autoencoder


def test_patchify_round_trip_and_token_masks() -> None:
    mae = MaskedAutoencoder(MAEConfig(img_size=32, patch_size=4, **TINY_MAE))
    x = torch.rand(3, 3, 32, 32)
    assert mae.patchify(x).shape == (3, 64, 48)
    assert torch.equal(mae.unpatchify(mae.patchify(x)), x)
    masks = random_token_masks(5, 64, 0.75, torch.Generator().manual_seed(1), torch.device("cpu"))
    assert masks.shape == (5, 64) and masks.dtype == torch.bool
    assert masks.sum(1).tolist() == [48] * 5
    assert not torch.equal(masks[0], masks[1])  # drawn per image


def test_restore_changes_only_hidden_tokens_and_ignores_batch_mates() -> None:
    torch.manual_seed(0)
    mae = MaskedAutoencoder(MAEConfig(img_size=32, patch_size=4, **TINY_MAE)).eval()
    x = torch.rand(3, 3, 32, 32)
    mask = torch.zeros(3, 64, dtype=torch.bool)
    mask[0, :48] = True  # images hide different numbers of tokens
    mask[1, [0, 63]] = True
    out = mae.restore(x, mask)
    pixels = mae.token_mask_to_pixels(mask)
    assert torch.equal(out * (1 - pixels), x * (1 - pixels))  # visible tokens untouched
    assert torch.equal(out[2], x[2])  # nothing hidden, nothing restored
    assert (out[1, :, :4, :4] != x[1, :, :4, :4]).any()
    alone = mae.restore(x[1:2], mask[1:2])
    assert torch.allclose(alone, out[1:2], atol=1e-5)  # padding of the batch never leaks in
    assert out.min() >= 0 and out.max() <= 1


def test_mae_training_lowers_reconstruction_loss_on_real_digits(mnist) -> None:
    images = mnist.train.x[:256]
    mae = MaskedAutoencoder(MAEConfig(img_size=28, patch_size=4, in_chans=1, **TINY_MAE))
    mask = random_token_masks(64, mae.num_tokens, 0.75, torch.Generator().manual_seed(0), torch.device("cpu"))
    with torch.no_grad():
        before = mae.loss(to_float(images[:64]), mask).item()
    recipe = MAERecipe(epochs=6, batch_size=32, blr=3e-3, warmup_epochs=1)
    train_mae(mae, images, recipe, torch.device("cpu"), torch.Generator().manual_seed(0))
    with torch.no_grad():
        after = mae.loss(to_float(images[:64]), mask).item()
    assert after < 0.8 * before


def test_reference_format_weights_load_and_mismatch_is_a_clear_error(tmp_path) -> None:
    config = MAEConfig(img_size=32, patch_size=4, **TINY_MAE)
    source = MaskedAutoencoder(config).eval()
    path = tmp_path / "mae.pth"
    torch.save({"model": source.state_dict()}, path)
    target = MaskedAutoencoder(config).eval()
    load_mae_weights(target, path)
    x, mask = torch.rand(2, 3, 32, 32), torch.rand(2, 64) < 0.5
    assert torch.equal(target.restore(x, mask), source.restore(x, mask))
    other = MaskedAutoencoder(MAEConfig(img_size=32, patch_size=8, **TINY_MAE))
    with pytest.raises(BenchError, match="do not fit"):
        load_mae_weights(other, path)
    with pytest.raises(BenchError, match="does not exist"):
        load_mae_weights(target, tmp_path / "missing.pth")


# --------------------------------------------------------------------------- token-grid steps


def test_grid_adjacency_is_the_four_neighbourhood() -> None:
    adj = grid_adjacency(4)
    assert adj.shape == (16, 16) and torch.equal(adj, adj.T)
    assert adj.sum(1).tolist() == [2, 3, 3, 2, 3, 4, 4, 3, 3, 4, 4, 3, 2, 3, 3, 2]
    assert adj[5, 6] and adj[5, 1] and not adj[5, 10] and not adj[3, 4]  # no wrap-around


def test_grow_regions_stays_inside_allowed_and_is_connected() -> None:
    grid = 6
    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(20, grid * grid, generator=gen)
    allowed = torch.zeros(20, grid * grid, dtype=torch.bool)
    block = [r * grid + c for r in range(1, 5) for c in range(1, 5)]  # a connected 4x4 block
    allowed[:, block] = True
    sizes = torch.randint(1, 9, (20,), generator=gen)
    sizes[0] = 0
    regions = grow_regions(scores, allowed, sizes, grid_adjacency(grid), gen, bonus=5.0)
    assert torch.equal(regions.sum(1), sizes)
    assert not (regions & ~allowed).any()
    # a large neighbour bonus makes every region one blob
    assert all(connected(regions[i], grid) for i in range(20))


def test_refinement_moves_scores_towards_the_hand_made_trigger() -> None:
    """A stand-in model changes its prediction only when the 'trigger' token is restored."""
    grid, trigger = 6, 35
    length = grid * grid
    gen = torch.Generator().manual_seed(0)
    scores = torch.full((4, length), 0.5) + 0.01 * torch.rand(4, length, generator=gen)
    y0 = torch.zeros(4, dtype=torch.long)
    calls: list[Tensor] = []

    def restore_and_predict(mask: Tensor, rows: Tensor) -> Tensor:
        calls.append(mask)
        return mask[:, trigger].long()  # prediction 1 (changed) iff the trigger token was restored

    k = torch.full((4,), 12)
    refined = refine_scores(scores, k, restore_and_predict, y0, grid_adjacency(grid), rounds=1, step=0.05,
                            bonus=0.5, gen=gen)  # fmt: skip
    delta = refined - scores
    region = calls[0]
    top = top_k_mask(scores, k)
    for i in range(4):  # one round: region -beta, rest of top-K +beta, others unchanged
        beta = -0.05 if region[i, trigger] else 0.05
        assert torch.allclose(delta[i][region[i]], torch.full_like(delta[i][region[i]], -beta))
        rest = top[i] & ~region[i]
        assert torch.allclose(delta[i][rest], torch.full_like(delta[i][rest], beta))
        assert torch.all(delta[i][~top[i]] == 0)
    refined = refine_scores(scores, k, restore_and_predict, y0, grid_adjacency(grid), rounds=30, step=0.05,
                            bonus=0.5, gen=gen)  # fmt: skip
    rank = (refined > refined[:, trigger : trigger + 1]).sum(1)
    assert (rank < 3).all()  # the trigger token ends at (or next to) the top of every image


def test_purification_masks_are_nested_capped_and_follow_thresholds() -> None:
    scores = torch.zeros(3, 64)
    scores[0, :3] = torch.tensor([0.9, 0.58, 0.47])  # few high tokens: thresholds 0.6 .. 0.4 apply
    scores[1] = torch.linspace(1.0, 0.0, 64)  # many high tokens: thresholds rise until the cap holds
    masks = purification_masks(scores, start=0.6, step=0.05, count=5, cap=0.25)
    assert masks.shape == (5, 3, 64)
    counts = masks.sum(-1)
    assert counts[:, 0].tolist() == [1, 2, 2, 3, 3]  # >=0.6, >=0.55, >=0.5, >=0.45, >=0.4
    assert (counts[:, 1] <= 16).all() and counts[-1, 1] == 15  # strictly under 25% of 64 tokens
    assert (counts[:, 2] == 0).all()
    assert all(bool((masks[i] <= masks[i + 1]).all()) for i in range(4))  # nested
    assert not purification_masks(scores, 0.6, 0.05, 5, cap=0.0).any()


def test_complementary_masks_are_shared_and_cover_every_token_once_per_permutation() -> None:
    gen = torch.Generator().manual_seed(0)
    half = mae_nn.complementary_token_masks(4, 3, 16, 0.5, gen, torch.device("cpu"))
    assert half.shape == (4, 3, 16) and (half.sum(-1) == 8).all()
    assert all(torch.equal(half[:, 0], half[:, i]) for i in range(3))  # one set for the whole batch
    for a, b in ((0, 1), (2, 3)):  # each pair hides every token exactly once
        assert torch.equal(half[a, 0] ^ half[b, 0], torch.ones(16, dtype=torch.bool)) and not (half[a, 0] & half[b, 0]).any()
    assert not torch.equal(half[0, 0], half[2, 0])  # a fresh permutation for the next pair
    three_quarters = mae_nn.complementary_token_masks(4, 1, 16, 0.75, gen, torch.device("cpu"))[:, 0]
    # windows of 12 over permutations of 16: mask 0 is 12 tokens of the first, mask 1 its other 4
    # and 8 of the next (a window across two permutations can repeat a token, as in the official code)
    assert three_quarters[0].sum() == 12 and (three_quarters.sum(-1) <= 12).all()
    assert (three_quarters[0] | three_quarters[1]).all()


def test_nearest_token_sampling_reads_the_map_where_nearest_resizing_does() -> None:
    """28 px on a 7x7 grid: nearest resizing samples pixels 0, 4, ..., 24 of each row and column."""
    dissimilarity = torch.rand(2, 28, 28)
    nearest = token_structural_scores(dissimilarity, 7, "nearest")
    assert torch.equal(nearest, dissimilarity[:, ::4, ::4].flatten(1))
    mean = token_structural_scores(dissimilarity, 7, "mean")
    assert torch.allclose(mean, dissimilarity.unfold(1, 4, 4).unfold(2, 4, 4).mean((-1, -2)).flatten(1))
    assert not torch.allclose(mean, nearest)


def test_batch_level_k_is_the_truncated_batch_mean() -> None:
    assert batch_mean_k(torch.tensor([1, 2, 6])).tolist() == [3, 3, 3]
    assert batch_mean_k(torch.tensor([1, 2])).tolist() == [1, 1]  # int(1.5)
    scores = torch.zeros(3, 64)
    scores[0, :3] = torch.tensor([0.9, 0.58, 0.47])
    scores[1, :8] = 0.7
    per_image = purification_masks(scores, 0.6, 0.05, 5, cap=0.25).sum(-1)  # (5, 3)
    batch = purification_masks(scores, 0.6, 0.05, 5, cap=0.25, per_image=False).sum(-1)
    assert per_image[:, 0].tolist() == [1, 2, 2, 3, 3] and (per_image[:, 1] == 8).all()
    assert batch.tolist() == [[int((1 + 8) / 3)] * 3, [int(10 / 3)] * 3, [int(10 / 3)] * 3, [int(11 / 3)] * 3,
                              [int(11 / 3)] * 3]  # fmt: skip
    # the stop of the threshold raising: 26 of image 0's 64 tokens pass 0.6 (41%), so per image
    # it is raised until 15 pass; over the batch that is 26 of 128 (20%): no raising, mean int(26 / 2)
    crowded = torch.zeros(2, 64)
    crowded[0] = torch.linspace(1.0, 0.0, 64)
    assert purification_masks(crowded, 0.6, 0.05, 1, cap=0.25).sum(-1).tolist() == [[15, 0]]
    assert purification_masks(crowded, 0.6, 0.05, 1, cap=0.25, per_image=False).sum(-1).tolist() == [[13, 13]]


# --------------------------------------------------------------------------- the defense


class CornerBackdoor(nn.Module):
    """A stand-in backdoored classifier: class 0 when the bottom-right 4x4 corner is bright, else 1.

    Its backdoor is known exactly, so the test can check that BDMAE finds that token."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: Tensor) -> Tensor:
        corner = x[:, :, -4:, -4:].mean((1, 2, 3))
        logits = torch.zeros(x.shape[0], 10, device=x.device)
        logits[:, 1] = 1.0
        logits[:, 0] = (corner - 0.9) * 100 * self.scale
        return logits


@pytest.fixture(scope="module")
def fitted_bdmae(mnist) -> BDMAE:
    defense = BDMAE(init_rounds=2, refine_rounds=4, mae=TINY_MAE,
                    mae_train={"epochs": 2, "batch_size": 64, "blr": 2e-3, "warmup_epochs": 1})  # fmt: skip
    defense.bind(CornerBackdoor(), torch.device("cpu"), seed=0)
    benign = mnist.train.subset(torch.arange(512))
    defense.fit(benign, torch.Generator().manual_seed(0))
    return defense


def test_bdmae_scores_have_token_shapes_and_ranges(fitted_bdmae: BDMAE, mnist) -> None:
    x = to_float(mnist.test.x[:16])
    structural, label, y0 = fitted_bdmae.token_scores(x)
    assert structural.shape == label.shape == (16, 49)  # 28 px / 4-px patches = 7x7 tokens
    assert y0.shape == (16,)
    refine_budget = fitted_bdmae.params.refine_rounds * fitted_bdmae.params.refine_step
    assert structural.min() >= -refine_budget and structural.max() <= 2 + refine_budget
    assert label.min() >= -refine_budget and label.max() <= 1 + refine_budget


def test_bdmae_locates_and_removes_the_corner_trigger(fitted_bdmae: BDMAE, mnist) -> None:
    x = to_float(mnist.test.x[:24])
    poisoned = x.clone()
    poisoned[:, :, -4:, -4:] = 1.0  # exactly the last token of the 7x7 grid
    model = fitted_bdmae.model
    assert (model(poisoned).argmax(1) == 0).all()
    structural, label, _ = fitted_bdmae.token_scores(poisoned)
    fused = 0.5 * structural + 0.5 * label
    corner = 48  # last token of the 7x7 grid
    assert ((fused > fused[:, corner : corner + 1]).sum(1) <= 2).float().mean() >= 0.9
    purified = fitted_bdmae.transform(poisoned)
    assert purified.shape == x.shape and purified.min() >= 0 and purified.max() <= 1
    assert (fitted_bdmae.predict(poisoned).argmax(1) != 0).float().mean() >= 0.9


def test_the_official_variants_remove_the_corner_trigger_too(fitted_bdmae: BDMAE, mnist) -> None:
    """Complementary shared masks, nearest token sampling and batch-level K on the same MAE."""
    x = to_float(mnist.test.x[:24])
    poisoned = x.clone()
    poisoned[:, :, -4:, -4:] = 1.0
    official = BDMAE(init_rounds=2, refine_rounds=4, mae=TINY_MAE, initial_masks="complementary",
                     token_sampling="nearest", per_image=False)  # fmt: skip
    official.bind(fitted_bdmae.model, torch.device("cpu"), seed=0, ctx=fitted_bdmae.ctx)
    official.load_state(fitted_bdmae.state())
    assert (official.predict(poisoned).argmax(1) != 0).float().mean() >= 0.9


def test_bdmae_without_restoration_is_the_identity_and_state_round_trips(fitted_bdmae: BDMAE, mnist) -> None:
    x = to_float(mnist.test.x[:8])
    none = BDMAE(max_restore=0.0, init_rounds=1, refine_rounds=1, mae=TINY_MAE)
    none.bind(fitted_bdmae.model, torch.device("cpu"), seed=3, ctx=fitted_bdmae.ctx)  # where the MAE is
    none.load_state(fitted_bdmae.state())
    assert torch.equal(none.transform(x), x)
    twin_a = BDMAE(init_rounds=2, refine_rounds=4, mae=TINY_MAE)
    twin_b = BDMAE(init_rounds=2, refine_rounds=4, mae=TINY_MAE)
    for twin in (twin_a, twin_b):
        twin.bind(fitted_bdmae.model, torch.device("cpu"), seed=5, ctx=fitted_bdmae.ctx)
        twin.load_state(fitted_bdmae.state())
    assert torch.equal(twin_a.transform(x), twin_b.transform(x))  # same seed, same purification
    stranger = BDMAE(mae=TINY_MAE)
    stranger.bind(fitted_bdmae.model, torch.device("cpu"), seed=5)  # a context that never saw the MAE
    with pytest.raises(MissingArtifactError):
        stranger.load_state(fitted_bdmae.state())


def test_bdmae_features_come_from_the_final_call_on_the_purified_images(fitted_bdmae: BDMAE, mnist) -> None:
    """BDMAE queries the model dozens of times while purifying; the captured features are those of
    the final call, and capturing them draws the same random masks as predict does."""
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, 1, width=4).eval()
    x = to_float(mnist.test.x[:6])
    twins = [BDMAE(init_rounds=2, refine_rounds=4, mae=TINY_MAE) for _ in range(3)]
    for twin in twins:
        twin.bind(model, torch.device("cpu"), seed=7, ctx=fitted_bdmae.ctx)  # where the MAE is
        twin.load_state(fitted_bdmae.state())
    with torch.no_grad():
        logits, features = twins[0].predict_with_features(x)
        assert torch.equal(logits, twins[1].predict(x))
        assert torch.equal(features, twins[2].features(x))
        assert not torch.equal(features, model.features(x))  # the check can fail: purification changed the input


def test_bdmae_parameters_are_validated() -> None:
    with pytest.raises(BenchError, match="max_restore"):
        BDMAE(max_restore=1.5)
    with pytest.raises(BenchError, match="init_rounds"):
        BDMAE(init_rounds=0)
    with pytest.raises(BenchError, match="mae_train"):
        BDMAE(mae_train={"epochs": 0})
    with pytest.raises(BenchError, match="unknown parameter 'mask_size'"):
        BDMAE(mask_size=3)
    with pytest.raises(BenchError, match="MAE architecture"):
        BDMAE(mae={"patch_size": 5}).mae_config(3, 32)
    assert BDMAE.intensity_param == "max_restore" and not BDMAE.intensity_affects_fit


def test_dataset_subsets_are_stratified_and_validated(mnist) -> None:
    split = subsample(mnist, train_subset=500, test_subset=100)
    assert len(split.test) == 100 and len(split.train) == 500
    assert split.test.y.bincount().tolist() == [10] * 10
    assert torch.equal(subsample(mnist, test_subset=100).test.x, split.test.x)  # fixed seed
    with pytest.raises(BenchError, match="test_subset"):
        subsample(mnist, test_subset=0)
