"""LoRA / QLoRA on the NNX Llama: the forward against hand-written maths, step 0 equals the base,
quantization error bounds, gradients only for adapters, merged and PEFT export, 8 devices."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix
from flax import nnx
from safetensors.numpy import load_file

from rsa_jax.models import (
    STORAGES,
    Llama,
    LoraConfig,
    error_bound,
    load_hf,
    merged_params,
    nf4_codes,
    param_count,
    project,
    save_merged_hf,
    save_peft,
    split_lora,
    tiny_config,
    to_lora,
    tree_bytes,
)
from rsa_jax.models._project import lora_equations
from rsa_jax.models._quant import store_weight

# The cases of each grid that the default suite runs; `make test-slow` runs every case
# (tests/conftest.py marks the others slow).
DEFAULT_CASES = {
    "test_step0_equals_the_base": ["float32-False", "nf4-False"],
    "test_merged_export_reloads_to_the_same_logits": ["float32-True", "nf4-False"],
    "test_gradients_reach_only_the_adapters": ["float32"],
    "test_projection_equals_hand_written_lora": ["nf4"],
    "test_dropout_only_in_training_and_only_on_the_adapters": ["True"],
}

HERE = os.path.dirname(os.path.abspath(__file__))
MASK = np.array([[0, 0, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1, 1]], bool)
POSITIONS = np.maximum(np.cumsum(MASK, axis=1) - 1, 0)
IDS = np.random.default_rng(0).integers(0, 256, size=MASK.shape)
# tiny_config: D=64, H=4 heads, K=2 KV heads, E=16, F=128; blocks of 16 so E (o's last input
# axis) holds one block.
BLOCK = 16
PROJ = ("q", "k", "v", "o", "gate", "up", "down")


def _lora_model(storage="float32", scan=False, rank=4, alpha=8.0, seed=0, **options):
    model = Llama(tiny_config(), rngs=nnx.Rngs(seed), scan_layers=scan)
    lora = LoraConfig(rank=rank, alpha=alpha, base_storage=storage, block_size=BLOCK, **options)
    return to_lora(model, lora, rngs=nnx.Rngs(seed + 1))


def _randomize_b(adapters, seed=3, scale=0.05):
    """B = 0 at init makes the delta vanish; tests of the delta need B != 0."""
    rng = np.random.default_rng(seed)
    return {
        k: jnp.asarray(scale * rng.normal(size=v.shape), v.dtype) if k.endswith("_lora_b") else v
        for k, v in adapters.items()
    }


_FORWARDS: dict = {}  # id(spec) -> (spec, jitted forward): one compile per spec and signature


def _logits(spec, base, adapters=None, dropout_key=None):
    if id(spec) not in _FORWARDS:

        @jax.jit
        def run(base, adapters, dropout_key):
            model = spec.module(base, adapters, dropout_key=dropout_key)
            hidden = model(jnp.asarray(IDS), jnp.asarray(POSITIONS), jnp.asarray(MASK))
            return model.logits(hidden)

        _FORWARDS[id(spec)] = (spec, run)  # holding spec keeps its id from being reused
    return np.asarray(_FORWARDS[id(spec)][1](base, adapters, dropout_key))


def test_lora_equations():
    assert lora_equations("bld,dhe->blhe") == ("bld,dr->blr", "blr,rhe->blhe")
    assert lora_equations("blhe,hed->bld") == ("blhe,her->blr", "blr,rd->bld")
    assert lora_equations("blf,fd->bld") == ("blf,fr->blr", "blr,rd->bld")


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="lora.rank"):
        LoraConfig(rank=0)
    with pytest.raises(ValueError, match="lora.targets"):
        LoraConfig(targets=("q", "lm_head"))
    with pytest.raises(ValueError, match="lora.dropout"):
        LoraConfig(dropout=1.0)
    with pytest.raises(ValueError, match="lora.base_storage"):
        LoraConfig(base_storage="fp8")
    with pytest.raises(ValueError, match="block size"):
        store_weight(jnp.ones((48, 8)), "nf4", input_dims=1, block_size=32)


@pytest.mark.parametrize("storage", ["float32", "nf4"])
def test_projection_equals_hand_written_lora(storage):
    """Every projection of layer 0: y = x W + (alpha / r) (x A) B, written in float64 NumPy
    on the flattened [in, out] matrices (W dequantized for nf4)."""
    model = _lora_model(storage, rank=4, alpha=8.0)
    spec, base, adapters = split_lora(model)
    adapters = _randomize_b(adapters)
    model = spec.module(base, adapters)
    block = model.layers[0]
    rng = np.random.default_rng(5)
    equations = {
        "q": ("bld,dhe->blhe", block.attention),
        "k": ("bld,dke->blke", block.attention),
        "v": ("bld,dke->blke", block.attention),
        "o": ("blhe,hed->bld", block.attention),
        "gate": ("bld,df->blf", block.mlp),
        "up": ("bld,df->blf", block.mlp),
        "down": ("blf,fd->bld", block.mlp),
    }
    for name, (equation, module) in equations.items():
        w_stored = base[f"layers/0/{'attention' if module is block.attention else 'mlp'}/{name}"]
        w = np.asarray(qwix.dequantize(w_stored) if storage == "nf4" else w_stored, np.float64)
        a = np.asarray(getattr(module, name + "_lora_a").get_value(), np.float64)
        b = np.asarray(getattr(module, name + "_lora_b").get_value(), np.float64)
        n_in = 2 if name == "o" else 1
        in_shape, out_shape = w.shape[:n_in], w.shape[n_in:]
        x = rng.normal(size=(2, 3, *in_shape)).astype(np.float32)
        got = np.asarray(project(module, name, equation, jnp.asarray(x), jnp.float32))
        x2 = x.reshape(6, -1).astype(np.float64)
        base_term = x2 @ w.reshape(-1, int(np.prod(out_shape)))
        lora_term = (8.0 / 4) * ((x2 @ a.reshape(-1, 4)) @ b.reshape(4, -1))
        assert np.abs(lora_term).max() > 1e-3, name  # the adapter term really contributes
        want = (base_term + lora_term).reshape(got.shape)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.parametrize(
    "storage,scan", [(s, False) for s in STORAGES] + [("float32", True), ("nf4", True)]
)
def test_step0_equals_the_base(storage, scan):
    """B = 0: the LoRA model's logits equal the adapters-off model's on the same base exactly,
    and for a float32 base those of the original model."""
    original = Llama(tiny_config(), rngs=nnx.Rngs(0), scan_layers=scan)
    before = jax.jit(
        lambda m: m.logits(m(jnp.asarray(IDS), jnp.asarray(POSITIONS), jnp.asarray(MASK)))
    )(original)
    spec, base, adapters = split_lora(_lora_model(storage, scan=scan))
    on, off = _logits(spec, base, adapters), _logits(spec, base)
    np.testing.assert_array_equal(on, off)
    if storage == "float32":
        np.testing.assert_allclose(on, np.asarray(before), rtol=1e-6, atol=1e-6)
    else:  # a lossy base moves the logits, within reason
        assert 0 < np.abs(on - np.asarray(before)).max() < 0.5


def _block_absmax(w: np.ndarray, axis: int, block: int) -> np.ndarray:
    """absmax over each block of `block` entries along `axis`, broadcast back to w's shape."""
    moved = np.moveaxis(w, axis, -1)
    blocks = moved.reshape(*moved.shape[:-1], -1, block)
    amax = np.broadcast_to(np.abs(blocks).max(-1, keepdims=True), blocks.shape)
    return np.moveaxis(amax.reshape(moved.shape), -1, axis)


