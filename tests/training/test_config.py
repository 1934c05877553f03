"""Every file in configs/ loads and validates; bad configs fail with errors naming the key."""

import dataclasses
import os

import pytest

from rsa_jax.config import (
    Config,
    ConfigError,
    MeshConfig,
    config_files,
    from_json,
    load_config,
    mesh_shape,
    stage_data,
    stage_view_key,
    to_json,
    validate,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = config_files(os.path.join(ROOT, "configs"))


def test_expected_config_files_exist():
    names = {os.path.basename(p)[:-5] for p in CONFIGS}
    assert {"dpo", "tdpo", "ra_dpo", "sacpo", "rsa_cvar", "rsa_erm", "tiny"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_config_loads_validates_and_documents_its_launch(path):
    config = load_config(path)
    validate(config, device_count=1)
    with open(path) as f:
        head = f.readline()
        assert head.startswith("#")
        text = f.read()
    assert "rsa-jax train" in text or "rsa_jax train" in text
    assert "Expected runtime" in text
    assert from_json(to_json(config)) == config  # the resolved JSON round-trips


def test_method_defaults_in_two_stage_configs():
    for name in ("sacpo", "rsa_cvar", "rsa_erm"):
        c = load_config(os.path.join(ROOT, "configs", f"{name}.yaml"))
        assert [s.reference for s in c.stages] == ["init", "previous_stage"]
        # stage 0 reads data.view ("auto": TRL pairs as given, PKU rows by helpfulness)
        assert [s.view for s in c.stages] == [None, "safety"] and c.data.view == "auto"
        assert c.optim.learning_rate == 2e-5 and c.optim.warmup_ratio == 0.03
        assert c.data.batch_size == 64 and c.data.epochs == 3
        assert c.data.max_prompt_len + c.data.max_response_len == 512
    assert load_config(os.path.join(ROOT, "configs", "rsa_erm.yaml")).stages[1].risk == "erm"
    assert load_config(os.path.join(ROOT, "configs", "sacpo.yaml")).stages[1].loss == "dpo"
    ra = load_config(os.path.join(ROOT, "configs", "ra_dpo.yaml")).stages[0]
    assert (ra.mu, ra.beta, ra.alpha, ra.version, ra.split_vocab) == (0.95, 0.1, 0.5, 1, True)


def test_data_view_reaches_every_stage_without_its_own():
    """`data.view=pairs` is not overridden by a stage that sets no view; a stage's own view
    wins, and the key a schema error names is the one that decided."""
    c = load_config(os.path.join(ROOT, "configs", "tiny.yaml"), ["data.view=pairs"])
    assert [stage_data(c, s).view for s in c.stages] == ["pairs", "safety"]
    assert [stage_view_key(c, i) for i in range(2)] == ["data.view", "stages.1.view"]
    c = load_config(os.path.join(ROOT, "configs", "dpo.yaml"), ["stages.0.view=safety"])
    assert stage_data(c, c.stages[0]).view == "safety"
    with pytest.raises(ConfigError, match="stages.0.view: must be one of auto, pairs"):
        load_config(os.path.join(ROOT, "configs", "dpo.yaml"), ["stages.0.view=harmless"])


def test_dotted_overrides_reach_nested_and_list_fields():
    c = load_config(
        os.path.join(ROOT, "configs", "rsa_cvar.yaml"),
        ["stages.1.beta=0.025", "optim.learning_rate=1e-5", "data.prompt_buckets=[32,64]"],
    )
    assert c.stages[1].beta == 0.025 and c.stages[0].beta == 0.1
    assert c.optim.learning_rate == 1e-5
    assert c.data.prompt_buckets == (32, 64)
    # A value that is not YAML (a template with braces and a colon) is taken as the text itself.
    c = load_config(
        os.path.join(ROOT, "configs", "rsa_cvar.yaml"), ["data.template={prompt} answer:"]
    )
    assert c.data.template == "{prompt} answer:"


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["optim.learnin_rate=1e-5"], "optim.learnin_rate"),
        (["stages.5.beta=0.1"], "stages.5"),
        (["optim.microbatches=many"], "optim.microbatches"),
        (["stages.0.loss=ppo"], "stages.0.loss"),
        (["stages.0.risk=var"], "stages.0.risk"),
        (["stages.0.reference=previous_stage"], "stages.0.reference"),
        (["stages.0.mu=1.5"], "stages.0.mu"),
        (["optim.microbatches=3"], "not divisible by 3"),
        (["mesh.data=-1", "mesh.fsdp=-1"], "at most one axis"),
        (["mesh.rules.batch=[data,pipe]"], "unknown mesh axis 'pipe'"),
        (["data.view=harmless"], "view"),
        (["model.compute_dtype=float16"], "model.compute_dtype"),
        (["model.attention=flash"], "model.attention"),
        (["noequals"], "dotted.key=value"),
    ],
)
def test_bad_configs_name_the_problem(overrides, fragment):
    with pytest.raises(ConfigError, match=None) as info:
        load_config(os.path.join(ROOT, "configs", "tiny.yaml"), overrides)
    assert fragment in str(info.value)


