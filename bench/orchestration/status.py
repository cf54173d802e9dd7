"""Job bookkeeping in a run directory, and the ``status RUN_DIR`` report built from it.

The driver writes, all atomically:

- ``run.json``: who drives the run (host, pid), the backend, and whether it is running;
- ``plan.json``: every cell of the grid with the jobs that stand between it and its record;
- ``jobs/<job_id>.json``: one file per started job: running, done (seconds, worker, and the
  artifacts it built or loaded -- models, defense states, shared sub-results such as BDMAE's
  autoencoder) or failed (the error's first line and the path of its log);
- ``logs/<job_id>.log``: the full traceback of a failed job.

Records (``records/<cell_id>.json``) stay the single source of truth for finished cells; the
rest only explains what is missing. A job marked running by a driver that no longer lives (on
this host) was interrupted and is shown as pending: the next ``run`` redoes it.

``status`` only reads: a damaged file (truncated JSON, JSON of the wrong shape) never makes it
crash. A damaged record is reported as such (the next ``run`` moves it aside and recomputes its
cell); a damaged ``plan.json``, ``run.json`` or job file counts as absent.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.core.errors import BenchError
from bench.core.files import atomic_write_json, atomic_write_text, read_json_object
from bench.core.records import RECORDS_DIR, RecordStore, record_problem
from bench.orchestration.executors import JobResult
from bench.orchestration.locks import process_alive, this_process
from bench.orchestration.plan import Job, Plan

JOBS_DIR = "jobs"
LOGS_DIR = "logs"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


class JobBook:
    """Writes the driver's view of a run: run.json, plan.json, job states and failure logs."""

    def __init__(self, run_dir: Path, run_id: str) -> None:
        self.run_dir = Path(run_dir)
        self.run_id = run_id

    def _write(self, job: Job, state: str, **fields: Any) -> None:
        entry = {"job_id": job.job_id, "kind": job.kind, "label": job.label, "state": state,
                 "run_id": self.run_id, **fields}  # fmt: skip
        atomic_write_json(entry, self.run_dir / JOBS_DIR / f"{job.job_id}.json")

    def begin(self, plan: Plan, **info: Any) -> None:
        """Start a run: write the plan and run.json; jobs a killed driver left "running" become
        "interrupted" (the caller holds the run lock, so no live driver owns them)."""
        for path in sorted((self.run_dir / JOBS_DIR).glob("*.json")):
            entry = read_json_object(path)
            if entry and entry.get("state") == "running":
                atomic_write_json({**entry, "state": "interrupted"}, path)
        atomic_write_json(plan.to_json(), self.run_dir / "plan.json")
        atomic_write_json(
            {"run_id": self.run_id, "state": "running", **this_process(), **info}, self.run_dir / "run.json"
        )

    def end(self, state: str) -> None:
        info = read_json_object(self.run_dir / "run.json") or {}
        atomic_write_json({**info, "state": state, "finished_at": _now()}, self.run_dir / "run.json")

    def started(self, job: Job, worker: str) -> None:
        self._write(job, "running", worker=worker, started_at=_now())

    def done(self, job: Job, result: JobResult) -> None:
        self._write(job, "done", worker=result.worker, seconds=round(result.seconds, 3), finished_at=_now(),
                    artifacts=result.artifacts)  # fmt: skip

    def failed(self, job: Job, result: JobResult) -> None:
        log = Path(LOGS_DIR) / f"{job.job_id}.log"
        header = f"{job.label}\njob {job.job_id}, worker {result.worker or '-'}, {_now()}\n\n"
        atomic_write_text(header + (result.traceback or result.error or "") + "\n", self.run_dir / log)
        self._write(job, "failed", worker=result.worker, error=result.error, log=str(log),
                    seconds=round(result.seconds, 3), finished_at=_now())  # fmt: skip

    def interrupted(self, job: Job) -> None:
        self._write(job, "interrupted", finished_at=_now())


# ------------------------------------------------------------------------------ status report


STATES = ("done", "running", "failed", "pending", "damaged")


@dataclass
class CellStatus:
    cell_id: str
    label: str
    state: str  # one of STATES
    detail: str = ""


def _plan_cells(run_dir: Path) -> list[dict[str, Any]] | None:
    """plan.json's cells, or None when the file is missing or not of the shape the driver writes."""
    plan = read_json_object(run_dir / "plan.json")
    cells = plan.get("cells") if plan else None
    if not isinstance(cells, list):
        return None
    for cell in cells:
        if not (isinstance(cell, dict) and isinstance(cell.get("cell_id"), str) and isinstance(cell.get("label"), str)
                and isinstance(cell.get("jobs"), list) and all(isinstance(j, str) for j in cell["jobs"])):  # fmt: skip
            return None
    return cells


