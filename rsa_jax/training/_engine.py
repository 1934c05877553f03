"""The training engine: one object that owns what every kind of run needs, and the one loop.

    engine = Engine(config)                 # mesh, tokenizer, model definition, initial params
    stage = engine.stage(0, engine.initial) # data, reference, optimizer state, step, hyperparams
    engine.fit(stage, hooks)                # the loop: next batch -> place -> step -> hooks

Built from a `Config` (and optionally a mesh and a user optax transformation), the engine owns
the device layout, the tokenizer, the model definition and its sharded initial parameters, the
optimizer, and the cache of compiled steps. Everything a run does is made of three calls:

- `stage(i, policy)` prepares stage i from a policy: its data iterator, its reference (the
  initial model, or a frozen copy of the policy for `reference: previous_stage`), the
  optimizer state placed on the mesh, the compiled step and the traced hyperparameters.
- `compiled_step(objective, state_sh)` returns the jitted step for an objective (a pair-loss
  kernel or SFT), cached by everything that shapes the program, so stages and runs that differ
  only in hyperparameters share one compile; `vmapped_step` is the same step under `jax.vmap`
  over K stacked variants (the vmap sweep).
- `fit(stage, on_step)` runs the steps: the single training loop of the library. Preference
  stages (`train`), SFT (`rsa_jax.tasks.sft`) and both sweep modes go through it.

Checkpoints, metrics files and signals belong to a run directory, not to the engine: they are
hooks (`_hooks.Hooks`, built by `_run.Run`) that `train` (in `_trainer.py`) and the vmap sweep
(one set per variant) pass to `fit`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import grain
import jax
import numpy as np
import optax

from rsa_jax.config import Config, StageConfig, stage_data, stage_view_key, validate
from rsa_jax.data import load_pairs, make_pair_dataset
from rsa_jax.losses import members_split_over
from rsa_jax.models import LlamaConfig
from rsa_jax.training._mesh import Layout, make_mesh, maybe_initialize_distributed, place_batch
from rsa_jax.training._model import (
    ModelDef,
    define_model,
    init_lora,
    init_params,
    llama_config,
    load_tokenizer,
)
from rsa_jax.training._optim import apply_update, make_optimizer, optax_update
from rsa_jax.training._step import (
    BATCH_KEYS,
    Hyper,
    Objective,
    PairObjective,
    TrainState,
    init_state,
    make_eval_step,
    make_train_step,
    stage_dropout_key,
    state_shardings,
)

log = logging.getLogger(__name__)

# Seconds JAX spends tracing, lowering and compiling, summed from its monitoring events: the
# loop subtracts them from a step's wall time, so throughput never counts compilation.
_COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)
_compile_seconds = [0.0]


def _count_compile_time(event: str, duration_secs: float, **kwargs: str | int) -> None:
    if event in _COMPILE_EVENTS:
        _compile_seconds[0] += duration_secs


jax.monitoring.register_event_duration_secs_listener(_count_compile_time)

# Programs loaded from JAX's persistent compilation cache (`train.compilation_cache_dir`).
_CACHE_HIT = "/jax/compilation_cache/cache_hits"
_cache_hits = [0]


def _count_cache_hits(event: str, **kwargs: str | int) -> None:
    if event == _CACHE_HIT:
        _cache_hits[0] += 1


jax.monitoring.register_event_listener(_count_cache_hits)


def compilation_cache_dir(setting: str) -> str | None:
    """The directory `train.compilation_cache_dir` names: "auto" is
    $XDG_CACHE_HOME/rsa_jax/jax_cache (~/.cache/... without it), "" is None (off)."""
    if not setting:
        return None
    if setting == "auto":
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        return os.path.join(base, "rsa_jax", "jax_cache")
    return os.path.expanduser(setting)


def use_compilation_cache(setting: str) -> None:
    """Points JAX's persistent compilation cache at `setting`'s directory (nothing when off),
    so a repeated or resumed run on the same devices loads its compiled steps."""
    path = compilation_cache_dir(setting)
    if path is None or getattr(jax.config, "jax_compilation_cache_dir", None) == path:
        return
    from jax.experimental.compilation_cache import compilation_cache

    # JAX's own thresholds stay (programs that took 1 s or more to compile, any size: the
    # steps, not small helpers); JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS changes them.
    jax.config.update("jax_compilation_cache_dir", path)
    compilation_cache.reset_cache()  # a cache opened on another directory reopens on this one


# (step function id, batch shapes) whose program `fit` has compiled or loaded in this process.
_compiled_programs: set = set()

# Jitted steps by everything that shapes the program (model, layout, objective, optimizer,
# microbatching, vmap axes); hyperparameters are arguments, so runs that agree here share one
# compiled program. Module-level so that several engines in one process (sweep variants,
# tests) share it.
_STEP_CACHE: dict = {}


def clear_step_cache() -> None:
    _STEP_CACHE.clear()


def cached_steps() -> list:
    """The jitted steps compiled so far in this process (`fn._cache_size()` counts programs)."""
    return list(_STEP_CACHE.values())


def device_copy(tree):
    """A fresh on-device buffer per leaf (the donated policy must not alias the reference)."""
    return jax.tree.map(lambda x: jax.device_put(x, x.sharding, may_alias=False), tree)


@dataclasses.dataclass
class Stage:
    """One stage ready to run: `fit` advances `state` in place of this object."""

    index: int
    config: StageConfig
    state: TrainState  # policy, optimizer state, stage step (placed; donated by each step)
    # The step's frozen inputs: the reference params (None for objectives without one), or with
    # LoRA {"base": the frozen base, "adapters": the reference adapters or None (adapters off)}.
    reference: Any
    batches: Iterator[dict]
    total: int  # optimizer steps of the stage
    step_fn: Callable
    hyper: Hyper


class Engine:
    """See the module docstring. `tx`: a user optax transformation for the whole run (its own
    learning rate and schedule); None uses the built-in AdamW whose hyperparameters are traced
    (the config's `optim`), which sweeps need."""

    def __init__(
        self,
        config: Config,
        *,
        layout: Layout | None = None,
        tx: optax.GradientTransformation | None = None,
        tokenizer=None,
        llama: LlamaConfig | None = None,
        check_devices: bool = True,
    ):
        """`layout`: the mesh and rules (default: the config's mesh over every device);
        `tokenizer` and `llama` (the architecture) default to what `config.model` names;
        `check_devices=False` (loading a policy for export or evaluation, vmap sweeps on one
        device) skips the check that the config's batch and mesh fit the devices."""
        maybe_initialize_distributed()
        use_compilation_cache(config.train.compilation_cache_dir)
        self.config = config
        if layout is None:
            layout = Layout(make_mesh(config.mesh), config.mesh.rules)
        self.layout = layout
        validate(config, device_count=layout.mesh.size if check_devices else None)
        self.tokenizer = load_tokenizer(config.model) if tokenizer is None else tokenizer
        if llama is None:
            llama = llama_config(config.model, len(self.tokenizer))
        if llama.final_logit_softcapping is not None and config.train.head == "fused":
            # The fused head forms logits chunk by chunk from the unembedding alone.
            raise ValueError(
                f"{config.model.path}: final_logit_softcapping={llama.final_logit_softcapping} "
                "is not applied by train.head=fused; set train.head=logits"
            )
        self.model: ModelDef = define_model(config.model, llama, layout)
        self.user_tx = tx
        self.tx = make_optimizer(config.optim) if tx is None else tx
        self._initial: dict | None = None
        self._base: dict | None = None

    # -- parameters ---------------------------------------------------------------------------
    @property
    def initial(self) -> dict:
        """The initial (SFT) parameters, loaded or randomly initialised once, placed sharded
        (with LoRA: the initial adapters, B = 0)."""
        if self._initial is None:
            if self.model.lora is None:
                self._initial = init_params(self.model, self.config.model)
            else:
                self._base, self._initial = init_lora(self.model, self.config.model)
        return self._initial

    @property
    def base(self) -> dict | None:
        """The frozen base of a LoRA model (created or loaded once; never donated nor copied),
        None for full fine-tuning."""
        if self.model.lora is not None and self._base is None:
            self.initial  # noqa: B018 - creates the base with the initial adapters
        return self._base

    def frozen(self, reference_adapters: dict | None) -> dict:
        """The LoRA step's frozen inputs: the base, and the reference adapters (None: off)."""
        return {"base": self.base, "adapters": reference_adapters}

    def saved_reference(self, stage: Stage):
        """What a checkpoint keeps of the stage's reference: the trained reference of a
        `previous_stage` stage (with LoRA its adapters alone, the base being the model's), or
        None."""
        if not stage.config.follows_previous:
            return None
        return stage.reference if self.model.lora is None else stage.reference["adapters"]

    def restore_reference(self, stage: Stage, restored) -> None:
        """Puts a reference restored from a checkpoint (`saved_reference`'s tree) in `stage`."""
        if restored is not None:
            stage.reference = restored if self.model.lora is None else self.frozen(restored)

    def merged(self, params: dict) -> dict:
        """Full parameters of the policy `params`: themselves, or with LoRA the base
        dequantized plus (alpha / r) A B (float32, for `model.module`, export and merging)."""
        if self.model.lora is None:
            return params
        from rsa_jax.models import merged_params

        base, full = self.base, self.model.full
        assert base is not None and full is not None  # a LoRA engine has both
        merged = merged_params(self.model.lora, base, params)
        return {k: jax.device_put(v, full.shardings[k]) for k, v in merged.items()}

    def merged_abstract(self) -> dict[str, jax.ShapeDtypeStruct]:
        """Shapes, dtypes and shardings of `merged(params)`, the policy `load_policy` gives
        (evaluation, export): the trained parameters, or with LoRA the float32 merged ones on
        the plain model's shardings."""
        full = self.model.full
        return self.model.abstract_params() if full is None else full.abstract_params()

    def abstract_state(self) -> TrainState:
        """Shapes, dtypes and shardings of a TrainState (restore targets), without arrays."""
        params = self.model.abstract_params()
        rep = self.layout.replicated
        opt = jax.eval_shape(self.tx.init, params)
        opt = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep), opt)
        step = jax.ShapeDtypeStruct((), jax.numpy.int32, sharding=rep)
        return TrainState(params, opt, step)

    def new_state(self, params: dict) -> TrainState:
        state = init_state(params, self.tx, self.layout.replicated)
        return jax.device_put(state, state_shardings(state))

    # -- programs -----------------------------------------------------------------------------
    def objective(self, stage: StageConfig) -> PairObjective:
        train = self.config.train
        return PairObjective(
            stage.kernel,
            head=train.head,
            chunk_size=train.chunk_size,
            row_shards=self.layout.row_shards,
        )

    def compiled_step(
        self, objective: Objective, state_sh: TrainState, *, reference_adapters: bool = False
    ):
        """The jitted step of `objective` on this engine's model and optimizer, with explicit
        shardings (`state_sh`: the state's) and the state donated. Cached by everything that
        shapes the program, so runs that differ only in hyperparameters share one compile.
        `reference_adapters` (LoRA): the reference has adapters of its own (stage 2), else it
        is the base with adapters off. Full fine-tuning: one program whatever the reference."""
        reference_adapters = reference_adapters and self.model.lora is not None
        key = (
            self._program_key(objective),
            _sharding_key(state_sh),
            self.layout,
            reference_adapters,
        )
        step = _STEP_CACHE.get(key)
        if step is None:
            rep = self.layout.replicated
            ref_sh = None
            if objective.needs_reference or self.model.lora is not None:  # LoRA: the base
                ref_sh = self.model.frozen_shardings(reference_adapters)
            batch_sh = {k: self.layout.batch for k in BATCH_KEYS}
            step = _STEP_CACHE[key] = jax.jit(
                self._step(
                    objective,
                    grad_shardings=state_sh.params,
                    micro_sharding=self.layout.microbatches,
                ),
                in_shardings=(state_sh, ref_sh, batch_sh, rep),
                out_shardings=(state_sh, rep),
                donate_argnums=(0,),
            )
        return step

    def vmapped_step(
        self,
        objective: Objective,
        reference_axis: int | None,
        *,
        shardings: tuple | None = None,
        axis_name: str | None = None,
    ):
        """The same step under `jax.vmap` over K stacked states and hyperparameters, the batch
        shared: `reference_axis` 0 gives each variant its own reference (stacked), None one
        shared reference. With LoRA the frozen base is always shared (passed once, not
        vmapped) and `reference_axis` applies to the reference adapters. Jitted with the state
        donated. `shardings`: (in_shardings, out_shardings) of the jit, with the K axis on the
        mesh axis `axis_name` (also vmap's `spmd_axis_name`), as `rsa_jax.sweep` places the
        variants; None leaves placement to XLA."""
        key = (
            self._program_key(objective),
            ("vmap", reference_axis),
            _sharding_key(shardings),
            axis_name,
        )
        step = _STEP_CACHE.get(key)
        if step is None:
            ref_axes = reference_axis
            if self.model.lora is not None:
                ref_axes = {"base": None, "adapters": reference_axis}
            batched = jax.vmap(
                self._step(objective), in_axes=(0, ref_axes, None, 0), spmd_axis_name=axis_name
            )
            # The risk's selection keeps the variant axis its own where it is split over
            # devices (`losses.members_split_over`): joined to the rows, it would gather keys.
            members = self.layout.mesh.shape.get(axis_name, 1) if axis_name else 1

            def vmapped(*args):
                with members_split_over(members):
                    return batched(*args)

            placed = {}
            if shardings is not None:
                placed = dict(in_shardings=shardings[0], out_shardings=shardings[1])
            step = _STEP_CACHE[key] = jax.jit(vmapped, donate_argnums=(0,), **placed)
        return step

    def _step(self, objective: Objective, grad_shardings=None, micro_sharding=None):
        update = apply_update if self.user_tx is None else optax_update
        microbatches = self.config.optim.microbatches
        return make_train_step(
            self.model,
            objective,
            self.tx,
            update,
            microbatches=microbatches,
            grad_shardings=grad_shardings,
            micro_sharding=micro_sharding,
        )

    def _program_key(self, objective: Objective) -> tuple:
        return (self.model.key, objective, self._tx_key(), self.config.optim.microbatches)

    def _tx_key(self):
        if self.user_tx is None:  # the built-in AdamW: its Adam constants shape the program
            o = self.config.optim
            return ("adamw", o.b1, o.b2, o.eps)
        return ("user", id(self.user_tx))

    # -- stages -------------------------------------------------------------------------------
    def stage_batches(self, i: int) -> tuple[Iterator[dict], int]:
        """(iterator over stage i's batches, the stage's number of steps). Raises ValueError
        when the data gives no full batch or fewer batches than the stage's `steps`."""
        dataset, total, data = self._stage_dataset(i, report_to_log=True)
        options = grain.ReadOptions(num_threads=data.read_threads)
        return iter(dataset.to_iter_dataset(options)), total

    def check_stage_data(self, first: int = 0) -> None:
        """Reads and checks the data of stages `first`.. up front (files, schema, enough
        batches), so a bad stage-2 file fails before stage 1 trains, not after."""
        for i in range(first, len(self.config.stages)):
            self._stage_dataset(i, report_to_log=False)

    def _stage_dataset(self, i: int, *, report_to_log: bool):
        config, stage = self.config, self.config.stages[i]
        data = stage_data(config, stage)
        pairs, report = load_pairs(data, view_key=stage_view_key(config, i))
        if data.eval_fraction:
            kept, held = _split_heldout(pairs, data)
            report.dropped["held out for evaluation (data.eval_fraction)"] += len(held)
            pairs = kept
        dataset = make_pair_dataset(
            pairs,
            self.tokenizer,
            data,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            report=report,
        )
        if len(dataset) == 0:
            raise ValueError(
                f"stage {stage.name!r}: {data.path} gives no full batch ({report.summary()})"
            )
        if stage.steps > len(dataset):
            raise ValueError(
                f"stage {stage.name!r}: steps={stage.steps} but {data.path} gives only "
                f"{len(dataset)} batches of {data.batch_size} pairs over {data.epochs} epoch(s); "
                "lower the stage's steps or raise data.epochs"
            )
        if report_to_log:
            left_out = report.dropped or report.skipped
            (log.warning if left_out else log.info)(
                "stage %r data: %s", stage.name, report.summary()
            )
        total = stage.steps if stage.steps > 0 else len(dataset)
        return dataset, total, data

    def heldout_batches(self, i: int) -> list[dict]:
        """Stage i's held-out pairs (`data.eval_path`, or the `data.eval_fraction` its training
        data leaves out) under the stage's view, as this host's rows of full global batches of
        `data.batch_size` pairs in file order (the partial last batch is left out and logged):
        the training batch's shape and sharding, so the evaluation compiles once."""
        config = self.config
        data = stage_data(config, config.stages[i])
        if data.eval_path:
            data = dataclasses.replace(data, path=data.eval_path)
            pairs, _ = load_pairs(data, view_key=stage_view_key(config, i))
        else:
            pairs = _split_heldout(load_pairs(data, view_key=stage_view_key(config, i))[0], data)[1]
        data = dataclasses.replace(data, shuffle=False, epochs=1, drop_remainder=True)
        if len(pairs) < data.batch_size:
            raise ValueError(
                f"stage {config.stages[i].name!r}: {len(pairs)} held-out pairs, fewer than one "
                f"batch of data.batch_size={data.batch_size}; hold out more pairs"
            )
        dataset = make_pair_dataset(
            pairs,
            self.tokenizer,
            data,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        if len(pairs) % data.batch_size:
            log.info("held-out evaluation leaves out %d pairs", len(pairs) % data.batch_size)
        return [batch for j in range(len(dataset)) if (batch := dataset[j]) is not None]

    def compiled_eval_step(self, objective: Objective, params_sh, *, reference_adapters=False):
        """The jitted held-out evaluation of `objective` (`make_eval_step`): the step's
        shardings for the parameters, the reference and the batch, nothing donated; cached like
        the step, so every evaluation of a run (and of runs that differ only in
        hyperparameters) runs one compiled program."""
        reference_adapters = reference_adapters and self.model.lora is not None
        key = ("eval", self.model.key, objective, self.config.optim.microbatches)
        key += (_sharding_key(params_sh), self.layout, reference_adapters)
        step = _STEP_CACHE.get(key)
        if step is None:
            ref_sh = None
            if objective.needs_reference or self.model.lora is not None:
                ref_sh = self.model.frozen_shardings(reference_adapters)
            batch_sh = {k: self.layout.batch for k in BATCH_KEYS}
            fn = make_eval_step(self.model, objective, microbatches=self.config.optim.microbatches)
            rep = self.layout.replicated
            step = _STEP_CACHE[key] = jax.jit(
                fn, in_shardings=(params_sh, ref_sh, batch_sh, rep), out_shardings=rep
            )
        return step

    def evaluate(self, stage: Stage, batches: list[dict]) -> dict[str, float]:
        """The stage's objective on held-out `batches` (`heldout_batches`) at its current
        policy: the mean over pairs of the loss and of every metric (rewards/accuracies and
        margins, kl/*, risk/*), named `eval/...`, and `eval/pairs`."""
        params_sh = jax.tree.map(lambda x: x.sharding, stage.state.params)
        fn = self.compiled_eval_step(
            self.objective(stage.config),
            params_sh,
            reference_adapters=stage.config.follows_previous,
        )
        totals: dict[str, float] = {}
        for batch in batches:
            sums = fn(stage.state.params, stage.reference, self.place(batch), stage.hyper)
            for k, v in jax.device_get(sums).items():
                totals[k] = totals.get(k, 0.0) + float(v)
        pairs = totals.pop("pairs")
        return {f"eval/{k}": v / pairs for k, v in totals.items()} | {"eval/pairs": pairs}

    def stage(self, i: int, policy: dict) -> Stage:
        """Stage i starting from `policy`: data, reference, placed optimizer state, step, hyper."""
        config = self.config.stages[i]
        batches, total = self.stage_batches(i)
        if self.model.lora is None:
            reference = device_copy(policy) if config.follows_previous else self.initial
        else:  # one base for both models; stage 2's reference: a copy of the adapters alone
            reference = self.frozen(device_copy(policy) if config.follows_previous else None)
        if policy is self._initial:  # the step donates the state: never the reference's buffers
            policy = device_copy(policy)
        state = self.new_state(policy)
        step_fn = self.compiled_step(
            self.objective(config),
            state_shardings(state),
            reference_adapters=config.follows_previous,
        )
        return Stage(
            i, config, state, reference, batches, total, step_fn, self.hyper(config, total, i)
        )

    def hyper(self, stage: StageConfig, total_steps: int, index: int = 0) -> Hyper:
        """The traced hyperparameters of stage `index` (`stage`), placed replicated (no
        optimizer part with a user optax transformation, whose hyperparameters are its own;
        the dropout key of `stage_dropout_key` with LoRA dropout)."""
        optim = self.config.optim if self.user_tx is None else None
        key = stage_dropout_key(self.config, index)
        hyper = Hyper.for_stage(stage, optim, total_steps, key)
        return jax.device_put(hyper, self.layout.replicated)

    def place(self, batch: dict) -> dict:
        """This host's rows of a global batch, placed on the layout's batch sharding."""
        return place_batch({k: batch[k] for k in BATCH_KEYS}, self.layout.batch)

    # -- the loop -----------------------------------------------------------------------------
    def fit(self, stage: Stage, on_step: Callable | None = None, *, place=None) -> bool:
        """Runs `stage` from its current step to `stage.total`; True when it got there.

        After each step, `on_step(stage, metrics, seconds, compile_seconds)` (a `Hooks`, or
        any function of those arguments) runs with the step's metrics (on the device,
        computed), its wall time without compilation, and the
        seconds spent tracing and compiling during the step (0 once the program is compiled);
        it returns True to stop early (a signal), and then `fit` returns False. `place(batch)`
        puts a host batch on the devices (default: this host's rows of the global batch on the
        layout's batch sharding).
        """
        if place is None:
            place = self.place

        while steps_done(stage.state) < stage.total:
            batch = next(stage.batches)
            t0, compiled0, hits0 = time.perf_counter(), _compile_seconds[0], _cache_hits[0]
            placed = place(batch)
            program = (id(stage.step_fn), tuple(np.shape(v) for v in placed.values()))
            what = f"the step of stage {stage.index} ({stage.config.name})"
            new_program = program not in _compiled_programs
            if new_program:  # compiling takes minutes for big models: say so before and after
                shape = "x".join(str(n) for n in np.shape(placed["input_ids"]))
                _say(f"compiling {what} for batches of {shape} tokens ...")
            stage.state, metrics = stage.step_fn(stage.state, stage.reference, placed, stage.hyper)
            jax.block_until_ready(metrics)  # the step's real time, not its dispatch
            compile_s = _compile_seconds[0] - compiled0
            if new_program:
                _compiled_programs.add(program)
                how = "loaded from the compilation cache" if _cache_hits[0] > hits0 else "compiled"
                _say(f"{how} {what} in {compile_s:.1f} s")
            seconds = time.perf_counter() - t0 - compile_s
            if on_step is not None and on_step(stage, metrics, seconds, compile_s):
                break
        return steps_done(stage.state) >= stage.total


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _split_heldout(pairs: list, data) -> tuple[list, list]:
    """(training pairs, held-out pairs): `data.eval_fraction` of them (at least one), drawn
    with `data.seed`, both in file order."""
    n_held = max(1, round(len(pairs) * data.eval_fraction))
    held = set(np.random.default_rng(data.seed).permutation(len(pairs))[:n_held].tolist())
    kept = [p for j, p in enumerate(pairs) if j not in held]
    return kept, [p for j, p in enumerate(pairs) if j in held]


def steps_done(state: TrainState) -> int:
    """Optimizer steps the state has taken (the first variant's under vmap: they move together)."""
    return int(np.asarray(state.step).reshape(-1)[0])


def _sharding_key(tree) -> tuple:
    leaves, treedef = jax.tree.flatten(tree)
    return (treedef, tuple(leaves))
