"""Metrics to JSON Lines in the run directory and to the trackers of `train.report_to`
(TensorBoard event files, W&B, MLflow: `_trackers`), a tqdm progress bar, and a summary line at
the end of each stage. Process 0 writes; the others only count."""

from __future__ import annotations

import json
import logging

import jax
from etils import epath

from rsa_jax.training._objstore import is_remote
from rsa_jax.training._rundir import RunDir
from rsa_jax.training._trackers import open_trackers

log = logging.getLogger(__name__)

METRICS_FILE = RunDir.METRICS


def drop_torn_tail(path: str) -> int:
    """Cuts a last line without its newline (a write interrupted by a kill or a full disk) off
    the JSON Lines file `path`, with a warning; returns the bytes dropped (0: nothing torn).

    Appending after a torn line would glue the next record onto it and make both unreadable.
    """
    try:
        with open(path, "rb+") as f:
            data = f.read()
            if not data or data.endswith(b"\n"):
                return 0
            keep = data.rfind(b"\n") + 1
            f.truncate(keep)
    except FileNotFoundError:
        return 0
    dropped = len(data) - keep
    log.warning(
        "%s: dropped 1 torn last line (%d bytes, line %d) left by an interrupted write",
        path,
        dropped,
        data.count(b"\n") + 1,
    )
    return dropped


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics JSON Lines file ([] if absent). A torn last line (no newline:
    a run killed mid-write, or one writing now) is skipped with a warning; any other line that
    is not a JSON object raises ValueError naming the file and the line."""
    try:
        text = epath.Path(path).read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return []
    lines = text.split("\n")
    torn = lines.pop()  # "" when the file ends with its newline
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{path}:{number}: not a JSON record ({e.msg}, column {e.colno}); delete the "
                "line or the file to go on"
            ) from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{number}: expected a JSON object, got {line[:40]!r}")
        records.append(record)
    if torn.strip():
        log.warning("%s:%d: skipped 1 torn last line (an interrupted write)", path, len(lines) + 1)
    return records


class _ObjectLog:
    """A JSON Lines log on object storage, which has no append: the whole text is kept here and
    uploaded again at each flush (one upload replaces the object whole, so a kill never leaves
    a torn line there). A torn last line left by another writer is dropped, as `drop_torn_tail`
    does on disk."""

    def __init__(self, path: str):
        self.path = epath.Path(path)
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            text = ""
        if text and not text.endswith("\n"):
            text = text[: text.rfind("\n") + 1]
            log.warning("%s: dropped 1 torn last line left by an interrupted write", path)
        self._text = text
        self._dirty = False

    def write(self, line: str) -> None:
        self._text += line
        self._dirty = True

    def flush(self) -> None:
        if self._dirty:
            self.path.write_text(self._text)
            self._dirty = False

    def close(self) -> None:
        self.flush()


class MetricsLog:
    def __init__(
        self,
        run_dir: str,
        *,
        progress: bool = True,
        flops_per_token: float = 0.0,
        label: str | None = None,
        report_to=("tensorboard",),
        params: dict | None = None,
    ):
        """`report_to`: the trackers (`_trackers.REPORT_TO`); `params`: the flat resolved config
        they record once."""
        # `label` (a sweep variant) prefixes the progress bar and the printed summary lines.
        self.prefix = f"[{label}] " if label else ""
        # Model FLOPs per token over peak FLOP/s: policy fwd + bwd (6N), reference fwd (2N).
        self.flops_per_token = flops_per_token
        self.main = jax.process_index() == 0
        self.progress = progress and self.main
        layout = RunDir(run_dir)
        self._jsonl = None
        if self.main:
            if is_remote(layout.metrics_file):
                self._jsonl = _ObjectLog(layout.metrics_file)
            else:
                drop_torn_tail(layout.metrics_file)
                self._jsonl = open(layout.metrics_file, "a")
        self._trackers = []
        if self.main:
            self._trackers = open_trackers(report_to, run_dir, params or {}, label)
        self._bar = None
        self._sums: dict[str, float] = {}
        self._count = 0

    def start_stage(self, index: int, name: str, total: int, done: int) -> None:
        self._stage = (index, name)
        self._sums, self._count = {}, 0
        if self.progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=done, desc=f"{self.prefix}stage {index} ({name})")

    def log(self, stage, step, global_step, metrics, tokens, pairs, seconds) -> None:
        record = {"stage": stage, "step": step, "global_step": global_step, **metrics}
        record["tokens_per_s"] = tokens / seconds if seconds > 0 else 0.0
        record["pairs_per_s"] = pairs / seconds if seconds > 0 else 0.0
        record["step_time_s"] = seconds
        if self.flops_per_token and seconds > 0:
            record["mfu"] = self.flops_per_token * tokens / seconds
        for k in ("loss", "rewards/accuracies", "rewards/margins", "kl/chosen", "risk/chosen"):
            if k in metrics:
                self._sums[k] = self._sums.get(k, 0.0) + metrics[k]
        self._count += 1
        if self._jsonl is None:  # not the main process
            return
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        scalars = {k: v for k, v in record.items() if isinstance(v, float)}
        for tracker in self._trackers:
            tracker.log(scalars, global_step)
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix(
                loss=f"{metrics['loss']:.4f}",
                acc=f"{metrics.get('rewards/accuracies', 0.0):.2f}",
                tok_s=f"{record['tokens_per_s']:.0f}",
            )
            self._bar.refresh()

    def copy_records(self, records: list[dict]) -> None:
        """Appends records made by another run (its stages this run shares), as they were."""
        if self._jsonl is None:
            return
        for record in records:
            self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()

    def log_eval(self, stage, step, global_step, metrics: dict[str, float]) -> None:
        """Held-out metrics (`eval/...`) as their own record of metrics.jsonl and at the same
        global step in the trackers, beside the training metrics of that step."""
        if self._jsonl is None:
            return
        record = {"stage": stage, "step": step, "global_step": global_step, **metrics}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for tracker in self._trackers:
            tracker.log(dict(metrics), global_step)

    def end_stage(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._count:
            means = {k: v / self._count for k, v in self._sums.items()}
            text = ", ".join(f"{k} {v:.4f}" for k, v in means.items())
            line = f"{self.prefix}stage {self._stage[0]} ({self._stage[1]}) summary: {text}"
            if log.isEnabledFor(logging.INFO):  # -v: the log has it; print it once, not twice
                log.info("%s", line)
            elif self.main:
                print(line, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        for tracker in self._trackers:
            tracker.close()
        self._trackers = []
