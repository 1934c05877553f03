"""Training: one engine for every kind of run, and `train(config)` on top of it.

    from rsa_jax.config import load_config
    from rsa_jax.training import train

    result = train(load_config("configs/rsa_cvar.yaml", ["model.path=artifacts/smollm2-135m"]))

- `Engine`: built from a `Config` (and optionally a mesh layout and an optax transformation);
  owns the model definition, sharded parameters, optimizer, the cache of compiled steps, and
  the one training loop (`Engine.fit`). Preference stages, SFT and both sweep modes run on it.
- `train(config)`: the stages of a config with checkpoints (exact resume), metrics and signals,
  added around `Engine.fit` as hooks (`Hooks`, `StepInfo`; `Run` builds a run's hooks).
- `RunDir`: the layout of a run directory (every name spelled once), its lock and config.json;
  `CheckpointMeta` the typed checkpoint record; `resolve_source` reads `RUN`, `RUN@STAGE` and
  Hugging Face directories for every command.
- `load_policy(run_dir)`: the newest usable policy of a run directory (LoRA: merged);
  `load_adapters(run_dir)`: the trained parameters as saved (LoRA: the adapters).
- Typed hyperparameters: `Hyper` (loss + optimizer + LoRA dropout key, traced;
  `stage_dropout_key` derives the key from `train.seed` and the stage), the objectives
  `PairObjective` (a static `rsa_jax.losses.Kernel`) and `NextTokenObjective` (SFT).
- Mesh and sharding: `Layout` (mesh + logical-axis rules), `make_mesh` (with
  `slice_groups`: multislice meshes), `place_batch`.
"""

from rsa_jax.training._checkpoint import (
    CheckpointMismatch,
    Checkpoints,
    CheckpointWriteError,
    CorruptCheckpoint,
)
from rsa_jax.training._checksum import tree_checksums
from rsa_jax.training._control import (
    EXIT_CONFIG,
    EXIT_DONE,
    EXIT_FAILED,
    EXIT_PREEMPTED,
    NonFiniteError,
    StopSignal,
    check_finite,
    exit_code,
)
from rsa_jax.training._engine import (
    Engine,
    Stage,
    cached_steps,
    clear_step_cache,
    compilation_cache_dir,
    device_copy,
    steps_done,
)
from rsa_jax.training._hooks import Hooks, StepInfo, all_finite
from rsa_jax.training._logging import METRICS_FILE, MetricsLog, drop_torn_tail, read_metrics
from rsa_jax.training._merge import Policy, load_source, merge_params, merge_sources
from rsa_jax.training._mesh import (
    Layout,
    batch_sharding,
    distributed_request,
    logical_spec,
    make_mesh,
    maybe_initialize_distributed,
    place_batch,
    replicated,
    slice_groups,
)
from rsa_jax.training._model import (
    ModelDef,
    define_model,
    init_params,
    llama_config,
    load_tokenizer,
)
from rsa_jax.training._optim import (
    TRACED_OPTIM_FIELDS,
    OptimHyper,
    apply_update,
    learning_rate_at,
    make_optimizer,
    make_schedule,
    optax_update,
    weight_decay_mask,
)
from rsa_jax.training._run import Run
from rsa_jax.training._rundir import (
    RESUME_IGNORED,
    CheckpointMeta,
    ConfigMismatch,
    RunDir,
    RunDirError,
    RunLock,
    Source,
    SourceError,
    absolute_paths,
    check_resume,
    config_diff,
    lock_run_dir,
    resolve_source,
    saved_config,
    split_source,
    write_config,
)
from rsa_jax.training._step import (
    BATCH_KEYS,
    Hyper,
    NextTokenObjective,
    PairObjective,
    TrainState,
    init_state,
    make_train_step,
    microbatch_dropout_keys,
    opt_state_shardings,
    split_pairs,
    split_rows,
    stage_dropout_key,
    state_shardings,
)
from rsa_jax.training._trackers import REPORT_TO, Tracker, log_artifacts, open_trackers
from rsa_jax.training._trackers import flatten as flatten_config
from rsa_jax.training._trainer import (
    RunResult,
    candidate_dir,
    finished_step,
    list_candidates,
    load_adapters,
    load_policy,
    run_config,
    save_candidate,
    save_stage_policy,
    stage_index,
    stage_policy_dir,
    train,
)

__all__ = [
    # run directory, checkpoints and how a run ends
    "CheckpointMismatch",
    "CheckpointWriteError",
    "ConfigMismatch",
    "EXIT_CONFIG",
    "EXIT_DONE",
    "EXIT_FAILED",
    "EXIT_PREEMPTED",
    "NonFiniteError",
    "RESUME_IGNORED",
    "CheckpointMeta",
    "RunDir",
    "RunDirError",
    "Source",
    "SourceError",
    "resolve_source",
    "run_config",
    "RunLock",
    "StopSignal",
    "absolute_paths",
    "check_finite",
    "check_resume",
    "config_diff",
    "exit_code",
    "finished_step",
    "lock_run_dir",
    "saved_config",
    "tree_checksums",
    "write_config",
    # engine, training, mesh, model, step
    "BATCH_KEYS",
    "TRACED_OPTIM_FIELDS",
    "Checkpoints",
    "CorruptCheckpoint",
    "Engine",
    "Hooks",
    "Hyper",
    "Layout",
    "METRICS_FILE",
    "MetricsLog",
    "drop_torn_tail",
    "read_metrics",
    "REPORT_TO",
    "Tracker",
    "ModelDef",
    "NextTokenObjective",
    "OptimHyper",
    "Policy",
    "PairObjective",
    "Run",
    "RunResult",
    "Stage",
    "StepInfo",
    "TrainState",
    "all_finite",
    "apply_update",
    "batch_sharding",
    "cached_steps",
    "clear_step_cache",
    "compilation_cache_dir",
    "define_model",
    "device_copy",
    "distributed_request",
    "init_params",
    "init_state",
    "learning_rate_at",
    "llama_config",
    "load_adapters",
    "load_policy",
    "load_source",
    "load_tokenizer",
    "log_artifacts",
    "flatten_config",
    "logical_spec",
    "make_mesh",
    "slice_groups",
    "make_optimizer",
    "make_schedule",
    "make_train_step",
    "maybe_initialize_distributed",
    "merge_params",
    "microbatch_dropout_keys",
    "merge_sources",
    "open_trackers",
    "opt_state_shardings",
    "optax_update",
    "place_batch",
    "replicated",
    "split_pairs",
    "split_rows",
    "split_source",
    "stage_dropout_key",
    "stage_index",
    "save_stage_policy",
    "candidate_dir",
    "list_candidates",
    "save_candidate",
    "stage_policy_dir",
    "state_shardings",
    "steps_done",
    "train",
    "weight_decay_mask",
]
