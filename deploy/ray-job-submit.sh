#!/usr/bin/env bash
# Submit a driftrl run to a Ray cluster as a Ray job, from the root of this checkout.
#
#   deploy/ray-job-submit.sh [--address URL] [--runtime-env FILE] [--submission-id ID] [--follow]
#                            [--] [DRIFTRL_SUBCOMMAND ARGS...]
#
# Everything after the options is a `driftrl` subcommand line, run on the cluster as
# `python -m driftrl.cli ...` inside the uploaded checkout. Default:
#   train --config configs/qwen2.5-7b-dapo.yaml
# e.g. deploy/ray-job-submit.sh --follow -- train --config configs/qwen2.5-7b-dapo.yaml learner.lr=2e-6
#
# Prints the submission id as the only line on stdout (progress goes to stderr), so
# `id=$(deploy/ray-job-submit.sh ...)` works. With --follow it then streams the job's logs to stdout
# and exits 0 only if the job SUCCEEDED.
#
# Address: --address, else $RAY_ADDRESS, else http://127.0.0.1:8265 (the dashboard, e.g. reached
# with `kubectl port-forward svc/<cluster>-head-svc 8265:8265`).
# The cluster runs the entrypoint with the `python` on its PATH: the image's (deploy/Dockerfile),
# or on a local head the environment `ray start` was launched from.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
address="${RAY_ADDRESS:-http://127.0.0.1:8265}"
runtime_env="$repo_root/deploy/runtime-env.yaml"
submission_id=""
follow=0

usage() { sed -n '2,19p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --address) address="${2:?--address needs a URL}"; shift 2 ;;
    --runtime-env) runtime_env="${2:?--runtime-env needs a file}"; shift 2 ;;
    --submission-id) submission_id="${2:?--submission-id needs an id}"; shift 2 ;;
    --follow) follow=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    -*) echo "ray-job-submit.sh: unknown option $1" >&2; usage; exit 2 ;;
    *) break ;;
  esac
done

if [[ $# -eq 0 ]]; then
  set -- train --config configs/qwen2.5-7b-dapo.yaml
fi
if [[ ! -f "$runtime_env" ]]; then
  echo "ray-job-submit.sh: runtime env file $runtime_env does not exist" >&2
  exit 2
fi
command -v ray >/dev/null || { echo "ray-job-submit.sh: the 'ray' CLI is not on PATH (activate .venv)" >&2; exit 2; }

# Our own id (instead of parsing Ray's log lines) so the caller gets it even if streaming fails.
# `ray job submit` shell-quotes each word after `--` itself (shlex.join), so overrides pass unchanged.
if [[ -z "$submission_id" ]]; then
  submission_id="driftrl-$(date -u +%Y%m%d-%H%M%S)-$RANDOM"
fi

cd "$repo_root"
echo "submitting to $address: python -m driftrl.cli $*" >&2
ray job submit \
  --address "$address" \
  --submission-id "$submission_id" \
  --working-dir "$repo_root" \
  --runtime-env "$runtime_env" \
  --no-wait \
  -- python -m driftrl.cli "$@" >&2
echo "$submission_id"

if [[ "$follow" -eq 1 ]]; then
  ray job logs --address "$address" --follow "$submission_id"
  # `logs --follow` returns when the job ends, whatever its outcome; the status decides the exit code.
  status="$(ray job status --address "$address" "$submission_id" 2>&1)"
  echo "$status" >&2
  grep -q "Job '$submission_id' succeeded" <<<"$status"
fi
