#!/usr/bin/env bash
# One GPU check in at most 8 minutes on one H100 / H200: the CUDA tests (pytest -m gpu), then
# benchmarks/gpu_check.py (training tokens/s and MFU of the paper's M model with bf16 autocast,
# the fused chunked loss and torch.compile; full-ensemble and routed evaluation tokens/s), ending in one summary
# table. Run from anywhere:
#
#     bash benchmarks/gpu_check.sh              # PYTHON=... to choose the interpreter
#     bash benchmarks/gpu_check.sh --steps 60   # extra arguments go to gpu_check.py
#
# Time limits: tests 180 s, measurements 280 s (killed past them, the table says so), about 8
# minutes with start-up. Exit status: gpu_check.py's (2 without CUDA), else the tests'.
set -u -o pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export HDEE_PROGRESS=plain

cuda_probe='
import sys
try:
    import torch
except ImportError as error:
    sys.exit(f"cannot import torch ({error})")
if not torch.cuda.is_available():
    sys.exit(f"no CUDA device visible (torch {torch.__version__}, torch.cuda.is_available() is False)")
'
if ! probe_error="$("$PYTHON" -c "$cuda_probe" 2>&1)"; then
    echo "gpu_check.sh: $PYTHON: $probe_error; nothing measured." \
         "'python benchmarks/gpu_check.py --dry-run' checks the script on a CPU." >&2
    exit 2
fi

echo "== pytest -m gpu (limit 180 s)"
tests_log="$(mktemp)"
timeout 180 "$PYTHON" -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tee "$tests_log"
tests_rc=$?
tests_summary="$(grep -E '(passed|failed|error|skipped|no tests ran)' "$tests_log" | tail -n 1)"
rm -f "$tests_log"
if [[ $tests_rc -eq 124 ]]; then tests_summary="timed out after 180 s: $tests_summary"; fi
tests_summary="exit $tests_rc: ${tests_summary:-no summary line}"

echo "== gpu_check.py (limit 280 s)"
timeout 280 "$PYTHON" benchmarks/gpu_check.py --tests "$tests_summary" "$@"
check_rc=$?
if [[ $check_rc -eq 124 ]]; then
    echo "gpu_check.py: killed after 280 s; pass fewer --steps or --eval-windows" >&2
fi
if [[ $check_rc -ne 0 ]]; then exit $check_rc; fi
exit $tests_rc
