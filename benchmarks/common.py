"""What every benchmark script shares: arguments, data, device description, timing and tables.

Timings on a GPU are only meaningful after the queued kernels have finished, so every timed
region starts and ends with :func:`synchronize`; each measurement is the best of a few repeats,
which on a shared machine is the figure least disturbed by other processes.

Training-step throughput is measured *inside* the harness's own loops (``train_classifier``,
``Refine.fit``) without touching them: every loop ends a step with ``optimizer.step()``, and a
global optimizer post-hook (:class:`StepMeter`) sees each step end. The first step of a run is
not timed (it pays for cuDNN's kernel search, lazy initialisation, the loop's set-up); instead
its FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode``, so the count is exactly
one real step of the real loop (forward, backward and anything else the step runs), not
arithmetic by hand. The steps after it are timed, so neither the set-up before the loop nor the
checks after it leak into images/s. Achieved TFLOP/s is that count times the step rate; its
share of the device's peak uses :data:`DEVICE_PEAKS`.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.flop_counter import FlopCounterMode

from bench.core.data import DataPaths, DataSplit, ImageSet, load_dataset
from bench.core.device import resolve_device
from bench.core.errors import BenchError
from bench.core.models import build_model
from bench.nn.train import TrainRecipe
from bench.orchestration.config import GridConfig, read_yaml

REPO = Path(__file__).resolve().parent.parent


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-root", help="where CIFAR-10 is looked for (default: $BENCH_DATA_ROOT, else ./data)")
    parser.add_argument("--cache-dir", default=str(REPO / "results" / "cache"),
                        help="decoded-dataset cache (default: results/cache)")  # fmt: skip
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats; the best one is reported")
    parser.add_argument("--csv", type=Path, help="also write the table to this CSV file")


def load_cifar10(args: argparse.Namespace) -> DataSplit:
    return load_dataset("cifar10", DataPaths.resolve(args.data_root, args.cache_dir))


def random_subset(images: ImageSet, n: int | None, seed: int = 0) -> ImageSet:
    """A fixed random subset of ``n`` images in their stored order (the stored set is ordered by
    class, so its first ``n`` would be one class); all of them when ``n`` is None."""
    if n is None:
        return images
    keep = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[: max(1, n)]
    return images.subset(keep.sort().values)


def seeded_model(name: str, train: ImageSet, seed: int = 0) -> torch.nn.Module:
    """A registered model for ``train``'s classes and channels, initialised from ``seed``: every row
    of a run (fp32 and bf16, say) starts from the same weights, and so does every run."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(name, train.num_classes, train.x.shape[1])


def device_from_args(args: argparse.Namespace) -> torch.device:
    return resolve_device(args.device)


def describe_device(device: torch.device) -> str:
    """``cuda:0 (NVIDIA H100 ...)`` or ``cpu (N threads)``: enough to compare rows across machines."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    threads = torch.get_num_threads()
    return f"{device.type} ({threads} thread{'s' if threads != 1 else ''})"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_seconds(run: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """The shortest wall time of ``repeats`` calls of ``run`` (device work included)."""
    best = float("inf")
    for _ in range(max(1, repeats)):
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


class StepMeter:
    """Counts the FLOPs of the first optimizer step of a run and times the ``steps`` after it.

    Use as ``with StepMeter(device, steps) as meter: run(1 + steps)``, where ``run`` is any loop
    that calls ``optimizer.step()`` once per step. The clock is ``time.monotonic``, system-wide on
    Linux, so the windows of several processes can be laid side by side. The device is
    synchronised only at the two ends of the timed window, never per step.
    """

    def __init__(self, device: torch.device, steps: int, count_flops: bool = True) -> None:
        if steps < 1:
            raise BenchError(f"at least one timed step is needed, got {steps}")
        self.device = device
        self.steps = steps
        self.count_flops = count_flops
        self.flops: int | None = None  # of the first step
        self.start: float | None = None  # end of the first step
        self.end: float | None = None  # end of the last timed step
        self._seen = 0
        self._counter: FlopCounterMode | None = None
        self._handle: Any = None

    def __enter__(self) -> StepMeter:
        if self.count_flops:
            self._counter = FlopCounterMode(display=False)
            self._counter.__enter__()
        self._handle = register_optimizer_step_post_hook(self._on_step)
        return self

    def _stop_counting(self) -> None:
        if self._counter is not None:
            counter, self._counter = self._counter, None
            counter.__exit__(None, None, None)
            self.flops = int(counter.get_total_flops())

    def _on_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._seen += 1
        if self._seen == 1:
            self._stop_counting()
            synchronize(self.device)
            self.start = time.monotonic()
        elif self._seen == 1 + self.steps:
            synchronize(self.device)
            self.end = time.monotonic()

    def __exit__(self, *exc: Any) -> None:
        self._handle.remove()
        if self._counter is not None:  # the run failed before its first step ended
            self._counter.__exit__(None, None, None)
            self._counter = None
        if exc[0] is None and self.end is None:
            raise BenchError(f"the run made {self._seen} optimizer steps, fewer than the {1 + self.steps} measured")

    @property
    def seconds(self) -> float:
        """Wall time of the timed steps (all but the first)."""
        assert self.start is not None and self.end is not None
        return self.end - self.start


@dataclass
class StepRate:
    """The best of several runs: seconds per step, the FLOPs of one step and the last run's result."""

    seconds_per_step: float
    flops_per_step: int | None
    result: Any


