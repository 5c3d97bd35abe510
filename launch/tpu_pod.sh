#!/usr/bin/env bash
# Train alexnet_jax on a multi-host Cloud TPU VM slice (v4-32, v5p-64, v6e-16, ...), from nothing and back.
#
# Every host runs the same command with --distributed: on a TPU slice jax.distributed.initialize() finds the other
# hosts by itself, so no coordinator flags are passed. Run it from the checkout root.
#
# Usage:
#   WORKDIR=gs://my-bucket/runs/alexnet launch/tpu_pod.sh [ACTION] [--config.key=value ...]
#   DRY_RUN=1 launch/tpu_pod.sh [ACTION]     print every command instead of running it
#
#   ACTION   run     (default) create, setup, train, follow the logs until the run ends, stop, delete
#            all     create, setup, train (detached: the slice stays up; `stop` and `delete` later)
#            create  request the slice as a queued resource and wait until it is ACTIVE (kept if it already is)
#            setup   put this checkout on every host and `pip install -e ".[tpu]"` it into <REMOTE_DIR>/.venv
#            train   start `python -m alexnet_jax.main --config=$CONFIG --workdir=$WORKDIR --distributed ...`
#                    on every host, detached (log in <REMOTE_DIR>/alexnet_train.log on each host)
#            logs    last $LOG_LINES lines of every host's log; FOLLOW=1 follows them until the run ends
#            stop    SIGTERM to the trainer on every host: it checkpoints and exits 143; killed after $STOP_TIMEOUT s
#            delete  delete the queued resource and its slice
#   Anything after ACTION is passed to alexnet_jax.main (run, all, train), e.g.
#     --config.data.train_path=gs://my-bucket/imagenet/train --config.batch_size=1024
#
# Environment (defaults are an example: a v4-32, 4 hosts with 4 chips each):
#   WORKDIR          run directory every host reaches under the same name, normally gs://BUCKET/PATH: checkpoints
#                    and metrics go there, and training again with the same WORKDIR resumes. Required for run, all
#                    and train (DRY_RUN=1 shows gs://YOUR_BUCKET/runs/alexnet)
#   TPU_NAME         the slice (TPU VM node) name (default: alexnet-v4-32)
#   QUEUED_RESOURCE  the queued resource that requests it (default: $TPU_NAME)
#   ZONE             its zone (default: us-central2-b)
#   ACCELERATOR_TYPE slice type (default: v4-32)
#   RUNTIME_VERSION  TPU software version (default: tpu-ubuntu2204-base; v5e: v2-alpha-tpuv5-lite,
#                    v5p: v2-alpha-tpuv5, v6e: v2-alpha-tpuv6e)
#   SPOT             1: request Spot capacity (cheaper, preemptible) (default: 0)
#   CREATE_FLAGS     extra `queued-resources create` flags, e.g. "--reserved" or "--valid-until-duration=6h"
#   PROJECT          GCP project (default: gcloud's configured project)
#   CONFIG           config file, relative to the checkout (default: configs/imagenet.py)
#   REPO_URL         git URL the hosts clone; unset: copy this checkout's tracked and untracked-but-not-ignored
#                    files, uncommitted edits included
#   REPO_REF         branch, tag or commit fetched from REPO_URL (default: main)
#   REMOTE_DIR       checkout on the hosts, relative to the remote home or absolute (default: alexnet_jax)
#   PYTHON           interpreter on the hosts that creates the venv, Python >= 3.11; python3.N is installed with
#                    apt if missing (default: python3.11; the Ubuntu 22.04 TPU images have 3.10 as python3)
#   LOG_LINES        lines shown by `logs` (default: 20)
#   STOP_TIMEOUT     seconds `stop` waits for the checkpoint before killing (default: 600)
#   POLL_SECONDS     seconds between state checks while `create` waits (default: 30)
set -euo pipefail

usage() {
  sed -n '2,/^set -euo pipefail/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2
  exit 2
}

ACTION=run
if [[ $# -gt 0 && $1 != -* ]]; then
  ACTION=$1
  shift
fi
case $ACTION in
  run | all | create | setup | train | logs | stop | delete) ;;
  -h | --help | help) usage ;;
  *) echo "error: unknown action: $ACTION" >&2; usage ;;
esac

DRY_RUN=${DRY_RUN:-0}
TPU_NAME=${TPU_NAME:-alexnet-v4-32}
QUEUED_RESOURCE=${QUEUED_RESOURCE:-$TPU_NAME}
ZONE=${ZONE:-us-central2-b}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v4-32}
RUNTIME_VERSION=${RUNTIME_VERSION:-tpu-ubuntu2204-base}
SPOT=${SPOT:-0}
CONFIG=${CONFIG:-configs/imagenet.py}
REPO_REF=${REPO_REF:-main}
REMOTE_DIR=${REMOTE_DIR:-alexnet_jax}
PYTHON=${PYTHON:-python3.11}
LOG_LINES=${LOG_LINES:-20}
FOLLOW=${FOLLOW:-0}
STOP_TIMEOUT=${STOP_TIMEOUT:-600}
POLL_SECONDS=${POLL_SECONDS:-30}
LOG=alexnet_train.log    # inside REMOTE_DIR on every host
PIDFILE=alexnet_train.pid  # the detached run's wrapper shell, leader of its own session

