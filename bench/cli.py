"""The command line: ``run_bench.py run|table|status|plot|report|list|describe|show-triggers|show-inversion``.

User errors (:class:`bench.core.errors.BenchError`) print one line ``error: ...`` on stderr and exit
with status 2, like argparse's own usage errors; nothing is left half-written because every
file is written atomically.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
import time
from pathlib import Path

from bench.core.errors import BenchError


def configs_dir() -> Path:
    """The shipped grid files: ``bench/configs/`` in an installed package (setup.cfg installs the
    top-level ``configs/`` there), else the ``configs/`` of the source checkout."""
    here = Path(__file__).resolve().parent
    installed = here / "configs"
    return installed if installed.is_dir() else here.parent / "configs"


DEFAULT_CONFIG = configs_dir() / "quick.yaml"
DEFAULT_CACHE_DIR = Path("results") / "cache"


def config_path(arg: str) -> Path:
    """The grid file ``arg``; a path that does not exist but names a shipped grid
    (``configs/cifar10_cpu.yaml`` run from another directory) is that grid."""
    path = Path(arg)
    shipped = configs_dir() / path.name
    return shipped if not path.exists() and path.suffix in (".yaml", ".yml") and shipped.is_file() else path


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-root", help="where datasets are looked for (default: $BENCH_DATA_ROOT, else ./data)")
    parser.add_argument("--cache-dir", default=None,
                        help=f"artifact cache: decoded datasets, trained models, fitted defenses "
                             f"(default: {DEFAULT_CACHE_DIR})")
    parser.add_argument("--device", default=None, help="auto (default: CUDA when available), cpu, cuda, cuda:N")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run_bench.py",
        description="Backdoor attacks x defenses benchmark: run grids, print BA/ASR tables.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run a grid (default: configs/quick.yaml) and print its table",
                         description="Run every unfinished cell of a grid and print the BA/ASR table.")
    run.add_argument("config", nargs="?", default=str(DEFAULT_CONFIG),
                     help="grid YAML file (the shipped grids are found by name from any directory)")
    run.add_argument("--out", help="run directory (default: results/<config name>)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config value, e.g. --set train.epochs=2 (repeatable)")
    run.add_argument("--only", action="append", default=[], metavar="KEY=NAMES",
                     help="run a slice: keep only the grid's entries of KEY (attacks, defenses, seeds, models, "
                          "datasets) with these comma-separated names or labels, parameters as in the file, "
                          "e.g. --only attacks=badnets,wanet (repeatable); 'table ... --out' merges slices")
    run.add_argument("--dry-run", action="store_true",
                     help="validate the config, list its cells and the work that remains; run nothing")
    run.add_argument("--no-tsne", action="store_true",
                     help="skip the t-SNE figures at the end (the features are saved all the same: "
                          "'plot tsne' draws them later)")
    run.add_argument("--workers", type=int, default=None, metavar="N",
                     help="worker processes in all, each running one job at a time (one runs in this process, "
                          "more are spawned). Default: on the CPU, usable cores / threads_per_job (jobs side by "
                          "side; every job has threads_per_job threads, so N never changes a number); on CUDA, "
                          "one per visible GPU. On several GPUs, worker i goes to GPU i mod GPUs. With --backend ray, the same "
                          "rules over the cluster's CPUs and GPUs")
    run.add_argument("--jobs-per-gpu", type=int, default=None, metavar="K",
                     help="K worker processes per visible GPU (workers = GPUs x K, round robin), for jobs too "
                          "small to fill a GPU; instead of --workers. An error with --device cpu; ignored when "
                          "the device is auto and no GPU is visible. With --backend ray: each task asks for 1/K of a GPU")
    run.add_argument("--backend", choices=("local", "ray"), default="local",
                     help="local: worker processes on this machine (default); ray: one Ray task per job")
    run.add_argument("--address", default=None,
                     help="Ray cluster to join (auto, HOST:PORT); default: start a local Ray instance")
    _common(run)

    table = sub.add_parser("table", help="rebuild and print the tables of a run directory, or merge several",
                           description="Rebuild cells.csv and table.{md,csv,tex} from a run's records. With --out, "
                                       "merge the records of one or more run directories (slices of one grid, "
                                       "e.g. run with --only attacks=...) into a new run directory with one "
                                       "cells.csv, table.{md,csv,tex}, figures and report.html. Slices whose "
                                       "configurations differ in anything but attacks, defenses and seeds, or "
                                       "that hold one cell with different numbers, are refused.")
    table.add_argument("run_dir", nargs="+", help="run directories written by 'run' (several need --out)")
    table.add_argument("--out", help="merge into this directory (new, empty, or an earlier merge)")
    table.add_argument("--no-tsne", action="store_true",
                       help="with --out: do not draw the t-SNE figures the slices did not draw already")

    status = sub.add_parser("status", help="show which cells of a run are done, running, failed or pending",
                            description="One line per cell: done (BA, ASR), running (which job, where), "
                                        "failed (the error's first line and its log), pending.")
    status.add_argument("run_dir", help="a run directory written by 'run'")

    plot = sub.add_parser("plot", help="draw a run's figures (PNG + PDF under RUN_DIR/figures)",
                          description="Draw trade-off curves or t-SNE figures from a run directory.")
    kinds = plot.add_subparsers(dest="figure", metavar="FIGURE", required=True)
    tradeoff = kinds.add_parser("tradeoff", help="BA and ASR against each defense's intensity, per attack",
                                description="One figure per (defense with an intensity knob, attack) from the records.")
    tradeoff.add_argument("run_dir", help="a run directory written by 'run'")
    tsne = kinds.add_parser("tsne", help="t-SNE of benign and poisoned penultimate features, one panel per defense",
                            description="Embed the penultimate features of benign and poisoned test images that "
                                        "the run's cells saved (no model or data is loaded).")
    tsne.add_argument("run_dir", help="a run directory written by 'run'")
    tsne.add_argument("--attack", action="append", metavar="LABEL", help="only this attack label (repeatable)")
    tsne.add_argument("--defense", action="append", metavar="LABEL",
                      help="panels for exactly these defense labels, in order (repeatable; default: no defense, "
                           "low and high intensity of each knob defense, every other defense)")

    report = sub.add_parser("report", help="rebuild a run's tables, figures and report.html",
                            description="Rewrite tables, trade-off figures and RUN_DIR/report.html from the records.")
    report.add_argument("run_dir", help="a run directory written by 'run'")
    report.add_argument("--tsne", action="store_true", help="also (re)draw the t-SNE figures")

    listing = sub.add_parser("list", help="list registered datasets, models, attacks and defenses",
                             description="List every registered plugin with a one-line description.")
    listing.add_argument("--verbose", "-v", action="store_true",
                         help="also each plugin's parameters: name, type, default, constraint, description")

    describe = sub.add_parser("describe", help="show one plugin's parameters",
                              description="A plugin's description, version and parameter table (name, type, "
                                          "default, constraint, description).")
    describe.add_argument("name", help="a registered dataset, model, attack or defense name")

    triggers = sub.add_parser("show-triggers", help="draw one PNG: a clean image and its poisoned version per attack",
                              description="Write a PNG grid with a clean test image, its poisoned version and "
                                          "their difference for every registered attack (or a grid file's attacks).")
    triggers.add_argument("config", nargs="?", help="grid YAML: use its first dataset and its attacks' parameters")
    triggers.add_argument("--dataset", default="cifar10", help="dataset when no config is given (default: cifar10)")
    triggers.add_argument("--out", default="results/triggers.png", help="PNG path (default: results/triggers.png)")
    triggers.add_argument("--index", type=int, default=0, help="which non-target test image to show (default: 0)")
    triggers.add_argument("--seed", type=int, default=0, help="cell seed for drawn triggers such as WaNet's field")
    _common(triggers)

    inversion = sub.add_parser("show-inversion", help="draw BTI-DBF's inverted and purified images from a run (Figure 3)",
                               description="From the illustration images a run's BTI-DBF cells saved: per attack, a "
                                           "PNG (+ PDF) with poisoned test images, BTI-DBF's inversion G(clean) and "
                                           "the purified images. No model or data is loaded.")
    inversion.add_argument("run_dir", help="a run directory written by 'run'")
    inversion.add_argument("--out", help="PNG path (default: RUN_DIR/figures/figure3_<attack>.png; with several "
                                         "attacks, _<attack> is added to its name)")
    return parser


def cmd_run(args: argparse.Namespace) -> int:
    from bench.orchestration.config import load_config
    from bench.orchestration.execute import run_grid
    from bench.orchestration.slices import select_entries
    from bench.orchestration.status import cell_statuses

    whole = load_config(config_path(args.config), args.overrides)
    config = select_entries(whole, args.only)
    run_dir = Path(args.out) if args.out else Path("results") / str(config.name)  # a validated plain name
    paths = _data_paths(args)
    if args.dry_run:
        from bench.orchestration.dryrun import describe_plan

        print(describe_plan(config, run_dir, paths.cache_dir, paths.data_root, whole=whole if args.only else None))
        return 0
    start = time.perf_counter()
    cells, computed, markdown = run_grid(config, run_dir, paths, args.device, tsne=not args.no_tsne,
                                         workers=args.workers, jobs_per_gpu=args.jobs_per_gpu, backend=args.backend,
                                         address=args.address)  # fmt: skip
    print(markdown)
    failed = [c for c in cell_statuses(run_dir, cells) if c.state != "done"]
    print(f"{len(cells)} cells ({computed} computed, {len(cells) - computed - len(failed)} already done"
          f"{f', {len(failed)} failed' if failed else ''}) in {time.perf_counter() - start:.1f} s -> {run_dir} "
          f"(report: {run_dir / 'report.html'})")
    if failed:
        for cell in failed:
            print(f"failed: {cell.label}: {cell.detail}", file=sys.stderr)
        print(f"see `run_bench.py status {run_dir}`; rerun the same command to retry the failed cells", file=sys.stderr)
        return 1
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from bench.orchestration.status import format_status

    print(format_status(Path(args.run_dir)))
    return 0


def cmd_table(args: argparse.Namespace) -> int:
    if args.out is not None:
        from bench.orchestration.merge import merge_runs

        markdown, cells = merge_runs([Path(p) for p in args.run_dir], Path(args.out), tsne=not args.no_tsne)
        print(markdown)
        print(f"{cells} cells from {len(args.run_dir)} run directories -> {args.out} "
              f"(report: {Path(args.out) / 'report.html'})")  # fmt: skip
        return 0
    if len(args.run_dir) > 1:
        raise BenchError("several run directories are merged into a new one: give --out DIR")
    from bench.report.tables import write_tables

    print(write_tables(_run_dir(args.run_dir[0])))
    return 0


def _run_dir(path: str) -> Path:
    run_dir = Path(path)
    if not (run_dir / "records").is_dir():
        raise BenchError(f"{run_dir} is not a run directory (no records/ inside)")
    return run_dir


def _data_paths(args: argparse.Namespace):
    """``--data-root`` and ``--cache-dir`` (checked: an existing file is no cache directory)."""
    from bench.core.data import DataPaths
    from bench.orchestration.store import check_cache_dir

    cache_dir = Path(args.cache_dir) if args.cache_dir else DEFAULT_CACHE_DIR
    check_cache_dir(cache_dir)
    return DataPaths.resolve(args.data_root, cache_dir)


def cmd_plot(args: argparse.Namespace) -> int:
    from bench.report.page import write_report

    run_dir = _run_dir(args.run_dir)
    if args.figure == "tradeoff":
        from bench.core.records import RecordStore
        from bench.report.plots import write_tradeoff_figures

        pngs = write_tradeoff_figures(run_dir, RecordStore(run_dir).read_all())
        if not pngs:
            print("no trade-off figure: no defense in this run has two or more intensities")
    else:
        from bench.report.tsne import write_tsne_figures

        pngs = write_tsne_figures(run_dir, args.attack, args.defense)
        if not pngs:
            print("no t-SNE figure: no finished cell of the first seed has saved features")
    for png in pngs:
        print(f"{png} (+ .pdf)")
    write_report(run_dir)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from bench.report.page import make_figures
    from bench.report.tables import write_tables

    run_dir = _run_dir(args.run_dir)
    write_tables(run_dir)
    for png in make_figures(run_dir, tsne=args.tsne):
        print(f"{png} (+ .pdf)")
    print(run_dir / "report.html")
    return 0


def cmd_show_triggers(args: argparse.Namespace) -> int:
    from bench.core.data import load_dataset
    from bench.core.registry import ATTACKS
    from bench.orchestration.config import PluginSpec, load_config
    from bench.report.triggers import default_attacks, trigger_examples, write_trigger_grid

    if Path(args.out).is_dir():
        raise BenchError(f"--out {args.out} is a directory; give the path of the PNG file to write")
    if args.config:
        config = load_config(config_path(args.config))
        dataset, target = config.datasets[0], config.poison.target
        attacks = [(spec.display(), ATTACKS.create(spec.name, spec.params)) for spec in config.attacks]
    else:
        dataset, attacks, target = PluginSpec(name=args.dataset), default_attacks(), 0
    data = load_dataset(dataset.name, _data_paths(args), **dataset.params)
    examples = trigger_examples(attacks, data, seed=args.seed, index=args.index, target=target)
    path = write_trigger_grid(examples, Path(args.out), title=f"{data.name}: test image {args.index}, seed {args.seed}")
    print(f"{len(examples)} attacks -> {path}")
    return 0


def cmd_show_inversion(args: argparse.Namespace) -> int:
    from bench.report.inversion import show_inversion

    run_dir = _run_dir(args.run_dir)
    out = Path(args.out) if args.out else None
    if out is not None and out.is_dir():
        raise BenchError(f"--out {out} is a directory; give the path of the PNG file to write")
    for png in show_inversion(run_dir, out):
        print(f"{png} (+ .pdf)")
    return 0


def _registries():
    from bench.core.registry import ATTACKS, DATASETS, DEFENSES, MODELS

    return (("datasets", DATASETS), ("models", MODELS), ("attacks", ATTACKS), ("defenses", DEFENSES))


def _parameter_table(cls, indent: str) -> str:
    from bench.core.params import format_table, param_docs

    table = format_table(param_docs(cls.Params), indent)
    knob = getattr(cls, "intensity_param", None)
    lines = [f"{indent}version {cls.version}" + (f"; intensity knob: {knob}" if knob else "")]
    return "\n".join([*lines, table or f"{indent}(no parameters)"])


def cmd_list(args: argparse.Namespace) -> int:
    from bench.core.registry import summary

    for title, registry in _registries():
        print(f"{title}:")
        for name, cls in registry.items():
            print(f"  {name:<18} {summary(cls)}")
            if args.verbose:
                print(_parameter_table(cls, "      "))
    return 0


def cmd_describe(args: argparse.Namespace) -> int:
    from bench.core.errors import UnknownNameError
    from bench.core.registry import summary

    found = [(title[:-1], registry.get(args.name)) for title, registry in _registries() if args.name in registry]
    if not found:
        names = sorted({n for _, registry in _registries() for n in registry.names()})
        close = difflib.get_close_matches(args.name, names, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UnknownNameError(f"no plugin is called {args.name!r}.{hint} Registered: {', '.join(names)}")
    for kind, cls in found:
        print(f"{args.name} ({kind}): {summary(cls)}")
        print(_parameter_table(cls, "  "))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["run", *argv]  # `run_bench.py` alone runs the default grid
    args = parser.parse_args(argv)
    handlers = {"run": cmd_run, "table": cmd_table, "list": cmd_list, "describe": cmd_describe, "plot": cmd_plot,
                "report": cmd_report, "status": cmd_status, "show-triggers": cmd_show_triggers,
                "show-inversion": cmd_show_inversion}
    try:
        return handlers[args.command](args)
    except BenchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except PermissionError as err:  # a path the user gave that this user may not read or write
        print(f"error: {err.filename or err}: permission denied", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished cells are saved, rerun the same command to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `run_bench.py list --verbose | head`: the reader left, which is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit-time flush stays quiet
        return 0
