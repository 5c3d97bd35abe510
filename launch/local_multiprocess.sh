#!/usr/bin/env bash
# Run N alexnet_jax processes on this machine, joined by jax.distributed over loopback (127.0.0.1), the way they
# would run on N hosts: each loads only its share of every global batch, and they checkpoint together.
#
# Usage (from the checkout root):
#   launch/local_multiprocess.sh N --config=CONFIG --workdir=DIR [--config.key=value ...]
#   launch/local_multiprocess.sh 2 --config=configs/digits.py --workdir=runs/digits_2p
# Process i gets `--coordinator_address=127.0.0.1:PORT --num_processes=N --process_id=i` added to the
# arguments. The script waits for all of them and exits with the first failing status, else 143 (or 130) if they
# stopped cleanly with a checkpoint, else 0. If one process fails, the others, which would wait for it forever,
# get GRACE seconds and are then killed; a clean stop (143, 130) is no failure and starts no such countdown.
# Ctrl-C or SIGTERM to the script is passed on as SIGTERM: the processes checkpoint and exit 143 together, and
# rerunning the same command resumes.
#
# Environment:
#   PYTHON            interpreter (default: python3; use the one with alexnet_jax installed)
#   PORT              coordinator port on 127.0.0.1 (default: a free one)
#   LOG_DIR           process_<i>.log for each process (default: a new temporary directory, printed)
#   GRACE             seconds the others get after one process fails (default: 30)
#   GPUS_PER_PROCESS  give process i its own GPUs (CUDA_VISIBLE_DEVICES); unset: every process runs on the CPU
#                     (JAX_PLATFORMS=cpu, one CPU device each unless XLA_FLAGS says otherwise)
#   DRY_RUN           1: print the commands instead of running them
# Needs bash >= 5.1.
set -euo pipefail

usage() {
  sed -n '2,/^set -euo pipefail/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2
  exit 2
}