if [[ -z ${WORKDIR:-} ]]; then
  if [[ $DRY_RUN == 1 ]]; then
    WORKDIR=gs://YOUR_BUCKET/runs/alexnet
  elif [[ $ACTION == run || $ACTION == all || $ACTION == train ]]; then
    echo "error: WORKDIR is not set (a gs:// path every host shares)" >&2
    echo >&2
    usage
  fi
fi

GCLOUD_FLAGS=(--zone="$ZONE")
if [[ -n ${PROJECT:-} ]]; then
  GCLOUD_FLAGS+=(--project="$PROJECT")
fi

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

# Every command with an effect goes through here, so DRY_RUN=1 shows the whole sequence and touches nothing.
run() {
  if [[ $DRY_RUN == 1 ]]; then
    show "$@"
  else
    "$@"
  fi
}

q() { printf '%q' "$1"; }
dir=$(q "$REMOTE_DIR")
# Prefixes each output line with the host, since all workers print at once ($(hostname) expands remotely).
# shellcheck disable=SC2016
tag='2>&1 | sed "s/^/[$(hostname)] /"'

on_all_hosts() {
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${GCLOUD_FLAGS[@]}" --worker=all --command="$1"
}

queued_state() {
  gcloud compute tpus queued-resources describe "$QUEUED_RESOURCE" "${GCLOUD_FLAGS[@]}" --format='value(state.state)'
}

create() {
  local flags=(--node-id="$TPU_NAME" --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION"
               "${GCLOUD_FLAGS[@]}")
  if [[ $SPOT == 1 ]]; then
    flags+=(--spot)
  fi
  local extra=()
  read -ra extra <<< "${CREATE_FLAGS:-}"
  flags+=("${extra[@]}")
  local state=""
  if [[ $DRY_RUN != 1 ]]; then
    state=$(queued_state 2>/dev/null || true)
  fi
  if [[ -n $state ]]; then
    echo "== queued resource $QUEUED_RESOURCE already exists ($state)"
  else
    echo "== requesting $ACCELERATOR_TYPE slice $TPU_NAME as queued resource $QUEUED_RESOURCE in $ZONE"
    run gcloud compute tpus queued-resources create "$QUEUED_RESOURCE" "${flags[@]}"
  fi
  if [[ $DRY_RUN == 1 ]]; then
    show gcloud compute tpus queued-resources describe "$QUEUED_RESOURCE" "${GCLOUD_FLAGS[@]}" \
      --format='value(state.state)'
    echo "  (repeated every $POLL_SECONDS s until it prints ACTIVE)"
    return
  fi
  # Queued capacity may take minutes to hours; the request stays queued if this wait is interrupted.
  while true; do
    state=$(queued_state)
    case $state in
      ACTIVE) echo "== $QUEUED_RESOURCE is ACTIVE"; return ;;
      FAILED | SUSPENDING | SUSPENDED)
        echo "error: queued resource $QUEUED_RESOURCE is $state; see \`gcloud compute tpus queued-resources" \
             "describe $QUEUED_RESOURCE --zone=$ZONE\`, then \`$0 delete\` and create again" >&2
        exit 1 ;;
    esac
    echo "== $QUEUED_RESOURCE is ${state:-not visible yet}; checking again in $POLL_SECONDS s"
    sleep "$POLL_SECONDS"
  done
}

ARCHIVE=""
DELETE_ON_EXIT=0
on_exit() {
  local status=$?
  if [[ -n $ARCHIVE && $DRY_RUN != 1 ]]; then
    rm -f "$ARCHIVE"
  fi
  if [[ $DELETE_ON_EXIT == 1 ]]; then
    DELETE_ON_EXIT=0
    stop || true
    delete || true
  fi
  exit "$status"
}
trap on_exit EXIT

