#!/usr/bin/env bash
# One slice of the paper's CIFAR-10 grid on a lent GPU, packed into one small archive.
#
#   OUT=/some/folder benchmarks/gpu_reference.sh ATTACKS [DEFENSES]
#
# ATTACKS and DEFENSES are comma-separated names or labels of the grid file's entries (run
# --only: the entries keep the file's reference parameters), e.g. `badnets,blended` and
# `none,shrinkpad,refine`. DEFENSES defaults to every defense of the grid.
#
# A GPU window is short and starts bare, and only small files come back, so the slice trains
# everything it needs into a throw-away cache, runs under a hard time limit (`timeout`: the run
# is interrupted, finished cells are kept), and the run directory -- records (device, versions,
# wall times), cells.csv, table.{md,csv,tex}, report.html, figures, job logs; no model weights,
# no cache, no saved features -- goes into ONE .tar.gz under $OUT, refused when 16 MiB or more.
# Beside it, a text summary: the command, exit status, wall time, nvidia-smi, library versions.
# Unpack archives into results/reference/ and merge the slices with
# `run_bench.py table SLICE... --out DIR` (results/reference/README.md).
#
# Settings (environment):
#   GPU_REF_CONFIG        grid file (default configs/cifar10_paper_fast.yaml)
#   GPU_REF_DATA          folder holding cifar10-jpg.tar.gz, carried to the device (default .device-data)
#   GPU_REF_DEVICE        auto (default), cuda or cpu (cpu: the packing is tested this way)
#   GPU_REF_JOBS_PER_GPU  worker processes per GPU (default 2; benchmarks/concurrency.py measures
#                         what pays -- not measured on a GPU yet)
#   GPU_REF_LIMIT_S       hard limit of the run in seconds (default 480, so that the whole script,
#                         packing included, stays under 9 minutes)
#   GPU_REF_WORK          scratch folder for the run and its cache (default: a new temporary one)
#   PYTHON                the interpreter (default python3)
set -uo pipefail

