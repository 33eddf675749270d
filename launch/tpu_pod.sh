#!/usr/bin/env bash
# A Cloud TPU VM slice: create it, install the project on every worker, run
# one command on all workers at once, fetch each worker's log, delete it.
set -uo pipefail
LAUNCHER=tpu_pod
source "$(dirname "$0")/common.sh"

usage() {
  cat <<'USAGE'
usage: launch/tpu_pod.sh --name NAME --zone ZONE [options] ACTION... [-- CMD...]

Actions, run in the order given:
  create    gcloud compute tpus tpu-vm create (the slice)
  install   copy the project (git archive of HEAD) to every worker, then
            install jax[tpu], requirements.txt and the project in a venv
  run       run CMD on every worker at once (--worker=all); every process
            starts JAX's distributed runtime itself (SEARCH_R3_DISTRIBUTED=on)
  logs      copy each worker's log to LOGDIR/worker_<i>.log
  delete    delete the slice
  all       create install run logs delete

Options:
  --name NAME       TPU VM name (required)
  --zone ZONE       zone, e.g. us-west4-a (required)
  --type TYPE       accelerator type (default v5litepod-8; v5litepod-32, v5p-32, ...)
  --version V       TPU software version (default v2-alpha-tpuv5-lite)
  --project P       GCP project (default: gcloud's)
  --workers W       hosts in the slice (default: from --type where known)
  --spot            create a Spot VM
  --dir DIR         project directory on the workers (default search_r3_jax)
  --logdir DIR      where `logs` puts the workers' logs (default logs/NAME)
  --dry-run         print every command instead of running it
  -h, --help        this text

Example (a v5e-32 slice, 8 hosts of 4 chips):
  launch/tpu_pod.sh --name sr3 --zone us-west4-a --type v5litepod-32 \
      create install run logs delete -- \
      python -m search_r3_jax.train --config=configs/rl.py:qwen1.5b-v5e-8 \
      --workdir=/mnt/shared/runs/rl

The workdir must be one directory every worker sees (a Filestore or
gcsfuse mount): checkpoints are written by all workers together.
USAGE
}

# Hosts per slice of the accelerator types whose layout is fixed.
workers_of() {
  case "$1" in
    v5litepod-1|v5litepod-4|v5litepod-8|v4-8|v5p-8|v6e-1|v6e-4|v6e-8) echo 1 ;;
    v5litepod-16|v6e-16) echo 4 ;;
    v5litepod-32|v6e-32) echo 8 ;;
    v5litepod-64|v6e-64) echo 16 ;;
    v5litepod-128|v6e-128) echo 32 ;;
    v5litepod-256|v6e-256) echo 64 ;;
    v4-16|v5p-16) echo 2 ;;
    v4-32|v5p-32) echo 4 ;;
    v4-64|v5p-64) echo 8 ;;
    *) echo "" ;;
  esac
}

name="" zone="" type="v5litepod-8" version="v2-alpha-tpuv5-lite" project=""
workers="" spot=0 dir="search_r3_jax" logdir="" actions=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --name) name="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --type) type="$2"; shift 2 ;;
    --version) version="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --workers) workers="$2"; shift 2 ;;
    --spot) spot=1; shift ;;
    --dir) dir="$2"; shift 2 ;;
    --logdir) logdir="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --) shift; break ;;
    create|install|run|logs|delete) actions+=("$1"); shift ;;
    all) actions+=(create install run logs delete); shift ;;
    *) echo "$LAUNCHER: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
need name "$name"
need zone "$zone"
if [[ ${#actions[@]} -eq 0 ]]; then
  echo "$LAUNCHER: give an action: create, install, run, logs, delete or all" >&2
  exit 2
fi
[[ -z "$workers" ]] && workers=$(workers_of "$type")
if [[ -z "$workers" ]]; then
  echo "$LAUNCHER: the hosts of $type are not known here; give --workers" >&2
  exit 2
fi
[[ -z "$logdir" ]] && logdir="logs/$name"
common=(--zone="$zone")
[[ -n "$project" ]] && common+=(--project="$project")
log="$dir/run.log"

for action in "${actions[@]}"; do
  case "$action" in
    create)
      extra=()
      ((spot)) && extra+=(--spot)
      step gcloud compute tpus tpu-vm create "$name" "${common[@]}" \
        --accelerator-type="$type" --version="$version" "${extra[@]}"
      ;;
    install)
      pack
      step gcloud compute tpus tpu-vm scp "$PACK" \
        "$name:/tmp/search_r3_jax.tar.gz" --worker=all "${common[@]}"
      step gcloud compute tpus tpu-vm ssh "$name" --worker=all "${common[@]}" \
        --command="$(install_line "$dir" tpu)"
      ;;
    run)
      if [[ $# -eq 0 ]]; then
        echo "$LAUNCHER: run needs the command after --" >&2
        exit 2
      fi
      step gcloud compute tpus tpu-vm ssh "$name" --worker=all "${common[@]}" \
        --command="$(run_line "$dir" SEARCH_R3_DISTRIBUTED=on "$@")"
      ;;
    logs)
      ((DRY_RUN)) || mkdir -p "$logdir"
      for ((i = 0; i < workers; i++)); do
        step gcloud compute tpus tpu-vm scp "$name:$log" \
          "$logdir/worker_$i.log" --worker="$i" "${common[@]}"
      done
      ;;
    delete)
      step gcloud compute tpus tpu-vm delete "$name" "${common[@]}" --quiet
      ;;
  esac
done
