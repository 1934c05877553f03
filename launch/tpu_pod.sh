#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice (or several slices): run the same command on every worker
# through `gcloud compute tpus tpu-vm ssh --worker=all`. Run it from your workstation; each worker
# must already hold the repository at REMOTE_DIR with rsa_jax installed (e.g. by a previous
# `--worker=all --command "git clone ... && pip install -e ."`).
#
#   CONFIG=configs/rsa_cvar.yaml TPU_NAME=my-v5p-32 ZONE=europe-west4-b RUN_DIR=/mnt/shared/runs/rsa \
#     OVERRIDES="model.path=/mnt/shared/sft data.path=/mnt/shared/train.jsonl" launch/tpu_pod.sh
#
# Variables (environment):
#   CONFIG        required  YAML config, relative to REMOTE_DIR
#   TPU_NAME      required  the TPU VM name; manual multislice: the prefix of <TPU_NAME>-0, -1, ...
#   ZONE          required  e.g. us-central2-b
#   PROJECT       gcloud's configured project   passed as --project when set
#   RUN_DIR       runs/<config name>  one directory shared by all workers at the same path
#                           (Filestore/NFS, a gcsfuse mount) or a gs://bucket/path URL (the
#                           `cloud` extra on every worker; docs/run_directory.md, "Runs on object
#                           storage", says what is tested); rerunning resumes from it
#   OVERRIDES     ""        dotted overrides, space separated (values cannot contain spaces)
#   REMOTE_DIR    rsa_jax   repository on each worker (relative to the remote home or absolute)
#   PYTHON        python3   interpreter on the workers, e.g. .venv/bin/python (relative to REMOTE_DIR)
#   REMOTE_ENV    ""        extra "NAME=value ..." exported on every worker before training
#   LIBTPU_INIT_ARGS, XLA_FLAGS   exported on every worker when set here
#   DETACH        0         1: start the trainer with nohup (output in REMOTE_DIR/train.log) and
#                           return; otherwise closing this terminal stops the run
#   SSH_ARGS      ""        extra gcloud ssh flags, e.g. "--internal-ip"
#   GCLOUD        gcloud    e.g. "gcloud alpha" where queued-resources ssh is not yet GA
#   NUM_SLICES    1         >1: multislice (data parallel over the data-center network), one of:
#     QR_ID       unset     the queued resource created with --node-count=NUM_SLICES: runs
#                           `gcloud compute tpus queued-resources ssh QR_ID --node=all --worker=all`;
#                           the queued resource sets MEGASCALE_* on every worker itself
#     (QR_ID unset)         manual multislice over the TPU VMs <TPU_NAME>-0 ... <TPU_NAME>-(N-1):
#                           one ssh per slice, each exporting MEGASCALE_COORDINATOR_ADDRESS,
#                           MEGASCALE_NUM_SLICES, MEGASCALE_SLICE_ID and MEGASCALE_PORT; needs
#       MEGASCALE_COORDINATOR_ADDRESS  required  IP of worker 0 of <TPU_NAME>-0 (":MEGASCALE_PORT"
#                           is appended unless it has a port):
#                           gcloud compute tpus tpu-vm describe <TPU_NAME>-0 --zone ZONE \
#                             --format='value(networkEndpoints[0].ipAddress)'
#       MEGASCALE_PORT    8080
#   DRY_RUN       0         1: print the commands ("+ " prefix, one per line) and exit 0
#
# JAX reads the pod (worker count, worker id, coordinator; slices from MEGASCALE_*) from the TPU
# VM metadata, so the trainer calls jax.distributed.initialize() with no arguments. Preemption:
# SIGTERM makes the trainer finish the step, save and exit; after a preempted or deleted slice is
# recreated, rerunning this exact command resumes from RUN_DIR. To stop a detached run cleanly,
# send SIGTERM on all workers: --worker=all --command "pkill -TERM -f 'rsa_jax train'".
set -euo pipefail

die() { echo "tpu_pod.sh: $*" >&2; exit 2; }

quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=,@+%-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

join_quoted() {
  local out="" arg
  for arg in "$@"; do out+="${out:+ }$(quote "$arg")"; done
  printf '%s' "$out"
}

for name in CONFIG TPU_NAME ZONE; do
  [[ -n "${!name:-}" ]] || die "$name is not set (needed: CONFIG, TPU_NAME, ZONE)"
