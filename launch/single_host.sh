#!/usr/bin/env bash
# Train on one host: one process that sees every local GPU (or the CPU), or, for testing the
# multi-process path on a laptop, NUM_PROCESSES local CPU processes joined through
# JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID.
#
#   CONFIG=configs/tiny.yaml launch/single_host.sh
#   CONFIG=configs/rsa_cvar.yaml RUN_DIR=runs/rsa OVERRIDES="model.path=artifacts/smollm2-135m \
#       data.path=train.jsonl" launch/single_host.sh
#   CONFIG=configs/tiny.yaml NUM_PROCESSES=2 CPU_DEVICES=4 launch/single_host.sh   # 2 x 4 CPU devices
#
# Variables (environment):
#   CONFIG         required  YAML config, e.g. configs/rsa_cvar.yaml
#   RUN_DIR        runs/<config name>  checkpoints, metrics, config.json; rerunning resumes from it
#   OVERRIDES      ""        dotted overrides, space separated: "stages.1.beta=0.05 data.path=x.jsonl"
#                            (values cannot contain spaces: put such values in a YAML file)
#   PYTHON         python    interpreter with rsa_jax installed, e.g. .venv/bin/python
#   NUM_PROCESSES  1         >1: that many local processes on the CPU (JAX_PLATFORMS=cpu), a test
#                            of the multi-host code path; process i>0 logs to RUN_DIR/logs/
#   COORDINATOR_PORT 12355   localhost port of the coordinator (NUM_PROCESSES > 1)
#   CPU_DEVICES    unset     simulated CPU devices per process (exported as JAX_NUM_CPU_DEVICES)
#   XLA_FLAGS, JAX_*         passed through unchanged
#   DRY_RUN        0         1: print the commands ("+ " prefix, one per line) and exit 0
#
# Preemption: SIGTERM/SIGINT make the trainer finish the step, save and exit with code 75
# (preempted; 0 when the run had finished, 1 failed, 2 config error); this script forwards them
# to its processes and exits with the trainer's code (several processes: 75 when every process
# that stopped early was preempted, 1 when one failed). Rerunning the same command resumes from
# RUN_DIR. The processes agree on the step to stop at (JAX's preemption sync point), so a
# signal to any one of them alone also stops all at the same step; a process that dies ends
# the others within RSA_JAX_PEER_TIMEOUT seconds (docs/faults.md).
set -euo pipefail

die() { echo "$(basename "$0"): $*" >&2; exit 2; }

# Print one argument so that a shell reads it back unchanged.
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=,@+%-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

show() {
  local out="+" arg
  for arg in "$@"; do out+=" $(quote "$arg")"; done
  echo "$out"
}

[[ -n "${CONFIG:-}" ]] || die "CONFIG is not set (e.g. CONFIG=configs/tiny.yaml)"
config_name="$(basename "$CONFIG")"
RUN_DIR="${RUN_DIR:-runs/${config_name%.*}}"
PYTHON="${PYTHON:-python}"
NUM_PROCESSES="${NUM_PROCESSES:-1}"
COORDINATOR_PORT="${COORDINATOR_PORT:-12355}"
DRY_RUN="${DRY_RUN:-0}"
read -r -a overrides <<< "${OVERRIDES:-}"
[[ "$NUM_PROCESSES" =~ ^[1-9][0-9]*$ ]] || die "NUM_PROCESSES must be a positive integer, got '$NUM_PROCESSES'"

train=("$PYTHON" -m rsa_jax train "$CONFIG" "train.run_dir=$RUN_DIR" "${overrides[@]}")
device_env=()
[[ -n "${CPU_DEVICES:-}" ]] && device_env=("JAX_NUM_CPU_DEVICES=$CPU_DEVICES")

if (( NUM_PROCESSES == 1 )); then
  cmd=("${train[@]}")
  (( ${#device_env[@]} )) && cmd=(env "${device_env[@]}" "${train[@]}")
  if [[ "$DRY_RUN" == 1 ]]; then show "${cmd[@]}"; exit 0; fi
  exec "${cmd[@]}"
fi

# Several local processes: the same command, each with its own JAX_PROCESS_ID.
log_dir="$RUN_DIR/logs"
commands=()
for ((i = 0; i < NUM_PROCESSES; i++)); do
  commands+=("$(show env JAX_PLATFORMS=cpu "JAX_COORDINATOR_ADDRESS=127.0.0.1:$COORDINATOR_PORT" \
    "JAX_NUM_PROCESSES=$NUM_PROCESSES" "JAX_PROCESS_ID=$i" "${device_env[@]}" "${train[@]}")")
done
if [[ "$DRY_RUN" == 1 ]]; then
  show mkdir -p "$log_dir"
  for ((i = 0; i < NUM_PROCESSES; i++)); do
    if (( i == 0 )); then echo "${commands[i]} &"; else
      echo "${commands[i]} > $(quote "$log_dir/process_$i.log") 2>&1 &"; fi
  done
  echo "+ wait"
  exit 0
fi

mkdir -p "$log_dir"
pids=()
got_signal=0
sent_term=0
forward() { got_signal=1; sent_term=1; kill -TERM "${pids[@]}" 2>/dev/null || true; }
trap forward TERM INT
for ((i = 0; i < NUM_PROCESSES; i++)); do
  env_i=(JAX_PLATFORMS=cpu "JAX_COORDINATOR_ADDRESS=127.0.0.1:$COORDINATOR_PORT"
    "JAX_NUM_PROCESSES=$NUM_PROCESSES" "JAX_PROCESS_ID=$i" "${device_env[@]}")
  if (( i == 0 )); then
    env "${env_i[@]}" "${train[@]}" &
  else
    env "${env_i[@]}" "${train[@]}" > "$log_dir/process_$i.log" 2>&1 &
  fi
  pids+=("$!")
done
# One process stopping early leaves the others blocked in a collective: stop them all (SIGTERM:
# they save and exit too). Exit code 75 (EX_TEMPFAIL) is the trainer's "preempted, state saved".
EXIT_PREEMPTED=75
failed=0
preempted=0
finished=0
while (( finished < NUM_PROCESSES )); do
  rc=0
  wait -n || rc=$?
  if (( rc > 128 && got_signal )); then got_signal=0; continue; fi  # the trap interrupted wait
  finished=$((finished + 1))
  (( rc == 0 )) && continue
  # Killed by the SIGTERM this script sent while it was already leaving (JAX's shutdown puts
  # the default SIGTERM action back): its run had stopped at the agreed step, saved.
  (( rc == 128 + 15 && sent_term )) && rc=$EXIT_PREEMPTED
  if (( failed == 0 && preempted == 0 )); then
    if (( rc == EXIT_PREEMPTED )); then
      echo "$(basename "$0"): a process was preempted (exit $rc); stopping the others" >&2
    else
      echo "$(basename "$0"): a process exited with $rc; stopping the others (logs: $log_dir)" >&2
    fi
    sent_term=1
    kill -TERM "${pids[@]}" 2>/dev/null || true
  fi
  if (( rc == EXIT_PREEMPTED )); then preempted=1; else failed=1; fi
done
(( failed )) && exit 1
(( preempted )) && exit "$EXIT_PREEMPTED"
exit 0
