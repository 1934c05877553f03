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
- Mesh and sharding: `Layout` (mesh + logical-axis rules), `make_mesh` (multislice meshes too).

The rest (step internals, optimizer parts, the lock, trackers) lives in the private modules;
`docs/api.md` lists the names here that only users, not other packages, need.
"""

from rsa_jax.training._checkpoint import Checkpoints, CheckpointWriteError, CorruptCheckpoint
from rsa_jax.training._control import (
    EXIT_CONFIG,
    EXIT_DONE,
    EXIT_FAILED,
    EXIT_PREEMPTED,
    NonFiniteError,
    StopSignal,
    exit_code,
)
from rsa_jax.training._engine import Engine, Stage, device_copy, steps_done
from rsa_jax.training._hooks import Hooks, StepInfo
from rsa_jax.training._logging import read_metrics
from rsa_jax.training._merge import Policy, load_source, merge_params, merge_sources
from rsa_jax.training._mesh import Layout, logical_spec, make_mesh
from rsa_jax.training._model import define_model, init_params, llama_config
from rsa_jax.training._optim import TRACED_OPTIM_FIELDS
from rsa_jax.training._run import Run
from rsa_jax.training._rundir import (
    CheckpointMeta,
    ConfigMismatch,
    RunDir,
    RunDirError,
    SourceError,
    absolute_paths,
    config_diff,
    resolve_source,
    split_source,
)
from rsa_jax.training._step import (
    BATCH_KEYS,
    Hyper,
    NextTokenObjective,
    PairObjective,
    TrainState,
    opt_state_shardings,
    stage_dropout_key,
    state_shardings,
)
from rsa_jax.training._trackers import log_artifacts
from rsa_jax.training._trainer import (
    RunResult,
    finished_step,
    list_candidates,
    load_adapters,
    load_policy,
    run_config,
    save_candidate,
    save_stage_policy,
    stage_policy_dir,
    train,
)

__all__ = [
    # run directory, checkpoints and how a run ends
    "CheckpointWriteError",
    "ConfigMismatch",
    "EXIT_CONFIG",
    "EXIT_DONE",
    "EXIT_FAILED",
    "EXIT_PREEMPTED",
    "NonFiniteError",
    "CheckpointMeta",
    "RunDir",
    "RunDirError",
    "SourceError",
    "resolve_source",
    "run_config",
    "StopSignal",
    "absolute_paths",
    "config_diff",
    "exit_code",
    "finished_step",
    # engine, training, mesh, model, step
    "BATCH_KEYS",
    "TRACED_OPTIM_FIELDS",
    "Checkpoints",
    "CorruptCheckpoint",
    "Engine",
    "Hooks",
    "Hyper",
    "Layout",
    "read_metrics",
    "NextTokenObjective",
    "Policy",
    "PairObjective",
    "Run",
    "RunResult",
    "Stage",
    "StepInfo",
    "TrainState",
    "define_model",
    "device_copy",
    "init_params",
    "llama_config",
    "load_adapters",
    "load_policy",
    "load_source",
    "log_artifacts",
    "logical_spec",
    "make_mesh",
    "merge_params",
    "merge_sources",
    "opt_state_shardings",
    "split_source",
    "stage_dropout_key",
    "save_stage_policy",
    "list_candidates",
    "save_candidate",
    "stage_policy_dir",
    "state_shardings",
    "steps_done",
    "train",
]
