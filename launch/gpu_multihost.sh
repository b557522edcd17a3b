#!/usr/bin/env bash
# Run `python -m clawjax.train` on a SLURM GPU cluster with `srun`: one process per node (each
# drives all the node's GPUs) or one per GPU. jax.distributed reads the SLURM variables (job id,
# node list, task count and rank), so every process joins one JAX runtime.
#
#   NODES=4 GPUS_PER_NODE=8 WORKDIR=/shared/runs/run1 bash launch/gpu_multihost.sh \
#       --config.model.path=/shared/Qwen3-0.6B --config.buffer.address=buffer-host:50051 \
#       --config.buffer.token_file=/shared/buffer.token --config.trainer.steps=2000
# or from an sbatch script (inside the allocation, NODES defaults to SLURM_JOB_NUM_NODES).
#
# Arguments after the script name are passed to python -m clawjax.train in every process.
# Variables (required first):
#   WORKDIR         run directory on a file system every node shares; orbax checkpoints are
#                   written there collectively (required)
#   GPUS_PER_NODE   GPUs per node (required)
#   NODES           nodes to use (required outside an allocation; default SLURM_JOB_NUM_NODES)
#   PER             "node" (default: one process per node, all its GPUs) or "gpu" (one per GPU)
#   CONFIG          config file (default configs/qwen3_0_6b.py)
#   PARTITION       srun --partition (optional)
#   TIME            srun --time (optional, e.g. 04:00:00)
#   PYTHON          interpreter on the nodes (default python)
#   SRUN_ARGS       more srun flags, e.g. "--account=myproj"
#   DRY_RUN=1       print the srun command, run nothing
set -euo pipefail

die() { echo "gpu_multihost.sh: error: $*" >&2; exit 1; }
log() { echo "gpu_multihost.sh: $*"; }

[[ -n "${WORKDIR:-}" ]] || die "WORKDIR is not set (a directory on a file system all nodes share)"
[[ -n "${GPUS_PER_NODE:-}" ]] || die "GPUS_PER_NODE is not set (GPUs on each node, e.g. 8)"
NODES="${NODES:-${SLURM_JOB_NUM_NODES:-}}"
[[ -n "$NODES" ]] || die "NODES is not set (nodes to run on; inside an allocation SLURM_JOB_NUM_NODES is used)"
PER="${PER:-node}"
CONFIG="${CONFIG:-configs/qwen3_0_6b.py}"
PYTHON="${PYTHON:-python}"
SRUN_ARGS="${SRUN_ARGS:-}"
DRY_RUN="${DRY_RUN:-0}"

[[ "$NODES" =~ ^[1-9][0-9]*$ ]] || die "NODES=$NODES, expected a positive integer"
[[ "$GPUS_PER_NODE" =~ ^[1-9][0-9]*$ ]] || die "GPUS_PER_NODE=$GPUS_PER_NODE, expected a positive integer"
if [[ "$DRY_RUN" != "1" ]]; then
  command -v srun >/dev/null || die "srun not found on PATH (run on a SLURM login node or in sbatch)"
  command -v "$PYTHON" >/dev/null || die "PYTHON=$PYTHON not found on PATH"
fi

cmd=(srun --nodes="$NODES" --gpus-per-node="$GPUS_PER_NODE" --kill-on-bad-exit=1)
train=("$PYTHON" -m clawjax.train --config="$CONFIG" --config.workdir="$WORKDIR"
       --config.distributed.enabled=True)
case "$PER" in
  node)
    # One task per node: JAX would give a SLURM task only the GPU of its local rank.
    ids=$(seq -s, 0 $(( GPUS_PER_NODE - 1 )))
    cmd+=(--ntasks-per-node=1)
    train+=(--config.distributed.local_device_ids="$ids")
    processes=$NODES ;;
  gpu)
    cmd+=(--ntasks-per-node="$GPUS_PER_NODE")
    processes=$(( NODES * GPUS_PER_NODE )) ;;
  *) die "PER=$PER, expected 'node' or 'gpu'" ;;
esac
[[ -n "${PARTITION:-}" ]] && cmd+=(--partition="$PARTITION")
[[ -n "${TIME:-}" ]] && cmd+=(--time="$TIME")
# shellcheck disable=SC2206  # SRUN_ARGS is split on purpose
[[ -n "$SRUN_ARGS" ]] && cmd+=($SRUN_ARGS)

log "$processes process(es) on $NODES node(s) x $GPUS_PER_NODE GPU(s), one per $PER; workdir $WORKDIR"
log "${cmd[*]} ${train[*]} $*"
[[ "$DRY_RUN" == "1" ]] && exit 0
exec "${cmd[@]}" "${train[@]}" "$@"