@pytest.mark.parametrize("storage", ["int8", "nf4"])
@pytest.mark.parametrize(
    "shape,input_dims,stacked,axis",
    [((64, 4, 16), 1, False, 0), ((4, 16, 64), 2, False, 1), ((3, 128, 64), 1, True, 1)],
)
def test_dequantization_error_within_bound(storage, shape, input_dims, stacked, axis):
    """|W - deq(q(W))| <= bound * absmax(block): int8 1/254, nf4 half the widest NF4 gap
    (0.1519); the worst error also comes near the bound (the test can fail both ways)."""
    w = np.random.default_rng(1).standard_t(df=4, size=shape).astype(np.float32)
    q = store_weight(jnp.asarray(w), storage, input_dims=input_dims, block_size=BLOCK,
                     stacked=stacked)  # fmt: skip
    assert isinstance(q, qwix.QArray)
    err = np.abs(np.asarray(qwix.dequantize(q), np.float64) - w)
    ratio = err / _block_absmax(w, axis, BLOCK)
    bound = error_bound(storage)
    assert ratio.max() <= bound * (1 + 1e-5), (ratio.max(), bound)
    assert ratio.max() > 0.5 * bound
    if storage == "nf4":
        assert q.qvalue.dtype == jnp.uint4
        # every stored value is a code point times its block's absmax
        codes = nf4_codes()
        assert len(codes) == 16 and codes[0] == -1 and codes[-1] == 1
        assert np.isclose(bound, (codes[1] - codes[0]) / 2)
        deq = np.asarray(qwix.dequantize(q), np.float64) / _block_absmax(w, axis, BLOCK)
        nearest = np.abs(deq[..., None] - codes).min(-1)
        assert nearest.max() < 1e-5


