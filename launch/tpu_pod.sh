#!/usr/bin/env bash
# Run `python -m clawjax.train` on every worker of a TPU VM pod (one process per worker; the
# processes form one JAX runtime through jax.distributed, which reads the pod's metadata).
#
#   TPU_NAME=my-v5e-32 ZONE=us-west4-a WORKDIR=/mnt/shared/run1 bash launch/tpu_pod.sh \
#       --config.model.path=/mnt/shared/Qwen3-0.6B --config.buffer.address=buffer-host:50051 \
#       --config.buffer.token_file=/mnt/shared/buffer.token --config.trainer.steps=2000
#
# Arguments after the script name are passed to python -m clawjax.train on every worker.
# Variables (required first):
#   TPU_NAME      the TPU VM pod (gcloud compute tpus tpu-vm list) (required)
#   ZONE          its zone (required)
#   WORKDIR       run directory on a mount every worker shares (Filestore / NFS / gcsfuse);
#                 orbax checkpoints are written there collectively (required)
#   PROJECT       gcloud project (default: gcloud's configured project)
#   CONFIG        config file relative to REPO_DIR (default configs/qwen3_0_6b.py)
#   REPO_DIR      the clawjax checkout on the workers (default ~/clawjax)
#   SETUP=1       first run `pip install -e .` and `pip install "jax[tpu]"` on every worker
#   PYTHON        interpreter on the workers (default python3)
#   DRY_RUN=1     print the gcloud commands, run nothing
set -euo pipefail

die() { echo "tpu_pod.sh: error: $*" >&2; exit 1; }
log() { echo "tpu_pod.sh: $*"; }

[[ -n "${TPU_NAME:-}" ]] || die "TPU_NAME is not set (the TPU VM pod to run on)"
[[ -n "${ZONE:-}" ]] || die "ZONE is not set (the zone of TPU_NAME, e.g. us-west4-a)"
[[ -n "${WORKDIR:-}" ]] || die "WORKDIR is not set (a directory on a mount every worker shares)"
CONFIG="${CONFIG:-configs/qwen3_0_6b.py}"
REPO_DIR="${REPO_DIR:-~/clawjax}"
PYTHON="${PYTHON:-python3}"
SETUP="${SETUP:-0}"
DRY_RUN="${DRY_RUN:-0}"

if [[ "$DRY_RUN" != "1" ]]; then
  command -v gcloud >/dev/null || die "gcloud not found on PATH (install the Google Cloud CLI)"
fi

gcloud_ssh=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all)
[[ -n "${PROJECT:-}" ]] && gcloud_ssh+=(--project="$PROJECT")

quoted_args=""
for a in "$@"; do quoted_args+=" $(printf '%q' "$a")"; done
train="cd $REPO_DIR && $PYTHON -m clawjax.train --config=$CONFIG --config.workdir=$WORKDIR"
train+=" --config.distributed.enabled=True${quoted_args}"

run() {
  log "${gcloud_ssh[*]} --command=\"$1\""
  [[ "$DRY_RUN" == "1" ]] || "${gcloud_ssh[@]}" --command="$1"
}

if [[ "$SETUP" == "1" ]]; then
  log "installing clawjax and jax[tpu] on every worker of $TPU_NAME"
  run "cd $REPO_DIR && $PYTHON -m pip install -e . && $PYTHON -m pip install 'jax[tpu]'"
fi
log "starting the trainer on every worker of $TPU_NAME (one process each, jax.distributed)"
run "$train"
