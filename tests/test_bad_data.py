"""Bad data files: one line naming the file, exit 2, nothing executed, nothing left behind."""

from __future__ import annotations

import io
import os
import pickle
import re
import shutil
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from bench.cli import main
from bench.core.data import CIFAR10_CLASSES, DataPaths, load_dataset
from bench.core.errors import BenchError
from tests.conftest import cifar_root, few_real_jpegs

REPO = Path(__file__).resolve().parent.parent
TINY_TRAIN = {"epochs": 1, "batch_size": 64, "lr": 0.05, "milestones": [], "flip": False}


def _grid(tmp_path: Path, dataset: dict | str) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({"datasets": [dataset], "models": [{"name": "small_cnn", "width": 8}],
                                    "attacks": ["badnets"], "defenses": ["none"], "train": TINY_TRAIN}))  # fmt: skip
    return path


def _run_error(tmp_path: Path, config: Path, *extra: str, capsys) -> str:
    """Run the CLI; assert exit 2 with exactly one line ``error: ...`` and no run directory."""
    code = main(["run", str(config), "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"),
                 "--device", "cpu", "--no-tsne", "--workers", "1", *extra])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()
    return err


def _leftovers(cache: Path) -> list[Path]:
    """What a failed data load left in the cache besides its (empty) lock files."""
    return [p for p in (cache / "data").rglob("*")] if (cache / "data").exists() else []


# ---------------------------------------------------------------------------------- item: files


def test_config_that_is_not_utf8_is_one_line(tmp_path, capsys):
    config = tmp_path / "grid.yaml"
    config.write_bytes(b"datasets: [mnist5k]\n# caf\xe9 au lait\nmodels: [small_cnn]\n")
    err = _run_error(tmp_path, config, capsys=capsys)
    assert f"config file {config} is not UTF-8 text" in err


def test_truncated_tarball_is_one_line_and_leaves_no_unpack(tmp_path, capsys):
    root = cifar_root()
    if root is None:
        pytest.skip("the shared CIFAR-10 JPEG tarball is not available")
    data = tmp_path / "data"
    data.mkdir()
    with open(next(root.glob("*.tar.gz")), "rb") as src:
        (data / "cifar10-jpg.tar.gz").write_bytes(src.read(2_000_000))  # the first 2 MB of ~20
    err = _run_error(tmp_path, _grid(tmp_path, {"name": "cifar10", "download": False}), "--data-root", str(data),
                     capsys=capsys)  # fmt: skip
    assert f"{data / 'cifar10-jpg.tar.gz'} is truncated or not a valid .tar.gz" in err
    assert _leftovers(tmp_path / "cache") == []  # no half-unpacked folder, no temporary


def test_archive_member_outside_its_folder_refuses_the_whole_archive(tmp_path, small_cifar_tarball, capsys):
    data = tmp_path / "data"
    data.mkdir()
    hostile = data / "cifar10-jpg.tar.gz"
    with tarfile.open(small_cifar_tarball) as good, tarfile.open(hostile, "w:gz") as bad:
        for member in good:
            bad.addfile(member, good.extractfile(member) if member.isfile() else None)
        payload = b"written outside the cache"
        escape = tarfile.TarInfo("../../escaped.txt")
        escape.size = len(payload)
        bad.addfile(escape, io.BytesIO(payload))
    err = _run_error(tmp_path, _grid(tmp_path, {"name": "cifar10", "download": False}), "--data-root", str(data),
                     capsys=capsys)  # fmt: skip
    assert f"{hostile}: refusing the archive: member '../../escaped.txt'" in err
    assert not list(tmp_path.rglob("escaped.txt"))
    assert _leftovers(tmp_path / "cache") == []  # not even the good members were kept


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    few_real_jpegs(tmp_path / "tree", per_class=2)
    return tmp_path / "tree"


@pytest.mark.parametrize("damage, message", [
    ("truncate", "is not a readable image (OSError"),
    ("text", "is not a readable image (UnidentifiedImageError"),
    ("directory", "has an image name but is not a file"),
])  # fmt: skip
def test_bad_image_files_are_named(tmp_path, tree, capsys, damage, message):
    victim = sorted((tree / "train" / "dog").glob("*.jpg"))[0]
    if damage == "truncate":
        victim.write_bytes(victim.read_bytes()[:200])
    elif damage == "text":
        victim = victim.with_name("notes.jpg")
        victim.write_text("not an image at all\n")
    else:
        victim = victim.with_name("album.png")
        victim.mkdir()
    err = _run_error(tmp_path, _grid(tmp_path, {"name": "imagefolder", "root": str(tree)}), capsys=capsys)
    assert f"error: {victim} {message}" in err


def test_mixed_image_sizes_get_advice_that_works(tmp_path, tree, capsys):
    from PIL import Image

    Image.new("RGB", (48, 40), (200, 10, 10)).save(tree / "train" / "cat" / "big.jpg")
    err = _run_error(tmp_path, _grid(tmp_path, {"name": "imagefolder", "root": str(tree)}), capsys=capsys)
    assert "have different sizes" in err and "big.jpg is 48x40" in err and "'resize'" in err
    # The advice works: imagefolder with resize loads the same tree.
    split = load_dataset("imagefolder", DataPaths(tree, tmp_path / "cache"), root=str(tree), resize=32)
    assert split.train.x.shape == (7, 3, 32, 32)

    # CIFAR-10 has no 'resize': its advice must not suggest one.
    cifar = tmp_path / "cifar"
    for split_name in ("train", "test"):
        for cls in CIFAR10_CLASSES:
            shutil.copytree(tree / split_name / "cat", cifar / split_name / cls)
    err = _run_error(tmp_path, _grid(tmp_path, {"name": "cifar10", "download": False}), "--data-root", str(cifar),
                     capsys=capsys)  # fmt: skip
    assert "have different sizes" in err and "use the 'imagefolder' dataset" in err
    assert "set the dataset's 'resize'" not in err
    with pytest.raises(BenchError, match="cifar10: unknown parameter 'resize'"):  # indeed no such parameter
        load_dataset("cifar10", DataPaths(cifar, tmp_path / "cache"), resize=32)