def test_unknown_key_in_yaml_names_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  learning_rate: 1e-4\n  lr_decay: cosine\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(bad))
    assert "bad.yaml" in str(info.value) and "lr_decay" in str(info.value)
    bad.write_text("stages:\n  - name: a\n    beta: high\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(bad))
    assert "beta" in str(info.value)


def test_mesh_fill_and_device_fit():
    assert mesh_shape(MeshConfig(data=-1, fsdp=2, tensor=2), 8) == (2, 2, 2)
    assert mesh_shape(MeshConfig(data=1, fsdp=-1, tensor=2), 8) == (1, 4, 2)
    with pytest.raises(ConfigError, match="cannot fill 8 devices"):
        mesh_shape(MeshConfig(data=-1, fsdp=3, tensor=1), 8)
    with pytest.raises(ConfigError, match="does not use the 8 devices"):
        mesh_shape(MeshConfig(data=2, fsdp=2, tensor=1), 8)
    config = load_config(os.path.join(ROOT, "configs", "tiny.yaml"), ["data.batch_size=6"])
    with pytest.raises(ConfigError, match="do not divide over the 4 batch shards"):
        validate(dataclasses.replace(config, mesh=MeshConfig(data=4)), device_count=4)
    assert isinstance(config, Config)


def test_stage_hyperparameters_carry_the_torch_rounded_quantile_tail():
    """The step gets tail = float32(1 - mu) rounded from float64, as torch.quantile ranks it."""
    import numpy as np

    from rsa_jax.config import StageConfig
    from rsa_jax.losses import torch_rank
    from rsa_jax.training import Hyper

    hyper = Hyper.for_stage(StageConfig(loss="ra_dpo", risk="cvar_reference", mu=0.8), None, 1)
    assert hyper.loss.mu == np.float32(0.8)
    assert hyper.loss.tail == np.float32(0.2)
    assert float(torch_rank(hyper.loss.tail, 16)) == 3.0  # float32 1 - mu would give 2.9999998


@pytest.mark.parametrize(
    "override, key",
    [
        ("stages.0.alpha=-0.5", "stages.0.alpha"),
        ("stages.0.gamma=0", "stages.0.gamma"),
        ("stages.0.gamma=1.5", "stages.0.gamma"),
        ("optim.b1=1.0", "optim.b1"),
        ("optim.b2=-0.1", "optim.b2"),
        ("checkpoint.every=-1", "checkpoint.every"),
        ("train.log_every=0", "train.log_every"),
        ("train.chunk_size=0", "train.chunk_size"),
        ("optim.eps=0", "optim.eps"),
        ("optim.max_grad_norm=-1", "optim.max_grad_norm"),
    ],
)
def test_out_of_range_values_get_one_line_naming_the_key(override, key):
    with pytest.raises(ConfigError) as info:
        load_config(os.path.join(ROOT, "configs", "tiny.yaml"), [override])
    message = str(info.value)
    assert message.startswith(key + ":") and "\n" not in message
    # The boundary values that are allowed still load.
    ok = {"stages.0.gamma": "1.0", "optim.b1": "0.0", "optim.b2": "0.0"}
    if key in ok:
        load_config(os.path.join(ROOT, "configs", "tiny.yaml"), [f"{key}={ok[key]}"])


def test_missing_file_and_yaml_syntax_error_name_the_file_and_line(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path / "nope.yaml"))
    assert str(info.value) == f"{tmp_path / 'nope.yaml'}: config file not found"
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  learning_rate: 1e-4\n  b1: [0.9\ntrain:\n  seed: 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(bad))
    message = str(info.value)
    assert message.startswith(f"{bad}:4: YAML syntax error") and "\n" not in message
    bom = tmp_path / "bom.yaml"
    bom.write_bytes(b"\xef\xbb\xbfoptim:\n  b1: 0.8\n")
    assert load_config(str(bom)).optim.b1 == 0.8


def test_overrides_of_text_fields_stay_text():
    tiny = os.path.join(ROOT, "configs", "tiny.yaml")
    assert load_config(tiny, ["model.path=no"]).model.path == "no"
    assert load_config(tiny, ["model.path=1e5"]).model.path == "1e5"
    assert load_config(tiny, ["stages.0.name=on"]).stages[0].name == "on"
    c = load_config(tiny, ["data.template=Question: {prompt}"])
    assert c.data.template == "Question: {prompt}"
    assert load_config(tiny, ["data.template=null"]).data.template is None
    # Quoted values are unquoted as YAML does (the demo pipeline passes its template this way).
    assert load_config(tiny, ["data.template='{prompt} answer:'"]).data.template == (
        "{prompt} answer:"
    )
    assert load_config(tiny, ['model.path="no"']).model.path == "no"
    # Non-text fields still parse YAML values.
    assert load_config(tiny, ["train.progress_bar=no"]).train.progress_bar is False
    # An error in an override blames the override, not the YAML file.
    with pytest.raises(ConfigError) as info:
        load_config(tiny, ["data.template=Question: {question}"])
    assert "tiny.yaml" not in str(info.value) and "data.template:" in str(info.value)
    # Fields other than {prompt} would fail only when the first batch is encoded.
    with pytest.raises(ConfigError, match=r"data.template: the only field allowed is \{prompt\}"):
        load_config(tiny, ["data.template=Q: {prompt} from {user}"])


def test_missing_model_path_and_missing_tokenizer_files(tmp_path):
    from rsa_jax.config import ModelConfig
    from rsa_jax.training._model import load_tokenizer

    with pytest.raises(FileNotFoundError) as info:
        load_tokenizer(ModelConfig(path=str(tmp_path / "models" / "sft")))
    assert "does not exist" in str(info.value) and "Repo id" not in str(info.value)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="has no tokenizer files"):
        load_tokenizer(ModelConfig(path=str(tmp_path / "empty")))


def test_the_attention_switch_reaches_the_model_definition():
    from rsa_jax.training import llama_config

    config = load_config(os.path.join(ROOT, "configs", "tiny.yaml"), ["model.attention=xla"])
    assert llama_config(config.model).attention == "xla"
    assert (
        llama_config(load_config(os.path.join(ROOT, "configs", "tiny.yaml")).model).attention
        == "auto"
    )
