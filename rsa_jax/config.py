"""The typed config tree: frozen dataclasses, YAML files in `configs/`, dotted CLI overrides.

Parsed by OmegaConf structured configs (unknown keys and wrong types are rejected with the full
dotted key), then checked by `validate` for the constraints types cannot express. The trainer turns
the tree into keyword arguments; kernels never import it.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import string
import types
import typing
from collections.abc import Sequence
from typing import Any, NoReturn, cast

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from rsa_jax.data import VIEWS, DataConfig
from rsa_jax.losses import DEFAULT_CHUNK_SIZE, DEFAULTS, Kernel, KernelError, check_mu
from rsa_jax.models import ATTENTION_CHOICES, PROJECTIONS, STORAGES

# A stage's reference model: the initial (SFT) model, or the frozen result of the stage before.
INIT, PREVIOUS_STAGE = "init", "previous_stage"
REFERENCES = (INIT, PREVIOUS_STAGE)
HEADS = ("fused", "logits")
_KERNEL = Kernel()  # defaults of the kernel fields
DTYPES = ("float32", "bfloat16")
MESH_AXES = ("data", "fsdp", "tensor")
REPORT_TO = ("tensorboard", "wandb", "mlflow")  # train.report_to (rsa_jax.training's trackers)


class ConfigError(ValueError):
    """A config that cannot run; the message names the dotted key and the problem."""


# What kind of key a field is, declared next to it (`_kind(...)`, the field's metadata "kind");
# a field without one takes its enclosing field's kind (PROGRAM at the top). Derived from it:
# `Hyper.for_stage`'s loss arguments (`traced_fields`), the keys a resume ignores
# (`RESUME_IGNORED` in `rsa_jax/training/_rundir.py`) and the keys vmap sweep variants may
# differ in.
#
#   kind            step argument   compared on resume   vmap variants may differ
#   TRACED          yes             yes                  yes
#   PROGRAM         no              yes                  no    (shapes the program or the data)
#   RESUME_IGNORED  no              no                   no    (paths, mesh, memory knobs)
#   COSMETIC        no              no                   yes   (logging, run_dir, checkpoints)
#   LABEL           no              yes                  yes   (a stage's name: RUN@name)
TRACED, PROGRAM, RESUME_IGNORED, COSMETIC, LABEL = (
    "traced",
    "program",
    "resume_ignored",
    "cosmetic",
    "label",
)
KINDS = (TRACED, PROGRAM, RESUME_IGNORED, COSMETIC, LABEL)


def _kind(kind: str, default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING):
    """A dataclass field declared of `kind`."""
    return dataclasses.field(default=default, default_factory=factory, metadata={"kind": kind})


@dataclasses.dataclass(frozen=True)
class LoraSettings:
    """`model.lora`: train low-rank adapters on a frozen base instead of every weight."""

    # 0: full fine-tuning (every weight trained, float32 master weights); r >= 1: LoRA of rank r.
    rank: int = 0
    # The adapter delta is scaled by alpha / rank.
    alpha: float = 16.0
    # Projections that get adapters, among q, k, v, o, gate, up, down.
    targets: list[str] = dataclasses.field(default_factory=lambda: list(PROJECTIONS))
    # Dropout on each adapter's input (PEFT's lora_dropout), in the policy's training steps
    # only (never the reference, evaluation, sampling or export); its masks are drawn from
    # train.seed, the stage and the step, so a resumed run draws the same ones.
    dropout: float = 0.0
    # Storage of the frozen base: float32 | bfloat16 | int8 | nf4 (QLoRA: nf4 + adapters).
    base_storage: str = "bfloat16"
    # Quantization block (entries per scale) of an int8/nf4 base.
    block_size: int = 64


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    # A local Hugging Face directory (config.json, safetensors, tokenizer files), or "tiny": a
    # random 2-layer Llama and a small trained-in-memory BPE tokenizer (tests and smoke runs).
    path: str = _kind(RESUME_IGNORED, "tiny")
    # Master weights are kept in float32; activations (matmuls) run in this dtype.
    compute_dtype: str = "bfloat16"
    # Rematerialise every decoder block in the backward pass (memory for compute).
    remat: bool = _kind(RESUME_IGNORED, True)
    # Stack the decoder blocks under one lax.scan (compile time independent of the depth).
    scan_layers: bool = False
    # Seed of the random initialisation of a "tiny" model.
    init_seed: int = 0
    # Attention kernel: "auto" (cuDNN flash attention on a GPU in bfloat16, XLA otherwise),
    # "xla" or "cudnn" (jax.nn.dot_product_attention's implementations).
    attention: str = "auto"
    # LoRA / QLoRA (null or rank 0: full fine-tuning).
    lora: LoraSettings | None = dataclasses.field(default_factory=LoraSettings)

    @property
    def uses_lora(self) -> bool:
        return self.lora is not None and self.lora.rank > 0


@dataclasses.dataclass(frozen=True)
class StageConfig:
    name: str = _kind(LABEL, "stage")
    # This stage's view of its rows (see data.view: auto, pairs, helpfulness, safety); null:
    # data.view. Needed only to pick a PKU-SafeRLHF side ("safety" for a safety stage).
    view: str | None = None
    # Data file of this stage; empty means `data.path`.
    data_path: str = _kind(RESUME_IGNORED, "")
    # Pair loss and one-step risk functional, chosen by name (rsa_jax.losses.LOSSES, RISKS).
    loss: str = _KERNEL.loss
    risk: str = _KERNEL.risk
    # Traced loss hyperparameters (docs/method.md): temperature, version-2 weight of the risk
    # difference, risk level (CVaR tail mass or ERM coefficient), discount of the recursion.
    beta: float = _kind(TRACED, float(DEFAULTS.beta))
    alpha: float = _kind(TRACED, float(DEFAULTS.alpha))
    mu: float = _kind(TRACED, float(DEFAULTS.mu))
    gamma: float = _kind(TRACED, float(DEFAULTS.gamma))
    # 1: the chosen side's risk takes gradient; 2: stop-gradient on it, weighted by alpha.
    version: int = _KERNEL.version
    # Quantile per vocabulary half, as the public Ra-DPO code does (cvar_reference only).
    split_vocab: bool = _KERNEL.split_vocab
    # "init": the initial (SFT) model; "previous_stage": the frozen result of the stage before.
    reference: str = INIT
    # Optimizer steps of this stage; -1: one pass over the stage's batches (data.epochs times).
    steps: int = -1

    @property
    def kernel(self) -> Kernel:
        """The static kernel choice (what selects the compiled program)."""
        return Kernel(self.loss, self.risk, self.version, self.split_vocab)

    @property
    def follows_previous(self) -> bool:
        """True when the reference is the frozen policy of the stage before."""
        return self.reference == PREVIOUS_STAGE


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = _kind(TRACED, 2e-5)
    warmup_ratio: float = _kind(TRACED, 0.03)
    # Cosine decay from learning_rate to learning_rate * final_lr_ratio.
    final_lr_ratio: float = _kind(TRACED, 0.0)
    weight_decay: float = _kind(TRACED, 0.0)
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    # Global gradient norm clipping; 0 disables.
    max_grad_norm: float = _kind(TRACED, 1.0)
    # Microbatches per step (gradient accumulation); data.batch_size must be divisible by it.
    microbatches: int = _kind(RESUME_IGNORED, 1)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    # Devices along each mesh axis; one axis may be -1 (all remaining devices).
    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    # TPU slices of a multislice run (joined by the data-centre network, DCN, which is much
    # slower than the chips' ICI links): the `data` axis spans them, every other axis stays
    # inside one slice, so only data parallelism (the gradient all-reduce) crosses slices, as
    # MaxText's `dcn_data_parallelism`. `data` must be a multiple of it; 1 = one slice.
    slices: int = 1
    # Logical axis -> mesh axes (a list; empty = replicated). Code names logical axes only.
    rules: dict[str, list[str]] = dataclasses.field(
        default_factory=lambda: {
            "batch": ["data", "fsdp"],
            "length": [],
            "vocab": ["tensor"],
            "embed": ["fsdp"],
            "heads": ["tensor"],
            "kv_heads": ["tensor"],
            "head_dim": [],
            "mlp": ["tensor"],
        }
    )


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    # Save every this many optimizer steps (and at the end of each stage); 0: only at stage ends.
    every: int = 100
    # Checkpoints kept (older ones deleted after a newer one is complete).
    keep: int = 3
    # Write in the background while training continues.
    async_save: bool = True
    # Keep the policy every this many steps of each stage (before its end) in
    # `candidates/<stage>_<step>/`, never deleted by retention, so points along training join a
    # method's frontier candidates (`RUN@STAGE:STEP`); 0: none.
    candidates_every: int = 0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    # Run directory (layout: docs/run_directory.md).
    run_dir: str = _kind(COSMETIC, "runs/default")
    # "auto": resume when the run directory's config matches (keys that do not change what is
    # trained aside), refuse otherwise; "force": resume even when it differs.
    resume: str = _kind(COSMETIC, "auto")
    # Seeds the masks of LoRA adapter dropout (model.lora.dropout); nothing else draws from it.
    # Traced: the dropout key is a step argument, so vmap variants may use other seeds.
    seed: int = _kind(TRACED, 0)
    log_every: int = _kind(COSMETIC, 1)
    # Chunk of response tokens whose logits the fused loss head forms at once.
    chunk_size: int = _kind(RESUME_IGNORED, DEFAULT_CHUNK_SIZE)
    # "fused": hidden states + unembedding into the loss head; "logits": full [2B, L, V] logits.
    head: str = _kind(RESUME_IGNORED, "fused")
    progress_bar: bool = _kind(COSMETIC, True)
    # Peak dense TFLOP/s of one device, for the MFU estimate in the metrics; 0: MFU not logged.
    peak_tflops: float = _kind(COSMETIC, 0.0)
    # JAX's persistent compilation cache: a repeated or resumed run on the same devices loads
    # its compiled steps instead of compiling again. "auto": $XDG_CACHE_HOME/rsa_jax/jax_cache
    # (~/.cache/rsa_jax/jax_cache); "": off. Changes nothing trained.
    compilation_cache_dir: str = _kind(COSMETIC, "auto")
    # Experiment trackers (TRL's spelling) besides metrics.jsonl: tensorboard, wandb, mlflow
    # (the last two: pip install -e '.[tracking]'; configured by their own environment
    # variables, docs/tracking.md). [] for metrics.jsonl alone.
    report_to: list[str] = _kind(COSMETIC, factory=lambda: ["tensorboard"])
    # Evaluate on the held-out pairs (data.eval_path or data.eval_fraction) every this many
    # steps of a stage and at its end, logged as eval/* beside the training metrics; 0: never.
    eval_every: int = _kind(COSMETIC, 0)


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    # Restore reshards onto another mesh (elastic resume); vmap sweeps place their own.
    mesh: MeshConfig = _kind(RESUME_IGNORED, factory=MeshConfig)
    # How often and how a run is saved, never what it trains.
    checkpoint: CheckpointConfig = _kind(COSMETIC, factory=CheckpointConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    stages: list[StageConfig] = dataclasses.field(default_factory=lambda: [StageConfig()])


def _unwrap(kind: Any) -> Any:
    """`X | None` -> X."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return kind