done
config_name="$(basename "$CONFIG")"
RUN_DIR="${RUN_DIR:-runs/${config_name%.*}}"
REMOTE_DIR="${REMOTE_DIR:-rsa_jax}"
PYTHON="${PYTHON:-python3}"
NUM_SLICES="${NUM_SLICES:-1}"
MEGASCALE_PORT="${MEGASCALE_PORT:-8080}"
DETACH="${DETACH:-0}"
DRY_RUN="${DRY_RUN:-0}"
read -r -a overrides <<< "${OVERRIDES:-}"
read -r -a remote_env <<< "${REMOTE_ENV:-}"
read -r -a ssh_args <<< "${SSH_ARGS:-}"
read -r -a gcloud <<< "${GCLOUD:-gcloud}"
[[ "$NUM_SLICES" =~ ^[1-9][0-9]*$ ]] || die "NUM_SLICES must be a positive integer, got '$NUM_SLICES'"
if (( NUM_SLICES > 1 )) && [[ -z "${QR_ID:-}" && -z "${MEGASCALE_COORDINATOR_ADDRESS:-}" ]]; then
  die "MEGASCALE_COORDINATOR_ADDRESS is not set (NUM_SLICES=$NUM_SLICES without QR_ID: IP of worker 0 of ${TPU_NAME}-0)"
fi

# Tells the trainer to call jax.distributed.initialize() (the pod is read from the metadata server).
remote_env=("RSA_JAX_DISTRIBUTED=1" "${remote_env[@]}")
[[ -n "${LIBTPU_INIT_ARGS:-}" ]] && remote_env+=("LIBTPU_INIT_ARGS=$LIBTPU_INIT_ARGS")
[[ -n "${XLA_FLAGS:-}" ]] && remote_env+=("XLA_FLAGS=$XLA_FLAGS")
location=(--zone "$ZONE")
[[ -n "${PROJECT:-}" ]] && location+=(--project "$PROJECT")
train=("$PYTHON" -m rsa_jax train "$CONFIG" "train.run_dir=$RUN_DIR" "${overrides[@]}")

# The command every worker runs; $1...: extra NAME=value pairs for this slice.
remote_command() {
  local env_pairs=("${remote_env[@]}" "$@") cmd="cd $(quote "$REMOTE_DIR")"
  (( ${#env_pairs[@]} )) && cmd+=" && export $(join_quoted "${env_pairs[@]}")"
  if [[ "$DETACH" == 1 ]]; then
    cmd+=" && nohup $(join_quoted "${train[@]}") > train.log 2>&1 < /dev/null &"
  else
    cmd+=" && $(join_quoted "${train[@]}")"
  fi
  printf '%s' "$cmd"
}

commands=()
if (( NUM_SLICES == 1 )); then
  commands+=("$(join_quoted "${gcloud[@]}" compute tpus tpu-vm ssh "$TPU_NAME" "${location[@]}" \
    --worker=all "${ssh_args[@]}" --command "$(remote_command)")")
elif [[ -n "${QR_ID:-}" ]]; then
  commands+=("$(join_quoted "${gcloud[@]}" compute tpus queued-resources ssh "$QR_ID" \
    "${location[@]}" --node=all --worker=all "${ssh_args[@]}" --command "$(remote_command)")")
else
  for ((slice = 0; slice < NUM_SLICES; slice++)); do
    address="$MEGASCALE_COORDINATOR_ADDRESS"
    [[ "$address" == *:* ]] || address+=":$MEGASCALE_PORT"
    megascale=("MEGASCALE_COORDINATOR_ADDRESS=$address"
      "MEGASCALE_NUM_SLICES=$NUM_SLICES" "MEGASCALE_SLICE_ID=$slice" "MEGASCALE_PORT=$MEGASCALE_PORT")
    commands+=("$(join_quoted "${gcloud[@]}" compute tpus tpu-vm ssh "$TPU_NAME-$slice" \
      "${location[@]}" --worker=all "${ssh_args[@]}" --command "$(remote_command "${megascale[@]}")")")
  done
fi

# Every command was quoted by join_quoted above: eval reads back exactly those arguments.
if (( ${#commands[@]} == 1 )); then
  if [[ "$DRY_RUN" == 1 ]]; then echo "+ ${commands[0]}"; exit 0; fi
  # `|| status=$?`: under `set -e` a failing eval would exit with 1, losing the trainer's code.
  status=0
  eval "${commands[0]}" || status=$?
  exit "$status"
fi
# Manual multislice: one ssh per slice, all at once (each blocks until its slice finishes).
if [[ "$DRY_RUN" == 1 ]]; then
  printf '+ %s &\n' "${commands[@]}"
  echo "+ wait"
  exit 0
fi
pids=()
for command in "${commands[@]}"; do
  (set +e; eval "$command"; exit $?) &  # errexit would turn every failing code into 1
  pids+=("$!")
done
# Exit code: 0 when every slice finished, 75 (the trainer's "preempted, state saved") when every
# slice that stopped early was preempted, 1 when one failed.
failed=0
preempted=0
for ((slice = 0; slice < ${#pids[@]}; slice++)); do
  rc=0
  wait "${pids[slice]}" || rc=$?
  if (( rc == 75 )); then
    echo "tpu_pod.sh: slice $slice was preempted (state saved; rerun to resume)" >&2
    preempted=1
  elif (( rc != 0 )); then
    echo "tpu_pod.sh: slice $slice failed (exit $rc)" >&2
    failed=1
  fi
done
(( failed )) && exit 1
(( preempted )) && exit 75
exit 0
