"""Reading the variants of a frontier comparison from `results.json` files.

Two formats are read:
  * `rsa_jax.eval.write_results` (what `rsa-jax demo`, `rsa-jax eval` and
    `bench/safety_frontier.py` write): `{"methods": {row: {metric: {value, low, high}}}}`. A row
    `"SACPO lr=0.0001 b2=0.05"` is variant `lr=0.0001 b2=0.05` of method `SACPO` (the first word
    is the method, the rest the variant); a one-word row is the method's only variant.
  * a sweep's (`rsa_jax.sweep`): `{"base": ..., "variants": [{name, overrides, run_dir, eval}]}`.
    The method is the base config's file stem, or, with `method_keys`, the values of those
    override keys (`stages.1.risk=erm`); the variant is its remaining overrides. Intervals come
    from the variant's `eval.json` (written by the sweep's eval hook) when it is found, else the
    interval is the value itself (noted).

Seeds. A directory holding `seed<k>/results.json` is read as those seeds (its own results.json is
then the aggregate over seeds and is not used). Otherwise the seed is the nearest `seed<k>`
component of the file's directory, or a sweep variant's `train.seed=k` override, else `0`.
Files of one seed are merged (for example one sweep per method); a (method, variant) found twice
in one seed is an error naming both files.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import re
from collections.abc import Sequence

from rsa_jax.eval.metrics import Estimate

RESULTS_JSON = "results.json"
_SEED_DIR = re.compile(r"^seed(\d+)$")
_SEED_KEYS = ("train.seed",)

# seed -> method -> variant -> metric -> Estimate
Table = dict[str, dict[str, dict[str, dict[str, Estimate]]]]


class FrontierInputError(ValueError):
    """A results file that cannot be read as frontier variants; the message names the file."""


@dataclasses.dataclass
class Loaded:
    """The variants read from results files.

    Attributes:
      seeds: {seed: {method: {variant: {metric: Estimate}}}}.
      files: the results.json files read.
      notes: what was skipped or assumed, one line each.
    """

    seeds: Table
    files: list[str]
    notes: list[str]


def results_files(path: str) -> list[str]:
    """The results.json files a command-line path stands for (see the module docstring)."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise FrontierInputError(f"{path}: no such file or directory")
    seeds = {}
    for file in glob.glob(os.path.join(path, "seed*", RESULTS_JSON)):
        match = _SEED_DIR.match(os.path.basename(os.path.dirname(file)))
        if match:
            seeds[int(match.group(1))] = file
    seeds = [seeds[k] for k in sorted(seeds)]
    if seeds:
        return seeds
    own = os.path.join(path, RESULTS_JSON)
    if os.path.exists(own):
        return [own]
    raise FrontierInputError(
        f"{path}: no {RESULTS_JSON} and no seed*/{RESULTS_JSON} (expected a demo, sweep or eval "
        "output directory)"
    )


def _dir_seed(path: str) -> str | None:
    for part in reversed(os.path.normpath(os.path.abspath(os.path.dirname(path))).split(os.sep)):
        match = _SEED_DIR.match(part)
        if match:
            return match.group(1)
    return None


def _estimate(path: str, where: str, x) -> Estimate:
    """An Estimate from {value, low, high} or a bare number (interval = the value)."""
    try:
        if isinstance(x, dict):
            return Estimate(float(x["value"]), float(x["low"]), float(x["high"]))
        if isinstance(x, int | float) and not isinstance(x, bool):
            return Estimate(float(x), float(x), float(x))
    except (KeyError, TypeError, ValueError):
        pass
    raise FrontierInputError(
        f"{path}: {where}: expected {{value, low, high}} or a number, got {x!r}"
    )


def _metrics(path: str, where: str, raw) -> dict[str, Estimate]:
    if not isinstance(raw, dict):
        raise FrontierInputError(f"{path}: {where}: expected a mapping of metrics, got {raw!r}")
    return {k: _estimate(path, f"{where}.{k}", v) for k, v in raw.items()}


def _split_row(row: str) -> tuple[str, str]:
    method, _, variant = row.strip().partition(" ")
    return method, variant.strip() or method


def _report_rows(path: str, payload: dict, seed: str):
    methods = payload["methods"]
    if not isinstance(methods, dict):
        raise FrontierInputError(f"{path}: methods: expected a mapping of rows")
    for row, raw in methods.items():
        method, variant = _split_row(row)
        yield seed, method, variant, _metrics(path, f"methods.{row}", raw)


def _override_map(path: str, where: str, overrides) -> dict[str, str]:
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise FrontierInputError(f"{path}: {where}.overrides: expected a list of key=value")
    return dict(o.split("=", 1) for o in overrides if "=" in o)


