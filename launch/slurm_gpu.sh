#!/usr/bin/env bash
# Train on a GPU cluster under SLURM. Submit from the repository root (the job cds to
# SLURM_SUBMIT_DIR); flags given to sbatch override the #SBATCH defaults below:
#
#   CONFIG=configs/rsa_cvar.yaml RUN_DIR=/shared/runs/rsa \
#     OVERRIDES="model.path=/shared/models/sft data.path=/shared/data/train.jsonl" \
#     sbatch --nodes=4 --gpus-per-node=8 --time=24:00:00 launch/slurm_gpu.sh
#   # one process per GPU instead of one per host:
#   PER_GPU=1 CONFIG=... sbatch launch/slurm_gpu.sh
#
#SBATCH --job-name=rsa-jax
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=12:00:00
#SBATCH --output=slurm-%x-%j.out
#SBATCH --requeue
#SBATCH --signal=B:TERM@120
#
# Variables (environment at submission; sbatch exports it to the job):
#   CONFIG         required  YAML config, e.g. configs/rsa_cvar.yaml
#   RUN_DIR        runs/<config name>  on a filesystem every node sees at the same path, or a
#                            gs://bucket/path URL (the `cloud` extra; no s3://: see
#                            docs/run_directory.md, "Runs on object storage"); resumes from it
#   OVERRIDES      ""        dotted overrides, space separated (values cannot contain spaces)
#   PYTHON         python    interpreter with rsa_jax installed on every node, e.g. .venv/bin/python
#   PER_GPU        0         0: one process per node seeing all GPUS_PER_NODE GPUs
#                            (JAX_LOCAL_DEVICE_IDS=0,...,G-1); 1: one process per GPU
#   GPUS_PER_NODE  $SLURM_GPUS_ON_NODE, else 8
#   SRUN_ARGS      ""        extra srun flags for your site, e.g. "--mpi=none --container-image=..."
#   XLA_FLAGS, JAX_*, NCCL_* passed through unchanged (srun exports the environment)
#   DRY_RUN        0         1: print the srun command ("+ " prefix) and exit 0; works outside
#                            a job given SLURM_JOB_ID, SLURM_JOB_NUM_NODES (and SLURM_NNODES)
#
# How the processes find each other: the trainer calls jax.distributed.initialize() with no
# arguments when SLURM_NTASKS > 1, and JAX reads the cluster from the step's environment:
# SLURM_NTASKS (process count), SLURM_PROCID (process id), SLURM_LOCALID (local id), and the
# coordinator is the first host of SLURM_STEP_NODELIST on a port derived from SLURM_JOB_ID
# (set JAX_COORDINATOR_PORT to pick it). Do not set JAX_COORDINATOR_ADDRESS here. JAX then makes
# only GPU SLURM_LOCALID visible to each process unless JAX_LOCAL_DEVICE_IDS is set, which is why
# the one-per-node mode exports it and the one-per-GPU mode runs with --gpu-bind=none (every task
# sees all GPUs of its node and JAX picks its own).
#
# Preemption and requeue: --signal=B:TERM@120 sends SIGTERM to this batch shell 120 s before the
# time limit; it forwards SIGTERM to srun (which passes it to every task: the trainer finishes
# the step, saves and exits), waits, and acts on the trainer's exit code: 75 (preempted, state
# saved) requeues the job with `scontrol requeue` (the requeued job resumes from RUN_DIR); 0 (the
# run finished, e.g. the signal came during the last step) ends the job; any other code (1
# failure, 2 config error) ends the job with that code, not requeued, since a rerun would fail
# the same way. The same holds when srun exits 75 without this shell being signalled (the tasks
# were sent SIGTERM directly, e.g. `scancel --signal=TERM`). With --requeue, a job preempted by
# the scheduler or hit by a node failure is requeued by SLURM itself (the tasks get SIGTERM,
# then SIGKILL after KillWait).
set -euo pipefail

die() { echo "slurm_gpu.sh: $*" >&2; exit 2; }

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

