"""LoRA / QLoRA in the engine: the state holds only adapters, the frozen base is passed once and
never donated or copied, step 1 of each stage is log 2 with zero KL and risk, a stopped and
resumed LoRA run equals the uninterrupted one bitwise, SFT's objective trains adapters too, and
the export of a LoRA run (merged and PEFT) reloads to the adapter model's logits."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from rsa_jax.cli import main
from rsa_jax.config import ConfigError, load_config
from rsa_jax.data import write_toy_data
from rsa_jax.models import load_hf
from rsa_jax.training import (
    Engine,
    NextTokenObjective,
    StopSignal,
    device_copy,
    load_adapters,
    load_policy,
    state_shardings,
    train,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
OVERRIDES = [
    "stages.0.view=safety",
    "stages.0.steps=6",
    "stages.1.steps=3",
    "checkpoint.every=1",
    "checkpoint.async_save=false",
    "optim.learning_rate=3e-3",
    "model.lora.rank=4",
    "model.lora.alpha=8",
    "model.lora.base_storage=nf4",
    "model.lora.block_size=16",
]
ADAPTER_SUFFIXES = ("_lora_a", "_lora_b")


def _config(data_path, run_dir, extra=()):
    return load_config(
        TINY, OVERRIDES + [f"data.path={data_path}", f"train.run_dir={run_dir}", *extra]
    )


def _records(run_dir):
    out = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            out[(r["stage"], r["step"])] = r
    return out


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("data") / "pairs.jsonl")
    write_toy_data(path, rows=48)
    return path


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, data_path):
    run_dir = str(tmp_path_factory.mktemp("lora"))
    result = train(_config(data_path, run_dir))
    return run_dir, result


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.lora.rank=-1", "model.lora.rank"),
        ("model.lora.alpha=0", "model.lora.alpha"),
        ("model.lora.targets=[q,qkv]", "model.lora.targets"),
        ("model.lora.targets=[q,q]", "model.lora.targets"),
        ("model.lora.dropout=1.0", "model.lora.dropout"),
        ("model.lora.dropout=-0.1", "model.lora.dropout"),
        ("model.lora.base_storage=fp8", "model.lora.base_storage"),
        ("model.lora.block_size=0", "model.lora.block_size"),
    ],
)
def test_lora_config_errors_name_the_key(override, key):
    overrides = ["model.lora.rank=4", override] if "rank" not in override else [override]
    with pytest.raises(ConfigError) as e:
        load_config(TINY, overrides)
    message = str(e.value)
    assert message.startswith(f"{key}:") and "\n" not in message, message


def test_lora_defaults_to_full_fine_tuning():
    config = load_config(TINY)
    assert config.model.lora is not None and config.model.lora.rank == 0
    assert not config.model.uses_lora
    assert not load_config(TINY, ["model.lora=null"]).model.uses_lora
    assert Engine(config, check_devices=False).model.lora is None


@pytest.mark.slow  # builds and inspects a compiled LoRA step (about 40 s on 2 cores)
def test_state_holds_only_adapters_and_the_base_is_passed_once(data_path, tmp_path):
    engine = Engine(_config(data_path, str(tmp_path)), check_devices=False)
    abstract = engine.abstract_state()
    adapters = abstract.params
    assert adapters and all(k.endswith(ADAPTER_SUFFIXES) for k in adapters)
    n_adapter = sum(x.size for x in jax.tree.leaves(adapters))
    # AdamW moments: two per adapter entry, plus scalar counts; nothing of the base.
    n_opt = sum(x.size for x in jax.tree.leaves(abstract.opt_state))
    assert 2 * n_adapter <= n_opt <= 2 * n_adapter + 8
    base = engine.base
    assert not any(k.endswith(ADAPTER_SUFFIXES) for k in base)
    n_base = sum(x.size for x in jax.tree.leaves(base))
    assert n_adapter < n_base / 5

    stage = engine.stage(0, engine.initial)
    assert stage.reference["base"] is base and stage.reference["adapters"] is None
    batch = engine.place(next(stage.batches))
    state, metrics = stage.step_fn(stage.state, stage.reference, batch, stage.hyper)
    assert float(metrics["loss"]) == pytest.approx(math.log(2), abs=1e-5)
    # The state was donated, the frozen base was not (it serves every step, both stages).
    assert all(x.is_deleted() for x in jax.tree.leaves(stage.state.params))
    assert not any(x.is_deleted() for x in jax.tree.leaves(base))
    # B moved away from zero only in the adapters; the base arrays are the same objects.
    assert any(np.abs(np.asarray(v)).max() > 0 for k, v in state.params.items() if "_lora_b" in k)

    stage2 = engine.stage(1, state.params)
    assert stage2.reference["base"] is base
    ref = stage2.reference["adapters"]
    assert set(ref) == set(state.params)
    for k in ref:  # a device copy of the stage-1 adapters, not their (donated) buffers
        np.testing.assert_array_equal(np.asarray(ref[k]), np.asarray(state.params[k]))
        assert ref[k] is not state.params[k]


@pytest.mark.slow  # the module's LoRA run (about 75 s on 2 cores)
def test_lora_stages_start_at_log_two_and_learn(lora_run):
    run_dir, result = lora_run
    assert result.status == "done" and result.global_step == 9
    rec = _records(run_dir)
    first = [rec[(0, s)]["loss"] for s in range(1, 7)]
    assert first[-1] < first[0] - 0.05, first
    for stage in (0, 1):  # stage 1: adapters vs adapters off; stage 2: vs the stage-1 adapters
        r = rec[(stage, 1)]
        assert r["loss"] == pytest.approx(math.log(2), abs=1e-5)
        for k in ("kl/chosen", "kl/rejected", "risk/chosen", "risk/rejected", "rewards/margins"):
            assert abs(r[k]) < 1e-5, (stage, k, r[k])


class _StopAfterRecords(StopSignal):
    """A stop signal that is 'received' once the run has logged `records` steps: the trainer
    checks it after each step's log, so the run stops at that exact step, saves and returns."""

    def __init__(self, run_dir, records):
        super().__init__()
        self.path, self.records = os.path.join(run_dir, "metrics.jsonl"), records

    @property
    def raised(self):
        if not self.received and os.path.exists(self.path):
            with open(self.path) as f:
                if sum(1 for _ in f) >= self.records:
                    self.received.append("SIGTERM")
        return super().raised