def measure_steps(run: Callable[[int], Any], steps: int, device: torch.device, repeats: int,
                  count_flops: bool = True) -> StepRate:  # fmt: skip
    """Run ``run(1 + steps)`` ``repeats`` times; the fastest per-step time of the timed steps.

    FLOPs are counted on the first step of the first run only (the counter slows the step it
    watches, which is why that step is never timed).
    """
    best, flops, result = float("inf"), None, None
    for _ in range(max(1, repeats)):
        with StepMeter(device, steps, count_flops=count_flops and flops is None) as meter:
            result = run(1 + steps)
        best = min(best, meter.seconds / steps)
        flops = meter.flops if flops is None else flops
    return StepRate(best, flops, result)


# --------------------------------------------------------------------------- device peaks


@dataclass(frozen=True)
class DevicePeak:
    """A GPU's dense (not 2:4-sparse) tensor-core peak, as its vendor publishes it."""

    pattern: str  # regular expression matched against torch.cuda.get_device_name()
    tflops: float
    dtype: str  # the precision the peak is for: bf16, or fp16 where the GPU has no bf16 tensor cores
    source: str


# Dense tensor-core peaks from NVIDIA's datasheets and whitepapers. The datasheets print the
# 2:4-sparse figure with an asterisk; the dense one is half of it. Checked against copies of the
# datasheets: H100 SXM 1,979* and PCIe 1,513* BF16 TFLOPS; H200 the same GH100 die and clocks as
# H100 SXM (1,979*; a lower "practical" ~790 TFLOP/s is sometimes quoted, but the vendor's dense
# number is what a share of peak is measured against); A100 312 | 624*; L4 242*; L40S
# 362.05 | 733*; V100 "up to 125 Tensor TFLOPS" (fp16: Volta has no bf16 tensor cores). Not found
# in a searchable copy, from NVIDIA's documents as published: A10 125 | 250* (A10 datasheet),
# RTX 4090 165.2 with fp32 accumulation (Ada whitepaper; GeForce runs fp32-accumulate tensor math
# at half the fp16-accumulate 330.3). Variants with other clocks or unit counts (H100/H200 NVL,
# A10G, RTX 4090 D, V100 PCIe, MIG slices) are deliberately absent: they print "unknown".
DEVICE_PEAKS: tuple[DevicePeak, ...] = (
    DevicePeak(r"\bH100\b.*\bPCIe\b", 756.5, "bf16", "NVIDIA H100 datasheet (PCIe), 1,513 sparse / 2"),
    DevicePeak(r"\bH100\b(?!.*\b(NVL|PCIe)\b)", 989.5, "bf16", "NVIDIA H100 datasheet (SXM), 1,979 sparse / 2"),
    DevicePeak(r"\bH200\b(?!.*\bNVL\b)", 989.5, "bf16", "NVIDIA H200 datasheet (SXM), 1,979 sparse / 2"),
    DevicePeak(r"\bA100\b", 312.0, "bf16", "NVIDIA A100 datasheet"),
    DevicePeak(r"\bL40S\b", 362.05, "bf16", "NVIDIA L40S datasheet"),
    DevicePeak(r"\bL4$", 121.0, "bf16", "NVIDIA L4 datasheet, 242 sparse / 2"),
    DevicePeak(r"\bA10$", 125.0, "bf16", "NVIDIA A10 datasheet"),
    DevicePeak(r"\bRTX 4090$", 165.2, "bf16", "NVIDIA Ada Lovelace whitepaper (fp32 accumulate)"),
    DevicePeak(r"\bV100-SXM2\b", 125.0, "fp16", "NVIDIA V100 (SXM2) datasheet; no bf16 tensor cores"),
)