def test_model_weights_within_bound_and_bytes():
    """The quantized model's projections against the float originals, and the storage bytes."""
    originals = {
        k: np.asarray(v)
        for k, v in split_lora(_lora_model("float32"))[1].items()
        if k.rsplit("/", 1)[-1] in ("q", "o", "down")
    }
    sizes = {}
    for storage in STORAGES:
        spec, base, adapters = split_lora(_lora_model(storage))
        sizes[storage] = tree_bytes(base)
        if storage in ("int8", "nf4"):
            for key, w in originals.items():
                axis = 1 if key.endswith("/o") else 0
                err = np.abs(np.asarray(qwix.dequantize(base[key])) - w)
                assert (err <= error_bound(storage) * _block_absmax(w, axis, BLOCK) * 1.00001).all()
    n = param_count(split_lora(_lora_model("float32"))[1])
    assert sizes["float32"] == 4 * n and sizes["bfloat16"] == 2 * n
    assert sizes["nf4"] < sizes["int8"] < sizes["bfloat16"]
    # adapters: r (in + out) per targeted projection and layer
    _, _, adapters = split_lora(_lora_model("float32", rank=4))
    d, f, h, k, e = 64, 128, 4, 2, 16
    per_layer = 4 * ((d + h * e) * 2 + (d + k * e) * 2 + (d + f) * 2 + (f + d))
    assert param_count(adapters) == 2 * per_layer


