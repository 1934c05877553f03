"""`rsa-jax export RUN OUT --base DIR` end to end on a tiny QLoRA run (issue 25, item 1): the
adapters the run trained, merged into the float base DIR (PEFT's merge_and_unload), are exactly
DIR's weights plus (alpha / r) A B; the command says that this is not the trained model and which
base the run trained on; a base of another shape is refused with one line; the plain export (the
trained model) differs from it by the nf4 rounding of the base."""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rsa_jax.cli import main
from rsa_jax.config import load_config
from rsa_jax.data import write_toy_data
from rsa_jax.models import Llama, load_hf, save_hf
from rsa_jax.models._lora import LORA_A, LORA_B
from rsa_jax.training import load_adapters, train

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
OVERRIDES = [
    "stages.0.view=safety",
    "stages.0.steps=2",
    "stages.1.steps=2",
    "checkpoint.every=0",
    "optim.learning_rate=3e-3",
    "model.lora.rank=4",
    "model.lora.alpha=8",
    "model.lora.base_storage=nf4",
    "model.lora.block_size=16",
]


def _float_base(path: str, like, seed: int, **shape) -> None:
    """A float Hugging Face directory of the run's model shape (or `shape` instead), random."""
    config = dataclasses.replace(like, **shape)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)
    state = jax.tree.map(lambda s: jnp.asarray(0.05 * rng.standard_normal(s.shape), s.dtype), state)
    save_hf(nnx.merge(graphdef, state), path)


def _flat(path: str) -> dict[str, np.ndarray]:
    model = load_hf(path)
    return {
        "/".join(map(str, p)): np.asarray(v[...])
        for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("qlora_cli")
    data = str(root / "pairs.jsonl")
    write_toy_data(data, rows=16)
    run_dir = str(root / "run")
    config = load_config(TINY, [*OVERRIDES, f"data.path={data}", f"train.run_dir={run_dir}"])
    assert train(config).status == "done"
    return root, run_dir


@pytest.mark.slow  # a tiny QLoRA run (about 40 s on 2 cores) and three exports
def test_export_on_a_named_float_base_end_to_end(qlora_run, capsys):
    root, run_dir = qlora_run
    engine, adapters = load_adapters(run_dir)
    spec = engine.model.lora
    base, on_base, trained = (str(root / n) for n in ("float_base", "on_base", "trained"))
    _float_base(base, spec.llama, seed=5)

    assert main(["export", run_dir, on_base, "--base", base]) == 0
    said = capsys.readouterr().out
    assert f"the adapters merged into the float base {base}" in said, said
    assert "(they were trained on tiny)" in said, said  # not the base the run trained on
    assert "the trained model is the nf4-quantized base plus the adapters" in said, said

    got, original = _flat(on_base), _flat(base)
    assert sorted(got) == sorted(original)
    merged = 0
    for key, value in original.items():
        a, b = adapters.get(key + LORA_A), adapters.get(key + LORA_B)
        if a is None:  # embeddings, norms: the float base's own
            np.testing.assert_array_equal(got[key], value, key)
            continue
        delta = np.tensordot(np.asarray(a, np.float32), np.asarray(b, np.float32), axes=1)
        expected = value + np.float32(spec.lora.scale) * delta.reshape(value.shape)
        np.testing.assert_allclose(got[key], expected, rtol=0, atol=1e-6, err_msg=key)
        assert np.abs(delta).max() > 0, key  # the adapters trained: B moved off zero
        merged += 1
    assert merged == len(adapters) // 2

    # The plain export is the trained model, another one: on another base here, and for the
    # same base it would still differ by the nf4 rounding (tests/models/test_qlora_export.py).
    assert main(["export", run_dir, trained]) == 0
    assert "is the trained model: the nf4-dequantized base plus the adapters" in (
        capsys.readouterr().out
    )
    first = next(k for k in original if k + LORA_A in adapters)
    assert not np.allclose(_flat(trained)[first], got[first], atol=1e-3)


@pytest.mark.slow  # shares the run above
def test_export_on_a_base_of_another_shape_is_one_clear_error(qlora_run, capsys):
    root, run_dir = qlora_run
    engine, _ = load_adapters(run_dir)
    other = str(root / "other_shape")
    _float_base(other, engine.model.lora.llama, seed=6, hidden_size=32, intermediate_size=64)
    code = main(["export", run_dir, str(root / "out_other"), "--base", other])
    err = capsys.readouterr().err
    assert code != 0
    assert f"{other}: not the base these adapters were trained on" in err, err
    assert "Traceback" not in err
    assert not os.path.exists(root / "out_other") or not os.listdir(root / "out_other")


def _module_params(model) -> dict[str, np.ndarray]:
    return {
        "/".join(map(str, p)): np.asarray(v[...])
        for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }


@pytest.fixture(scope="module")
def qlora_on_a_directory(qlora_run):
    """A QLoRA run whose model.path is a float Hugging Face directory (the first run's export)."""
    root, first = qlora_run
    base = str(root / "hf_base")
    assert main(["export", first, base]) == 0
    run_dir = str(root / "run_on_dir")
    data = str(root / "pairs.jsonl")
    overrides = [*OVERRIDES, f"model.path={base}", f"data.path={data}", f"train.run_dir={run_dir}"]
    assert train(load_config(TINY, overrides)).status == "done"
    return root, base, run_dir


@pytest.mark.slow  # another tiny QLoRA run, on a model directory
def test_eval_kl_reference_of_a_qlora_run_is_its_quantized_base(qlora_on_a_directory):
    from rsa_jax.eval import load_model, quantized_base_of

    root, base, run_dir = qlora_on_a_directory
    assert quantized_base_of(run_dir, base) == "nf4"
    assert quantized_base_of(run_dir, base + "/") == "nf4"
    assert quantized_base_of(run_dir, str(root / "float_base")) is None  # another model
    assert quantized_base_of(base, base) is None  # a model directory is not a run

    off = _module_params(load_model(run_dir, adapters_off=True)[0])
    policy = _module_params(load_model(run_dir)[0])
    floating = _module_params(load_model(base)[0])
    engine, adapters = load_adapters(run_dir)
    scale = np.float32(engine.model.lora.lora.scale)
    checked = 0
    for key in off:
        a, b = adapters.get(key + LORA_A), adapters.get(key + LORA_B)
        if a is None:
            continue
        delta = np.tensordot(np.asarray(a, np.float32), np.asarray(b, np.float32), axes=1)
        # The policy is exactly the adapters-off model plus the adapters' product...
        np.testing.assert_allclose(
            policy[key], off[key] + scale * delta.reshape(off[key].shape), rtol=0, atol=1e-6
        )
        # ... and the adapters-off model is the nf4 rounding of the float base, not the float
        # base: KL against the float base would measure that rounding too.
        rounding = np.abs(off[key] - floating[key]).max()
        assert 1e-4 < rounding < 0.5 * np.abs(floating[key]).max(), (key, rounding)
        checked += 1
    assert checked == len(adapters) // 2
    with pytest.raises(ValueError, match="no adapters to turn off"):
        load_model(base, adapters_off=True)
