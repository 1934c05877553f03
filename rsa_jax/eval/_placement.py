"""Where evaluation runs: the device mesh, the parameters sharded as in training, the rows split
over the batch axes, and the way back to host NumPy arrays.

Dimension legend: R rows (sampled responses), L layers, S cache slots, K key/value heads, E head
dim.

A `Placement` is a mesh and the logical-axis rules of `rsa_jax.training` (the same `make_mesh`,
`define_model` and `logical_spec` the trainer uses), so a model that trains on a mesh evaluates on
it: its parameters get the training shardings, rows go over the `batch` rule's mesh axes and the
KV cache [L, R, S, K, E] is split like the rows and, on K, like the key/value heads.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rsa_jax.config import ConfigError, MeshConfig, ModelConfig
from rsa_jax.generate import Shardings
from rsa_jax.models import store_in_compute_dtype
from rsa_jax.training import (
    Layout,
    define_model,
    init_params,
    llama_config,
    logical_spec,
    make_mesh,
)

log = logging.getLogger(__name__)

CACHE_AXES = ("layers", "batch", "length", "kv_heads", "head_dim")


@dataclasses.dataclass(frozen=True)
class Placement:
    """A mesh and logical-axis rules (`MeshConfig.rules`: logical axis -> mesh axes)."""

    mesh: Mesh
    rules: Mapping[str, Sequence[str]]

    @property
    def batch_axes(self) -> tuple[str, ...]:
        """The mesh axes (of size > 1) that rows are split over: the `batch` rule's."""
        return tuple(a for a in self.rules.get("batch", ()) if self.mesh.shape[a] > 1)

    @property
    def row_shards(self) -> int:
        """Into how many parts rows are split; every batch is a multiple of it."""
        return int(np.prod([self.mesh.shape[a] for a in self.batch_axes], dtype=np.int64))

    def rows(self) -> NamedSharding:
        """[R, ...] arrays split on their first axis over `batch_axes`, the rest replicated."""
        axes = self.batch_axes
        entry = None if not axes else axes[0] if len(axes) == 1 else axes
        return NamedSharding(self.mesh, PartitionSpec(entry))

    def cache(self, shape: tuple[int, ...]) -> NamedSharding:
        """The KV cache [L, R, S, K, E] by the rules (a K the tensor axis does not divide stays
        whole, as for the parameters)."""
        spec = logical_spec(CACHE_AXES, shape, self.mesh, dict(self.rules))
        return NamedSharding(self.mesh, spec)

    def generate_shardings(self, rows: int, slots: int, llama) -> Shardings:
        """`rsa_jax.generate.Shardings` for a batch of `rows` rows and `slots` cache slots."""
        shape = (llama.num_hidden_layers, rows, slots, llama.num_key_value_heads, llama.head_dim)
        return Shardings(self.rows(), self.cache(shape))


def placement_for(mesh: MeshConfig | None = None, devices=None) -> Placement:
    """The Placement of a mesh config over `devices` (default: all devices, all on `data`)."""
    mesh = MeshConfig() if mesh is None else mesh
    return Placement(make_mesh(mesh, devices), {k: list(v) for k, v in mesh.rules.items()})


def mesh_from_text(text: str) -> MeshConfig:
    """`"DATA,FSDP,TENSOR"` (e.g. `"-1,2,1"`; one may be -1: the rest) -> a MeshConfig with the
    default rules; a ValueError naming the text otherwise."""
    parts = [p.strip() for p in text.split(",")]
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        sizes = []
    if len(sizes) != 3 or any(s == 0 or s < -1 for s in sizes) or sizes.count(-1) > 1:
        raise ValueError(
            f"mesh {text!r}: give DATA,FSDP,TENSOR, three positive sizes or one -1 (e.g. -1,2,1)"
        )
    return MeshConfig(data=sizes[0], fsdp=sizes[1], tensor=sizes[2])


