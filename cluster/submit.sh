#!/usr/bin/env bash
# Submit a cacovid-rl training run to a Ray cluster as a Ray job, and say how to follow it.
#
# Wraps `ray job submit --runtime-env cluster/runtime_env.yaml -- cacovid-rl train --config ...`
# so that every run ships the same runtime_env, gets a readable submission ID, records the config
# and git commit as job metadata, and fails fast on a config typo before any GPU is allocated.
# Run `cluster/submit.sh --help` for the options; docs/CLUSTER.md for the whole path.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: cluster/submit.sh [options] [key.sub=value ...] [--resume] [-- extra train args]

Submits `cacovid-rl train --config CONFIG [key.sub=value ...] [--resume]` to a Ray cluster with
`ray job submit`, then prints how to follow, inspect and stop the job. Paths are relative to the
repository root, which is uploaded as the job's working directory.

Options:
  --config PATH         training config (default: $CONFIG or configs/llava_ov_7b.yaml)
  --runtime-env PATH    runtime_env YAML (default: $RUNTIME_ENV or cluster/runtime_env.yaml;
                        cluster/runtime_env.local.yaml for a local single-node Ray)
  --address URL         Ray dashboard/job server (default: $RAY_ADDRESS or http://127.0.0.1:8265)
  --submission-id ID    job ID (default: cacovid-<config name>-<UTC date-time>)
  --resume              continue from the newest checkpoint in learner.checkpoint_dir
  --wait                stream the job's logs until it ends; exit non-zero if it failed
  --no-wait             return as soon as the job is accepted (default)
  --dry-run             print the ray command instead of running it
  -h, --help            show this help

Environment: RAY (ray executable, default: ray), PYTHON (interpreter used to validate the config
locally before submitting, default: python3; skipped when it cannot import cacovid_rl).

Examples:
  ray dashboard cluster/autoscaler.yaml &          # tunnel: http://127.0.0.1:8265
  cluster/submit.sh                                # LLaVA-OV-7B, the published recipe
  cluster/submit.sh --config configs/qwen2_5_vl_7b.yaml wandb.run_name=qwen7b-try2
  cluster/submit.sh learner.total_steps=50 --wait  # a short smoke run
  cluster/submit.sh --resume                       # after a failure: continue from the checkpoint
EOF
}

die() {
  echo "submit.sh: $*" >&2
  exit 2
}

config="${CONFIG:-configs/llava_ov_7b.yaml}"
runtime_env="${RUNTIME_ENV:-cluster/runtime_env.yaml}"
address="${RAY_ADDRESS:-http://127.0.0.1:8265}"
ray_bin="${RAY:-ray}"
python_bin="${PYTHON:-python3}"
submission_id=""
wait_for_job=0
dry_run=0
train_args=()

while (($# > 0)); do
  case "$1" in
    -h | --help)
      usage
      exit 0
      ;;
    --config | --runtime-env | --address | --submission-id)
      (($# >= 2)) || die "$1 needs a value"
      case "$1" in
        --config) config="$2" ;;
        --runtime-env) runtime_env="$2" ;;
        --address) address="$2" ;;
        --submission-id) submission_id="$2" ;;
      esac
      shift 2
      ;;
    --config=*) config="${1#*=}"; shift ;;
    --runtime-env=*) runtime_env="${1#*=}"; shift ;;
    --address=*) address="${1#*=}"; shift ;;
    --submission-id=*) submission_id="${1#*=}"; shift ;;
    --resume) train_args+=("--resume"); shift ;;
    --wait) wait_for_job=1; shift ;;
    --no-wait) wait_for_job=0; shift ;;
    --dry-run) dry_run=1; shift ;;
    --)
      shift
      train_args+=("$@")
      break
      ;;
    -*) die "unknown option '$1' (see --help)" ;;
    *=*) train_args+=("$1"); shift ;;
    *) die "unexpected argument '$1': config overrides look like key.sub=value (see --help)" ;;
  esac
done

# The repository root is the job's working_dir (runtime_env `working_dir: .`), so run from there
# whatever the caller's directory, and read relative paths against it.
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

[[ -f "$runtime_env" ]] || die "runtime_env file '$runtime_env' not found (relative to $repo_root)"
case "$config" in
  /*) ;; # an absolute path is read on the cluster (e.g. a config kept on /mnt/runs)
  *) [[ -f "$config" ]] || die "config '$config' not found (relative to $repo_root)" ;;
esac
case "$config" in
  *\"* | *\\*) die "config path must not contain quotes or backslashes" ;;
esac

# Catch a typo'd key here rather than after the cluster has scaled up for it.
overrides=()
for arg in ${train_args[@]+"${train_args[@]}"}; do
  [[ "$arg" == *=* && "$arg" != -* ]] && overrides+=("$arg")
done
if [[ -f "$config" ]] && "$python_bin" -c "import cacovid_rl.config" >/dev/null 2>&1; then
  "$python_bin" - "$config" ${overrides[@]+"${overrides[@]}"} <<'PY' || die "config check failed"
import sys

from cacovid_rl.config import ConfigError, load_config

try:
    load_config(sys.argv[1], sys.argv[2:])
except ConfigError as exc:
    sys.exit(f"invalid config: {exc}")
PY
elif [[ -f "$config" ]]; then
  echo "submit.sh: note: '$python_bin' cannot import cacovid_rl, so the config and overrides are" \
    "checked only on the cluster (set PYTHON to an interpreter that has the package)" >&2
fi

if [[ -z "$submission_id" ]]; then
  name="$(basename "$config")"
  name="${name%.*}"
  submission_id="cacovid-${name//_/-}-$(date -u +%Y%m%d-%H%M%S)"
fi

git_commit="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
if [[ "$git_commit" != unknown ]] && ! git diff --quiet HEAD 2>/dev/null; then
  git_commit="${git_commit}-dirty"
fi
metadata="{\"config\": \"$config\", \"git_commit\": \"$git_commit\"}"

# Upload exactly what the runtime_env's excludes allow: without this Ray also applies .gitignore,
# whose patterns are written for git, not for deciding which source files a cluster job needs.
export RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1

cmd=("$ray_bin" job submit
  --address "$address"
  --runtime-env "$runtime_env"
  --submission-id "$submission_id"
  --metadata-json "$metadata")
((wait_for_job)) || cmd+=(--no-wait)
cmd+=(-- cacovid-rl train --config "$config" ${train_args[@]+"${train_args[@]}"})

if ((dry_run)); then
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi

status=0
"${cmd[@]}" || status=$?
if ((status != 0 && !wait_for_job)); then
  echo "submit.sh: ray job submit failed (exit $status); is the dashboard reachable at $address?" >&2
  exit "$status"
fi

# Resuming needs the same overrides (output and checkpoint dirs among them) and runtime_env.
resume_cmd=(cluster/submit.sh --config "$config")
[[ "$runtime_env" == cluster/runtime_env.yaml ]] || resume_cmd+=(--runtime-env "$runtime_env")
resume_cmd+=(--address "$address" ${overrides[@]+"${overrides[@]}"} --resume)
resume_hint="$(printf '%q ' "${resume_cmd[@]}")"

cat <<EOF

Job ID: $submission_id  (address $address)
  follow logs:  $ray_bin job logs --address $address -f $submission_id
  status:       $ray_bin job status --address $address $submission_id
  stop:         $ray_bin job stop --address $address $submission_id
  list jobs:    $ray_bin job list --address $address
  resume later: ${resume_hint% }
EOF
exit "$status"
