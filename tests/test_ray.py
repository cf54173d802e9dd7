"""The Ray backend on a private local 2-CPU Ray instance gives the local executor's table."""

from __future__ import annotations

import json

import pytest
from gridrun import assert_complete_files, assert_same_features, reference_run, run_cli, write_grid

pytest.importorskip("ray", reason="Ray is not installed: pip install -e '.[ray]'")

pytestmark = pytest.mark.slow


def test_ray_backend_gives_the_local_table(tmp_path_factory, tmp_path):
    reference = reference_run(tmp_path_factory)
    config = write_grid(tmp_path / "grid.yaml")
    done = run_cli(config, tmp_path / "run", tmp_path / "cache", "--backend", "ray", "--workers", "2")
    assert done.returncode == 0, done.stderr[-3000:]

    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["backend"] == "ray" and run["workers"] == 2 and run["state"] == "finished"
    jobs = [json.loads(p.read_text()) for p in (tmp_path / "run" / "jobs").glob("*.json")]
    assert jobs and all(j["state"] == "done" for j in jobs)
    # The jobs ran in Ray's worker processes, not in the driver.
    assert all(not j["worker"].startswith(f"pid {run['pid']} ") for j in jobs)
    assert len(list((tmp_path / "cache" / "models").glob("*.pt"))) == 3
    records = [json.loads(p.read_text()) for p in (tmp_path / "run" / "records").glob("*.json")]
    assert {r["threads_per_job"] for r in records} == {1}  # the grid's threads_per_job
    assert (tmp_path / "run" / "table.md").read_text() == (reference / "table.md").read_text()
    assert_same_features(tmp_path / "run", reference)  # computed in worker processes, saved by the driver
    assert_complete_files(tmp_path / "run")