def _sweep_eval(path: str, run_dir: str | None, name: str) -> dict | None:
    """The variant's eval.json metrics (with intervals), looked up where the sweep ran and beside
    the results file."""
    from rsa_jax.training import RunDir

    candidates = [RunDir(os.path.join(os.path.dirname(path), name)).eval_file]
    if run_dir:
        candidates.insert(0, RunDir(run_dir).eval_file)
    for candidate in candidates:
        if os.path.exists(candidate):
            with open(candidate) as f:
                saved = json.load(f)
            if isinstance(saved, dict) and isinstance(saved.get("metrics"), dict):
                return saved["metrics"]
    return None


def _sweep_rows(path: str, payload: dict, seed: str | None, method_keys, notes):
    variants = payload["variants"]
    if not isinstance(variants, list):
        raise FrontierInputError(f"{path}: variants: expected a list")
    base = payload.get("base")
    stem = os.path.splitext(os.path.basename(base))[0] if isinstance(base, str) else "sweep"
    no_interval = []
    for i, v in enumerate(variants):
        where = f"variants.{i}"
        if not isinstance(v, dict) or not isinstance(v.get("name"), str):
            raise FrontierInputError(f"{path}: {where}: expected a mapping with a name")
        overrides = _override_map(path, where, v.get("overrides", []))
        raw = _sweep_eval(path, v.get("run_dir"), v["name"])
        if raw is None:
            raw = v.get("eval") or {}
            if raw:
                no_interval.append(v["name"])
        if not raw:
            notes.append(f"{path}: variant {v['name']} has no evaluation; left out")
            continue
        missing = [k for k in method_keys if k not in overrides]
        if missing:
            raise FrontierInputError(
                f"{path}: {where} ({v['name']}): no override for method key(s) {missing}"
            )
        method = " ".join(f"{k}={overrides[k]}" for k in method_keys) or stem
        own = [
            f"{k}={val}"
            for k, val in overrides.items()
            if k not in method_keys and k not in _SEED_KEYS
        ]
        variant_seed = next((overrides[k] for k in _SEED_KEYS if k in overrides), None)
        row_seed = variant_seed if variant_seed is not None else seed or "0"
        yield row_seed, method, " ".join(own) or "(base)", _metrics(path, where, raw)
    if no_interval:
        notes.append(
            f"{path}: no eval.json for {len(no_interval)} variant(s) ({', '.join(no_interval)}): "
            "their intervals are the point values"
        )


def load_frontier_inputs(paths: Sequence[str], *, method_keys: Sequence[str] = ()) -> Loaded:
    """Every variant of every seed in the results files that `paths` stand for.

    Args:
      paths: files or directories (demo, sweep, eval or bench output).
      method_keys: override keys that name the method of a sweep variant (sweep files only).

    Raises:
      FrontierInputError naming the file and field that cannot be read.
    """
    seeds: Table = {}
    origin: dict[tuple[str, str, str], str] = {}
    files, notes = [], []
    for path in paths:
        for file in results_files(path):
            try:
                with open(file) as f:
                    payload = json.load(f)
            except json.JSONDecodeError as e:
                raise FrontierInputError(f"{file}: not JSON ({e.msg}, line {e.lineno})") from None
            seed = _dir_seed(file)
            if isinstance(payload, dict) and "methods" in payload:
                rows = _report_rows(file, payload, seed or "0")
            elif isinstance(payload, dict) and "variants" in payload:
                rows = _sweep_rows(file, payload, seed, tuple(method_keys), notes)
            else:
                raise FrontierInputError(
                    f"{file}: neither an evaluation's results (key 'methods') nor a sweep's "
                    "(key 'variants')"
                )
            files.append(file)
            for row_seed, method, variant, metrics in rows:
                key = (row_seed, method, variant)
                if key in origin:
                    raise FrontierInputError(
                        f"{file}: seed {row_seed}, method {method!r}, variant {variant!r} is also "
                        f"in {origin[key]}; give each seed its own seed<k>/ directory"
                    )
                origin[key] = file
                finite = {k: e for k, e in metrics.items() if math.isfinite(e.value)}
                seeds.setdefault(row_seed, {}).setdefault(method, {})[variant] = finite
    return Loaded(seeds, files, notes)


def select_methods(loaded: Loaded, methods: Sequence[str]) -> Loaded:
    """Only the named methods (each must exist in some seed)."""
    known = sorted({m for per_seed in loaded.seeds.values() for m in per_seed})
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise FrontierInputError(f"unknown method(s) {unknown}; the results have {known}")
    seeds = {
        s: {m: v for m, v in per_seed.items() if m in methods}
        for s, per_seed in loaded.seeds.items()
    }
    return Loaded(seeds, loaded.files, loaded.notes)