@pytest.mark.parametrize("storage", ["float32", "nf4"])
def test_gradients_reach_only_the_adapters(storage):
    spec, base, adapters = split_lora(_lora_model(storage))
    weights = jnp.asarray(np.random.default_rng(2).normal(size=(2, 8, 256)), jnp.float32)

    def loss(base, adapters):
        model = spec.module(base, adapters)
        hidden = model(jnp.asarray(IDS), jnp.asarray(POSITIONS), jnp.asarray(MASK))
        return (model.logits(hidden) * weights).sum()

    float_base = {k: v for k, v in base.items() if not isinstance(v, qwix.QArray)}
    quantized = {k: v for k, v in base.items() if isinstance(v, qwix.QArray)}

    def loss_float_base(float_base, adapters):
        return loss({**float_base, **quantized}, adapters)

    g_base, g_adapters = jax.jit(jax.grad(loss_float_base, argnums=(0, 1)))(float_base, adapters)
    assert all(not np.asarray(g).any() for g in g_base.values())  # frozen: exactly zero
    for key, g in g_adapters.items():
        g = np.asarray(g)
        assert np.isfinite(g).all()
        # B = 0 at init: dL/dA = x^T (dL/dy) B^T = 0, while dL/dB = (x A)^T dL/dy != 0
        assert (np.abs(g).max() > 0) == key.endswith("_lora_b"), key
    moved = _randomize_b(adapters)
    g_adapters = jax.jit(jax.grad(loss_float_base, argnums=1))(float_base, moved)
    assert all(np.abs(np.asarray(g)).max() > 0 for g in g_adapters.values())


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("storage", ["float32", "nf4"])
def test_merged_export_reloads_to_the_same_logits(tmp_path, storage, scan):
    spec, base, adapters = split_lora(_lora_model(storage, scan=scan))
    adapters = _randomize_b(adapters)
    want = _logits(spec, base, adapters)
    assert np.abs(want - _logits(spec, base)).max() > 1e-2  # the adapters matter
    save_merged_hf(spec, base, adapters, str(tmp_path / "f32"))
    reloaded = load_hf(str(tmp_path / "f32"), scan_layers=scan)
    got = jax.jit(
        lambda m: m.logits(m(jnp.asarray(IDS), jnp.asarray(POSITIONS), jnp.asarray(MASK)))
    )(reloaded)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=2e-5)
    # bfloat16: the merged float32 weights rounded once to bfloat16, and its config says so
    save_merged_hf(spec, base, adapters, str(tmp_path / "bf16"), dtype="bfloat16")
    with open(tmp_path / "bf16" / "config.json") as f:
        assert json.load(f)["torch_dtype"] == "bfloat16"
    merged = merged_params(spec, base, adapters)
    bf16 = load_hf(str(tmp_path / "bf16"), param_dtype=jnp.bfloat16, scan_layers=scan)
    for path, var in nnx.to_flat_state(nnx.state(bf16, nnx.Param)):
        key = "/".join(map(str, path))
        np.testing.assert_array_equal(
            np.asarray(var.get_value()), merged[key].astype(jnp.bfloat16), err_msg=key
        )