def placement_of(model) -> Placement | None:
    """The mesh the model's parameters live on, with the default rules; None when they all sit
    on one device (nothing to split: evaluation runs as before, on that device)."""
    from flax import nnx

    for _, value in nnx.to_flat_state(nnx.state(model)):
        sharding = getattr(value[...], "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
            mesh = sharding.mesh  # rules name only the axes this mesh has
            assert isinstance(mesh, Mesh)  # a concrete mesh: the array lives on its devices
            rules = {k: [a for a in v if a in mesh.shape] for k, v in MeshConfig().rules.items()}
            return Placement(mesh, rules)
    return None


def to_host(x) -> np.ndarray:
    """A global array as one host NumPy array (gathered from every process when the mesh spans
    several; each process gets all rows)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def _fit(mesh: MeshConfig, what: str) -> MeshConfig:
    """`mesh` if it fits the devices here; else all devices on `data` (with a warning), so a run
    trained on 8 devices still evaluates on a laptop."""
    try:
        make_mesh(mesh)
        return mesh
    except ConfigError as e:
        fallback = dataclasses.replace(mesh, data=-1, fsdp=1, tensor=1)
        log.warning(
            "%s: its mesh does not fit the %d devices here (%s); using all of them on data",
            what,
            jax.device_count(),
            e,
        )
        return fallback


def source_template(path: str, template: str | None = None, default: str | None = None):
    """The prompt template to sample `path` with: `template` when given; a run directory's
    (or `RUN@STAGE`'s) own `data.template`, the format it was trained on (None there: the chat
    template); else `default` (None: the chat template of a Hugging Face directory)."""
    if template is not None:
        return template
    from rsa_jax.training import resolve_source, run_config

    source = resolve_source(path)
    return default if source.kind != "run" else run_config(source.path).data.template


def load_model(
    path: str,
    mesh: MeshConfig | None = None,
    *,
    stage: str | int | None = None,
    compute_dtype: str | None = None,
    adapters_off: bool = False,
):
    """(model, tokenizer) of a Hugging Face directory, or of a run directory's newest usable
    checkpoint, of `RUN@STAGE` or `stage` (the policy stage STAGE ended with), or of
    `RUN@STAGE:STEP` (a candidate kept along training), its parameters sharded on `mesh`.

    `mesh` None: a run directory evaluates on its training mesh (its checkpoint's config's
    `mesh`, falling back to all devices on `data` when it does not fit the devices here), a
    Hugging Face directory on all devices on `data` (parameters replicated, rows split).

    `compute_dtype` None: a run computes in its own `model.compute_dtype` (what it trained in;
    a LoRA run's adapters merged into float32 weights), a Hugging Face directory in float32.
    The weights the model casts to that dtype at every use are stored in it
    (`rsa_jax.models.store_in_compute_dtype`): the same outputs, and in bfloat16 half the memory
    and no converted copy in the sampler's program.

    `adapters_off`: a LoRA run's base as the run trained on it, its adapters zero: for an int8
    or nf4 run the dequantized base, the reference its first stage started from (ValueError
    for a full fine-tuning run or a model directory).
    """
    from rsa_jax.training import load_adapters, load_policy, resolve_source, run_config

    source = resolve_source(path)
    if source.kind == "run":
        config = run_config(source.path)
        mesh = _fit(config.mesh, path) if mesh is None else mesh
        placement = placement_for(mesh)
        # Restored straight onto the training shardings of the evaluation mesh.
        layout = Layout(placement.mesh, dict(placement.rules))
        load = load_adapters if adapters_off else load_policy
        engine, params = load(
            source.path,
            config,
            stage=source.stage if stage is None else stage,
            layout=layout,
            compute_dtype=compute_dtype,
        )
        if adapters_off:
            if engine.model.lora is None:
                raise ValueError(f"{path}: a full fine-tuning run has no adapters to turn off")
            params = engine.merged(jax.tree.map(jax.numpy.zeros_like, params))
        model = engine.model.module(params)
        del params  # the float32 leaves go as they are cast (`store_in_compute_dtype`)
        return store_in_compute_dtype(model), engine.tokenizer
    if adapters_off:
        raise ValueError(f"{path}: a model directory has no adapters to turn off")
    if stage is not None:
        raise FileNotFoundError(f"{path}: a stage needs a run directory, not a model directory")
    path = source.path
    from transformers import AutoTokenizer

    placement = placement_for(mesh)
    dtype = "float32" if compute_dtype is None else compute_dtype
    model_config = ModelConfig(path=path, compute_dtype=dtype, remat=False)
    layout = Layout(placement.mesh, dict(placement.rules))
    model_def = define_model(model_config, llama_config(model_config), layout)
    model = model_def.module(init_params(model_def, model_config))  # each tensor to its shard
    model = store_in_compute_dtype(model)
    return model, AutoTokenizer.from_pretrained(path, local_files_only=True)


def quantized_base_of(run_path: str, reference: str) -> str | None:
    """The storage ("int8", "nf4") when `reference` is the float model the LoRA run `run_path`
    quantized for its base, else None. KL against that float model would mostly measure the
    quantization: the run's own reference is its quantized base with the adapters off
    (`load_model(run_path, adapters_off=True)`)."""
    import os

    from rsa_jax.training import resolve_source, run_config

    try:
        source = resolve_source(run_path)
        if source.kind != "run":
            return None
        model = run_config(source.path).model
    except (FileNotFoundError, ValueError):
        return None
    lora = model.lora
    if lora is None or lora.rank <= 0 or lora.base_storage not in ("int8", "nf4"):
        return None
    same = os.path.realpath(os.path.abspath(reference)) == os.path.realpath(
        os.path.abspath(model.path)
    )
    return lora.base_storage if same else None