def run_status(run_dir: Path) -> tuple[dict[str, Any], list[CellStatus]]:
    """(run.json with an ``alive`` flag, one status per cell in grid order)."""
    run_dir = Path(run_dir)
    plan_cells = _plan_cells(run_dir)
    records_dir = run_dir / RECORDS_DIR
    if plan_cells is None and not records_dir.is_dir():
        raise BenchError(f"{run_dir} is not a run directory (no readable plan.json or records/ inside)")
    run_file = read_json_object(run_dir / "run.json")
    run = dict(run_file or {})
    alive = process_alive(run) if run.get("state") == "running" else False
    run["alive"] = alive
    run["damaged"] = [name for name, readable in (("plan.json", plan_cells is not None), ("run.json", run_file is not None))
                      if not readable and (run_dir / name).exists()]  # fmt: skip
    paths = sorted(records_dir.glob("*.json")) if records_dir.is_dir() else []
    records = {p.stem: record_problem(p) for p in paths}  # read only: status never moves a file
    moved_aside = RecordStore(run_dir).damaged()
    cells = plan_cells if plan_cells is not None else [
        {"cell_id": cid, "label": _record_label(r) if r else cid, "jobs": []} for cid, (r, _) in records.items()
    ]  # fmt: skip
    jobs = {job_id: _job_state(run_dir, job_id, run, alive) for cell in cells for job_id in cell["jobs"]}
    out = []
    for cell in cells:
        record, problem = records.get(cell["cell_id"], (None, None))
        if record is not None:
            detail = f"BA {record['ba']:.2f}  ASR {record['asr']:.2f}"
            out.append(CellStatus(cell["cell_id"], cell["label"], "done", detail))
            continue
        if problem is not None:
            detail = f"{RECORDS_DIR}/{cell['cell_id']}.json is {problem}; the next run moves it aside and recomputes it"
            out.append(CellStatus(cell["cell_id"], cell["label"], "damaged", detail))
            continue
        chain = [jobs[job_id] for job_id in cell["jobs"]]  # dependencies first, the cell's own job last
        failed = [j for j in chain if j["state"] == "failed"]
        running = [j for j in chain if j["state"] == "running"]
        if failed:
            state, detail = "failed", f"{failed[0].get('error')}  [{failed[0].get('log', '')}]"
        elif chain and chain[-1]["state"] == "running":
            state, detail = "running", f"on {chain[-1].get('worker')}"
        elif running:
            state, detail = "pending", f"waits for {running[0].get('label')} (running on {running[0].get('worker')})"
        elif any(j["state"] == "interrupted" for j in chain):
            state, detail = "pending", "interrupted; rerun the same command to resume"
        elif cell["cell_id"] in moved_aside:
            aside = moved_aside[cell["cell_id"]]
            state, detail = "pending", f"its record was damaged (moved aside to {RECORDS_DIR}/{aside.name})"
        else:
            state, detail = "pending", ""
        out.append(CellStatus(cell["cell_id"], cell["label"], state, detail))
    return run, out


def _job_state(run_dir: Path, job_id: str, run: dict[str, Any], alive: bool | None) -> dict[str, Any]:
    """A job's file, its state seen from now: "running" only while its own driver lives."""
    job = read_json_object(run_dir / JOBS_DIR / f"{job_id}.json")
    if job is None or not isinstance(job.get("state"), str):
        job = {"state": "pending"}
    current = job.get("run_id") == run.get("run_id")
    if job["state"] == "running" and (not current or alive is False):
        job["state"] = "interrupted"
    if job["state"] == "failed" and not current and alive is not False:
        job["state"] = "pending"  # failed in an earlier run; the live run retries it
    return job


def cell_statuses(run_dir: Path, cells: list[Any]) -> list[CellStatus]:
    """The status of these grid cells (objects with a ``cell_id``), in their order."""
    by_id = {c.cell_id: c for c in run_status(run_dir)[1]}
    return [by_id.get(c.cell_id) or CellStatus(c.cell_id, c.cell_id, "pending") for c in cells]


def _record_label(record: dict | None) -> str:
    r = record or {}
    return (
        f"{r.get('dataset')}/{r.get('model')} {r.get('attack_label')} / {r.get('defense_label')} seed {r.get('seed')}"
    )


def format_status(run_dir: Path) -> str:
    run, cells = run_status(run_dir)
    counts = {state: sum(c.state == state for c in cells) for state in STATES}
    if not counts["damaged"]:
        del counts["damaged"]
    if run.get("state") == "running":
        driver = {True: "running", False: "dead: the run was killed", None: "state unknown from this host"}[
            run["alive"]
        ]
        who = f"driver pid {run.get('pid')} on {run.get('host')}: {driver}"
    else:
        who = f"last run {run.get('state', 'unknown')} at {run.get('finished_at', '?')}" if run else "no run.json"
    lines = [f"{run_dir}: {len(cells)} cells: " + ", ".join(f"{n} {s}" for s, n in counts.items()) + f" ({who})"]
    lines += [f"warning: {name} is damaged (not the JSON object the driver writes); ignored"
              for name in run.get("damaged", [])]  # fmt: skip
    width = max((len(c.label) for c in cells), default=0)
    for cell in cells:
        lines.append(f"{cell.state:<8} {cell.label:<{width}}  {cell.detail}".rstrip())
    return "\n".join(lines)