def key_kind(key: str) -> str:
    """The declared kind (TRACED, PROGRAM, RESUME_IGNORED, COSMETIC, LABEL) of a dotted config
    key; list items by index or `*`; a key under a dict or an undeclared field takes its
    enclosing field's kind, an unknown key PROGRAM (compared, never free)."""
    node: Any = Config
    kind = PROGRAM
    for part in key.split("."):
        node = _unwrap(node)
        if typing.get_origin(node) in (list, tuple):
            node = typing.get_args(node)[0]
            continue
        if not dataclasses.is_dataclass(node):
            return kind
        fields = {f.name: f for f in dataclasses.fields(node)}
        if part not in fields:
            return kind if node is not Config else PROGRAM
        kind = fields[part].metadata.get("kind", kind)
        node = typing.get_type_hints(node)[part]
    return kind


def keys_of_kind(*kinds: str, node: Any = Config, prefix: str = "", inherited: str = PROGRAM):
    """Dotted patterns (`*` for list items) of every field of one of `kinds`, shallowest first:
    a field of that kind whose subfields are all of it too is one pattern."""
    out: list[str] = []
    hints = typing.get_type_hints(node)
    for f in dataclasses.fields(node):
        kind = f.metadata.get("kind", inherited)
        kind_type = _unwrap(hints[f.name])
        name = f"{prefix}{f.name}"
        if typing.get_origin(kind_type) in (list, tuple):
            item = typing.get_args(kind_type)[0]
            if dataclasses.is_dataclass(item):
                out += keys_of_kind(*kinds, node=item, prefix=f"{name}.*.", inherited=kind)
                continue
        if dataclasses.is_dataclass(kind_type):
            inner = keys_of_kind(*kinds, node=kind_type, prefix=f"{name}.", inherited=kind)
            every = [f"{name}.{g.name}" for g in dataclasses.fields(kind_type)]
            out += [name] if kind in kinds and inner == every else inner
        elif kind in kinds:
            out.append(name)
    return out


