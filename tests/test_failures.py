"""Failure isolation: a defense that raises fails its cell only; user errors stop before any work."""

from __future__ import annotations

from typing import Any

import pytest
from gridrun import GRID, write_grid

from bench.cli import main
from bench.core.registry import DEFENSES
from defenses.base import Defense

TINY_BTIDBF = {"generator_base": 4, "generator_depth": 2, "batch_size": 64, "pretrain_epochs": 1, "mask_epochs": 1,
               "invert_epochs": 1, "rounds": 1, "defend_epochs": 1, "crop_padding": 2, "flip": False}  # fmt: skip


class ExplodingDefense(Defense):
    """Test-only: a trainable defense whose fit always raises."""

    name = "exploding"
    trainable = True

    def fit(self, benign: Any, gen: Any) -> None:
        raise RuntimeError("exploding defense: fit always fails\nsecond line of the message")


@pytest.fixture
def exploding(monkeypatch):
    """Registered for this test only, so no other test (or conformance check) ever sees it."""
    DEFENSES.names()  # load the built-ins first
    monkeypatch.setitem(DEFENSES._items, "exploding", ExplodingDefense)


def test_failing_defense_fails_its_cell_only(tmp_path, exploding, capsys):
    grid = {**GRID, "attacks": ["badnets"], "defenses": ["none", "exploding", {"name": "shrinkpad", "pad": 2}]}
    config = write_grid(tmp_path / "grid.yaml", grid)
    run_dir = tmp_path / "run"
    # One worker, in this process: the test-only defense is registered here only.
    args = ["run", str(config), "--out", str(run_dir), "--cache-dir", str(tmp_path / "cache"), "--device", "cpu",
            "--no-tsne", "--workers", "1"]  # fmt: skip

    assert main(args) == 1
    err = capsys.readouterr().err
    assert "failed: mnist5k/small_cnn badnets / exploding seed 0" in err
    assert "RuntimeError: exploding defense: fit always fails" in err
    # Not a terminal: one progress line per settled job instead of a bar, the failure's dependents counted.
    progress = [line for line in err.splitlines() if line.startswith("[")]
    assert any("fit exploding" in line and line.endswith(
        "failed: RuntimeError: exploding defense: fit always fails (1 dependent job not run)") for line in progress)  # fmt: skip
    assert progress[-1].startswith(f"[{len(progress) + 1}/{len(progress) + 1}]")  # the failure settled two jobs
    records = sorted((run_dir / "records").glob("*.json"))
    assert len(records) == 2  # none and shrinkpad finished all the same

    assert main(["status", str(run_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "3 cells: 2 done, 0 running, 1 failed, 0 pending" in lines[0]
    failed = [line for line in lines[1:] if line.startswith("failed")]
    assert len(failed) == 1 and "badnets / exploding" in failed[0]
    assert "RuntimeError: exploding defense: fit always fails" in failed[0]
    assert "second line" not in failed[0]
    assert sorted(line.split()[0] for line in lines[1:]) == ["done", "done", "failed"]

    log = failed[0].rsplit("[", 1)[1].rstrip("]")
    text = (run_dir / log).read_text()
    assert "Traceback (most recent call last)" in text and "in fit" in text and "second line" in text

    # A rerun retries the failed cell only: the finished ones are left as they are.
    before = {p: p.read_bytes() for p in records}
    assert main(args) == 1
    assert "0 computed, 2 already done, 1 failed" in capsys.readouterr().out
    assert {p: p.read_bytes() for p in records} == before


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--workers", "0"], "--workers must be >= 1"),
        (["--jobs-per-gpu", "0"], "--jobs-per-gpu must be >= 1"),
        (["--workers", "2", "--jobs-per-gpu", "2"], "give --workers (worker processes in all) or --jobs-per-gpu"),
        (["--device", "cpu", "--jobs-per-gpu", "2"], "--jobs-per-gpu places jobs on GPUs; on the CPU use --workers"),
        (["--set", "threads_per_job=0"], "threads_per_job must be >= 1, got 0"),
        (["--set", "deterministic=maybe"], "deterministic must be true, false or warn, got 'maybe'"),
        (["--address", "auto"], "--address is for --backend ray"),
        (["--set", "defenses=[none, nosuchdefense]"], "unknown defense 'nosuchdefense'"),
    ],
)
def test_user_errors_exit_2_before_any_work(tmp_path, capsys, extra, message):
    config = write_grid(tmp_path / "grid.yaml")
    run_dir = tmp_path / "run"
    args = ["run", str(config), "--out", str(run_dir), "--cache-dir", str(tmp_path / "cache"), *extra]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not run_dir.exists()


@pytest.mark.parametrize(
    "change, message, kept",
    [
        ({"train": {**GRID["train"], "lr": 1e6}}, "train small_cnn [badnets]: the loss became nan at epoch 1; lower train.lr", set()),
        # At lr 1e6 the U-Net's output leaves [0, 1] in one step and the clamp stops every gradient,
        # so the loss stays finite; weight decay at 1e20 overflows the weights.
        ({"defenses": [{"name": "refine", "width": 4, "epochs": 1, "batch_size": 32, "lr": 1e20}]},
         "refine: the loss became nan at epoch 1; lower lr", {"models"}),
        # BTI-DBF: a failing pre-training stores no generator; a failing purifier keeps the
        # finished (finite) pre-trained generator, a valid shared artifact, but no defense state.
        ({"defenses": [{**TINY_BTIDBF, "name": "btidbf_u", "gen_lr": 1e30}]},
         "btidbf_u (unlearn): pretrain generator: the loss became nan at epoch 1; lower gen_lr", {"models"}),
        ({"defenses": [{**TINY_BTIDBF, "name": "btidbf_p", "purify_lr": 1e30}]},
         "btidbf_p (purify): train purifier: the loss became nan at epoch 1; lower purify_lr",
         {"models", "shared-btidbf-generator"}),
    ],
)
def test_a_fit_whose_loss_turns_non_finite_fails_its_cell_and_caches_nothing(tmp_path, capsys, change, message, kept):
    grid = {**GRID, "attacks": ["badnets"], "defenses": ["none"], **change}
    config = write_grid(tmp_path / "grid.yaml", grid)
    cache = tmp_path / "cache"
    args = ["run", str(config), "--out", str(tmp_path / "run"), "--cache-dir", str(cache), "--device", "cpu",
            "--no-tsne", "--workers", "1"]  # fmt: skip
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "failed: mnist5k/small_cnn badnets" in err and message in err
    assert not list((tmp_path / "run" / "records").glob("*.json"))
    stored = {path.relative_to(cache).parts[0] for path in cache.rglob("*") if path.is_file()}
    assert {"models", "defenses", "shared-btidbf-generator"} & stored == kept
