"""Run directories and the cache: nothing written or deleted outside the run's own files, killed
writers leave nothing for ever, damaged run files never crash a command, modes follow the umask."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gridrun import GRID, one_thread, write_grid

import bench.core.files
from bench.cli import main
from bench.core.data import DataPaths, _source_key, load_dataset
from bench.core.errors import BenchError
from bench.core.files import atomic_write_bytes, temp_path
from bench.orchestration.locks import RUN_LOCK_FILE
from bench.orchestration.rundir import MARKER
from bench.orchestration.store import ArtifactStore, sweep_cache

REPO = Path(__file__).resolve().parent.parent
SMALL = {**GRID, "attacks": ["badnets"], "defenses": ["none", {"name": "shrinkpad", "pad": 2}]}


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


def _args(config: Path, run_dir: Path, cache: Path, *extra: str) -> list[str]:
    return ["run", str(config), "--out", str(run_dir), "--cache-dir", str(cache), "--device", "cpu", "--no-tsne",
            "--workers", "1", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(config, run directory, cache) of a finished two-cell run; tests copy it before changing it."""
    base = tmp_path_factory.mktemp("finished")
    config = write_grid(base / "grid.yaml", SMALL)
    with one_thread():
        assert main(_args(config, base / "run", base / "cache")) == 0
    return config, base / "run", base / "cache"


def _copy_run(finished, tmp_path: Path) -> tuple[Path, Path, Path]:
    import shutil

    config, run_dir, cache = finished
    shutil.copytree(run_dir, tmp_path / "run")
    return config, tmp_path / "run", cache


# ------------------------------------------------------------------ item: writes stay in the run