if [[ $# -lt 1 || ! $1 =~ ^[1-9][0-9]*$ ]]; then
  echo "error: the first argument must be the number of processes (got '${1:-}')" >&2
  echo >&2
  usage
fi
NUM_PROCESSES=$1
shift

DRY_RUN=${DRY_RUN:-0}
PYTHON=${PYTHON:-python3}
GRACE=${GRACE:-30}
if [[ -z ${PORT:-} ]]; then
  PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
if [[ -z ${LOG_DIR:-} ]]; then
  if [[ $DRY_RUN == 1 ]]; then
    LOG_DIR=${TMPDIR:-/tmp}/alexnet_jax_local.XXXXXX
  else
    LOG_DIR=$(mktemp -d -t alexnet_jax_local.XXXXXX)
  fi
fi
[[ $DRY_RUN == 1 ]] || mkdir -p "$LOG_DIR"

# Prints a command as a line that can be pasted into a shell.
show() {
  local words=() word
  for word in "$@"; do
    if [[ $word =~ ^[][A-Za-z0-9_./:=@%+,-]+$ ]]; then
      words+=("$word")
    else
      words+=("'${word//\'/\'\\\'\'}'")
    fi
  done
  echo "+ ${words[*]}"
}

echo "== $NUM_PROCESSES processes, coordinator 127.0.0.1:$PORT, logs in $LOG_DIR/process_<i>.log"
pids=()
for ((i = 0; i < NUM_PROCESSES; i++)); do
  environment=()
  if [[ -n ${GPUS_PER_PROCESS:-} ]]; then
    environment+=("CUDA_VISIBLE_DEVICES=$(seq -s, $((i * GPUS_PER_PROCESS)) $(((i + 1) * GPUS_PER_PROCESS - 1)))")
  else
    environment+=("JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}")
  fi
  # setsid: each process and its grain workers form a session that can be killed as a whole; the session
  # leader is the trainer itself, so a forwarded SIGTERM reaches only it and it can checkpoint.
  command=(env "${environment[@]}" setsid "$PYTHON" -m alexnet_jax.main "$@"
           --coordinator_address="127.0.0.1:$PORT" --num_processes="$NUM_PROCESSES" --process_id="$i")
  log=$LOG_DIR/process_$i.log
  if [[ $DRY_RUN == 1 ]]; then
    echo "$(show "${command[@]}") > $(show "$log" | cut -c3-) 2>&1 &"
  else
    "${command[@]}" > "$log" 2>&1 < /dev/null &
    pids+=($!)
  fi
done
if [[ $DRY_RUN == 1 ]]; then
  echo "+ wait"
  exit 0
fi

forward_term() {
  echo "== passing SIGTERM on: the processes checkpoint and exit 143"
  kill -TERM "${pids[@]}" 2>/dev/null || true
}
trap forward_term INT TERM

declare -A process_of status_of
for i in "${!pids[@]}"; do
  process_of[${pids[$i]}]=$i
done
running=("${pids[@]}")
status=0
stopped=0
deadline=""

# Books process PID's exit status RC: it leaves `running`, and a failure starts the others' countdown.
finished_with() {
  local finished=$1 rc=$2 pid i=${process_of[$1]}
  status_of[$i]=$rc
  echo "== process $i exited with status $rc"
  local still=()
  for pid in "${running[@]}"; do
    [[ $pid == "$finished" ]] || still+=("$pid")
  done
  running=("${still[@]}")
  if [[ $rc == 143 || $rc == 130 ]]; then
    # A clean stop (checkpointed on SIGTERM or Ctrl-C): the others are stopping the same way, however long
    # their checkpoint takes.
    stopped=$rc
  elif [[ $rc != 0 && $status == 0 ]]; then
    status=$rc
    if [[ ${#running[@]} -gt 0 && -z $deadline ]]; then
      echo "== the other processes get $GRACE s to finish"
      deadline=$((SECONDS + GRACE))
    fi
  fi
}

while [[ ${#running[@]} -gt 0 ]]; do
  waited=("${running[@]}")
  timer=""
  if [[ -n $deadline ]]; then
    sleep 1 &
    timer=$!
    waited+=("$timer")
  fi
  finished=""
  rc=0
  wait -n -p finished "${waited[@]}" 2>/dev/null || rc=$?
  finished=${finished:-}  # unset when a signal interrupted the wait, or when no waited job was left
  if [[ -n $timer && $finished != "$timer" ]]; then
    kill "$timer" 2>/dev/null || true
    wait "$timer" 2>/dev/null || true
  fi
  if [[ -n $finished && $finished != "$timer" ]]; then
    finished_with "$finished" "$rc"
  fi
  # A process that died of a signal while this loop was busy elsewhere (one we just killed, or one the OOM
  # killer took) has been reported by bash and dropped from its job table, so `wait -n` no longer returns it
  # (it fails at once with "no such job", and the loop would spin forever); `wait PID` still has its status.
  for pid in "${running[@]}"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      rc=0
      wait "$pid" 2>/dev/null || rc=$?
      finished_with "$pid" "$rc"
    fi
  done
  if [[ -n $deadline && $SECONDS -ge $deadline && ${#running[@]} -gt 0 ]]; then
    for pid in "${running[@]}"; do
      echo "== killing process ${process_of[$pid]}"
      kill -KILL -- "-$pid" 2>/dev/null || true
    done
    deadline=""
  fi
done

for ((i = 0; i < NUM_PROCESSES; i++)); do
  # 143 is a clean stop (checkpointed); anything else deserves a look at the log.
  if [[ ${status_of[$i]} != 0 && ${status_of[$i]} != 143 ]]; then
    echo "== last lines of process $i (status ${status_of[$i]}), $LOG_DIR/process_$i.log:"
    tail -n 15 "$LOG_DIR/process_$i.log" | sed 's/^/   /'
  fi
done
if [[ $status == 0 ]]; then
  status=$stopped
fi
exit "$status"
