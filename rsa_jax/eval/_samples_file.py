"""The sampled texts with their scores as JSON Lines, one row per sample, so a user can read what
each model said next to the numbers it got.

Dimension legend: R samples of one model.

Row fields: `model` (the name evaluated), `prompt_index`, `prompt`, `sample` (the sample's number
among its prompt's samples, 0..N-1), `text` (the decoded response, without EOS), `reward`, `cost`,
`catastrophic`, `finished` (the response ended with EOS within the token budget), `length`
(tokens generated, EOS included) and, with a reference model, `logratio`
(log pi(y|x) - log pi_ref(y|x)).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence

from rsa_jax.eval.metrics import SampleScores

SAMPLES_JSONL = "samples.jsonl"


def sample_rows(
    model: str,
    prompts: Sequence[str],
    samples,
    scores: SampleScores,
) -> list[dict]:
    """The R rows (module docstring) of one model's evaluation.

    Args:
      model: the model's name in the results.
      prompts: the B prompt texts (samples.prompt_index indexes them).
      samples: the `Samples` the scores were computed from (R rows).
      scores: their `SampleScores` (R rows, in the same order).
    """
    if len(scores) != len(samples.texts):
        raise ValueError(
            f"sample_rows: {len(samples.texts)} samples but {len(scores)} scores for {model!r}"
        )
    sample_index = samples.sample_index
    rows = []
    for r, (p, text) in enumerate(zip(samples.prompt_index.tolist(), samples.texts, strict=True)):
        row = dict(
            model=model,
            prompt_index=int(p),
            prompt=prompts[p],
            sample=int(sample_index[r]),
            text=text,
            reward=float(scores.reward[r]),
            cost=float(scores.cost[r]),
            catastrophic=bool(scores.catastrophic[r]),
            finished=bool(samples.finished[r]),
            length=int(samples.lengths[r]),
        )
        if scores.logratio is not None:
            row["logratio"] = float(scores.logratio[r])
        rows.append(row)
    return rows


def write_samples(path: str | os.PathLike, rows: Iterable[dict]) -> str:
    """Writes `rows` as JSON Lines (UTF-8, non-ASCII kept readable) to `path` (a file, or a
    directory: `<path>/samples.jsonl`); the file appears complete or not at all (written to a
    temporary name, then renamed). Returns the file's path."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, SAMPLES_JSONL)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def read_samples(path: str | os.PathLike) -> list[dict]:
    """The rows of a file written by `write_samples` (a file or its directory)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, SAMPLES_JSONL)
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not JSON ({e.msg})") from None
    return rows