if [[ $# -lt 1 || $# -gt 2 || "$1" == -h || "$1" == --help ]]; then
    sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
ATTACKS=$1
DEFENSES=${2:-}
REPO=$(cd "$(dirname "$0")/.." && pwd)
CONFIG=${GPU_REF_CONFIG:-$REPO/configs/cifar10_paper_fast.yaml}
DATA=${GPU_REF_DATA:-$REPO/.device-data}
DEVICE=${GPU_REF_DEVICE:-auto}
JOBS_PER_GPU=${GPU_REF_JOBS_PER_GPU:-2}
LIMIT_S=${GPU_REF_LIMIT_S:-480}
PYTHON=${PYTHON:-python3}
MAX_BYTES=$((16 * 1024 * 1024))  # what the device tool brings back per file
# GPU_REF_MAX_BYTES may only lower it (the tests check the refusal with a tiny bound).
[[ "${GPU_REF_MAX_BYTES:-}" =~ ^[0-9]+$ && "${GPU_REF_MAX_BYTES:-0}" -lt $MAX_BYTES ]] && MAX_BYTES=$GPU_REF_MAX_BYTES

fail() { echo "error: $*" >&2; exit 2; }
[[ -n "${OUT:-}" ]] || fail "set OUT to the folder the archive is written to"
[[ -f "$CONFIG" ]] || fail "grid file $CONFIG does not exist"
[[ "$LIMIT_S" =~ ^[0-9]+$ && "$LIMIT_S" -gt 0 ]] || fail "GPU_REF_LIMIT_S must be a positive number of seconds"
[[ "$JOBS_PER_GPU" =~ ^[0-9]+$ && "$JOBS_PER_GPU" -gt 0 ]] || fail "GPU_REF_JOBS_PER_GPU must be a positive number"
"$PYTHON" -c "import torch, pydantic, pandas, jinja2, tabulate, seaborn" 2>/dev/null \
    || fail "$PYTHON lacks the harness's dependencies (pydantic, ...): carry them as wheels (README: Regenerating the paper table)"
mkdir -p "$OUT" || fail "cannot create OUT=$OUT"

slug=$(printf '%s' "$ATTACKS${DEFENSES:+-$DEFENSES}" | tr -c 'A-Za-z0-9' '-' | tr -s '-' | sed 's/^-//; s/-$//' | cut -c1-60)
name="$(basename "$CONFIG" .yaml)-$slug-$(date -u +%Y%m%dT%H%M%SZ)"
work=${GPU_REF_WORK:-$(mktemp -d)}
run_dir="$work/$name"
archive="$OUT/$name.tar.gz"
summary="$OUT/$name-summary.txt"

cmd=("$PYTHON" "$REPO/run_bench.py" run "$CONFIG" --only "attacks=$ATTACKS" --out "$run_dir" --cache-dir "$work/cache"
     --device "$DEVICE")
[[ -n "$DEFENSES" ]] && cmd+=(--only "defenses=$DEFENSES")
[[ "$DEVICE" != cpu ]] && cmd+=(--jobs-per-gpu "$JOBS_PER_GPU")
if [[ -d "$DATA" ]]; then
    cmd+=(--data-root "$DATA")
else
    echo "note: no data folder $DATA (set GPU_REF_DATA); the grid's datasets are looked for in the default places" >&2
fi

echo "\$ ${cmd[*]}"
start=$(date +%s)
# SIGINT first (the harness saves finished cells and stops its workers), SIGKILL 20 s later.
PYTHONUNBUFFERED=1 timeout --signal=INT --kill-after=20 "$LIMIT_S" "${cmd[@]}"
rc=$?
wall=$(($(date +%s) - start))
[[ $rc -eq 124 || $rc -eq 130 ]] && echo "note: the slice hit its ${LIMIT_S} s limit; packing the cells it finished" >&2

if [[ -d "$run_dir/records" ]] && compgen -G "$run_dir/records/*.json" >/dev/null; then
    "$PYTHON" "$REPO/run_bench.py" report "$run_dir" >/dev/null || echo "warning: could not rebuild the report" >&2
fi
[[ -d "$run_dir" ]] || fail "the run wrote no run directory (exit status $rc)"

# Records, tables, report, figures and logs; never weights, caches or saved features.
tar -czf "$archive" -C "$work" --exclude='*.pt' --exclude='*.pth' --exclude='*.npz' --exclude='cache' \
    --exclude='features' "$name" || fail "could not write $archive"
size=$(stat -c %s "$archive")
cells=$(find "$run_dir/records" -name '*.json' 2>/dev/null | wc -l)

{
    echo "slice: attacks=$ATTACKS defenses=${DEFENSES:-all of the grid}"
    echo "config: $CONFIG"
    echo "command: ${cmd[*]}"
    echo "exit status: $rc (124/130: stopped at the ${LIMIT_S} s limit)"
    echo "wall time: ${wall} s (run only; measured with date, whole seconds)"
    echo "cells with records: $cells"
    echo "archive: $(basename "$archive") ($size bytes)"
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "git: $(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)"
    echo "versions: $("$PYTHON" -c 'import platform, torch, torchvision; print(f"python {platform.python_version()}, torch {torch.__version__}, torchvision {torchvision.__version__}, cuda {torch.version.cuda}")' 2>&1)"
    echo "--- nvidia-smi"
    nvidia-smi 2>&1 || echo "(no nvidia-smi)"
} >"$summary"

if [[ $size -ge $MAX_BYTES ]]; then
    rm -f "$archive"
    echo "ARCHIVE TOO BIG: $size bytes >= $MAX_BYTES bytes; removed. Run a smaller slice." | tee -a "$summary" >&2
    exit 3
fi
echo "$archive ($size bytes, $cells cells) + $summary"
[[ -z "${GPU_REF_WORK:-}" ]] && rm -rf "$work"
exit "$rc"
