#!/usr/bin/env bash
# Train alexnet_jax on every host of a multi-host Cloud TPU VM slice (v4-32, v5p-64, v6e-16, ...).
#
# Every host runs the same command with --distributed: jax.distributed.initialize() then finds the other hosts by
# itself on a TPU slice, so no --coordinator_address/--num_processes/--process_id flags are passed. Run it from
# the checkout root.
#
# Usage:
#   TPU_NAME=my-v4-32 ZONE=us-central2-b WORKDIR=gs://my-bucket/runs/alexnet \
#     launch/tpu_pod.sh [ACTION] [--config.key=value ...]
#
#   ACTION   all    (default) setup, then train
#            setup  put this checkout on every host and `pip install -e ".[tpu]"` it into <REMOTE_DIR>/.venv
#            train  start `python -m alexnet_jax.main --config=$CONFIG --workdir=$WORKDIR ...` on every host
#            stop   stop a detached run on every host (the process group started by `train`)
#            logs   last $LOG_LINES lines of every host's log
#   Anything after ACTION is passed to alexnet_jax.main, e.g.
#     --config.data.train_path=gs://my-bucket/imagenet/train --config.batch_size=1024
#
# Required environment:
#   TPU_NAME    name of the TPU VM slice
#   ZONE        its zone
#   WORKDIR     (all, train) run directory that every host reaches under the same name: a gs:// path or a
#               shared mount. Checkpoints and metrics go there; rerunning `train` with the same WORKDIR resumes.
# Optional environment:
#   PROJECT     GCP project (default: gcloud's configured project)
#   CONFIG      config file, relative to the checkout (default: configs/imagenet.py)
#   REPO_URL    git URL the hosts clone; unset: copy this checkout's tracked and untracked-but-not-ignored files,
#               uncommitted edits included
#   REPO_REF    branch, tag or commit fetched from REPO_URL (default: main)
#   REMOTE_DIR  checkout on the hosts, relative to the remote home or absolute (default: alexnet_jax)
#   PYTHON      interpreter on the hosts used to create the venv; needs Python >= 3.11 (default: python3)
#   DETACH      1 (default): start under nohup and return, logs in <REMOTE_DIR>/alexnet_train.log on each host;
#               0: stay attached and stream every host's output (the run dies if this ssh session does)
#   LOG_LINES   lines shown by `logs` (default: 20)
set -euo pipefail

usage() {
  sed -n '2,/^set -euo pipefail/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2
  exit 2
}

ACTION=all
if [[ $# -gt 0 && $1 != -* ]]; then
  ACTION=$1
  shift
fi
case $ACTION in
  all | setup | train | stop | logs) ;;
  -h | --help | help) usage ;;
  *) echo "unknown action: $ACTION" >&2; usage ;;
esac

missing=()
for var in TPU_NAME ZONE; do
  [[ -n ${!var:-} ]] || missing+=("$var")
done
if [[ ($ACTION == all || $ACTION == train) && -z ${WORKDIR:-} ]]; then
  missing+=(WORKDIR)
fi
if [[ ${#missing[@]} -gt 0 ]]; then
  echo "missing environment variable(s): ${missing[*]}" >&2
  echo >&2
  usage
fi

CONFIG=${CONFIG:-configs/imagenet.py}
REPO_REF=${REPO_REF:-main}
REMOTE_DIR=${REMOTE_DIR:-alexnet_jax}
PYTHON=${PYTHON:-python3}
DETACH=${DETACH:-1}
LOG_LINES=${LOG_LINES:-20}
LOG=alexnet_train.log    # inside REMOTE_DIR on every host
PIDFILE=alexnet_train.pid

GCLOUD_FLAGS=(--zone="$ZONE")
if [[ -n ${PROJECT:-} ]]; then
  GCLOUD_FLAGS+=(--project="$PROJECT")
fi

q() { printf '%q' "$1"; }
dir=$(q "$REMOTE_DIR")
# Prefixes each output line with the host, since all workers print at once ($(hostname) expands remotely).
# shellcheck disable=SC2016
tag='2>&1 | sed "s/^/[$(hostname)] /"'

on_all_hosts() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${GCLOUD_FLAGS[@]}" --worker=all --command="$1"
}

setup() {
  if [[ -n ${REPO_URL:-} ]]; then
    echo "== fetching $REPO_URL@$REPO_REF on every host of $TPU_NAME"
    on_all_hosts "set -euo pipefail; { [ -d $dir/.git ] || git clone --quiet $(q "$REPO_URL") $dir; \
git -C $dir fetch --quiet origin $(q "$REPO_REF") && git -C $dir checkout --quiet --detach FETCH_HEAD; } $tag"
  else
    local root
    root=$(git rev-parse --show-toplevel)
    ARCHIVE=$(mktemp -t alexnet_jax.XXXXXX.tar.gz)
    trap 'rm -f "$ARCHIVE"' EXIT
    echo "== copying $root (tracked + untracked, not ignored) to every host of $TPU_NAME"
    (cd "$root" && git ls-files -z --cached --others --exclude-standard | tar --null -T - -czf "$ARCHIVE")
    gcloud compute tpus tpu-vm scp "$ARCHIVE" "$TPU_NAME":alexnet_jax_src.tar.gz "${GCLOUD_FLAGS[@]}" --worker=all
    on_all_hosts "set -euo pipefail; mkdir -p $dir && tar -xzf alexnet_jax_src.tar.gz -C $dir && rm alexnet_jax_src.tar.gz"
  fi
  echo "== installing into $REMOTE_DIR/.venv on every host"
  on_all_hosts "set -euo pipefail; { cd $dir; \
$(q "$PYTHON") -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || { echo 'needs Python >= 3.11: install it (e.g. python3.11 python3.11-venv) and set PYTHON=python3.11'; exit 1; }; \
[ -x .venv/bin/python ] || $(q "$PYTHON") -m venv .venv; \
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
  if [[ $DETACH == 1 ]]; then
    # setsid: the run and its grain workers form one process group, which `stop` kills as a whole.
    on_all_hosts "set -euo pipefail; cd $dir; \
if [ -f $PIDFILE ] && kill -0 -\$(cat $PIDFILE) 2>/dev/null; then \
  echo \"[\$(hostname)] already running (pid \$(cat $PIDFILE)); launch/tpu_pod.sh stop first\"; exit 1; fi; \
nohup setsid $cmd > $LOG 2>&1 < /dev/null & echo \$! > $PIDFILE; \
echo \"[\$(hostname)] started pid \$(cat $PIDFILE), log \$PWD/$LOG\""
    echo "== follow with: TPU_NAME=$TPU_NAME ZONE=$ZONE $0 logs"
  else
    on_all_hosts "cd $dir && exec $cmd"
  fi
}

stop() {
  on_all_hosts "cd $dir 2>/dev/null || exit 0; \
if [ -f $PIDFILE ] && kill -- -\$(cat $PIDFILE) 2>/dev/null; then echo \"[\$(hostname)] stopped\"; \
else echo \"[\$(hostname)] not running\"; fi; rm -f $PIDFILE"
}

logs() {
  on_all_hosts "tail -n $(q "$LOG_LINES") $dir/$LOG $tag"
}

case $ACTION in
  all) setup; train "$@" ;;
  setup) setup ;;
  train) train "$@" ;;
  stop) stop ;;
  logs) logs ;;
esac