@pytest.mark.slow  # the module's LoRA run and two more
@pytest.mark.parametrize("stop_after", [4, 7])  # mid stage 1; mid stage 2 (reference adapters)
def test_stopped_and_resumed_lora_run_equals_uninterrupted_bitwise(
    lora_run, data_path, tmp_path, stop_after
):
    base_dir, _ = lora_run
    run_dir = str(tmp_path / "stopped")
    config = _config(data_path, run_dir)
    first = train(config, stop=_StopAfterRecords(run_dir, stop_after))
    assert first.status == "preempted" and first.global_step == stop_after
    second = train(config)
    assert second.status == "done" and second.global_step == 9
    _, expected = load_adapters(base_dir)
    _, resumed = load_adapters(run_dir)
    assert set(expected) == set(resumed)
    for k in expected:
        np.testing.assert_array_equal(np.asarray(resumed[k]), np.asarray(expected[k]), err_msg=k)
    a, b = _records(base_dir), _records(run_dir)
    assert set(a) == set(b)
    for key in a:
        assert a[key]["loss"] == b[key]["loss"], key


@pytest.mark.slow  # builds and compiles a LoRA SFT engine (about 1-2 min on 2 cores)
def test_sft_objective_trains_adapters_on_the_frozen_base(data_path, tmp_path):
    """`NextTokenObjective` on a LoRA engine (with adapter dropout): the state holds the
    adapters, the base is the frozen argument and stays alive, step 1's loss is the base
    model's cross-entropy (B = 0) computed by hand, and the loss falls."""
    engine = Engine(
        _config(data_path, str(tmp_path), ["model.lora.dropout=0.1"]), check_devices=False
    )
    batch = engine.place(next(engine.stage_batches(0)[0]))
    state = engine.new_state(device_copy(engine.initial))
    step = engine.compiled_step(NextTokenObjective(), state_shardings(state))
    hyper = engine.hyper(engine.config.stages[0], 10)
    assert hyper.dropout_key is not None
    frozen = engine.frozen(None)

    model = engine.model.module(engine.merged(engine.initial))  # the base itself: B = 0
    hidden = model(batch["input_ids"], batch["positions"], batch["attention_mask"])
    logp = jax.nn.log_softmax(model.logits(hidden), axis=-1)
    nll = -jnp.take_along_axis(logp, batch["labels"][..., None], axis=-1)[..., 0]
    mask = np.asarray(batch["loss_mask"])
    expected = float(np.asarray(nll)[mask].mean())

    losses = []
    for _ in range(6):
        state, metrics = step(state, frozen, batch, hyper)
        losses.append(float(metrics["loss"]))
    assert losses[0] == pytest.approx(expected, rel=1e-5)
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(k.endswith(ADAPTER_SUFFIXES) for k in state.params)
    assert not any(x.is_deleted() for x in jax.tree.leaves(engine.base))


def _adapter_logits(run_dir, input_ids):
    engine, adapters = load_adapters(run_dir)
    positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
    mask = jnp.ones_like(input_ids, dtype=bool)
    model = engine.model.lora.module(engine.base, adapters)
    return np.asarray(model.logits(model(input_ids, positions, mask))), positions, mask


