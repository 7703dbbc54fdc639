#!/usr/bin/env bash
# The GPU figures of issue 17.5 on one H100/H200, one JSON line each (benchmarks/gpu_check.py):
# fused token-statistics kernel vs torch, the learner step at the Qwen2.5-1.5B shape (ZeRO-2 bf16,
# 2048-token sequences), a weight sync between two processes. Not part of CI; run it by hand:
#   bash benchmarks/gpu_check.sh             # on a GPU machine, <= 8 minutes
#   bash benchmarks/gpu_check.sh --dry-run   # on CPU: reduced shapes, "dry_run": true (--quick is the same)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
[[ -x .venv/bin/python && "$PYTHON" == python ]] && PYTHON=.venv/bin/python
MODE=()
for arg in "$@"; do
  case "$arg" in
    --quick) MODE=(--quick) ;;
    --dry-run) MODE=(--dry-run) ;;
    -h|--help) sed -n '2,6p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $arg (use --dry-run or --quick)" >&2; exit 2 ;;
  esac
done
if [[ ${#MODE[@]} -eq 0 ]] && ! "$PYTHON" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
  echo "gpu_check.sh: no CUDA device; use --dry-run" >&2
  exit 2
fi
# 8 minutes in all: each figure gets its own bound so one hang cannot eat the others' time
timeout 120 "$PYTHON" benchmarks/gpu_check.py --figure fused_stats "${MODE[@]}"
timeout 90 "$PYTHON" benchmarks/gpu_check.py --figure weight_sync "${MODE[@]}"
timeout 240 "$PYTHON" benchmarks/gpu_check.py --figure learner_step "${MODE[@]}"
quick=false; [[ "${MODE[*]-}" == --quick ]] && quick=true
dry=false; [[ ${#MODE[@]} -gt 0 ]] && dry=true
echo "{\"metric\": \"gpu_check_figures\", \"value\": 3, \"goal\": \"== 3\", \"dry_run\": $dry, \"quick\": $quick}"
