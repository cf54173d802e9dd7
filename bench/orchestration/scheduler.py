"""Drive a plan through an executor: start ready jobs on free slots, record what comes back.

The driver is the only writer of records (with their t-SNE features) and job states, whatever
the backend, so a worker killed mid-job leaves at worst a finished artifact in the cache (written
atomically) and no record: the next run plans that cell again. A failed job is logged, its dependents are marked
failed without running ("not run: ..."), and everything else goes on.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from bench.core.records import RecordStore
from bench.orchestration.executors import Executor, JobResult
from bench.orchestration.plan import Job, Plan
from bench.orchestration.status import JobBook


@dataclass
class Outcome:
    """What one execution of a plan achieved."""

    finished: list[str] = field(default_factory=list)  # job ids
    failed: dict[str, str] = field(default_factory=dict)  # job id -> error (first line)
    records_written: int = 0


def _next_job(remaining: dict[str, Job], finished: set[str], warm_model: str | None) -> Job | None:
    """The earliest ready job, preferring one that uses the model the slot has in memory."""
    first = None
    for job in remaining.values():
        if all(dep in finished for dep in job.deps):
            if warm_model is None or job.cell.model_key == warm_model:
                return job
            first = first or job
    return first


def _running_text(running: dict[int, Job]) -> str:
    return "; ".join(job.label for _, job in sorted(running.items()))


def execute_plan(plan: Plan, executor: Executor, book: JobBook, records: RecordStore) -> Outcome:
    """Run every job of ``plan``; return what finished and what failed (never raises for a job)."""
    outcome = Outcome()
    remaining = dict(plan.jobs)
    finished: set[str] = set()
    running: dict[int, Job] = {}
    warm: dict[int, str] = {}
    bar = tqdm(total=len(plan), desc="grid", unit="job", disable=None, dynamic_ncols=True)
    done = 0
    try:
        while remaining or running:
            for slot in range(executor.slots):
                if slot in running:
                    continue
                job = _next_job(remaining, finished, warm.get(slot))
                if job is None:
                    break
                del remaining[job.job_id]
                running[slot] = job
                book.started(job, executor.where(slot))
                executor.start(slot, job)
            if not running:
                break  # defensive: every remaining job waits on one that can no longer finish
            bar.set_postfix_str(_running_text(running), refresh=False)
            for slot, result in executor.wait():
                job = running.pop(slot)
                warm[slot] = job.cell.model_key
                settled = _settle(plan, job, result, remaining, finished, book, records, outcome)
                bar.update(settled)
                if bar.disable:  # no terminal (a log file, CI): one line per job instead of the bar
                    done += settled
                    _log_line(done, len(plan), job, result, settled - 1)
                if outcome.failed:
                    bar.set_description(f"grid ({len(outcome.failed)} failed)", refresh=False)
    finally:
        for job in running.values():
            book.interrupted(job)
        bar.close()
    return outcome


def _log_line(done: int, total: int, job: Job, result: JobResult, skipped: int) -> None:
    """``[done/total] label: done in N s`` on stderr, flushed, so a redirected long run shows progress."""
    what = f"done in {result.seconds:.0f} s" if result.ok else f"failed: {result.error}"
    if skipped:
        what += f" ({skipped} dependent job{'s' if skipped > 1 else ''} not run)"
    print(f"[{done}/{total}] {job.label}: {what}", file=sys.stderr, flush=True)


def _settle(
    plan: Plan,
    job: Job,
    result: JobResult,
    remaining: dict[str, Job],
    finished: set[str],
    book: JobBook,
    records: RecordStore,
    outcome: Outcome,
) -> int:
    """Record one result; return how many jobs it settled (its skipped dependents included)."""
    if result.ok:
        if result.record is not None:
            records.write(result.record, result.features, result.illustrations)
            outcome.records_written += 1
        book.done(job, result)
        finished.add(job.job_id)
        outcome.finished.append(job.job_id)
        return 1
    book.failed(job, result)
    outcome.failed[job.job_id] = result.error or "failed"
    settled = 1
    for dep_id in plan.dependents(job.job_id):
        dependent = remaining.pop(dep_id, None)
        if dependent is None:
            continue
        reason = f"not run: {job.label} failed: {result.error}"
        book.failed(dependent, JobResult(dep_id, False, error=reason, traceback=reason, worker=result.worker))
        outcome.failed[dep_id] = reason
        settled += 1
    return settled
