#!/usr/bin/env bash
# TPU slices on GKE: a JobSet of one Job per slice, one pod per TPU host, all
# running the same command; or the same through xpk, for multi-slice runs.
set -uo pipefail
LAUNCHER=gke
source "$(dirname "$0")/common.sh"

usage() {
  cat <<'USAGE'
usage: launch/gke.sh --name NAME --image IMAGE [options] ACTION -- CMD...

Actions:
  manifest  print the JobSet manifest
  apply     kubectl apply the manifest (read from stdin)
  delete    kubectl delete the JobSet
  xpk       create the workload with xpk instead (xpk workload create)

Options:
  --name NAME        JobSet / workload name (required)
  --image IMAGE      container image with the project installed (required),
                     e.g. one built FROM python:3.11 that ran the install of
                     README.md with jax[tpu]
  --type TYPE        TPU type, tpu-v5-lite-podslice (default), tpu-v5p-slice,
                     tpu-v6e-slice
  --topology T       chips per slice as AxB (default 4x8: a v5e-32)
  --chips-per-host C TPU chips per host (default 4)
  --slices S         slices (default 1; more, multi-slice over DCN, with xpk)
  --cluster C        GKE cluster (xpk)
  --zone Z           zone (xpk)
  --dry-run          print the kubectl / xpk command instead of running it
  -h, --help         this text

Every container gets SEARCH_R3_DISTRIBUTED=on: JAX finds its peers from
the TPU environment GKE gives each pod.
USAGE
}

name="" image="" type="tpu-v5-lite-podslice" topology="4x8" chips=4 slices=1
cluster="" zone="" action=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --name) name="$2"; shift 2 ;;
    --image) image="$2"; shift 2 ;;
    --type) type="$2"; shift 2 ;;
    --topology) topology="$2"; shift 2 ;;
    --chips-per-host) chips="$2"; shift 2 ;;
    --slices) slices="$2"; shift 2 ;;
    --cluster) cluster="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --) shift; break ;;
    manifest|apply|delete|xpk) action="$1"; shift ;;
    *) echo "$LAUNCHER: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
need name "$name"
if [[ -z "$action" ]]; then
  echo "$LAUNCHER: give an action: manifest, apply, delete or xpk" >&2
  exit 2
fi
if [[ ! "$topology" =~ ^[0-9]+(x[0-9]+)+$ ]]; then
  echo "$LAUNCHER: --topology must look like 4x8, got '$topology'" >&2
  exit 2
fi
total=1
IFS=x read -r -a dims <<< "$topology"
for d in "${dims[@]}"; do total=$((total * d)); done
if ((total % chips)); then
  echo "$LAUNCHER: $topology has $total chips, not a multiple of --chips-per-host $chips" >&2
  exit 2
fi
hosts=$((total / chips))
if ((slices > 1)) && [[ "$action" == manifest || "$action" == apply ]]; then
  echo "$LAUNCHER: a JobSet here runs one slice; multi-slice runs go through xpk (action xpk), which sets up the slices' coordinator" >&2
  exit 2
fi

manifest() {
  local cmd
  cmd="$(show "$@")"
  cat <<YAML
apiVersion: jobset.x-k8s.io/v1alpha2
kind: JobSet
metadata:
  name: $name
  annotations:
    alpha.jobset.sigs.k8s.io/exclusive-topology: cloud.google.com/gke-nodepool
spec:
  failurePolicy:
    maxRestarts: 0
  replicatedJobs:
  - name: slice
    replicas: $slices
    template:
      spec:
        parallelism: $hosts
        completions: $hosts
        backoffLimit: 0
        template:
          spec:
            restartPolicy: Never
            nodeSelector:
              cloud.google.com/gke-tpu-accelerator: $type
              cloud.google.com/gke-tpu-topology: $topology
            containers:
            - name: search-r3
              image: $image
              command: ["bash", "-c", $(printf '%s' "$cmd" | python3 -c 'import json, sys; print(json.dumps(sys.stdin.read()))')]
              env:
              - name: SEARCH_R3_DISTRIBUTED
                value: "on"
              resources:
                limits:
                  google.com/tpu: $chips
YAML
}

case "$action" in
  manifest|apply)
    need image "$image"
    if [[ $# -eq 0 ]]; then
      echo "$LAUNCHER: give the command after --" >&2
      exit 2
    fi
    if [[ "$action" == manifest ]]; then
      manifest "$@"
    elif ((DRY_RUN)); then
      show kubectl apply -f -
      manifest "$@"
    else
      manifest "$@" | kubectl apply -f -
      rc=$?
      ((rc)) && echo "$LAUNCHER: kubectl apply failed with status $rc" >&2
      exit "$rc"
    fi
    ;;
  delete)
    step kubectl delete jobset "$name"
    ;;
  xpk)
    need image "$image"
    need cluster "$cluster"
    need zone "$zone"
    if [[ $# -eq 0 ]]; then
      echo "$LAUNCHER: give the command after --" >&2
      exit 2
    fi
    case "$type" in
      tpu-v5-lite-podslice) prefix=v5litepod ;;
      tpu-v5p-slice) prefix=v5p; total=$((total * 2)) ;;
      tpu-v6e-slice) prefix=v6e ;;
      *) echo "$LAUNCHER: xpk: unknown --type $type" >&2; exit 2 ;;
    esac
    step xpk workload create --cluster="$cluster" --zone="$zone" \
      --workload="$name" --tpu-type="$prefix-$total" --num-slices="$slices" \
      --docker-image="$image" \
      --command="export SEARCH_R3_DISTRIBUTED=on && $(show "$@")"
    ;;
esac
