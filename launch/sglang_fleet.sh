#!/usr/bin/env bash
# Start N SGLang servers (the policy fleet) on this machine and print the addresses the trainer
# config needs (--config.publish.urls=...).
#
#   MODEL_PATH=/ckpt/qwen3-4b NUM_SERVERS=4 TP=2 bash launch/sglang_fleet.sh
#
# Variables (required first):
#   MODEL_PATH       HF model directory or hub id SGLang loads at start (required)
#   NUM_SERVERS      servers to start (default 1); server i uses GPUs i*TP .. i*TP+TP-1
#   TP               tensor-parallel size per server, --tp (default 1)
#   MEM_FRACTION     --mem-fraction-static (default 0.85)
#   BASE_PORT        server i listens on BASE_PORT+i (default 30000)
#   HOST             bind address, --host (default 0.0.0.0)
#   ADVERTISE_HOST   host name printed in the URLs (default: hostname -f)
#   API_KEY          optional --api-key (then send Authorization: Bearer ...)
#   LOG_DIR          one log per server (default ./sglang_logs)
#   PYTHON           interpreter with sglang installed (default python)
#   EXTRA_ARGS       more launch_server flags, e.g. "--context-length 32768"
#   HEALTH_TIMEOUT   seconds to wait for every /health (default 900)
#   DRY_RUN=1        print the commands, start nothing
# Install the fleet's packages first: pip install -r requirements-fleet.txt
set -euo pipefail

die() { echo "sglang_fleet.sh: error: $*" >&2; exit 1; }
log() { echo "sglang_fleet.sh: $*"; }

[[ -n "${MODEL_PATH:-}" ]] || die "MODEL_PATH is not set (the HF model directory or hub id to serve)"
NUM_SERVERS="${NUM_SERVERS:-1}"
TP="${TP:-1}"
MEM_FRACTION="${MEM_FRACTION:-0.85}"
BASE_PORT="${BASE_PORT:-30000}"
HOST="${HOST:-0.0.0.0}"
ADVERTISE_HOST="${ADVERTISE_HOST:-$(hostname -f 2>/dev/null || hostname)}"
LOG_DIR="${LOG_DIR:-./sglang_logs}"
PYTHON="${PYTHON:-python}"
EXTRA_ARGS="${EXTRA_ARGS:-}"
HEALTH_TIMEOUT="${HEALTH_TIMEOUT:-900}"
DRY_RUN="${DRY_RUN:-0}"

[[ "$NUM_SERVERS" =~ ^[1-9][0-9]*$ ]] || die "NUM_SERVERS=$NUM_SERVERS, expected a positive integer"
[[ "$TP" =~ ^[1-9][0-9]*$ ]] || die "TP=$TP, expected a positive integer"
if ! [[ "$BASE_PORT" =~ ^[0-9]+$ ]] || (( BASE_PORT + NUM_SERVERS > 65536 )); then
  die "BASE_PORT=$BASE_PORT, expected a port such that BASE_PORT+NUM_SERVERS <= 65536"
fi
[[ "$MEM_FRACTION" =~ ^0?\.[0-9]+$ ]] || die "MEM_FRACTION=$MEM_FRACTION, expected a number in (0, 1)"

if [[ "$DRY_RUN" != "1" ]]; then
  command -v "$PYTHON" >/dev/null || die "PYTHON=$PYTHON not found on PATH"
  "$PYTHON" -c "import sglang" 2>/dev/null \
    || die "sglang is not importable by $PYTHON (pip install -r requirements-fleet.txt)"
  command -v curl >/dev/null || die "curl not found (needed for the health checks)"
  if command -v nvidia-smi >/dev/null; then
    NGPU=$(nvidia-smi --list-gpus | wc -l)
    (( NUM_SERVERS * TP <= NGPU )) \
      || die "NUM_SERVERS*TP = $((NUM_SERVERS * TP)) GPUs wanted, $NGPU visible"
  else
    die "nvidia-smi not found: SGLang needs CUDA GPUs (use python -m clawjax.serve on CPU)"
  fi
  mkdir -p "$LOG_DIR"
fi

PIDS=()
URLS=()
# Until every server is healthy, any exit (die, a failed command, a signal) stops the servers
# started so far; the normal exit below clears the trap and leaves them running.
cleanup() {
  if (( ${#PIDS[@]} )); then
    log "stopping ${#PIDS[@]} server(s): ${PIDS[*]}"
    kill "${PIDS[@]}" 2>/dev/null || true
    PIDS=()
  fi
}
on_signal() {  # $1: the exit status, 128 + the signal's number
  trap - INT TERM
  cleanup
  exit "$1"
}
trap cleanup EXIT
trap 'on_signal 130' INT
trap 'on_signal 143' TERM

for (( i = 0; i < NUM_SERVERS; i++ )); do
  port=$(( BASE_PORT + i ))
  first=$(( i * TP ))
  gpus=$(seq -s, "$first" $(( first + TP - 1 )))
  cmd=("$PYTHON" -m sglang.launch_server --model-path "$MODEL_PATH" --host "$HOST"
       --port "$port" --tp "$TP" --mem-fraction-static "$MEM_FRACTION")
  [[ -n "${API_KEY:-}" ]] && cmd+=(--api-key "$API_KEY")
  # shellcheck disable=SC2206  # EXTRA_ARGS is split on purpose
  [[ -n "$EXTRA_ARGS" ]] && cmd+=($EXTRA_ARGS)
  URLS+=("http://${ADVERTISE_HOST}:${port}")
  shown=("${cmd[@]}")
  for j in "${!shown[@]}"; do
    [[ "${shown[$j]}" == "--api-key" ]] && shown[j + 1]="***"
  done
  log "server $i: CUDA_VISIBLE_DEVICES=$gpus ${shown[*]} > $LOG_DIR/server_$i.log"
  if [[ "$DRY_RUN" != "1" ]]; then
    CUDA_VISIBLE_DEVICES="$gpus" nohup "${cmd[@]}" > "$LOG_DIR/server_$i.log" 2>&1 &
    PIDS+=($!)
  fi
done

if [[ "$DRY_RUN" != "1" ]]; then
  log "waiting up to ${HEALTH_TIMEOUT}s for /health on ${#URLS[@]} server(s)"
  deadline=$(( SECONDS + HEALTH_TIMEOUT ))
  for (( i = 0; i < NUM_SERVERS; i++ )); do
    url="http://127.0.0.1:$(( BASE_PORT + i ))"
    until curl -sf "$url/health" >/dev/null; do
      kill -0 "${PIDS[$i]}" 2>/dev/null \
        || die "server $i exited during start-up; see $LOG_DIR/server_$i.log"
      (( SECONDS < deadline )) || die "server $i not healthy after ${HEALTH_TIMEOUT}s; see $LOG_DIR/server_$i.log"
      sleep 2
    done
    log "server $i healthy at ${URLS[$i]} (pid ${PIDS[$i]})"
  done
fi

joined=$(IFS=,; echo "${URLS[*]}")
echo
echo "Fleet addresses (pass to the trainer):"
echo "  --config.publish.urls=${joined}"
echo "FLEET_URLS=${joined}"
[[ "$DRY_RUN" == "1" ]] && exit 0
trap - EXIT INT TERM
log "servers run in the background (pids ${PIDS[*]}); stop them with: kill ${PIDS[*]}"