setup() {
  if [[ -n ${REPO_URL:-} ]]; then
    echo "== fetching $REPO_URL@$REPO_REF on every host of $TPU_NAME"
    on_all_hosts "set -euo pipefail; { [ -d $dir/.git ] || git clone --quiet $(q "$REPO_URL") $dir; \
git -C $dir fetch --quiet origin $(q "$REPO_REF") && git -C $dir checkout --quiet --detach FETCH_HEAD; } $tag"
  else
    local root
    root=$(git rev-parse --show-toplevel)
    if [[ $DRY_RUN == 1 ]]; then
      ARCHIVE=${TMPDIR:-/tmp}/alexnet_jax.XXXXXX.tar.gz
    else
      ARCHIVE=$(mktemp -t alexnet_jax.XXXXXX.tar.gz)
    fi
    echo "== copying $root (tracked + untracked, not ignored) to every host of $TPU_NAME"
    run bash -c "cd $(q "$root") && git ls-files -z --cached --others --exclude-standard \
| tar --null -T - -czf $(q "$ARCHIVE")"
    run gcloud compute tpus tpu-vm scp "$ARCHIVE" "$TPU_NAME":alexnet_jax_src.tar.gz "${GCLOUD_FLAGS[@]}" --worker=all
    on_all_hosts "set -euo pipefail; mkdir -p $dir && tar -xzf alexnet_jax_src.tar.gz -C $dir && rm alexnet_jax_src.tar.gz"
  fi
  local py install
  py=$(q "$PYTHON")
  # A versioned name (python3.11) that is missing is installed from the image's Ubuntu archive.
  if [[ $PYTHON =~ ^python3\.[0-9]+$ ]]; then
    install="sudo apt-get update -qq && sudo apt-get install -y -qq $py $py-venv"
  else
    install="echo 'PYTHON=$py is not Python >= 3.11 with venv' && exit 1"
  fi
  echo "== installing into $REMOTE_DIR/.venv on every host"
  on_all_hosts "set -euo pipefail; { cd $dir; \
$py -c 'import sys, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || { $install; }; \
[ -x .venv/bin/python ] || $py -m venv .venv; \
.venv/bin/pip install --quiet --upgrade pip; \
.venv/bin/pip install --quiet -e '.[tpu]'; \
.venv/bin/python -c 'import jax; print(jax.process_count(), \"processes,\", jax.device_count(), \"devices\")' \
  || echo 'warning: jax cannot see the slice yet (a run may still hold the TPU: launch/tpu_pod.sh stop)'; } $tag"
}

train() {
  local args=""
  if [[ $# -gt 0 ]]; then
    printf -v args ' %q' "$@"
  fi
  local cmd
  cmd=".venv/bin/python -m alexnet_jax.main --config=$(q "$CONFIG") --workdir=$(q "$WORKDIR") --distributed$args"
  echo "== starting on every host of $TPU_NAME: $cmd"
  # setsid: the wrapper shell, the trainer and its grain workers form one session whose leader's pid is saved;
  # `stop` signals only the trainer (the wrapper's child) so that it can checkpoint. The wrapper logs the exit
  # status: 143 means checkpointed and stopped, and training again resumes.
  # shellcheck disable=SC2016
  on_all_hosts "set -euo pipefail; cd $dir; \
if [ -f $PIDFILE ] && kill -0 \$(cat $PIDFILE) 2>/dev/null; then \
  echo \"[\$(hostname)] already running (pid \$(cat $PIDFILE)); launch/tpu_pod.sh stop first\"; exit 1; fi; \
nohup setsid bash -c '\"\$@\"; echo \"== trainer exited with status \$?\"' trainer $cmd > $LOG 2>&1 < /dev/null & \
echo \$! > $PIDFILE; echo \"[\$(hostname)] started, log \$PWD/$LOG\""
}

logs() {
  if [[ $FOLLOW == 1 ]]; then
    # tail exits once the run's wrapper has, i.e. when the trainer has exited on this host.
    on_all_hosts "cd $dir && { if [ -f $PIDFILE ]; then tail -n +1 -f --pid=\$(cat $PIDFILE) $LOG; \
else tail -n +1 $LOG; fi; } $tag"
  else
    on_all_hosts "tail -n $(q "$LOG_LINES") $dir/$LOG $tag"
  fi
}

stop() {
  on_all_hosts "cd $dir 2>/dev/null || exit 0; pid=\$(cat $PIDFILE 2>/dev/null || echo 0); \
if [ \$pid -gt 0 ] && kill -0 \$pid 2>/dev/null; then \
  pkill -TERM -P \$pid; i=0; \
  while kill -0 \$pid 2>/dev/null && [ \$i -lt $(q "$STOP_TIMEOUT") ]; do sleep 1; i=\$((i + 1)); done; \
  if kill -0 \$pid 2>/dev/null; then kill -KILL -- -\$pid; echo \"[\$(hostname)] killed after $STOP_TIMEOUT s\"; \
  else echo \"[\$(hostname)] stopped: \$(tail -n 1 $LOG)\"; fi; \
else echo \"[\$(hostname)] not running\"; fi; rm -f $PIDFILE"
}

delete() {
  echo "== deleting queued resource $QUEUED_RESOURCE and slice $TPU_NAME"
  run gcloud compute tpus queued-resources delete "$QUEUED_RESOURCE" "${GCLOUD_FLAGS[@]}" --force --quiet
}

case $ACTION in
  run)
    # From here on, leaving for any reason (the run ended, an error, Ctrl-C) stops the trainer with a checkpoint
    # and deletes the slice; running again with the same WORKDIR resumes.
    DELETE_ON_EXIT=1
    trap 'exit 130' INT
    trap 'exit 143' TERM
    create
    setup
    train "$@"
    FOLLOW=1 logs ;;
  all) create; setup; train "$@" ;;
  create) create ;;
  setup) setup ;;
  train) train "$@" ;;
  logs) logs ;;
  stop) stop ;;
  delete) delete ;;
esac
