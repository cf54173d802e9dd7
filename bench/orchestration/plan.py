"""Compile grid cells into a plan of jobs with dependencies.

A cell needs up to three expensive things, each cached under its own content key (see
:mod:`bench.orchestration.grid`): the backdoored model (``model_key``), the fitted defense state
(``defense_key``, trainable defenses only) and finally the evaluation that writes the cell's
record. Many cells share one model, and intensity sweeps share one fitted defense, so the plan
has one job per *distinct* artifact:

    model-<model_key>  ->  defense-<defense_key>  ->  cell-<cell_id>

Clean-label attacks (``Attack.clean_label``) craft their poison with a clean model
(``FitContext.train_clean_model``): that model is the grid's ``clean`` row model
(``Cell.clean_model_key``), so their model job waits for a ``model-<clean key>`` job
that trains it, once for every attack setting and for the ``clean`` row itself.

A job whose output already exists (a record in the run directory, an artifact in the cache) is
not planned at all, which is what makes a re-run of the same command continue with the
unfinished work only. Jobs are kept in grid order; executors start the earliest ready job, so
the cells of one model finish before the next model is trained (early results, warm memos).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from bench.core.errors import BenchError
from bench.core.records import RecordStore
from bench.core.registry import ATTACKS
from bench.orchestration.grid import Cell
from bench.orchestration.store import ArtifactStore


@dataclass(frozen=True)
class Job:
    """One unit of work: produce one artifact or one record, after the jobs in ``deps``."""

    job_id: str
    kind: str  # "clean" | "model" | "defense" | "cell"
    cell: Cell  # the first cell (in grid order) that needs this job: enough to compute it
    deps: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        """A short human description for progress bars and ``status``."""
        cell = self.cell
        if self.kind == "clean":
            return f"train clean {cell.model.name} seed {cell.seed}"
        if self.kind == "model":
            return f"train {cell.model.name} [{cell.attack_label}] seed {cell.seed}"
        if self.kind == "defense":
            return f"fit {cell.defense_label} [{cell.attack_label}] seed {cell.seed}"
        return f"eval {cell.attack_label} / {cell.defense_label} seed {cell.seed}"


def cell_label(cell: Cell) -> str:
    return f"{cell.dataset.name}/{cell.model.name} {cell.attack_label} / {cell.defense_label} seed {cell.seed}"


@dataclass
class Plan:
    """The unfinished jobs of a grid, in priority (grid) order, and every cell of the grid."""

    cells: list[Cell]
    jobs: dict[str, Job] = field(default_factory=dict)
    done_cells: set[str] = field(default_factory=set)

    def __len__(self) -> int:
        return len(self.jobs)

    def __iter__(self) -> Iterator[Job]:
        return iter(self.jobs.values())

    def cell_jobs(self, cell: Cell) -> list[str]:
        """The planned jobs that stand between ``cell`` and its record (the cell job last)."""
        job = self.jobs.get(f"cell-{cell.cell_id}")
        if job is None:
            return []
        out: list[str] = []
        stack = list(job.deps)
        while stack:
            dep = stack.pop()
            if dep not in out:
                out.append(dep)
                stack.extend(self.jobs[dep].deps)
        return [*reversed(out), job.job_id]

    def dependents(self, job_id: str) -> list[str]:
        """Every planned job that needs ``job_id``, directly or indirectly."""
        out: list[str] = []
        frontier = {job_id}
        for job in self.jobs.values():  # jobs are in topological order
            if frontier.intersection(job.deps):
                out.append(job.job_id)
                frontier.add(job.job_id)
        return out

    def to_json(self) -> dict[str, Any]:
        """What ``status`` needs without importing plugins: cells, their labels and their jobs."""
        return {
            "cells": [
                {"cell_id": c.cell_id, "label": cell_label(c), "jobs": self.cell_jobs(c),
                 "done": c.cell_id in self.done_cells}
                for c in self.cells
            ],
            "jobs": {j.job_id: {"kind": j.kind, "label": j.label, "deps": list(j.deps)} for j in self.jobs.values()},
        }  # fmt: skip


def _planned(plan: Plan, artifacts: ArtifactStore, kind: str, key: str) -> bool:
    """Whether an artifact still has to be made: planned already, or missing from the cache."""
    prefix = "model" if kind == "models" else "defense"
    return f"{prefix}-{key}" in plan.jobs or not artifacts.exists(kind, key)


def check_distinct_cells(cells: list[Cell]) -> None:
    """Refuse two grid entries that resolve to the same cell (one spells out a parameter's default
    value, the other leaves it out): they would merge silently and be counted twice."""
    first: dict[str, Cell] = {}
    for cell in cells:
        other = first.setdefault(cell.cell_id, cell)
        if other is not cell:
            raise BenchError(f"two grid entries are the same cell: '{cell_label(other)}' and '{cell_label(cell)}' "
                             "(equal once defaults are filled in); list each once")  # fmt: skip


def build_plan(cells: list[Cell], records: RecordStore, artifacts: ArtifactStore) -> Plan:
    """Plan the jobs that remain: skip finished cells and artifacts already in the cache."""
    check_distinct_cells(cells)
    plan = Plan(cells)
    for cell in cells:
        if records.has(cell.cell_id):
            plan.done_cells.add(cell.cell_id)
            continue
        deps: list[str] = []
        if _planned(plan, artifacts, "models", cell.model_key):
            model_deps: tuple[str, ...] = ()
            if getattr(ATTACKS.get(cell.attack.name), "clean_label", False):
                clean_key = cell.clean_model_key
                if _planned(plan, artifacts, "models", clean_key):
                    plan.jobs.setdefault(f"model-{clean_key}", Job(f"model-{clean_key}", "clean", cell))
                    model_deps = (f"model-{clean_key}",)
            model_job = f"model-{cell.model_key}"
            plan.jobs.setdefault(model_job, Job(model_job, "model", cell, model_deps))
            deps.append(model_job)
        if cell.defense_key is not None and _planned(plan, artifacts, "defenses", cell.defense_key):
            defense_job = f"defense-{cell.defense_key}"
            plan.jobs.setdefault(defense_job, Job(defense_job, "defense", cell, tuple(deps)))
            deps = [defense_job]  # the defense job already waits for the model
        cell_job = f"cell-{cell.cell_id}"
        plan.jobs[cell_job] = Job(cell_job, "cell", cell, tuple(deps))
    return plan