@pytest.mark.parametrize("name", ["../escaped", "/tmp/absolute", ".hidden", "a/b", ".."])
def test_run_names_are_plain_slugs(tmp_path, capsys, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    config = write_grid(tmp_path / "grid.yaml", {**SMALL, "name": name})
    assert main(["run", str(config), "--cache-dir", str(tmp_path / "cache"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {config}: name must be a plain name") and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.yaml"]


def test_default_name_comes_from_the_file_name_as_a_slug(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = write_grid(tmp_path / "my grid (v2).yaml", SMALL)
    assert main(["run", str(config), "--cache-dir", str(tmp_path / "cache"), "--dry-run"]) == 0
    assert "-> results/my-grid-v2-" in capsys.readouterr().out


def test_out_must_be_new_empty_or_a_run(tmp_path, finished, capsys):
    config, _, cache = finished
    foreign = tmp_path / "home"
    (foreign / "sub" / "deeper").mkdir(parents=True)
    notes = foreign / "sub" / "deeper" / ".notes.tmp"
    notes.write_text("my notes\n")
    (foreign / "thesis.tex").write_text("...")
    before = sorted(foreign.rglob("*"))
    assert main(_args(config, foreign, cache)) == 2
    err = capsys.readouterr().err
    assert err == (f"error: --out {foreign} is a non-empty directory that is no run directory of this harness "
                   f"(no {MARKER} inside); choose a new or empty directory\n")  # fmt: skip
    assert sorted(foreign.rglob("*")) == before and notes.read_text() == "my notes\n"

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(_args(config, empty, cache)) == 0  # all cached: fast
    assert json.loads((empty / MARKER).read_text())["format"] == 1


def test_sweep_removes_only_the_harness_temps_in_its_folders(tmp_path, finished):
    config, run_dir, cache = _copy_run(finished, tmp_path)
    # The debris of killed writers: a record, a job file and a table half-written.
    debris = [temp_path(run_dir / "records" / "abc.json"), temp_path(run_dir / "jobs" / "x.json"),
              temp_path(run_dir / "table.md")]  # fmt: skip
    # A user's files that merely look temporary, in and below the run directory.
    mine = [run_dir / ".notes.tmp", run_dir / "records" / ".draft.json.tmp", run_dir / "extra" / "deep" / ".x.tmp",
            run_dir / "extra" / temp_path(Path("y.json")).name]  # fmt: skip
    for path in debris + mine:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    assert main(_args(config, run_dir, cache)) == 0
    assert [p for p in debris if p.exists()] == []
    assert all(p.read_text() == "x" for p in mine)


def test_an_earlier_run_without_a_marker_is_still_a_run(tmp_path, finished, capsys):
    config, run_dir, cache = _copy_run(finished, tmp_path)
    (run_dir / MARKER).unlink()  # as written by a version before the marker
    assert main(_args(config, run_dir, cache)) == 0
    assert (run_dir / MARKER).exists()
    # One killed before its first record: only the run lock's file and the job files.
    killed = tmp_path / "killed"
    (killed / "jobs").mkdir(parents=True)
    (killed / RUN_LOCK_FILE).touch()
    assert main(_args(config, killed, cache, "--dry-run")) == 0
    assert "2 cells in grid -> " in capsys.readouterr().out


# ------------------------------------------------------------- item: killed runs leave nothing


def test_cache_sweep_removes_killed_writers_temps_only(tmp_path):
    cache = tmp_path / "cache"
    store = ArtifactStore(cache)
    store.save("models", "alive", {"w": torch.zeros(1)})
    user_file = cache / "models" / ".notes.tmp"
    user_file.write_text("mine")
    # A writer that holds the artifact lock while it writes, then is killed mid-write.
    script = (
        "import sys, time; from pathlib import Path; from bench.core.locks import artifact_lock; "
        "from bench.core.files import temp_path; cache = Path(sys.argv[1]); "
        "lock = artifact_lock(cache, 'models', 'k'); lock.acquire(); "
        "temp_path(cache / 'models' / 'k.pt').write_bytes(b'partial'); print('writing', flush=True); time.sleep(600)"
    )
    writer = subprocess.Popen([sys.executable, "-c", script, str(cache)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "writing"
        (temp,) = [p for p in (cache / "models").iterdir() if p.name.startswith(".k.pt.bench-")]
        assert sweep_cache(cache) == [] and temp.exists()  # the writer lives: its temp stays
        writer.kill()
        writer.wait()
        assert sweep_cache(cache) == [temp] and not temp.exists()
    finally:
        writer.kill()
        writer.wait()
    assert user_file.read_text() == "mine" and store.load("models", "alive") is not None


def test_failed_or_killed_unpacks_leave_no_folder(tmp_path, small_cifar_tarball):
    cache = tmp_path / "cache"
    key = _source_key(small_cifar_tarball)
    # A killed unpack of this very tarball, and one of another tarball, left their folders.
    same = temp_path(cache / "data" / f"unpacked-{key}")
    other = temp_path(cache / "data" / "unpacked-0123456789abcdef")
    for leftover in (same, other):
        (leftover / "train" / "cat").mkdir(parents=True)
        (leftover / "train" / "cat" / "0001.jpg").write_bytes(b"half")
    split = load_dataset("cifar10", DataPaths(small_cifar_tarball.parent, cache), download=False)
    assert split.train.x.shape == (10, 3, 32, 32)
    assert not same.exists()  # swept by the unpack that needed the same entry
    assert other.exists()
    assert sweep_cache(cache) == [other] and not other.exists()  # and the start-up sweep does the rest
    names = sorted(p.name for p in (cache / "data").iterdir())
    assert names == sorted([f"unpacked-{key}", f"cifar10-tarball-{key}.pt"])


# --------------------------------------------------------------------- item: damaged run files


def test_truncated_record_is_moved_aside_and_recomputed(tmp_path, finished, capsys):
    config, run_dir, cache = _copy_run(finished, tmp_path)
    record = sorted((run_dir / "records").glob("*.json"))[0]
    good = json.loads(record.read_text())
    record.write_text(record.read_text()[:120])

    assert main(["status", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "2 cells: 1 done, 0 running, 0 failed, 0 pending, 1 damaged" in out
    assert f"records/{record.name} is not valid JSON" in out

    assert main(["table", str(run_dir)]) == 0
    err = capsys.readouterr().err
    assert err.startswith(f"warning: {record} is damaged") and err.count("\n") == 1
    assert not record.exists() and record.with_name(record.name + ".damaged").exists()
    assert main(["status", str(run_dir)]) == 0
    assert "its record was damaged (moved aside" in capsys.readouterr().out

    assert main(_args(config, run_dir, cache)) == 0
    assert "(1 computed, 1 already done)" in capsys.readouterr().out
    again = json.loads(record.read_text())
    assert (again["ba"], again["asr"]) == (good["ba"], good["asr"])  # the cached model, evaluated again


@pytest.mark.parametrize("content", ["[]", '{"cell_id": "other", "ba": 1, "asr": 2}', '{"ba": "high"}'])
def test_records_of_the_wrong_shape_never_crash_a_command(tmp_path, finished, capsys, content):
    _, run_dir, cache = _copy_run(finished, tmp_path)
    record = sorted((run_dir / "records").glob("*.json"))[0]
    record.write_text(content)
    assert main(["status", str(run_dir)]) == 0
    assert "1 done, 0 running, 0 failed, 0 pending, 1 damaged" in capsys.readouterr().out
    assert main(["report", str(run_dir)]) == 0
    assert record.with_name(record.name + ".damaged").read_text() == content
    assert main(["status", str(run_dir)]) == 0
    assert "1 done, 0 running, 0 failed, 1 pending" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["plan.json", "run.json"])
@pytest.mark.parametrize("content", ["[1, 2]", '"running"', '{"cells": [1], "pid": "x"}', "{trunc"])
def test_status_survives_damaged_plan_and_run_files(tmp_path, finished, capsys, name, content):
    _, run_dir, _ = _copy_run(finished, tmp_path)
    (run_dir / name).write_text(content)
    assert main(["status", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "2 cells: 2 done" in out
    not_what_the_driver_writes = name == "plan.json" or not content.startswith('{"')
    assert (f"warning: {name} is damaged" in out) == not_what_the_driver_writes


def test_the_next_run_rewrites_damaged_plan_and_run_files(tmp_path, finished, capsys):
    config, run_dir, cache = _copy_run(finished, tmp_path)
    (run_dir / "plan.json").write_text("[1, 2]")
    (run_dir / "run.json").write_text('"running"')
    assert main(_args(config, run_dir, cache)) == 0
    assert "(0 computed, 2 already done)" in capsys.readouterr().out
    assert all(isinstance(json.loads((run_dir / n).read_text()), dict) for n in ("plan.json", "run.json"))


# ------------------------------------------------------------------- item: modes follow the umask


@pytest.fixture
def umask():
    def set_umask(mask: int) -> None:
        os.umask(mask)

    old = os.umask(0o022)
    yield set_umask
    os.umask(old)


def test_files_are_created_with_the_umask_mode(tmp_path, umask):
    for mask, mode in ((0o002, 0o664), (0o022, 0o644), (0o077, 0o600)):
        umask(mask)
        path = tmp_path / f"file-{mask:o}.json"
        atomic_write_bytes(b"{}", path)
        assert path.stat().st_mode & 0o777 == mode


def test_a_group_shared_run_and_cache_are_group_writable(tmp_path, umask):
    from bench.core.data import DataPaths
    from bench.orchestration.config import load_config
    from bench.orchestration.execute import run_grid

    umask(0o007)
    config = load_config(write_grid(tmp_path / "grid.yaml", {**SMALL, "defenses": ["none"]}))
    run_grid(config, tmp_path / "run", DataPaths(tmp_path / "data", tmp_path / "cache"), "cpu", workers=1)
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()] + \
        [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]  # fmt: skip
    assert len(files) > 10
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {oct(0o660)}


def test_permission_error_on_an_artifact_is_an_error_not_a_delete(tmp_path, monkeypatch):
    store = ArtifactStore(tmp_path)
    path = store.save("models", "k", {"w": torch.ones(2)})
    real_load = torch.load

    def denied(file, *args, **kwargs):  # what open() raises on another user's 0600 file
        if Path(str(file)) == path:
            raise PermissionError(13, "Permission denied", str(file))
        return real_load(file, *args, **kwargs)

    monkeypatch.setattr(bench.core.files.torch, "load", denied)
    with store.lock("models", "k"), pytest.raises(BenchError, match=f"cannot read {path}: permission denied"):
        store.load("models", "k")
    assert path.exists()
    monkeypatch.setattr(bench.core.files.torch, "load", real_load)
    assert torch.equal(store.load("models", "k")["w"], torch.ones(2))


def test_permission_error_on_the_data_cache_is_an_error_not_a_rebuild(tmp_path, monkeypatch):
    from PIL import Image

    paths = DataPaths(tmp_path / "unused", tmp_path / "cache")
    tree = tmp_path / "tree"
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (tree / split / cls).mkdir(parents=True)
            Image.new("RGB", (8, 8), (10, 20, 30)).save(tree / split / cls / "0.png")
    load_dataset("imagefolder", paths, root=str(tree))
    (cached,) = (tmp_path / "cache" / "data").glob("imagefolder-*.pt")
    real_load = torch.load

    def denied(file, *args, **kwargs):
        if Path(str(file)) == cached:
            raise PermissionError(13, "Permission denied", str(file))
        return real_load(file, *args, **kwargs)

    monkeypatch.setattr(bench.core.files.torch, "load", denied)
    with pytest.raises(BenchError, match="permission denied"):
        load_dataset("imagefolder", paths, root=str(tree))
    assert cached.exists()