def test_out_pointing_to_an_existing_file(tmp_path, capsys):
    out = tmp_path / "results.txt"
    out.write_text("keep me\n")
    config = _grid(tmp_path, "mnist5k")
    for extra in ([], ["--dry-run"]):
        code = main(["run", str(config), "--out", str(out), "--cache-dir", str(tmp_path / "cache"), *extra])
        err = capsys.readouterr().err
        assert code == 2 and err == f"error: --out {out} is an existing file, not a directory; choose a new or empty directory\n"
    assert out.read_text() == "keep me\n" and not (tmp_path / "cache").exists()


# ------------------------------------------------------------------ item: no code from data files


def _batch(n: int, seed: int) -> dict:
    """A batch in the official layout (after latin-1 decoding): label, labels, data, file names."""
    rng = np.random.default_rng(seed)
    return {"batch_label": f"batch {seed}", "labels": rng.integers(0, 10, n).tolist(),
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "filenames": [f"img_{i}.png" for i in range(n)]}  # fmt: skip


class _Python2Pickler(pickle._Pickler):
    """Writes byte strings and ASCII strings as Python 2's ``str`` (BINSTRING), and numpy under its
    numpy-1 module name, as the official release (pickled by Python 2 with numpy 1) has them."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj: bytes | str) -> None:
        data = obj.encode("latin-1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str
    dispatch[str] = _save_py2_str

    def save_global(self, obj, name=None):  # noqa: ANN001 - pickle's signature
        module = getattr(obj, "__module__", "")
        if module == "numpy._core.multiarray":
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n" + obj.__name__.encode() + b"\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)


def _write_batches(folder: Path, style: str) -> dict[str, dict]:
    folder.mkdir(parents=True)
    batches = {name: _batch(20, i) for i, name in enumerate([*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"])}
    for name, batch in batches.items():
        with open(folder / name, "wb") as fh:
            if style == "python3":
                pickle.dump(batch, fh, protocol=2)
            else:
                _Python2Pickler(fh, protocol=2).dump(batch)
    return batches


@pytest.mark.parametrize("style", ["python3", "python2"])
def test_real_format_batches_still_load(tmp_path, style):
    batches = _write_batches(tmp_path / "data" / "cifar-10-batches-py", style)
    split = load_dataset("cifar10", DataPaths(tmp_path / "data", tmp_path / "cache"), download=False)
    assert split.train.x.shape == (100, 3, 32, 32) and split.test.x.shape == (20, 3, 32, 32)
    expected = np.concatenate([batches[f"data_batch_{i}"]["data"] for i in range(1, 6)]).reshape(-1, 3, 32, 32)
    assert torch.equal(split.train.x, torch.from_numpy(expected))
    assert split.test.y.tolist() == batches["test_batch"]["labels"]


class _Payload:
    """Unpickling this runs ``os.mkdir(marker)``: what a crafted batch file could do to anyone."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_crafted_batch_file_is_refused_and_never_runs(tmp_path, capsys):
    folder = tmp_path / "data" / "cifar-10-batches-py"
    _write_batches(folder, "python3")
    marker = tmp_path / "code-ran"
    with open(folder / "data_batch_3", "wb") as fh:
        pickle.dump({"data": _Payload(marker), "labels": [0]}, fh, protocol=2)
    err = _run_error(tmp_path, _grid(tmp_path, {"name": "cifar10", "download": False}),
                     "--data-root", str(tmp_path / "data"), capsys=capsys)  # fmt: skip
    assert f"{folder / 'data_batch_3'} is not a CIFAR-10 python batch file" in err and "posix.mkdir" in err
    assert "bad parameters" not in err
    assert not marker.exists()


@pytest.mark.parametrize("payload", [
    pickle.dumps({"data": np.zeros((2, 3072), dtype=object), "labels": [0, 1]}, protocol=2),  # object arrays
    pickle.dumps({"data": [1, 2], "labels": [0, 1]}, protocol=2)[:-10],  # truncated
    b"this is not a pickle",
])  # fmt: skip
def test_other_non_batch_files_are_refused(tmp_path, payload):
    folder = tmp_path / "data" / "cifar-10-batches-py"
    _write_batches(folder, "python3")
    (folder / "test_batch").write_bytes(payload)
    with pytest.raises(BenchError, match=re.escape(str(folder / "test_batch"))):
        load_dataset("cifar10", DataPaths(tmp_path / "data", tmp_path / "cache"), download=False)


def test_no_unsafe_deserialisation_in_the_code_base():
    """Every torch.load is weights_only=True; nothing calls pickle.load(s) or np.load with pickles."""
    sources = [p for d in ("bench", "attacks", "defenses", "benchmarks") for p in (REPO / d).rglob("*.py")]
    sources.append(REPO / "run_bench.py")
    offenders = []
    for path in sources:
        text = path.read_text()
        for match in re.finditer(r"torch\.load\(([^()]*(?:\([^()]*\)[^()]*)*)\)", text):
            if "weights_only=True" not in match.group(1):
                offenders.append(f"{path.name}: {match.group(0)}")
        offenders += [f"{path.name}: {m}" for m in re.findall(r"pickle\.loads?\(|allow_pickle=True|yaml\.load\(", text)
                      if path.name != "safe_yaml.py" or m != "yaml.load("]  # fmt: skip
    assert offenders == []