[[ -n "${CONFIG:-}" ]] || die "CONFIG is not set (e.g. CONFIG=configs/rsa_cvar.yaml sbatch launch/slurm_gpu.sh)"
[[ -n "${SLURM_JOB_ID:-}" ]] || die "SLURM_JOB_ID is not set: submit with sbatch (or run inside salloc)"
nodes="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-}}"
[[ -n "$nodes" ]] || die "SLURM_JOB_NUM_NODES is not set: submit with sbatch (or run inside salloc)"
config_name="$(basename "$CONFIG")"
RUN_DIR="${RUN_DIR:-runs/${config_name%.*}}"
PYTHON="${PYTHON:-python}"
PER_GPU="${PER_GPU:-0}"
GPUS_PER_NODE="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}"
DRY_RUN="${DRY_RUN:-0}"
read -r -a overrides <<< "${OVERRIDES:-}"
read -r -a srun_args <<< "${SRUN_ARGS:-}"
[[ "$GPUS_PER_NODE" =~ ^[1-9][0-9]*$ ]] || die "GPUS_PER_NODE must be a positive integer, got '$GPUS_PER_NODE'"

if [[ "$PER_GPU" == 1 ]]; then
  tasks_per_node="$GPUS_PER_NODE"
  placement=(--gpu-bind=none)
  unset JAX_LOCAL_DEVICE_IDS
else
  tasks_per_node=1
  placement=()
  JAX_LOCAL_DEVICE_IDS="$(seq -s, 0 $((GPUS_PER_NODE - 1)))"
  export JAX_LOCAL_DEVICE_IDS
fi
# A CPU share per task, so that PER_GPU tasks fit the "#SBATCH --ntasks-per-node=1" allocation.
cpu_share=()
if [[ -n "${SLURM_CPUS_ON_NODE:-}" ]] && (( SLURM_CPUS_ON_NODE >= tasks_per_node )); then
  cpu_share=("--cpus-per-task=$((SLURM_CPUS_ON_NODE / tasks_per_node))")
fi

cmd=(srun "--nodes=$nodes" "--ntasks=$((nodes * tasks_per_node))" "--ntasks-per-node=$tasks_per_node"
  "${cpu_share[@]}" "${placement[@]}" --kill-on-bad-exit=1 "${srun_args[@]}"
  "$PYTHON" -m rsa_jax train "$CONFIG" "train.run_dir=$RUN_DIR" "${overrides[@]}")

if [[ "$DRY_RUN" == 1 ]]; then
  [[ -n "${JAX_LOCAL_DEVICE_IDS:-}" ]] && show export "JAX_LOCAL_DEVICE_IDS=$JAX_LOCAL_DEVICE_IDS"
  show "${cmd[@]}"
  exit 0
fi

cd "${SLURM_SUBMIT_DIR:-$PWD}"
echo "slurm_gpu.sh: job $SLURM_JOB_ID, $nodes node(s) x $tasks_per_node process(es), run dir $RUN_DIR"
# The trainer's exit codes (rsa_jax/training/_control.py): 0 done, 1 failed, 2 config error,
# 75 preempted (EX_TEMPFAIL: state saved, rerun to resume).
EXIT_PREEMPTED=75
finish() {
  local rc="$1"
  if (( rc == 0 )); then
    echo "slurm_gpu.sh: the run finished"
    exit 0
  elif (( rc == EXIT_PREEMPTED )); then
    echo "slurm_gpu.sh: the run was preempted (state saved); requeueing job $SLURM_JOB_ID" >&2
    scontrol requeue "$SLURM_JOB_ID" || echo "slurm_gpu.sh: scontrol requeue failed" >&2
    exit "$EXIT_PREEMPTED"
  fi
  echo "slurm_gpu.sh: the trainer exited with $rc; not requeued" >&2
  exit "$rc"
}
# srun runs in the background so that this shell can take the SIGTERM sent before the time limit.
on_term() {
  echo "slurm_gpu.sh: SIGTERM: asking the tasks to save" >&2
  kill -TERM "$srun_pid" 2>/dev/null || true
  local rc=0
  wait "$srun_pid" || rc=$?
  finish "$rc"
}
trap on_term TERM
"${cmd[@]}" &
srun_pid=$!
rc=0
wait "$srun_pid" || rc=$?
finish "$rc"