def peak_for_name(name: str) -> DevicePeak | None:
    """The peak of the GPU called ``name``, or None when the name is not in the table (or is a MIG slice)."""
    if re.search(r"\bMIG\b", name):
        return None  # a slice has a fraction of the units; the whole device's peak would flatter it
    return next((p for p in DEVICE_PEAKS if re.search(p.pattern, name.strip())), None)


def device_peak(device: torch.device) -> DevicePeak | None:
    """The peak of ``device``; CPUs and unknown GPUs have none (never a guess)."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return peak_for_name(torch.cuda.get_device_name(index))


def compute_figures(flops_per_step: int | None, seconds_per_step: float, batch: int,
                    peak: DevicePeak | None) -> dict[str, Any]:  # fmt: skip
    """GFLOP per image, achieved TFLOP/s and the share of the peak (``unknown`` without a peak)."""
    if flops_per_step is None:
        return {"gflop_per_img": "unknown", "achieved_tflops": "unknown", "peak_tflops": "unknown", "peak_pct": "unknown"}
    achieved = flops_per_step / seconds_per_step / 1e12
    return {
        "gflop_per_img": significant(flops_per_step / batch / 1e9),
        "achieved_tflops": significant(achieved),
        "peak_tflops": f"{peak.tflops:g} ({peak.dtype})" if peak else "unknown",
        "peak_pct": significant(100 * achieved / peak.tflops) if peak else "unknown",
    }


def significant(value: float, digits: int = 4) -> float:
    """``value`` rounded to ``digits`` significant digits (CPU and GPU rates differ by 1000x)."""
    return float(f"{value:.{digits}g}")


COMPUTE_COLUMNS = ["gflop_per_img", "achieved_tflops", "peak_tflops", "peak_pct"]
COMPUTE_NOTE = ("gflop_per_img: FlopCounterMode's count of one real step (matmuls and convolutions, forward and "
                "backward) per image; achieved_tflops: that count at the measured step rate; peak_pct: its share "
                "of the device's dense tensor-core peak (benchmarks/common.py), unknown on CPUs and unlisted GPUs.")  # fmt: skip


def format_value(value: Any) -> str:
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        return f"{value:,.1f}" if abs(value) >= 10 else f"{value:.3g}"
    return str(value)


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    """A Markdown table of ``columns`` (missing values shown as ``-``)."""
    cells = [[format_value(row.get(c, "-")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)]
    print("| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    numeric = [all(isinstance(row.get(c), (int, float)) or row.get(c) == "" for row in rows) for c in columns]
    for r in cells:
        print("| " + " | ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(r, widths, numeric, strict=True)) + " |")


def write_csv(rows: Sequence[dict[str, Any]], columns: Sequence[str], path: Path) -> None:
    """Write exactly ``columns`` (in that order), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


RECIPE_CONFIGS = {"paper": REPO / "configs" / "cifar10_paper.yaml", "fast": REPO / "configs" / "fast_cifar_resnet18.yaml"}


def recipe_settings(name_or_path: str) -> tuple[TrainRecipe, float, int]:
    """(training recipe, holdout, evaluation batch size) of a named recipe or a grid YAML file.

    Only these three settings are read (not the whole grid), so a recipe can be measured while
    some of its grid's plugins are still missing.
    """
    path = RECIPE_CONFIGS.get(name_or_path, Path(name_or_path))
    raw = read_yaml(path)
    try:
        recipe = TrainRecipe(**(raw.get("train") or {}))
    except (TypeError, ValueError) as err:
        raise BenchError(f"{path}: train: {err}") from None
    defaults = GridConfig.model_fields
    holdout = float(raw.get("holdout", defaults["holdout"].default))
    return recipe, holdout, int(raw.get("eval_batch_size", defaults["eval_batch_size"].default))


def report(rows: Sequence[dict[str, Any]], columns: Sequence[str], csv_columns: Sequence[str],
           csv_path: Path | None, note: str = "") -> None:  # fmt: skip
    """Print the table (and a note on what is extrapolated); write the CSV when asked."""
    print()
    print_table(rows, columns)
    if note:
        print(f"\n{note}")
    if csv_path:
        write_csv(rows, csv_columns, csv_path)
        print(f"wrote {csv_path}")


def script_main(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], Any], argv: list[str] | None) -> int:
    """Parse, run; a user error prints one line and exits 2, as ``run_bench.py`` does."""
    args = parser.parse_args(argv)
    try:
        run(args)
    except BenchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
