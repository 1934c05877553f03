"""Non-finite values never validate (issue 25, item 12): every float of the config tree, the
task file and the demo's settings; an export refuses NaN weights; two NaNs compare equal in
the resume check."""

from __future__ import annotations

import json
import os
import stat

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import nnx

from rsa_jax.config import ConfigError, load_config
from rsa_jax.demo import DemoConfig
from rsa_jax.models import Llama, LoraConfig, save_hf, save_peft, split_lora, tiny_config, to_lora
from rsa_jax.tasks import SafetyTask
from rsa_jax.training._rundir import check_resume

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")


def _constant_model(value: float = 0.01) -> Llama:
    """A tiny Llama with every weight `value`: built from shapes, without the seconds of
    random initialisation (one compile per parameter on a loaded machine)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Llama(tiny_config(), rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, jax.tree.map(lambda s: jnp.full(s.shape, value, s.dtype), state))


@pytest.mark.parametrize(
    "override, key",
    [
        ("optim.learning_rate=nan", "optim.learning_rate"),
        ("optim.learning_rate=.inf", "optim.learning_rate"),
        ("stages.0.beta=nan", "stages.0.beta"),
        ("stages.0.beta=inf", "stages.0.beta"),
        ("stages.0.beta=1e30", "stages.0.beta"),
        ("stages.0.alpha=nan", "stages.0.alpha"),
        ("stages.0.mu=nan", "stages.0.mu"),
        ("stages.0.gamma=nan", "stages.0.gamma"),
        ("optim.weight_decay=nan", "optim.weight_decay"),
        ("optim.max_grad_norm=inf", "optim.max_grad_norm"),
        ("optim.eps=nan", "optim.eps"),
        ("optim.final_lr_ratio=nan", "optim.final_lr_ratio"),
        ("train.peak_tflops=nan", "train.peak_tflops"),
        ("model.lora.alpha=nan", "model.lora.alpha"),
        ("model.lora.dropout=nan", "model.lora.dropout"),
    ],
)
def test_non_finite_and_absurd_floats_name_their_key(override, key):
    with pytest.raises(ConfigError) as info:
        load_config(TINY, [override])
    assert str(info.value).startswith(f"{key}: ")


def test_non_finite_in_a_yaml_file_names_the_key(tmp_path):
    path = tmp_path / "nan.yaml"
    path.write_text("stages:\n  - name: a\n    beta: .nan\n")
    with pytest.raises(ConfigError, match=r"^stages\.0\.beta: must be a finite number"):
        load_config(str(path))


@pytest.mark.parametrize(
    "text, field",
    [
        ("catastrophe_cost: .nan", "catastrophe_cost"),
        ("catastrophe_cost: .inf", "catastrophe_cost"),
        ("rude_cost: .nan", "rude_cost"),
        ("rude_rate: [.nan, 0.04, 0.05, 0.08, 0.1, 0.12]", "rude_rate[0]"),
    ],
)
def test_task_file_rejects_non_finite_costs_and_rates(tmp_path, text, field):
    path = tmp_path / "task.yaml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError) as info:
        SafetyTask.from_yaml(str(path))
    assert str(path) in str(info.value) and f"SafetyTask.{field}" in str(info.value)
    assert "finite" in str(info.value)
    with pytest.raises(ValueError, match="finite"):
        SafetyTask.from_dict(yaml.safe_load(text))


def test_demo_settings_reject_non_finite():
    with pytest.raises(ValueError, match=r"demo: betas\.1: must be a finite number"):
        DemoConfig(betas=(0.1, float("nan")))
    with pytest.raises(ValueError, match=r"demo: learning_rate"):
        DemoConfig(learning_rate=float("inf"))


def test_export_refuses_nan_weights_and_writes_nothing(tmp_path):
    model = _constant_model()
    state = nnx.state(model, nnx.Param)
    flat = nnx.to_flat_state(state)
    _, variable = flat[0]
    variable[...] = jnp.full(variable[...].shape, jnp.nan, variable[...].dtype)
    nnx.update(model, nnx.from_flat_state(flat))
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"1 of \d+ tensors hold NaN or infinite values"):
        save_hf(model, str(out))
    assert not list(out.glob("*.safetensors"))


def test_peft_export_refuses_nan_adapters_and_is_readable_by_others(tmp_path):
    model = to_lora(_constant_model(), LoraConfig(rank=2), rngs=nnx.Rngs(1))
    spec, _, adapters = split_lora(model)
    out = tmp_path / "peft"
    save_peft(spec, adapters, str(out))
    mode = stat.S_IMODE(os.stat(out / "adapter_model.safetensors").st_mode)
    config_mode = stat.S_IMODE(os.stat(out / "adapter_config.json").st_mode)
    assert mode == config_mode and mode & stat.S_IROTH  # item 8: readable like its config
    bad = jax.tree.map(lambda a: jnp.full_like(a, jnp.nan), adapters)
    with pytest.raises(ValueError, match="hold NaN or infinite values"):
        save_peft(spec, bad, str(tmp_path / "bad"))
    assert not (tmp_path / "bad" / "adapter_model.safetensors").exists()


def test_nan_saved_config_matches_the_same_nan(tmp_path):
    saved = {"optim": {"learning_rate": float("nan")}, "stages": [{"beta": 0.1}]}
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert check_resume(str(tmp_path), json.loads(json.dumps(saved))) == []
    changed = {"optim": {"learning_rate": 1e-4}, "stages": [{"beta": 0.1}]}
    with pytest.raises(ValueError, match="optim.learning_rate: NaN -> 0.0001"):
        check_resume(str(tmp_path), changed)
    assert np.isnan(json.loads((tmp_path / "config.json").read_text())["optim"]["learning_rate"])
