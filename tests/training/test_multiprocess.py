"""The trainer as two JAX processes x 4 CPU devices (one 8-device global mesh, gloo collectives)
equals the one-process 8-device run; each process places only its rows of every global batch;
checkpoints move between the two topologies in both directions.

The runs go through `multiprocess_worker.py` in subprocesses (one per JAX process).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from rsa_jax.data import write_toy_data
from rsa_jax.training._mesh import distributed_request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
WORKER = os.path.join(HERE, "multiprocess_worker.py")
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
STAGE_STEPS = (4, 3)  # global steps 1-4 stage 0, 5-7 stage 1 (reference = stage-0 policy)
OVERRIDES = [
    "stages.0.view=safety",
    f"stages.0.steps={STAGE_STEPS[0]}",
    f"stages.1.steps={STAGE_STEPS[1]}",
    "checkpoint.every=1",
    "checkpoint.keep=20",
    "optim.learning_rate=3e-3",
    "data.batch_size=8",  # the rows of a microbatch's pairs divide over the 8 data shards
    # Stage 2 starts with policy == reference, where the token log-ratios are rounding noise;
    # cvar_reference's tail selection ranks that noise, so its gradient there jumps with the last
    # bit of the parameters: 2 processes (gloo all-reduce) vs 1 then end 0.1 apart (measured).
    # The smooth entropic risk keeps the comparison well-conditioned.
    "stages.1.risk=erm",
    # AdamW moves each entry by lr * g / (|g| + eps). Entries with |g| near eps = 1e-8 (rare
    # tokens' embedding rows, stage 2's first step) are made of the gradient sum's rounding, and
    # the order of that sum differs between one process and two (gloo): with eps = 1e-8 the
    # parameters end 8e-4 apart (relative to each tensor's largest entry, measured) while every
    # logged metric agrees to 7e-6. A larger eps keeps such entries' updates proportional to g.
    "optim.eps=1e-4",
]
TOTAL = sum(STAGE_STEPS)
ROWS = 16  # 2 * data.batch_size
RTOL = 1e-5


# --------------------------------------------------------------------------- environment parsing


def test_distributed_request_from_the_environment():
    explicit = {
        "JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234",
        "JAX_NUM_PROCESSES": "4",
        "JAX_PROCESS_ID": "3",
    }
    assert distributed_request(explicit) == dict(
        coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3
    )
    one = {**explicit, "JAX_NUM_PROCESSES": "1", "JAX_PROCESS_ID": "0"}
    assert distributed_request(one) is None
    with pytest.raises(ValueError, match="JAX_PROCESS_ID"):
        distributed_request({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"})
    with pytest.raises(ValueError, match="not in"):
        distributed_request({**explicit, "JAX_PROCESS_ID": "4"})
    assert distributed_request({}) is None
    assert distributed_request({"SLURM_NTASKS": "1", "SLURM_JOB_ID": "7"}) is None
    assert distributed_request({"SLURM_NTASKS": "8", "SLURM_JOB_ID": "7"}) == {}
    assert distributed_request({"OMPI_COMM_WORLD_SIZE": "2"}) == {}
    assert distributed_request({"TPU_WORKER_HOSTNAMES": "t0"}) is None
    assert distributed_request({"TPU_WORKER_HOSTNAMES": "t0,t1"}) == {}
    assert distributed_request({"RSA_JAX_DISTRIBUTED": "1"}) == {}
    assert distributed_request({"RSA_JAX_DISTRIBUTED": "0"}) is None
    assert distributed_request({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.2:8080"}) == {}


def test_data_iterator_state_written_by_two_processes_restores_in_one(tmp_path):
    import grain
    from etils import epath

    from rsa_jax.training._checkpoint import DataIterHandler, DataIterRestore

    it = iter(grain.MapDataset.range(20).to_iter_dataset(grain.ReadOptions(num_threads=0)))
    for name in ("process_0-of-2.json", "process_1-of-2.json"):
        (tmp_path / name).write_text(json.dumps({"next_index": 5}))
    DataIterHandler().restore(epath.Path(tmp_path), DataIterRestore(it))
    assert next(it) == 5
    # Processes that disagree (not this pipeline's global position) cannot be merged.
    (tmp_path / "process_1-of-2.json").write_text(json.dumps({"next_index": 6}))
    with pytest.raises(ValueError, match="differ"):
        DataIterHandler().restore(epath.Path(tmp_path), DataIterRestore(it))


# --------------------------------------------------------------------------- runs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(processes: int, run_dir: str, out_dir: str, data_path: str, timeout: int = 900) -> None:
    """One run of the worker as `processes` JAX processes of 8 / processes devices each."""
    args = [*OVERRIDES, f"data.path={data_path}", f"train.run_dir={run_dir}"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TOKENIZERS_PARALLELISM": "false"}
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(name, None)
    port = _free_port()
    procs = []
    for i in range(processes):
        if processes > 1:
            env = {
                **env,
                "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                "JAX_NUM_PROCESSES": str(processes),
                "JAX_PROCESS_ID": str(i),
            }
        cmd = [sys.executable, WORKER, str(8 // processes), out_dir, TINY, *args]
        procs.append(
            subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    outputs = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            out, _ = proc.communicate()
            out += f"\n[timed out after {timeout} s]"
        outputs.append(out)
    report = "\n".join(f"--- process {i} ---\n{out[-4000:]}" for i, out in enumerate(outputs))
    for i, (proc, out) in enumerate(zip(procs, outputs, strict=True)):
        assert proc.returncode == 0, report
        done = f"process {i} of {processes} on 8 devices: done at global step {TOTAL}"
        assert done in out, report


def _records(run_dir: str) -> dict:
    out = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            out[(r["stage"], r["step"])] = r  # the last record wins (a resumed run repeats steps)
    return out


def _rows(out_dir: str, process: int) -> list[dict[str, np.ndarray]]:
    with np.load(os.path.join(out_dir, f"rows_{process}.npz")) as z:
        steps = sorted({int(k.split("/")[0]) for k in z.files})
        return [{k.split("/")[1]: z[k] for k in z.files if k.startswith(f"{t}/")} for t in steps]


def _params(out_dir: str) -> dict[str, np.ndarray]:
    with np.load(os.path.join(out_dir, "params.npz")) as z:
        return {k: z[k] for k in z.files}


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _assert_same_run(run_dir, out_dir, base_dir, base_out, label):
    """Every logged metric and final parameter within RTOL of the baseline, relative to the
    largest magnitude that metric or tensor takes (a metric that is 0 in exact arithmetic, like
    stage 2's first margins, is rounding noise at its own scale)."""
    rec, base = _records(run_dir), _records(base_dir)
    assert sorted(rec) == sorted(base) and len(base) == TOTAL, (sorted(rec), sorted(base))
    timing = {"tokens_per_s", "pairs_per_s", "step_time_s", "mfu", "compile_s"}
    timing |= {"stage", "step", "global_step"}
    names = sorted(k for k in next(iter(base.values())) if k not in timing)
    assert "loss" in names and "rewards/margins" in names, names
    worst_metric = (0.0, "")
    for name in names:
        scale = max(abs(b[name]) for b in base.values()) or 1.0
        for key, b in base.items():
            if name == "rewards/accuracies" and key == (1, 1):
                continue  # the fraction of margins > 0 where every margin is rounding noise
            diff = abs(rec[key][name] - b[name]) / scale
            worst_metric = max(worst_metric, (diff, f"{name} at {key}"))
            assert diff <= RTOL, (label, key, name, rec[key][name], b[name], scale)
    worst_loss = max(abs(rec[k]["loss"] - b["loss"]) / abs(b["loss"]) for k, b in base.items())
    params, base_params = _params(out_dir), _params(base_out)
    assert sorted(params) == sorted(base_params)
    worst_param = max(_rel(params[k], base_params[k]) for k in base_params)
    print(
        f"{label}: max relative difference: loss {worst_loss:.2e}, any metric "
        f"{worst_metric[0]:.2e} ({worst_metric[1]}), parameters {worst_param:.2e}"
    )
    assert worst_param <= RTOL, (label, worst_param)


def _truncate(src_run, dst_run, keep_through: int) -> None:
    """A copy of a finished run as if it had been killed right after checkpoint `keep_through`."""
    shutil.copytree(src_run, dst_run)
    ckpts = os.path.join(dst_run, "checkpoints")
    for name in os.listdir(ckpts):
        if name.isdigit() and int(name) > keep_through:
            shutil.rmtree(os.path.join(ckpts, name))
    with open(os.path.join(src_run, "metrics.jsonl")) as f:
        kept = [line for line in f if json.loads(line)["global_step"] <= keep_through]
    with open(os.path.join(dst_run, "metrics.jsonl"), "w") as f:
        f.writelines(kept)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The one-process 8-device run and the two-process 2 x 4-device run of the same config."""
    root = tmp_path_factory.mktemp("multiprocess")
    data_path = str(root / "pairs.jsonl")
    write_toy_data(data_path, rows=48)
    dirs = {}
    for processes in (1, 2):
        run_dir, out_dir = str(root / f"run{processes}"), str(root / f"out{processes}")
        _run(processes, run_dir, out_dir, data_path)
        dirs[processes] = (run_dir, out_dir)
    return root, data_path, dirs


@pytest.mark.slow  # two tiny runs, one of them as two processes (about 2-3 min on 2 cores)
def test_two_processes_equal_one_process(runs):
    _, _, dirs = runs
    (one_run, one_out), (two_run, two_out) = dirs[1], dirs[2]
    _assert_same_run(two_run, two_out, one_run, one_out, "2 processes vs 1")
    # One writer: one record per step, one config, one event file.
    with open(os.path.join(two_run, "metrics.jsonl")) as f:
        assert sum(1 for _ in f) == TOTAL
    json.loads(open(os.path.join(two_run, "config.json")).read())
    assert len(os.listdir(os.path.join(two_run, "tensorboard"))) == 1
    # Each process saved its own data iterator position in every checkpoint.
    for step in range(1, TOTAL + 1):
        item = os.path.join(two_run, "checkpoints", str(step), "data_iter")
        files = [f for f in os.listdir(item) if f.startswith("process_")]
        assert sorted(f for f in files if f.endswith(".json")) == [  # each with its .sha256
            "process_0-of-2.json",
            "process_1-of-2.json",
        ], (step, files)
        assert sorted(f for f in files if f.endswith(".sha256")) == [
            "process_0-of-2.sha256",
            "process_1-of-2.sha256",
        ], (step, files)


@pytest.mark.slow
def test_each_process_places_only_its_rows(runs):
    _, _, dirs = runs
    whole = _rows(dirs[1][1], 0)
    halves = [_rows(dirs[2][1], p) for p in (0, 1)]
    assert len(whole) == TOTAL and [len(h) for h in halves] == [TOTAL, TOTAL]
    for t, batch in enumerate(whole):
        assert batch["input_ids"].shape[0] == ROWS
        for p, half in enumerate(halves):
            block = slice(p * ROWS // 2, (p + 1) * ROWS // 2)
            assert sorted(half[t]) == sorted(batch)
            for key, value in batch.items():
                np.testing.assert_array_equal(half[t][key], value[block], err_msg=f"{t} {p} {key}")


@pytest.mark.slow
def test_two_process_checkpoint_resumes_in_one_process(runs):
    root, data_path, dirs = runs
    (one_run, one_out), (two_run, _) = dirs[1], dirs[2]
    run_dir, out_dir = str(root / "resume_2_to_1"), str(root / "out_2_to_1")
    _truncate(two_run, run_dir, keep_through=2)  # mid stage 0
    _run(1, run_dir, out_dir, data_path)
    _assert_same_run(run_dir, out_dir, one_run, one_out, "2-process checkpoint resumed by 1")
    # The resumed iterator continues at the global batch after the checkpoint.
    resumed, whole = _rows(out_dir, 0), _rows(one_out, 0)
    assert len(resumed) == TOTAL - 2
    for t, batch in enumerate(resumed):
        for key, value in batch.items():
            np.testing.assert_array_equal(value, whole[t + 2][key])


@pytest.mark.slow
def test_one_process_checkpoint_resumes_in_two_processes(runs):
    root, data_path, dirs = runs
    one_run, one_out = dirs[1]
    run_dir, out_dir = str(root / "resume_1_to_2"), str(root / "out_1_to_2")
    _truncate(one_run, run_dir, keep_through=STAGE_STEPS[0] + 1)  # mid stage 1
    _run(2, run_dir, out_dir, data_path)
    _assert_same_run(run_dir, out_dir, one_run, one_out, "1-process checkpoint resumed by 2")
    whole = _rows(one_out, 0)
    for p in (0, 1):
        resumed = _rows(out_dir, p)
        assert len(resumed) == TOTAL - STAGE_STEPS[0] - 1
        block = slice(p * ROWS // 2, (p + 1) * ROWS // 2)
        for t, batch in enumerate(resumed):
            for key, value in batch.items():
                np.testing.assert_array_equal(value, whole[t + STAGE_STEPS[0] + 1][key][block])
