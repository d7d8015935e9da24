#!/usr/bin/env bash
# The one GPU script (issue 27): every check that needs a GPU, its results written to $OUT.
#
#   DGATE_COMMIT=<sha> OUT=runs/gpu bash benchmarks/gpu.sh      # on the GPU machine: about 7.5 minutes at most
#   OUT=/tmp/gpu-smoke bash benchmarks/gpu.sh --quick           # a smoke run, on the CPU or a GPU: a minute or two
#
# 1. `pytest -m gpu -q tests/test_gpu.py` (the tests skip without CUDA) -> $OUT/pytest-gpu.txt; a failure does
#    not stop the script.
# 2. benchmarks/speed/gpu.py with the time left (its own budget, and a hard limit 25 s above it)
#    -> $OUT/gpu-results.jsonl (one JSON line per measurement, written as it goes) and $OUT/benchmark-log.txt.
# 3. its report -> $OUT/benchmarks-gpu.md and $OUT/benchmarks-gpu.json; the docs are regenerated from
#    $OUT/gpu-results.jsonl afterwards (benchmarks/README.md says how).
#
# Arguments go to benchmarks/speed/gpu.py (--quick, --configs, --max-autotune none, ...). The whole script
# keeps under DGATE_GPU_TOTAL_S seconds (default 450; the issue's limit is 8 minutes), so it runs twice in 15.
# Python: .venv/bin/python if it runs here, else python3; the repository goes on PYTHONPATH. Packages carried to
# a machine without PyPI (a missing or too old timm): wheels in runs/gpu-pydeps are installed into
# /tmp/dgate-site, or a folder of packages there is used as it is; either goes first on PYTHONPATH.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
OUT=${OUT:-runs/gpu}
TOTAL_S=${DGATE_GPU_TOTAL_S:-450}
mkdir -p "$OUT"
start=$SECONDS

if [ -x .venv/bin/python ] && .venv/bin/python -c "" 2>/dev/null; then PY=.venv/bin/python; else PY=python3; fi
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G "runs/gpu-pydeps/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/dgate-site \
        runs/gpu-pydeps/*.whl && PYTHONPATH="/tmp/dgate-site:$PYTHONPATH"
elif [ -d runs/gpu-pydeps ]; then
    PYTHONPATH="$PWD/runs/gpu-pydeps:$PYTHONPATH"
fi
export PYTHONPATH PYTHONUNBUFFERED=1

if ! "$PY" -c "import timm, timm_dgate" >"$OUT/import-check.txt" 2>&1; then
    cat "$OUT/import-check.txt"
    cat <<EOF
gpu.sh: $PY cannot import timm and timm_dgate (see above). On a machine without PyPI, carry what is missing as
wheels: on a machine with PyPI, in the repository,
    python3 -m pip download --no-deps -d runs/gpu-pydeps timm==1.0.31
(add any other package the error names, a binary one with --only-binary=:all: --python-version and --platform
of the GPU machine; torchvision must match its torch), and carry runs/gpu-pydeps: this script installs its
wheels into /tmp/dgate-site and puts that first on PYTHONPATH.
EOF
    exit 2
fi
"$PY" -c "import sys, timm, torch; print('gpu.sh: python', sys.version.split()[0], '| torch', torch.__version__, '| timm',
timm.__version__, timm.__file__, '| CUDA:', torch.cuda.is_available() and torch.cuda.get_device_name(0))"

# 1. the GPU tests
if "$PY" -c "import pytest" 2>/dev/null; then
    timeout -k 10 "${DGATE_PYTEST_TIMEOUT_S:-120}" "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py \
        >"$OUT/pytest-gpu.txt" 2>&1
    pytest_rc=$?
else
    echo "pytest is not installed for $PY: the GPU tests did not run" >"$OUT/pytest-gpu.txt"
    pytest_rc=127
fi
tests=$(grep -v '^\s*$' "$OUT/pytest-gpu.txt" | tail -n 1)
echo "gpu.sh: GPU tests (exit $pytest_rc, $((SECONDS - start)) s): $tests"

# 2. the benchmark, in the time left (40 s kept for the report and the hard limit's margin)
budget=$((TOTAL_S - (SECONDS - start) - 40))
if [ "$budget" -lt 60 ]; then budget=60; fi
echo "gpu.sh: benchmark budget $budget s"
timeout -k 10 $((budget + 25)) "$PY" benchmarks/speed/gpu.py --out "$OUT" --budget-s "$budget" "$@" \
    2>&1 | tee "$OUT/benchmark-log.txt"
bench_rc=${PIPESTATUS[0]}

# 3. the report, from whatever the benchmark wrote
report_rc=1
if [ -s "$OUT/gpu-results.jsonl" ]; then
    "$PY" benchmarks/speed/gpu.py --report "$OUT/gpu-results.jsonl" --output "$OUT/benchmarks-gpu.md" \
        --json "$OUT/benchmarks-gpu.json" >"$OUT/goals.txt" 2>&1
    report_rc=$?
fi

echo
echo "==== gpu.sh summary ($((SECONDS - start)) s) ===="
echo "GPU tests: exit $pytest_rc: $tests ($OUT/pytest-gpu.txt)"
echo "benchmark: exit $bench_rc$([ "$bench_rc" = 124 ] && echo ' (hit its hard time limit)'), $(grep -c '"kind": "row"' "$OUT/gpu-results.jsonl" 2>/dev/null || echo 0) rows in $OUT/gpu-results.jsonl"
echo "report: exit $report_rc: $OUT/benchmarks-gpu.md, $OUT/benchmarks-gpu.json"
[ -f "$OUT/goals.txt" ] && cat "$OUT/goals.txt"
[ "$pytest_rc" = 0 ] && [ "$bench_rc" = 0 ] && [ "$report_rc" = 0 ]