def traced_fields(node: Any) -> tuple[str, ...]:
    """The TRACED fields of one config dataclass (e.g. `StageConfig`: beta, alpha, mu, gamma)."""
    return tuple(f.name for f in dataclasses.fields(node) if f.metadata.get("kind") == TRACED)


def _field_type(key: str) -> Any:
    """The declared type of a dotted key of `Config` (list items by index), or None if unknown."""
    node: Any = Config
    for part in key.split("."):
        node = _unwrap_optional(node)
        origin = typing.get_origin(node)
        if origin in (list, tuple) and part.isdigit():
            node = typing.get_args(node)[0]
        elif dataclasses.is_dataclass(node):
            hints = typing.get_type_hints(node)
            if part not in hints:
                return None
            node = hints[part]
        else:
            return None
    return node


def _unwrap_optional(kind: Any) -> Any:
    """`X | None` -> X (a dataclass that may be null, such as `model.lora`); others as they are."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if len(args) == 1 and dataclasses.is_dataclass(args[0]):
            return args[0]
    return kind


def _check_text_fields(values: Any, where: str, prefix: str = "") -> None:
    """A YAML number or bool where the config wants text (`run_dir: 5`) is an error, not
    silently the text "5": a typo there would otherwise name a directory or a file."""
    if isinstance(values, list):
        for i, item in enumerate(values):
            _check_text_fields(item, where, f"{prefix}{i}.")
        return
    if not isinstance(values, dict):
        return
    for name, value in values.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict | list):
            _check_text_fields(value, where, f"{key}.")
        elif value is not None and not isinstance(value, str) and _is_text(_field_type(key)):
            raise ConfigError(
                f"{where}{key}: expected text, got {type(value).__name__} {value!r} "
                f"(quote it, e.g. {name}: '{value}', if that is meant)"
            )


def _is_text(kind: Any) -> bool:
    """str, or `str | None`: a field whose override value is taken as written."""
    if kind is str:
        return True
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return set(typing.get_args(kind)) == {str, type(None)}
    return False


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    kind = _field_type(key)
    if _is_text(kind):
        # Text fields keep the text: YAML would turn `no` into False and `Question: {prompt}`
        # into a mapping. `null` still clears an optional text field.
        text = raw.strip()
        if kind is not str and text in ("null", "~"):
            return key, None
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
            try:  # a quoted value ('{prompt} answer:'): YAML's unquoting, as before
                unquoted = yaml.safe_load(text)
            except yaml.YAMLError:
                unquoted = None
            if isinstance(unquoted, str):
                return key, unquoted
        return key, raw
    if not raw.strip():
        return key, ""
    try:
        return key, yaml.safe_load(raw)
    except yaml.YAMLError:
        # Not a YAML scalar or list: the text itself (the schema then rejects it by type).
        return key, raw


def _apply_override(values: dict, item: str) -> None:
    key, value = _parse_override(item)
    node: Any = values
    parts = key.split(".")
    for depth, part in enumerate(parts):
        here = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(
                    f"override {item!r}: {here} is not an index of a {len(node)}-list"
                )
        elif not isinstance(node, dict) or part not in node:
            close = (
                difflib.get_close_matches(part, list(node), n=1) if isinstance(node, dict) else []
            )
            hint = f". Did you mean: {'.'.join([*parts[:depth], close[0]])!r}?" if close else ""
            raise ConfigError(f"override {item!r}: unknown key {here!r}{hint}")
        index: Any = int(part) if isinstance(node, list) else part
        if depth == len(parts) - 1:
            node[index] = value
        else:
            node = node[index]


def load_config(
    path: str | None = None, overrides: Sequence[str] = (), *, check: bool = True
) -> Config:
    """YAML file (optional) + dotted overrides (`optim.learning_rate=1e-5`, `stages.1.beta=0.05`).

    Raises ConfigError naming the dotted key for unknown keys, wrong types and invalid values.
    """
    schema = OmegaConf.structured(Config)
    where = f"{path}: " if path else ""  # what an error is blamed on: the file or the overrides
    try:
        merged = schema
        if path is not None:
            raw = _read_yaml(path)
            _check_text_fields(raw, where)
            merged = OmegaConf.merge(schema, raw)
        if overrides:
            where = "override: "
            values = cast(dict, OmegaConf.to_container(merged))
            for item in overrides:
                _apply_override(values, item)
            merged = OmegaConf.merge(schema, values)
        config = cast(Config, OmegaConf.to_object(merged))
    except OmegaConfBaseException as e:
        first = str(e).splitlines()[0]
        key = getattr(e, "full_key", None)
        raise ConfigError(f"{where}{first}" + (f" (key: {key})" if key else "")) from None
    except ValueError as e:  # DataConfig.__post_init__ and friends
        if isinstance(e, ConfigError):
            raise
        message = str(e)
        if message.startswith("DataConfig: "):  # "DataConfig: view must be ..." -> data.view
            field, _, rest = message.removeprefix("DataConfig: ").partition(" ")
            message = f"data.{field}: {rest}"
        raise ConfigError(f"{where or 'config: '}{message}") from None
    if check:
        validate(config)
    return config


def _read_yaml(path: str) -> dict:
    """The top-level mapping of a YAML config file; ConfigError naming the file (and line)."""
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: a UTF-8 BOM is not part of the YAML
            loaded = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a YAML config file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}{line}: YAML syntax error: {problem}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return loaded


def _fail(key: str, message: str) -> NoReturn:
    raise ConfigError(f"{key}: {message}")


# No float setting of the library means anything beyond this magnitude, and float32 products of
# such a value with a log-ratio or a gradient (beta * margin, the squared gradient norm) overflow.
MAX_MAGNITUDE = 1e6


def check_finite(node: Any, prefix: str = "") -> None:
    """ConfigError naming the dotted key of the first float of `node` (a config dataclass, list,
    tuple or dict, walked recursively) that is NaN, infinite or of magnitude above MAX_MAGNITUDE.

    NaN slips through every `x < 0` check (all comparisons with NaN are false), so the
    range checks alone cannot catch it.
    """
    if isinstance(node, bool):
        return
    if isinstance(node, float):
        key = prefix or "value"
        if not math.isfinite(node):
            _fail(key, f"must be a finite number, got {node}")
        if abs(node) > MAX_MAGNITUDE:
            _fail(key, f"must have magnitude <= {MAX_MAGNITUDE:g}, got {node:g}")
        return
    dot = f"{prefix}." if prefix else ""
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        for field in dataclasses.fields(node):
            check_finite(getattr(node, field.name), f"{dot}{field.name}")
    elif isinstance(node, list | tuple):
        for i, item in enumerate(node):
            check_finite(item, f"{dot}{i}")
    elif isinstance(node, dict):
        for name, item in node.items():
            check_finite(item, f"{dot}{name}")


def _validate_lora(lora: LoraSettings) -> None:
    if lora.rank < 0:
        _fail("model.lora.rank", f"must be >= 0 (0: full fine-tuning), got {lora.rank}")
    if lora.rank == 0:
        return
    if not lora.alpha > 0:
        _fail("model.lora.alpha", f"must be > 0, got {lora.alpha}")
    unknown = [t for t in lora.targets if t not in PROJECTIONS]
    if unknown or not lora.targets or len(set(lora.targets)) != len(lora.targets):
        _fail(
            "model.lora.targets",
            f"must be distinct names among {', '.join(PROJECTIONS)}, got {list(lora.targets)}",
        )
    if not 0 <= lora.dropout < 1:
        _fail("model.lora.dropout", f"must lie in [0, 1), got {lora.dropout}")
    if lora.base_storage not in STORAGES:
        _fail(
            "model.lora.base_storage",
            f"must be one of {', '.join(STORAGES)}, got {lora.base_storage!r}",
        )
    if lora.block_size < 1:
        _fail("model.lora.block_size", f"must be >= 1, got {lora.block_size}")


def validate(config: Config, device_count: int | None = None) -> None:
    """Constraints beyond types. With `device_count`, also that the mesh fits the devices/batch."""
    check_finite(config)
    m = config.model
    if m.attention not in ATTENTION_CHOICES:
        _fail("model.attention", f"must be one of {ATTENTION_CHOICES}, got {m.attention!r}")
    if m.compute_dtype not in DTYPES:
        _fail("model.compute_dtype", f"must be one of {DTYPES}, got {m.compute_dtype!r}")
    if m.lora is not None:
        _validate_lora(m.lora)
    if not config.stages:
        _fail("stages", "at least one stage is required")
    for i, s in enumerate(config.stages):
        k = f"stages.{i}"
        try:
            s.kernel  # noqa: B018 - checks loss, risk and version against the registries
        except KernelError as e:
            _fail(f"{k}.{e.field}", str(e))
        if s.reference not in REFERENCES:
            _fail(f"{k}.reference", f"must be one of {REFERENCES}, got {s.reference!r}")
        if i == 0 and s.follows_previous:
            _fail(f"{k}.reference", "the first stage has no previous stage; use 'init'")
        if s.view is not None and s.view not in VIEWS:
            _fail(f"{k}.view", f"must be one of {', '.join(VIEWS)} or null, got {s.view!r}")
        if s.beta <= 0:
            _fail(f"{k}.beta", f"must be > 0, got {s.beta}")
        try:
            check_mu(s.risk, s.mu)
        except KernelError as e:
            _fail(f"{k}.{e.field}", str(e))
        if s.alpha < 0:
            _fail(f"{k}.alpha", f"must be >= 0, got {s.alpha}")
        if not 0 < s.gamma <= 1:
            _fail(f"{k}.gamma", f"discount must lie in (0, 1], got {s.gamma}")
        if s.steps == 0 or s.steps < -1:
            _fail(f"{k}.steps", f"must be -1 (one pass) or >= 1, got {s.steps}")
    o = config.optim
    if o.learning_rate <= 0:
        _fail("optim.learning_rate", f"must be > 0, got {o.learning_rate}")
    if not 0 <= o.warmup_ratio < 1:
        _fail("optim.warmup_ratio", f"must lie in [0, 1), got {o.warmup_ratio}")
    for name in ("b1", "b2"):
        if not 0 <= getattr(o, name) < 1:
            _fail(f"optim.{name}", f"Adam decay must lie in [0, 1), got {getattr(o, name)}")
    if o.eps <= 0:
        _fail("optim.eps", f"must be > 0, got {o.eps}")
    if o.weight_decay < 0:
        _fail("optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
    if o.max_grad_norm < 0:
        _fail("optim.max_grad_norm", f"must be >= 0 (0 disables clipping), got {o.max_grad_norm}")
    if not 0 <= o.final_lr_ratio <= 1:
        _fail("optim.final_lr_ratio", f"must lie in [0, 1], got {o.final_lr_ratio}")
    if o.microbatches < 1:
        _fail("optim.microbatches", f"must be >= 1, got {o.microbatches}")
    if config.data.batch_size % o.microbatches:
        _fail(
            "optim.microbatches",
            f"data.batch_size={config.data.batch_size} is not divisible by {o.microbatches}",
        )
    sizes = [config.mesh.data, config.mesh.fsdp, config.mesh.tensor]
    if sizes.count(-1) > 1:
        _fail("mesh", f"at most one axis may be -1, got data/fsdp/tensor = {sizes}")
    if any(s == 0 or s < -1 for s in sizes):
        _fail("mesh", f"axis sizes must be >= 1 or -1, got data/fsdp/tensor = {sizes}")
    if config.mesh.slices < 1:
        _fail("mesh.slices", f"must be >= 1 (1: one slice), got {config.mesh.slices}")
    for logical, axes in config.mesh.rules.items():
        for a in axes:
            if a not in MESH_AXES:
                _fail(f"mesh.rules.{logical}", f"unknown mesh axis {a!r} (axes: {MESH_AXES})")
    if config.data.template is not None:
        fields = {
            f"{{{f}{'!' + c if c else ''}{':' + spec if spec else ''}}}"
            for _, f, spec, c in string.Formatter().parse(config.data.template)
            if f is not None
        }
        if fields != {"{prompt}"}:
            _fail("data.template", f"the only field allowed is {{prompt}}, got {sorted(fields)}")
    if config.train.resume not in ("auto", "force"):
        _fail("train.resume", f"must be 'auto' or 'force', got {config.train.resume!r}")
    if config.train.head not in HEADS:
        _fail("train.head", f"must be one of {HEADS}, got {config.train.head!r}")
    if config.checkpoint.keep < 1:
        _fail("checkpoint.keep", f"must be >= 1, got {config.checkpoint.keep}")
    if config.checkpoint.every < 0:
        _fail(
            "checkpoint.every",
            f"must be >= 0 (0: only at stage ends), got {config.checkpoint.every}",
        )
    if config.checkpoint.candidates_every < 0:
        _fail(
            "checkpoint.candidates_every",
            f"must be >= 0 (0: no candidates along training), got "
            f"{config.checkpoint.candidates_every}",
        )
    t = config.train
    if t.log_every < 1:
        _fail("train.log_every", f"must be >= 1, got {t.log_every}")
    if t.chunk_size < 1:
        _fail("train.chunk_size", f"must be >= 1, got {t.chunk_size}")
    if t.peak_tflops < 0:
        _fail("train.peak_tflops", f"must be >= 0 (0: MFU not logged), got {t.peak_tflops}")
    if not t.run_dir:
        _fail("train.run_dir", "must not be empty")
    if t.eval_every < 0:
        _fail("train.eval_every", f"must be >= 0 (0: no held-out evaluation), got {t.eval_every}")
    if t.eval_every and not (config.data.eval_path or config.data.eval_fraction):
        _fail("train.eval_every", "needs held-out pairs: set data.eval_path or data.eval_fraction")
    unknown = [r for r in t.report_to if r not in REPORT_TO]
    if unknown:
        _fail("train.report_to", f"unknown {unknown}: choose among {', '.join(REPORT_TO)}")
    if not config.model.path:
        _fail("model.path", "must not be empty (a local Hugging Face directory, or 'tiny')")
    if device_count is not None:
        shape = mesh_shape(config.mesh, device_count)
        batch_axes = config.mesh.rules.get("batch", [])
        axis_sizes: dict[str, int] = dict(zip(MESH_AXES, shape, strict=True))
        shards = 1
        for a in batch_axes:
            shards *= axis_sizes[a]
        per_micro = config.data.batch_size // o.microbatches
        if per_micro % shards:
            _fail(
                "data.batch_size",
                f"{per_micro} pairs per microbatch do not divide over the {shards} batch shards "
                f"of mesh {axis_sizes}",
            )


def mesh_shape(mesh: MeshConfig, device_count: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) with the -1 axis filled; ConfigError if it does not fit the devices."""
    sizes = [mesh.data, mesh.fsdp, mesh.tensor]
    known = 1
    for s in sizes:
        if s != -1:
            known *= s
    if -1 in sizes:
        if device_count % known:
            _fail("mesh", f"{sizes} cannot fill {device_count} devices ({known} does not divide)")
        sizes[sizes.index(-1)] = device_count // known
    if sizes[0] * sizes[1] * sizes[2] != device_count:
        _fail("mesh", f"data*fsdp*tensor = {sizes} does not use the {device_count} devices")
    if mesh.slices > 1 and sizes[0] % mesh.slices:
        _fail(
            "mesh.slices",
            f"the data axis ({sizes[0]} of data/fsdp/tensor = {sizes} on {device_count} devices) "
            f"is not a multiple of the {mesh.slices} slices it must span",
        )
    return sizes[0], sizes[1], sizes[2]