@pytest.mark.slow  # two exports of the module's LoRA run (about 30 s on 2 cores)
def test_export_of_a_lora_run_merged_and_peft(lora_run, tmp_path, capsys):
    run_dir, _ = lora_run
    merged_dir, peft_dir = str(tmp_path / "merged"), str(tmp_path / "peft")
    assert main(["export", run_dir, merged_dir]) == 0
    assert main(["export", run_dir, peft_dir, "--peft"]) == 0

    input_ids = jnp.asarray(np.random.default_rng(0).integers(0, 200, (2, 12)), jnp.int32)
    expected, positions, mask = _adapter_logits(run_dir, input_ids)
    reloaded = load_hf(merged_dir, compute_dtype=jnp.float32)
    got = np.asarray(reloaded.logits(reloaded(input_ids, positions, mask)))
    # Merged: W + (alpha/r) A B in float32 vs x W + (alpha/r)(x A) B: rounding only.
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    # load_policy (export, eval, merge) gives the same merged model.
    engine, merged = load_policy(run_dir)
    model = engine.model.module(merged)
    np.testing.assert_allclose(
        np.asarray(model.logits(model(input_ids, positions, mask))), expected, rtol=1e-4, atol=1e-4
    )

    # The stage-1 policy of the run (adapters kept under stages/0) merges too, and differs.
    _, stage0 = load_policy(run_dir, stage=0)
    assert stage0.keys() == merged.keys()
    assert any(not np.array_equal(np.asarray(stage0[k]), np.asarray(merged[k])) for k in merged)

    with open(os.path.join(peft_dir, "adapter_config.json")) as f:
        peft_config = json.load(f)
    assert peft_config["r"] == 4 and peft_config["lora_alpha"] == 8
    tensors = load_file(os.path.join(peft_dir, "adapter_model.safetensors"))
    llama = engine.model.llama
    d = llama.hidden_size
    a = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    b = tensors["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"]
    assert a.shape == (4, d) and b.shape == (d, 4)
    # 7 targets x 2 matrices per layer.
    assert len(tensors) == 14 * llama.num_hidden_layers


@pytest.mark.slow  # trains a full run for one error line (15 s)
def test_peft_export_of_a_full_run_is_a_clear_error(tmp_path, data_path, capsys):
    run_dir = str(tmp_path / "full")
    config = load_config(
        TINY,
        [
            "stages.0.steps=1",
            "stages.1.steps=1",
            f"data.path={data_path}",
            f"train.run_dir={run_dir}",
        ],
    )
    assert train(config).status == "done"
    capsys.readouterr()  # training's own lines (its step compiles)
    assert main(["export", run_dir, str(tmp_path / "out"), "--peft"]) == 2
    err = capsys.readouterr().err
    assert "full fine-tuning run" in err and "\n" == err[-1] and err.count("\n") == 1


@pytest.mark.slow  # loads and compiles SmolLM2-135M (minutes on 2 CPU cores)
def test_qlora_stage_on_smollm2_lowers_the_loss(data_path, tmp_path):
    """One QLoRA stage (nf4 base, rank 8) of the bundled SmolLM2-135M on the toy pairs' learnable
    safety view: the first step is log 2 (adapters start at B = 0) and the loss falls."""
    model_dir = os.path.join(ROOT, "artifacts", "smollm2-135m")
    config_path = str(tmp_path / "qlora.yaml")
    with open(config_path, "w") as f:
        json.dump(
            {
                "model": {
                    "path": model_dir,
                    "compute_dtype": "float32",
                    "remat": True,
                    "lora": {"rank": 8, "alpha": 16, "base_storage": "nf4"},
                },
                "data": {
                    "path": data_path,
                    "max_prompt_len": 16,
                    "max_response_len": 16,
                    "batch_size": 4,
                    "read_threads": 0,
                },
                "optim": {"learning_rate": 1e-3, "warmup_ratio": 0.0},
                "checkpoint": {"every": 0},
                "train": {"run_dir": str(tmp_path / "run"), "progress_bar": False},
                "stages": [{"name": "safety", "view": "safety", "steps": 5}],
            },
            f,
        )  # JSON is YAML
    result = train(load_config(config_path))
    assert result.status == "done"
    rec = _records(str(tmp_path / "run"))
    losses = [rec[(0, s)]["loss"] for s in range(1, 6)]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4)
    assert losses[-1] < losses[0] - 0.1, losses


# With dropout: another 3 minutes on 2 cores, so in the slow set.
@pytest.mark.slow  # 8 simulated devices in a subprocess (about 2 minutes on 2 cores)
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_lora_step_on_8_simulated_devices_equals_one_device(dropout, device_script):
    """`lora_sharded_check.py` in a subprocess (the device count is fixed per process): the LoRA
    step with an nf4 base on meshes 8x1x1, 2x2x2, 1x4x2 equals one device after two AdamW steps,
    with the adapters and the base partitioned (tolerances as in test_sharded.py); with adapter
    dropout too (the masks do not depend on the mesh)."""
    here = os.path.dirname(os.path.abspath(__file__))
    out = device_script(os.path.join(here, "lora_sharded_check.py"), str(dropout))
    assert out["single_compiles"] == 1
    for name in ("8x1x1", "2x2x2", "1x4x2"):
        case = out[name]
        assert case["compiles"] == 1, (name, case)
        assert case["loss_diff"] <= 1e-5, (name, case)
        assert case["grad_norm_rel_diff"] <= 1e-5, (name, case)
        assert case["param_diff"] <= 1e-5, (name, case)
    for name in ("2x2x2", "1x4x2"):  # fsdp/tensor axes partition the base and the adapters
        assert out[name]["sharded_adapters"] > 0 and out[name]["sharded_base"] > 0, out[name]