@pytest.mark.parametrize("scan", [False, True])
def test_peft_files_names_shapes_and_merge(tmp_path, scan):
    """PEFT's names and [r, in] / [out, r] layouts; W_hf + (alpha / r) B_peft A_peft (PEFT's
    own merge) reproduces our merged export tensor by tensor."""
    rank, alpha = 4, 8.0
    model = _lora_model("float32", scan=scan, rank=rank, alpha=alpha)
    spec, base, adapters = split_lora(model)
    adapters = _randomize_b(adapters)
    save_peft(spec, adapters, str(tmp_path / "peft"), base_model_name_or_path="local/base")
    save_merged_hf(spec, base, adapters, str(tmp_path / "merged"))
    save_merged_hf(spec, base, {}, str(tmp_path / "base"))
    with open(tmp_path / "peft" / "adapter_config.json") as f:
        config = json.load(f)
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["r"] == rank and config["lora_alpha"] == alpha
    assert sorted(config["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    tensors = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    d, f, h, k, e = 64, 128, 4, 2, 16
    io = {
        "self_attn.q_proj": (d, h * e),
        "self_attn.k_proj": (d, k * e),
        "self_attn.v_proj": (d, k * e),
        "self_attn.o_proj": (h * e, d),
        "mlp.gate_proj": (d, f),
        "mlp.up_proj": (d, f),
        "mlp.down_proj": (f, d),
    }
    expected = {}
    for layer in range(2):
        for module, (n_in, n_out) in io.items():
            prefix = f"base_model.model.model.layers.{layer}.{module}"
            expected[prefix + ".lora_A.weight"] = (rank, n_in)
            expected[prefix + ".lora_B.weight"] = (n_out, rank)
    assert {n: t.shape for n, t in tensors.items()} == expected
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    plain = load_file(str(tmp_path / "base" / "model.safetensors"))
    for name, a in tensors.items():
        if ".lora_A." not in name:
            continue
        b = tensors[name.replace(".lora_A.", ".lora_B.")]
        hf = name.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
        np.testing.assert_allclose(
            merged[hf], plain[hf] + (alpha / rank) * b @ a, rtol=1e-5, atol=1e-6, err_msg=hf
        )
        assert np.abs(merged[hf] - plain[hf]).max() > 1e-4, hf


def test_targets_subset_only_adapts_those():
    spec, base, adapters = split_lora(_lora_model(targets=("q", "v")))
    names = {k.rsplit("/", 1)[-1] for k in adapters}
    assert names == {"q_lora_a", "q_lora_b", "v_lora_a", "v_lora_b"}
    assert spec.adapter_axes["layers/0/attention/q_lora_a"] == ("embed", None)
    assert spec.adapter_axes["layers/0/attention/q_lora_b"] == (None, "heads", "head_dim")
    assert "layers/0/attention/o_lora_a" not in spec.adapter_axes
    assert spec.adapter_axes["layers/0/attention/v_lora_b"] == (None, "kv_heads", "head_dim")


@pytest.mark.slow  # simulated devices in a subprocess
def test_sharded_lora_forward_equals_one_device(device_script):
    out = device_script(os.path.join(HERE, "lora_sharded_check.py"))
    for case in ("float32", "nf4_scan"):
        assert out[case]["logits_diff"] <= 1e-5, out
        assert out[case]["grad_diff"] <= 1e-5, out
        assert out[case]["sharded_adapters"] > 0, out
        assert out[case]["sharded_base"] > 0, out


@pytest.mark.parametrize("scan", [False, True])
def test_dropout_only_in_training_and_only_on_the_adapters(scan):
    spec, base, adapters = split_lora(_lora_model(scan=scan, dropout=0.3))
    k1, k2 = jax.random.key(1), jax.random.key(2)
    # B = 0: the dropped-out branch adds nothing, the base path is never dropped
    np.testing.assert_array_equal(_logits(spec, base, adapters, k1), _logits(spec, base))
    adapters = _randomize_b(adapters)
    no_key = _logits(spec, base, adapters)
    one, again, other = (_logits(spec, base, adapters, k) for k in (k1, k1, k2))
    np.testing.assert_array_equal(one, again)
    assert np.abs(one - no_key).max() > 1e-3 and np.abs(one - other).max() > 1e-3


def test_dropout_is_unbiased():
    """Inverted dropout: over many keys the mean projection is the one without dropout (within
    5 standard errors per element)."""
    spec, base, adapters = split_lora(_lora_model(dropout=0.25, targets=("q",)))
    adapters = _randomize_b(adapters, scale=0.5)
    x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 3, 64)), jnp.float32)

    def q(key):
        module = spec.module(base, adapters, dropout_key=key).layers[0].attention
        return project(module, "q", "bld,dhe->blhe", x, jnp.float32)

    keys = jax.random.split(jax.random.key(0), 4000)
    samples = np.asarray(jax.jit(jax.vmap(q))(keys), np.float64)
    want = np.asarray(q(None))
    mean, stderr = samples.mean(0), samples.std(0) / np.sqrt(len(keys))
    assert (stderr > 0).all()
    assert (np.abs(mean - want) <= 5 * stderr).all(), np.abs(mean - want).max()


def test_qlora_backward_saves_no_dequantized_weight(capsys):
    """With an nf4 base the autodiff residuals are activations and packed codes: no float copy
    of any projection weight is kept from the forward to the backward pass."""
    from jax.ad_checkpoint import print_saved_residuals

    spec, base, adapters = split_lora(_lora_model("nf4"))
    shapes = {",".join(map(str, v.shape)) for k, v in base.items() if k.rsplit("/", 1)[-1] in PROJ}

    def loss(adapters):
        model = spec.module(base, adapters)
        hidden = model(jnp.asarray(IDS), jnp.asarray(POSITIONS), jnp.asarray(MASK))
        return model.logits(hidden).sum()

    capsys.readouterr()
    print_saved_residuals(loss, adapters)
    lines = capsys.readouterr().out.splitlines()
    saved = [line.split(" ", 1)[0] for line in lines]  # e.g. "f32[2,8,64]", "u4[64,4,16]"
    assert any(s.startswith("f32[") for s in saved)  # activations are saved
    assert not [s for s in saved if s.startswith("f32[") and s[4:-1] in shapes], lines
    assert shapes <= {s[3:-1] for s in saved if s.startswith("u4[")}  # the codes are