def to_json(config: Config) -> str:
    return json.dumps(dataclasses.asdict(config), indent=2, sort_keys=True)


def from_json(text: str) -> Config:
    return load_config_dict(json.loads(text))


def load_config_dict(values: dict) -> Config:
    try:
        return cast(
            Config, OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), values))
        )
    except OmegaConfBaseException as e:
        raise ConfigError(str(e).splitlines()[0]) from None


def stage_data(config: Config, stage: StageConfig) -> DataConfig:
    """The data options of one stage: its view (data.view unless it sets its own) and, if set,
    its own file."""
    return dataclasses.replace(
        config.data,
        view=config.data.view if stage.view is None else stage.view,
        path=stage.data_path or config.data.path,
    )


def check_data_files(config: Config) -> None:
    """ConfigError naming the key (`data.path` or `stages.N.data_path`) of the first stage data
    file that does not exist: checked before a model loads or a run directory is made."""
    for i, stage in enumerate(config.stages):
        path = stage_data(config, stage).path
        if not path:
            _fail("data.path", f"stage {i} ({stage.name}) has no data file: set data.path")
        if not os.path.exists(path):
            key = f"stages.{i}.data_path" if stage.data_path else "data.path"
            _fail(key, f"{path!r} does not exist")


def stage_view_key(config: Config, index: int) -> str:
    """The dotted key that decides stage `index`'s view: what an error tells the user to set."""
    return "data.view" if config.stages[index].view is None else f"stages.{index}.view"


def config_files(directory: str = "configs") -> list[str]:
    return sorted(os.path.join(directory, f) for f in os.listdir(directory) if f.endswith(".yaml"))
