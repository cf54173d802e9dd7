"""A grid run killed with SIGKILL part-way, then resumed with the same command."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from gridrun import (
    N_CELLS,
    REPO,
    assert_complete_files,
    assert_same_features,
    cli_command,
    cli_env,
    reference_run,
    write_grid,
)

from bench.orchestration.status import format_status, run_status

pytestmark = pytest.mark.slow


def _records(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "records").glob("*.json"))


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead
    except FileNotFoundError:
        return False


def _kill_part_way(command: list[str], run_dir: Path, log: Path) -> int:
    """Start ``command``, SIGKILL it once the first record exists; return the records it left."""
    with open(log, "w") as out:
        proc = subprocess.Popen(command, cwd=REPO, env=cli_env(), stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 600
            while not _records(run_dir):
                assert proc.poll() is None, f"the run ended before writing a record:\n{log.read_text()[-3000:]}"
                assert time.monotonic() < deadline, "no record after 10 minutes"
                time.sleep(0.02)
            proc.kill()
        finally:
            proc.kill()
            proc.wait()
    return len(_records(run_dir))


def test_killed_run_resumes_without_recomputing(tmp_path_factory):
    reference = reference_run(tmp_path_factory)
    base = tmp_path_factory.mktemp("resume")
    config = write_grid(base / "grid.yaml")
    run_dir, cache = base / "run", base / "cache"
    command = cli_command(config, run_dir, cache, "--workers", "2")

    left = _kill_part_way(command, run_dir, base / "killed.log")
    assert 1 <= left < N_CELLS, f"the kill came too late to test anything ({left} of {N_CELLS} records)"
    assert_complete_files(run_dir, allow_temps=True)

    # The workers die with their driver instead of running on as orphans.
    jobs = [json.loads(p.read_text()) for p in (run_dir / "jobs").glob("*.json")]
    worker_pids = {int(j["worker"].split()[1]) for j in jobs if j.get("worker", "").startswith("pid ")}
    assert worker_pids
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in worker_pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in worker_pids), "worker processes outlived the killed driver"

    # status sees a dead driver: some cells done, none running, the rest pending.
    run, cells = run_status(run_dir)
    assert run["alive"] is False and "dead" in format_status(run_dir)
    assert sum(c.state == "done" for c in cells) == left
    assert {c.state for c in cells} == {"done", "pending"}

    # What was finished before the kill, byte for byte, and the models already trained.
    finished = {p: p.read_bytes() for p in _records(run_dir)}
    finished.update({p: p.read_bytes() for p in (run_dir / "jobs").glob("*.json")
                     if json.loads(p.read_text())["state"] == "done"})  # fmt: skip
    models = {p: p.stat().st_mtime_ns for p in (cache / "models").glob("*.pt")}
    assert models, "a record exists, so its model must be in the cache"

    resumed = subprocess.run(command, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{N_CELLS - left} computed, {left} already done" in resumed.stdout

    for path, content in finished.items():
        assert path.read_bytes() == content, f"{path.name} was recomputed after the resume"
    for path, mtime in models.items():
        assert path.stat().st_mtime_ns == mtime, f"model {path.name} was retrained after the resume"
    first_run = {json.loads(c)["run_id"] for p, c in finished.items() if p.parent.name == "jobs"}
    later = [json.loads(p.read_text()) for p in (run_dir / "jobs").glob("*.json") if p not in finished]
    redone = [j for j in later if j["state"] == "done"]
    assert redone and all(j["run_id"] not in first_run for j in redone)
    # A job cut off by the kill is redone, or (when its worker saved the artifact before dying)
    # left marked interrupted.
    assert all(j["state"] == "interrupted" and j["run_id"] in first_run for j in later if j not in redone)

    assert len(_records(run_dir)) == N_CELLS
    assert (run_dir / "table.md").read_text() == (reference / "table.md").read_text()
    assert_same_features(run_dir, reference)  # computed in worker processes, saved by the driver
    assert_complete_files(run_dir)
    assert {c.state for c in run_status(run_dir)[1]} == {"done"}
