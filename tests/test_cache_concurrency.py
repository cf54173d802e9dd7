"""The decoded-data cache: shared safely by concurrent runs, and never trusted when damaged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bench.core.data
from bench.core.data import DataPaths, load_dataset
from tests.conftest import cifar_root

REPO = Path(__file__).resolve().parent.parent

# Load CIFAR-10 once the start file appears; report how often this process unpacked and decoded.
LOADER = """
import hashlib, json, os, sys, time
from pathlib import Path
import bench.core.data as data

counts = {"extract": 0, "decode": 0}
def counting(name, real):
    def wrapper(*args, **kwargs):
        counts[name] += 1
        return real(*args, **kwargs)
    return wrapper
data._extract_checked = counting("extract", data._extract_checked)
data.read_image_folder = counting("decode", data.read_image_folder)
root, cache, start = (Path(a) for a in sys.argv[1:4])
while not start.exists():
    time.sleep(0.005)
split = data.load_dataset("cifar10", data.DataPaths(root, cache), download=False)
digest = hashlib.sha256(split.train.x.numpy().tobytes() + split.test.y.numpy().tobytes()).hexdigest()
print(json.dumps({**counts, "train": len(split.train), "test": len(split.test), "digest": digest}))
"""


def test_two_cold_runs_share_one_cache(tmp_path):
    root = cifar_root()
    if root is None:
        pytest.skip("the shared CIFAR-10 JPEG tarball is not available (set BENCH_DATA_ROOT)")
    cache, start = tmp_path / "cache", tmp_path / "start"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", LOADER, str(root), str(cache), str(start)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]  # fmt: skip
    start.touch()  # both are imported and waiting: they reach the empty cache together
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert [(r["train"], r["test"]) for r in results] == [(50000, 10000)] * 2
    assert results[0]["digest"] == results[1]["digest"]
    # One process unpacked and decoded; the other waited for the lock, then loaded its result.
    assert sum(r["extract"] for r in results) == 1 and sum(r["decode"] for r in results) == 1
    entries = sorted(p.name for p in (cache / "data").iterdir())
    assert len(entries) == 2 and entries[0].startswith("cifar10-tarball-") and entries[1].startswith("unpacked-")


def test_a_bit_flip_in_the_decoded_cache_is_detected_and_rebuilt(tmp_path, small_cifar_tarball, monkeypatch):
    paths = DataPaths(small_cifar_tarball.parent, tmp_path / "cache")
    first = load_dataset("cifar10", paths, download=False)
    (cache_file,) = (tmp_path / "cache" / "data").glob("cifar10-*.pt")
    # Flip one bit inside the stored pixels of the first training image.
    raw = bytearray(cache_file.read_bytes())
    at = raw.find(first.train.x[0].numpy().tobytes()[:64])
    assert at > 0
    raw[at + 10] ^= 0x01
    cache_file.write_bytes(bytes(raw))

    builds = []
    real = bench.core.data.read_image_folder
    monkeypatch.setattr(bench.core.data, "read_image_folder", lambda *a, **k: builds.append(1) or real(*a, **k))
    again = load_dataset("cifar10", paths, download=False)
    assert builds == [1]  # the damaged entry was not used but rebuilt
    assert torch.equal(again.train.x, first.train.x) and torch.equal(again.test.y, first.test.y)
    load_dataset("cifar10", paths, download=False)
    assert builds == [1]  # and the rebuilt entry verifies
