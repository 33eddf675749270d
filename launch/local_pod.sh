#!/usr/bin/env bash
# A pod of N JAX processes on this machine, each with its own fake CPU
# devices, joined over gloo collectives through a coordinator on localhost.
# Every process runs the same command; a process that dies stops the pod.
set -uo pipefail

usage() {
  cat <<'EOF'
usage: launch/local_pod.sh [options] N -- CMD [ARGS...]

Runs CMD as N processes of one JAX pod on this machine (CPU collectives).
Process i gets SEARCH_R3_COORDINATOR=localhost:PORT,
SEARCH_R3_NUM_PROCESSES=N and SEARCH_R3_PROCESS_ID=i, which the project's
programs (python -m search_r3_jax.train, .eval, ...) read at start, and
XLA_FLAGS giving it its own fake CPU devices.

Options:
  --devices K     fake CPU devices per process (default 4)
  --port P        coordinator port (default: a free one)
  --logs DIR      also write each process's output to DIR/process_<i>.log
  --grace S       seconds the others get to stop after one dies (default 10)
  -h, --help      this text

Output lines carry the process: "[p1] ...". If a process exits with a
non-zero status, the others are stopped (SIGTERM, then SIGKILL after the
grace period) and the script exits with that status, naming the process.

Example:
  launch/local_pod.sh 2 -- python -m search_r3_jax.train \
      --config=configs/sft.py:tiny --workdir=/tmp/pod
EOF
}

devices=4
port=""
logs=""
grace=10
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --devices) devices="$2"; shift 2 ;;
    --devices=*) devices="${1#*=}"; shift ;;
    --port) port="$2"; shift 2 ;;
    --port=*) port="${1#*=}"; shift ;;
    --logs) logs="$2"; shift 2 ;;
    --logs=*) logs="${1#*=}"; shift ;;
    --grace) grace="$2"; shift 2 ;;
    --grace=*) grace="${1#*=}"; shift ;;
    --) shift; break ;;
    -*) echo "local_pod: unknown option $1 (see --help)" >&2; exit 2 ;;
    *)
      if [[ -z "${n:-}" ]]; then n="$1"; shift
      else echo "local_pod: give the command after --" >&2; exit 2; fi ;;
  esac
done
if [[ -z "${n:-}" || ! "$n" =~ ^[1-9][0-9]*$ ]]; then
  echo "local_pod: give the number of processes, N >= 1 (see --help)" >&2
  exit 2
fi
if [[ ! "$devices" =~ ^[1-9][0-9]*$ ]]; then
  echo "local_pod: --devices must be a positive integer, got '$devices'" >&2
  exit 2
fi
if [[ $# -eq 0 ]]; then
  echo "local_pod: no command given after -- (see --help)" >&2
  exit 2
fi
if [[ -z "$port" ]]; then
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')
fi
[[ -n "$logs" ]] && mkdir -p "$logs"

pids=()
# Each process runs in its own process group (job control), so a signal
# reaches everything it started: the command, tee and sed. JAX's runtime
# catches SIGTERM (preemption), so SIGKILL follows after the grace period.
set -m
stop_all() {
  local sig="$1"
  for pid in "${pids[@]}"; do
    kill "-$sig" -- "-$pid" 2>/dev/null
  done
}
trap 'stop_all TERM; sleep 2; stop_all KILL; exit 130' INT TERM

for ((i = 0; i < n; i++)); do
  (
    export SEARCH_R3_COORDINATOR="localhost:$port"
    export SEARCH_R3_NUM_PROCESSES="$n"
    export SEARCH_R3_PROCESS_ID="$i"
    export JAX_PLATFORMS=cpu
    # This process's own device count replaces any other in XLA_FLAGS.
    flags_kept=$(printf '%s' "${XLA_FLAGS:-}" | sed -E 's/--xla_force_host_platform_device_count=[^ ]*//g')
    export XLA_FLAGS="$flags_kept --xla_force_host_platform_device_count=$devices"
    if [[ -n "$logs" ]]; then
      "$@" 2>&1 | tee "$logs/process_$i.log" | sed -u "s/^/[p$i] /"
    else
      "$@" 2>&1 | sed -u "s/^/[p$i] /"
    fi
    exit "${PIPESTATUS[0]}"
  ) &
  pids+=("$!")
done

declare -A index
for ((i = 0; i < n; i++)); do index[${pids[$i]}]=$i; done

running=("${pids[@]}")
status=0
while ((${#running[@]} > 0)); do
  wait -n -p done_pid "${running[@]}"
  rc=$?
  i=${index[$done_pid]}
  still=()
  for pid in "${running[@]}"; do [[ "$pid" != "$done_pid" ]] && still+=("$pid"); done
  running=("${still[@]}")
  if ((rc != 0)); then
    echo "local_pod: process $i (pid $done_pid) exited with status $rc; stopping the other processes" >&2
    status=$rc
    stop_all TERM
    deadline=$((SECONDS + grace))
    while ((SECONDS < deadline)); do
      alive=0
      for pid in "${pids[@]}"; do kill -0 -- "-$pid" 2>/dev/null && alive=1; done
      ((alive)) || break
      sleep 0.2
    done
    stop_all KILL
    wait 2>/dev/null
    echo "local_pod: stopped; process $i failed with status $rc" >&2
    exit "$status"
  fi
done
exit 0
