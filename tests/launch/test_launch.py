"""The `launch/` scripts: DRY_RUN=1 prints exactly the commands they would run, and without it
they run those commands (checked with fake `gcloud`, `srun` and python executables on PATH)."""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = ROOT / "launch"

# Variables that a developer's shell or CI might carry and that would change what a script does.
_SCRUB = (
    "CONFIG", "RUN_DIR", "OVERRIDES", "PYTHON", "DRY_RUN", "NUM_PROCESSES", "CPU_DEVICES",
    "COORDINATOR_PORT", "PER_GPU", "GPUS_PER_NODE", "SRUN_ARGS", "TPU_NAME", "ZONE", "PROJECT",
    "REMOTE_DIR", "REMOTE_ENV", "DETACH", "SSH_ARGS", "GCLOUD", "NUM_SLICES", "QR_ID",
    "MEGASCALE_COORDINATOR_ADDRESS", "MEGASCALE_PORT", "LIBTPU_INIT_ARGS", "XLA_FLAGS",
    "JAX_LOCAL_DEVICE_IDS",
)  # fmt: skip


def run_script(name: str, env: dict[str, str], path_prefix: Path | None = None):
    base = {k: v for k, v in os.environ.items() if k not in _SCRUB and not k.startswith("SLURM_")}
    if path_prefix is not None:
        base["PATH"] = f"{path_prefix}{os.pathsep}{base['PATH']}"
    return subprocess.run(
        ["bash", str(LAUNCH / name)],
        env={**base, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )


def printed_commands(result) -> list[str]:
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines and all(line.startswith("+ ") for line in lines), result.stdout
    return [line[2:] for line in lines]


def fake_executable(directory: Path, name: str, body: str = "") -> Path:
    """A script that appends its arguments (one per line, then a blank line) to calls.log."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    log = directory / "calls.log"
    # One write(2) per call (cat of a small file), so that concurrent calls do not interleave
    # their lines: bash's printf may write a long record line by line.
    path.write_text(
        f'#!/usr/bin/env bash\nrecord="$(mktemp)"\nprintf "%s\\n" "$0" "$@" "" > "$record"\n'
        f'cat "$record" >> {shlex.quote(str(log))}\nrm -f "$record"\n{body}\n'
    )
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


# A stand-in for a trainer that runs until SIGTERM, then exits 0 (its sleep must not outlive it:
# it would hold the captured output open).
SLEEP_UNTIL_TERM = (
    "sleep 20 > /dev/null 2>&1 &\nchild=$!\ntrap 'kill $child; exit 0' TERM\nwait $child"
)


def recorded_calls(directory: Path) -> list[list[str]]:
    text = (directory / "calls.log").read_text()
    calls = [block.splitlines() for block in text.split("\n\n") if block.strip()]
    return [[os.path.basename(call[0])] + call[1:] for call in calls]


# --------------------------------------------------------------------------- single_host.sh


def test_single_host_one_process():
    result = run_script(
        "single_host.sh",
        {
            "CONFIG": "configs/tiny.yaml",
            "OVERRIDES": "stages.1.beta=0.05 train.seed=3",
            "DRY_RUN": "1",
        },
    )
    (command,) = printed_commands(result)
    assert shlex.split(command) == [
        "python", "-m", "rsa_jax", "train", "configs/tiny.yaml", "train.run_dir=runs/tiny",
        "stages.1.beta=0.05", "train.seed=3",
    ]  # fmt: skip


def test_single_host_local_processes_get_the_three_jax_variables():
    env = {
        "CONFIG": "configs/tiny.yaml",
        "RUN_DIR": "/tmp/r",
        "NUM_PROCESSES": "3",
        "COORDINATOR_PORT": "23456",
        "CPU_DEVICES": "4",
        "DRY_RUN": "1",
    }
    commands = printed_commands(run_script("single_host.sh", env))
    assert commands[0] == "mkdir -p /tmp/r/logs"
    assert commands[-1] == "wait"
    launches = commands[1:-1]
    assert len(launches) == 3
    for i, line in enumerate(launches):
        assert line.endswith("&")
        argv = shlex.split(line.removesuffix("&"))
        assert argv[:6] == [
            "env", "JAX_PLATFORMS=cpu", "JAX_COORDINATOR_ADDRESS=127.0.0.1:23456",
            "JAX_NUM_PROCESSES=3", f"JAX_PROCESS_ID={i}", "JAX_NUM_CPU_DEVICES=4",
        ]  # fmt: skip
        train = ["python", "-m", "rsa_jax", "train", "configs/tiny.yaml", "train.run_dir=/tmp/r"]
        if i == 0:
            assert argv[6:] == train
        else:
            assert argv[6:] == [*train, ">", f"/tmp/r/logs/process_{i}.log", "2>&1"]


def test_single_host_runs_what_it_prints(tmp_path):
    fake = fake_executable(tmp_path / "bin", "python")
    env = {"CONFIG": "configs/tiny.yaml", "RUN_DIR": str(tmp_path / "run"), "PYTHON": str(fake)}
    env["OVERRIDES"] = "stages.0.beta=0.2"
    printed = printed_commands(run_script("single_host.sh", {**env, "DRY_RUN": "1"}))
    result = run_script("single_host.sh", env)
    assert result.returncode == 0, result.stderr
    assert recorded_calls(tmp_path / "bin") == [["python", *shlex.split(printed[0])[1:]]]


def test_single_host_local_processes_run_and_a_failure_stops_the_run(tmp_path):
    # Process 1 fails at once; process 0 would hang in a collective: the script must stop it.
    # Process 1 first waits (up to 5 s) until both processes have recorded their call: else the
    # script may stop process 0 before its first line runs, and the test sees one call (a race
    # seen once on a loaded 2-core CI machine).
    log = shlex.quote(str(tmp_path / "bin" / "calls.log"))
    wait = f'for _ in $(seq 50); do (( $(grep -c "^$" {log}) >= 2 )) && break; sleep 0.1; done'
    body = f'[[ "$JAX_PROCESS_ID" == 1 ]] && {{ {wait}; exit 3; }}\n' + SLEEP_UNTIL_TERM
    fake = fake_executable(tmp_path / "bin", "python", body)
    env = {
        "CONFIG": "configs/tiny.yaml",
        "RUN_DIR": str(tmp_path / "run"),
        "PYTHON": str(fake),
        "NUM_PROCESSES": "2",
    }
    start = time.monotonic()
    result = run_script("single_host.sh", env)
    assert time.monotonic() - start < 10, "process 0 was not stopped"
    assert result.returncode != 0
    assert "stopping the others" in result.stderr
    assert len(recorded_calls(tmp_path / "bin")) == 2


def test_single_host_local_processes_succeed(tmp_path):
    fake = fake_executable(
        tmp_path / "bin", "python", 'echo "id=$JAX_PROCESS_ID of $JAX_NUM_PROCESSES"'
    )
    env = {
        "CONFIG": "configs/tiny.yaml",
        "RUN_DIR": str(tmp_path / "run"),
        "PYTHON": str(fake),
        "NUM_PROCESSES": "2",
    }
    result = run_script("single_host.sh", env)
    assert result.returncode == 0, result.stderr
    assert "id=0 of 2" in result.stdout
    assert "id=1 of 2" in (tmp_path / "run" / "logs" / "process_1.log").read_text()


def start_script(name: str, env: dict[str, str], path_prefix: Path | None = None):
    base = {k: v for k, v in os.environ.items() if k not in _SCRUB and not k.startswith("SLURM_")}
    if path_prefix is not None:
        base["PATH"] = f"{path_prefix}{os.pathsep}{base['PATH']}"
    return subprocess.Popen(
        ["bash", str(LAUNCH / name)],
        env={**base, **env},
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_calls(directory: Path, count: int) -> None:
    for _ in range(200):
        if (directory / "calls.log").exists() and len(recorded_calls(directory)) >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"fewer than {count} calls in {directory}")


def test_single_host_one_process_passes_the_exit_code_through(tmp_path):
    fake = fake_executable(tmp_path / "bin", "python", "exit 75")
    env = {"CONFIG": "configs/tiny.yaml", "RUN_DIR": str(tmp_path / "run"), "PYTHON": str(fake)}
    assert run_script("single_host.sh", env).returncode == 75


def test_single_host_preempted_processes_exit_75_and_stop_the_others(tmp_path):
    # Process 1 is preempted on its own; the script asks process 0 to stop, which saves and
    # exits 75 too: the run as a whole is preempted, not failed.
    # (process 1 waits until process 0 has installed its trap)
    body = '[[ "$JAX_PROCESS_ID" == 1 ]] && sleep 0.5 && exit 75\n' + SLEEP_UNTIL_TERM.replace(
        "exit 0", "exit 75"
    )
    fake = fake_executable(tmp_path / "bin", "python", body)
    env = {"CONFIG": "c.yaml", "RUN_DIR": str(tmp_path / "run"), "PYTHON": str(fake)}
    start = time.monotonic()
    result = run_script("single_host.sh", {**env, "NUM_PROCESSES": "2"})
    assert time.monotonic() - start < 10, "process 0 was not stopped"
    assert result.returncode == 75, result.stderr
    assert "a process was preempted (exit 75); stopping the others" in result.stderr


def test_single_host_a_failure_among_preempted_processes_is_a_failure(tmp_path):
    body = '[[ "$JAX_PROCESS_ID" == 1 ]] && exit 3\n' + SLEEP_UNTIL_TERM.replace(
        "exit 0", "exit 75"
    )
    fake = fake_executable(tmp_path / "bin", "python", body)
    env = {"CONFIG": "c.yaml", "RUN_DIR": str(tmp_path / "run"), "PYTHON": str(fake)}
    result = run_script("single_host.sh", {**env, "NUM_PROCESSES": "2"})
    assert result.returncode == 1, result.stderr


def test_single_host_forwards_sigterm_to_every_process(tmp_path):
    body = SLEEP_UNTIL_TERM.replace("exit 0", f'echo "$JAX_PROCESS_ID" >> {tmp_path}/saved; exit 0')
    fake = fake_executable(tmp_path / "bin", "python", body)
    env = {"CONFIG": "c.yaml", "RUN_DIR": str(tmp_path / "run"), "PYTHON": str(fake)}
    proc = start_script("single_host.sh", {**env, "NUM_PROCESSES": "3"})
    wait_for_calls(tmp_path / "bin", 3)
    time.sleep(0.3)  # let each fake install its trap
    proc.terminate()
    _, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    assert sorted((tmp_path / "saved").read_text().split()) == ["0", "1", "2"]


# --------------------------------------------------------------------------- slurm_gpu.sh

SLURM = {
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NUM_NODES": "4",
    "SLURM_NNODES": "4",
    "SLURM_CPUS_ON_NODE": "96",
    "SLURM_GPUS_ON_NODE": "8",
    "SLURM_NTASKS": "4",
}


def test_slurm_header_requests_requeue_and_an_early_sigterm():
    header = [line for line in (LAUNCH / "slurm_gpu.sh").read_text().splitlines()]
    sbatch = [line.split(None, 1)[1] for line in header if line.startswith("#SBATCH")]
    assert "--requeue" in sbatch
    assert "--signal=B:TERM@120" in sbatch
    assert "--ntasks-per-node=1" in sbatch


def test_slurm_one_process_per_node():
    env = {**SLURM, "CONFIG": "configs/rsa_cvar.yaml", "RUN_DIR": "/shared/rsa", "DRY_RUN": "1"}
    env["OVERRIDES"] = "stages.1.beta=0.05 model.path=/m"
    export, srun = printed_commands(run_script("slurm_gpu.sh", env))
    assert export == "export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7"
    assert shlex.split(srun) == [
        "srun", "--nodes=4", "--ntasks=4", "--ntasks-per-node=1", "--cpus-per-task=96",
        "--kill-on-bad-exit=1", "python", "-m", "rsa_jax", "train", "configs/rsa_cvar.yaml",
        "train.run_dir=/shared/rsa", "stages.1.beta=0.05", "model.path=/m",
    ]  # fmt: skip


def test_slurm_one_process_per_gpu():
    env = {**SLURM, "CONFIG": "configs/dpo.yaml", "PER_GPU": "1", "GPUS_PER_NODE": "4"}
    env.update(DRY_RUN="1", SRUN_ARGS="--mpi=none", PYTHON=".venv/bin/python")
    (srun,) = printed_commands(run_script("slurm_gpu.sh", env))
    assert shlex.split(srun) == [
        "srun", "--nodes=4", "--ntasks=16", "--ntasks-per-node=4", "--cpus-per-task=24",
        "--gpu-bind=none", "--kill-on-bad-exit=1", "--mpi=none", ".venv/bin/python", "-m",
        "rsa_jax", "train", "configs/dpo.yaml", "train.run_dir=runs/dpo",
    ]  # fmt: skip


def test_slurm_runs_what_it_prints(tmp_path):
    bin_dir = tmp_path / "bin"
    fake_executable(bin_dir, "srun", 'echo "ids=$JAX_LOCAL_DEVICE_IDS"')
    env = {**SLURM, "CONFIG": "configs/dpo.yaml", "SLURM_SUBMIT_DIR": str(ROOT)}
    printed = printed_commands(run_script("slurm_gpu.sh", {**env, "DRY_RUN": "1"}))
    result = run_script("slurm_gpu.sh", env, path_prefix=bin_dir)
    assert result.returncode == 0, result.stderr
    assert recorded_calls(bin_dir) == [shlex.split(printed[-1])]
    assert "ids=0,1,2,3,4,5,6,7" in result.stdout


def slurm_sigterm(tmp_path, exit_code: int):
    """Runs slurm_gpu.sh with a fake step that, on SIGTERM, records it and exits `exit_code`
    (the trainer: 75 preempted with its state saved, 0 when the signal came in the last step);
    sends the batch shell SIGTERM as --signal=B:TERM@120 does."""
    bin_dir = tmp_path / "bin"
    term_file = tmp_path / "term"
    fake_executable(
        bin_dir,
        "srun",
        SLEEP_UNTIL_TERM.replace("exit 0", f"echo got-term > {term_file}; exit {exit_code}"),
    )
    fake_executable(bin_dir, "scontrol")
    env = {**SLURM, "CONFIG": "configs/dpo.yaml", "SLURM_SUBMIT_DIR": str(ROOT)}
    proc = start_script("slurm_gpu.sh", env, path_prefix=bin_dir)
    wait_for_calls(bin_dir, 1)
    time.sleep(0.3)  # let the fake step install its trap
    proc.terminate()
    _, err = proc.communicate(timeout=15)
    assert (tmp_path / "term").read_text() == "got-term\n"
    return proc.returncode, err, recorded_calls(bin_dir)


def test_slurm_sigterm_forwards_and_requeues_a_preempted_run(tmp_path):
    returncode, err, calls = slurm_sigterm(tmp_path, 75)
    assert returncode == 75, err
    assert calls[-1] == ["scontrol", "requeue", "4242"]
    assert "preempted" in err


def test_slurm_sigterm_during_the_last_step_is_a_finished_run_not_requeued(tmp_path):
    returncode, err, calls = slurm_sigterm(tmp_path, 0)
    assert returncode == 0, err
    assert [c[0] for c in calls] == ["srun"]


@pytest.mark.parametrize(("code", "requeued"), [(75, True), (1, False), (2, False), (0, False)])
def test_slurm_acts_on_the_trainer_exit_code(tmp_path, code, requeued):
    # No SIGTERM to the batch shell: the tasks stopped by themselves (e.g. signalled directly).
    bin_dir = tmp_path / "bin"
    fake_executable(bin_dir, "srun", f"exit {code}")
    fake_executable(bin_dir, "scontrol")
    env = {**SLURM, "CONFIG": "configs/dpo.yaml", "SLURM_SUBMIT_DIR": str(ROOT)}
    result = run_script("slurm_gpu.sh", env, path_prefix=bin_dir)
    assert result.returncode == code, result.stderr
    calls = recorded_calls(bin_dir)
    assert (calls[-1] == ["scontrol", "requeue", "4242"]) is requeued
    assert len(calls) == 1 + requeued
    if code not in (0, 75):
        assert f"exited with {code}; not requeued" in result.stderr


@pytest.mark.parametrize(
    ("env", "missing"),
    [
        ({"SLURM_JOB_ID": "1", "SLURM_JOB_NUM_NODES": "2"}, "CONFIG"),
        ({"CONFIG": "configs/dpo.yaml", "SLURM_JOB_NUM_NODES": "2"}, "SLURM_JOB_ID"),
    ],
)
def test_slurm_missing_variable(env, missing):
    result = run_script("slurm_gpu.sh", {**env, "DRY_RUN": "1"})
    assert result.returncode != 0
    assert result.stdout == ""
    assert f"{missing} is not set" in result.stderr


# --------------------------------------------------------------------------- tpu_pod.sh

TPU = {"CONFIG": "configs/rsa_cvar.yaml", "TPU_NAME": "v5p-32", "ZONE": "us-east5-a"}
TRAIN = (
    "python3 -m rsa_jax train configs/rsa_cvar.yaml train.run_dir=/mnt/runs/rsa stages.1.beta=0.05"
)


def tpu_env(**extra):
    return {**TPU, "RUN_DIR": "/mnt/runs/rsa", "OVERRIDES": "stages.1.beta=0.05", **extra}


def test_tpu_one_slice_all_workers():
    env = tpu_env(PROJECT="proj", XLA_FLAGS="--xla_dump_to=/tmp/x --xla_foo", DRY_RUN="1")
    (command,) = printed_commands(run_script("tpu_pod.sh", env))
    argv = shlex.split(command)
    assert argv[:-2] == [
        "gcloud", "compute", "tpus", "tpu-vm", "ssh", "v5p-32", "--zone", "us-east5-a",
        "--project", "proj", "--worker=all",
    ]  # fmt: skip
    assert argv[-2] == "--command"
    remote = argv[-1]
    assert remote == (
        "cd rsa_jax && export RSA_JAX_DISTRIBUTED=1 'XLA_FLAGS=--xla_dump_to=/tmp/x --xla_foo' && "
        f"{TRAIN}"
    )
    # The remote shell reads the exported value back whole.
    assert shlex.split(remote.split(" && ")[1]) == [
        "export",
        "RSA_JAX_DISTRIBUTED=1",
        "XLA_FLAGS=--xla_dump_to=/tmp/x --xla_foo",
    ]


def test_tpu_detached():
    env = tpu_env(DETACH="1", REMOTE_DIR="/opt/rsa", PYTHON=".venv/bin/python", DRY_RUN="1")
    (command,) = printed_commands(run_script("tpu_pod.sh", env))
    remote = shlex.split(command)[-1]
    train = TRAIN.replace("python3", ".venv/bin/python")
    assert remote == (
        f"cd /opt/rsa && export RSA_JAX_DISTRIBUTED=1 && nohup {train} > train.log 2>&1 "
        "< /dev/null &"
    )


def test_tpu_multislice_queued_resource():
    env = tpu_env(NUM_SLICES="2", QR_ID="qr-1", DRY_RUN="1")
    (command,) = printed_commands(run_script("tpu_pod.sh", env))
    assert shlex.split(command) == [
        "gcloud", "compute", "tpus", "queued-resources", "ssh", "qr-1", "--zone", "us-east5-a",
        "--node=all", "--worker=all", "--command",
        f"cd rsa_jax && export RSA_JAX_DISTRIBUTED=1 && {TRAIN}",
    ]  # fmt: skip


def test_tpu_multislice_manual_exports_megascale_per_slice():
    env = tpu_env(NUM_SLICES="3", MEGASCALE_COORDINATOR_ADDRESS="10.1.2.3", DRY_RUN="1")
    commands = printed_commands(run_script("tpu_pod.sh", env))
    assert commands[-1] == "wait"
    assert len(commands) == 4
    for slice_id, line in enumerate(commands[:-1]):
        assert line.endswith(" &")
        argv = shlex.split(line.removesuffix(" &"))
        assert argv[5] == f"v5p-32-{slice_id}"
        assert "--worker=all" in argv
        assert argv[-1] == (
            "cd rsa_jax && export RSA_JAX_DISTRIBUTED=1 MEGASCALE_COORDINATOR_ADDRESS=10.1.2.3:8080"
            f" MEGASCALE_NUM_SLICES=3 MEGASCALE_SLICE_ID={slice_id} MEGASCALE_PORT=8080 && {TRAIN}"
        )


@pytest.mark.parametrize(("codes", "expected"), [((75, 75), 75), ((75, 0), 75), ((75, 4), 1)])
def test_tpu_manual_multislice_exit_code(tmp_path, codes, expected):
    bin_dir = tmp_path / "bin"
    # The fake ssh exits with its slice's code (the slice id is in the remote command).
    body = "\n".join(f'[[ "$*" == *MEGASCALE_SLICE_ID={i}* ]] && exit {c}' for i, c in
                     enumerate(codes)) + "\nexit 0"  # fmt: skip
    fake_executable(bin_dir, "gcloud", body)
    env = tpu_env(NUM_SLICES="2", MEGASCALE_COORDINATOR_ADDRESS="10.1.2.3")
    result = run_script("tpu_pod.sh", env, path_prefix=bin_dir)
    assert result.returncode == expected, result.stderr
    assert "slice 0 was preempted" in result.stderr


def test_tpu_one_slice_passes_the_exit_code_through(tmp_path):
    bin_dir = tmp_path / "bin"
    fake_executable(bin_dir, "gcloud", "exit 75")
    assert run_script("tpu_pod.sh", tpu_env(), path_prefix=bin_dir).returncode == 75


def test_tpu_runs_what_it_prints(tmp_path):
    bin_dir = tmp_path / "bin"
    fake_executable(bin_dir, "gcloud")
    env = tpu_env(
        NUM_SLICES="2", MEGASCALE_COORDINATOR_ADDRESS="10.1.2.3:9000", SSH_ARGS="--internal-ip"
    )
    printed = printed_commands(run_script("tpu_pod.sh", {**env, "DRY_RUN": "1"}))
    result = run_script("tpu_pod.sh", env, path_prefix=bin_dir)
    assert result.returncode == 0, result.stderr
    expected = [shlex.split(line.removesuffix(" &")) for line in printed[:-1]]
    assert sorted(recorded_calls(bin_dir)) == sorted(expected)
    assert "--internal-ip" in expected[0]
    assert "MEGASCALE_COORDINATOR_ADDRESS=10.1.2.3:9000 " in expected[0][-1]


@pytest.mark.parametrize("missing", ["CONFIG", "TPU_NAME", "ZONE"])
def test_tpu_missing_required_variable(missing):
    env = {k: v for k, v in TPU.items() if k != missing}
    result = run_script("tpu_pod.sh", {**env, "DRY_RUN": "1"})
    assert result.returncode != 0
    assert result.stdout == ""
    assert f"{missing} is not set" in result.stderr


def test_tpu_manual_multislice_needs_the_coordinator():
    result = run_script("tpu_pod.sh", tpu_env(NUM_SLICES="2", DRY_RUN="1"))
    assert result.returncode != 0
    assert "MEGASCALE_COORDINATOR_ADDRESS is not set" in result.stderr


def test_single_host_missing_config():
    result = run_script("single_host.sh", {"DRY_RUN": "1"})
    assert result.returncode != 0
    assert result.stdout == ""
    assert "CONFIG is not set" in result.stderr
