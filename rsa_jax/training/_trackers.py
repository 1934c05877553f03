"""Experiment trackers (`train.report_to`, TRL's spelling): TensorBoard event files, Weights &
Biases and MLflow, behind one small interface that `MetricsLog` feeds on process 0.

Each tracker gets the resolved config once as parameters (flattened to dotted keys), then every
logged record as metrics at its global step, and files (the frontier report, plots) as
artifacts. W&B and MLflow are optional extras (`pip install -e '.[tracking]'`); naming one that
is not installed is an error that says so before anything trains. Where they write comes from
their own environment variables, as with TRL: `WANDB_PROJECT`, `WANDB_MODE=offline`, `WANDB_DIR`
(default: the run directory); `MLFLOW_TRACKING_URI` (default: SQLite, `<run_dir>/mlflow.db`),
`MLFLOW_EXPERIMENT_NAME`. A resumed run continues the same tracker run: its id is kept in the
run directory (`wandb_run_id`, `mlflow_run_id`).
"""

from __future__ import annotations

import os
import time
import uuid
from typing import Any, Protocol

from rsa_jax.training._rundir import RunDir

REPORT_TO = ("tensorboard", "wandb", "mlflow")
DEFAULT_PROJECT = "rsa_jax"
_EXTRA = {"wandb": "wandb", "mlflow": "mlflow"}  # the module each tracker imports


class Tracker(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def artifacts(self, paths: list[str], folder: str) -> None: ...

    def close(self) -> None: ...


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config dict as {dotted key: scalar}; lists are JSON-like text."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    key = prefix[:-1]
    if isinstance(value, list | tuple):
        if value and all(isinstance(v, dict) for v in value):
            out = {}
            for i, v in enumerate(value):
                out.update(flatten(v, f"{key}.{i}."))
            return out
        return {key: str(list(value))}
    return {key: value}


def check_available(report_to) -> None:
    """ValueError naming the extra to install for a tracker whose package is missing."""
    import importlib.util

    for name in report_to:
        if name not in REPORT_TO:
            raise ValueError(f"train.report_to: unknown tracker {name!r} (one of {REPORT_TO})")
        module = _EXTRA.get(name)
        if module and importlib.util.find_spec(module) is None:
            raise ValueError(
                f"train.report_to: {name} is not installed; pip install -e '.[tracking]' "
                f"(or pip install {module})"
            )


def _stored_id(run_dir: str, name: str) -> str | None:
    path = os.path.join(run_dir, name)
    if os.path.isfile(path):
        with open(path) as f:
            return f.read().strip() or None
    return None


def _store_id(run_dir: str, name: str, value: str) -> None:
    with open(os.path.join(run_dir, name), "w") as f:
        f.write(value + "\n")


class TensorBoard:
    def __init__(self, run_dir: str):
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(RunDir(run_dir).tensorboard)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)

    def artifacts(self, paths: list[str], folder: str) -> None:
        pass  # event files hold scalars; the files stay where they were written

    def close(self) -> None:
        self.writer.close()


class WandB:
    """One W&B run per run directory (resumed by its stored id)."""

    def __init__(self, run_dir: str, params: dict[str, Any], name: str):
        import wandb

        run_id = _stored_id(run_dir, "wandb_run_id")
        if run_id is None:
            run_id = uuid.uuid4().hex[:12]  # W&B ids: letters and digits
            _store_id(run_dir, "wandb_run_id", run_id)
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", DEFAULT_PROJECT),
            name=name,
            id=run_id,
            resume="allow",
            dir=os.environ.get("WANDB_DIR", run_dir),
            config=params,
            settings=wandb.Settings(console="off", silent=True),
            reinit="create_new",
        )

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def artifacts(self, paths: list[str], folder: str) -> None:
        import wandb

        artifact = wandb.Artifact(folder.replace("/", "-"), type="report")
        for path in paths:
            artifact.add_file(path)
        self.run.log_artifact(artifact)

    def close(self) -> None:
        self.run.finish()


class MLflow:
    """One MLflow run per run directory, through `MlflowClient` (no global active run)."""

    def __init__(self, run_dir: str, params: dict[str, Any], name: str):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///" + os.path.join(
            os.path.abspath(run_dir), "mlflow.db"
        )
        self.client = MlflowClient(tracking_uri=uri)
        experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_PROJECT)
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        run_id = _stored_id(run_dir, "mlflow_run_id")
        if run_id is None:
            run = self.client.create_run(experiment_id, run_name=name)
            run_id = run.info.run_id
            _store_id(run_dir, "mlflow_run_id", run_id)
            items = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
            for i in range(0, len(items), 100):  # log_batch takes at most 100 params
                self.client.log_batch(run_id, params=items[i : i + 100])
        else:  # resumed (params are immutable in MLflow: the first run's stand)
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=items)

    def artifacts(self, paths: list[str], folder: str) -> None:
        for path in paths:
            self.client.log_artifact(self.run_id, path, artifact_path=folder)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def open_trackers(
    report_to, run_dir: str, params: dict[str, Any], name: str | None = None
) -> list[Tracker]:
    """The trackers `report_to` names, each started for `run_dir` with `params` (flat)."""
    check_available(report_to)
    name = name or os.path.basename(os.path.normpath(run_dir))
    made: list[Tracker] = []
    for kind in dict.fromkeys(report_to):  # once each, in the given order
        if kind == "tensorboard":
            made.append(TensorBoard(run_dir))
        elif kind == "wandb":
            made.append(WandB(run_dir, params, name))
        else:
            made.append(MLflow(run_dir, params, name))
    return made


def log_artifacts(
    report_to, run_dir: str, paths: list[str], folder: str = "report", name: str | None = None
) -> None:
    """Files (a frontier report, plots) as artifacts of the tracker run of `run_dir` (a sweep's
    or demo's output directory: its own tracker run, with no parameters)."""
    trackers = open_trackers([k for k in report_to if k != "tensorboard"], run_dir, {}, name)
    try:
        for tracker in trackers:
            tracker.artifacts([p for p in paths if os.path.isfile(p)], folder)
    finally:
        for tracker in trackers:
            tracker.close()
