"""Sweep files: a base config, shared overrides, a grid and/or explicit variants.

```yaml
# rsa-jax sweep configs/sweeps/tiny_risks.yaml
base: configs/tiny.yaml              # a train config (relative to the cwd, else to this file)
overrides: [stages.0.steps=4]        # applied to every variant
grid:                                # cartesian product, in key order
  stages.0.risk: [cvar_reference, erm]
  stages.1.beta: [0.1, 0.05]
variants:                            # explicit list; crossed with the grid when both are given
  - {name: low_lr, overrides: [optim.learning_rate=1.0e-4]}
mode: sequential                     # or vmap (K variants as one program)
variant_devices: 4                   # vmap: spread K over 4 devices (absent: one device)
run_dir: runs/sweep_tiny             # each variant trains in run_dir/<name>/
eval: {task: safety, samples: 8}     # optional, see rsa_jax.sweep._eval
```

Every variant's config is loaded and validated (`load_config`) when the file is read, so a bad
key or value fails before anything trains, with the sweep file and the variant in the message.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
from typing import NoReturn

import yaml

from rsa_jax.config import Config, ConfigError, load_config, to_json
from rsa_jax.losses import MU_DEFAULT, MU_MEANING

MODES = ("sequential", "vmap")
TOP_KEYS = ("base", "overrides", "grid", "variants", "mode", "run_dir", "eval", "variant_devices")
VARIANT_KEYS = ("name", "overrides")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=-]*$")


class SweepError(ConfigError):
    """A sweep file that cannot run; the message names the file and the bad key or value."""


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str  # stable: derived from the grid values and the explicit variant's name
    overrides: tuple[str, ...]  # the variant's own (grid + explicit), after the sweep's shared ones
    config: Config  # resolved, train.run_dir = <sweep run_dir>/<name>
    # The user's name of an explicit variant ("" for a grid point): reports label it by this.
    label: str = ""

    @property
    def run_dir(self) -> str:
        return self.config.train.run_dir


@dataclasses.dataclass(frozen=True)
class Sweep:
    path: str
    base: str
    overrides: tuple[str, ...]
    variants: tuple[Variant, ...]
    mode: str
    run_dir: str
    eval: dict | None  # the `eval:` mapping, None when absent
    # vmap mode: devices along the `variant` mesh axis the K variants are split over, the
    # config's mesh filling the rest (rsa_jax.sweep._placement); None: one device. Sequential
    # mode ignores it.
    variant_devices: int | None = None


def format_value(value) -> str:
    """A grid value as override text that `load_config` parses back to the same value.

    PyYAML reads `1e-05` as a string, so floats always carry a dot (`1.0e-05`).
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        text = repr(value)
        if "e" in text and "." not in text:
            mantissa, exponent = text.split("e")
            sign = "" if exponent[0] in "+-" else "+"
            text = f"{mantissa}.0e{sign}{exponent}"
        return text
    if isinstance(value, int | str):
        return str(value)
    raise TypeError(type(value).__name__)


def _short(key: str) -> str:
    """`stages.1.beta` -> `s1.beta`, `optim.learning_rate` -> `learning_rate` (for names)."""
    if key.startswith("stages."):
        return "s" + key.removeprefix("stages.")
    return key.split(".", 1)[-1] if "." in key else key


def _sanitise(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]", "-", text)


def _fail(path: str, message: str) -> NoReturn:
    raise SweepError(f"{path}: {message}")


def _string_list(path: str, where: str, value) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        _fail(path, f"{where} must be a list of 'dotted.key=value' strings, got {value!r}")
    for item in value:
        if "=" not in item:
            _fail(path, f"{where}: {item!r} is not of the form dotted.key=value")
        if item.split("=", 1)[0].strip() == "train.run_dir":
            _fail(path, f"{where}: train.run_dir is set by the sweep (run_dir/<variant name>)")
    return tuple(value)


def _grid_points(path: str, grid) -> list[tuple[str, tuple[str, ...]]]:
    """[(name, overrides)] of the cartesian product, the first key varying slowest."""
    if grid is None:
        return [("", ())]
    if not isinstance(grid, dict) or not grid:
        _fail(path, f"grid must be a non-empty mapping of dotted key -> list, got {grid!r}")
    axes = []
    for key, values in grid.items():
        if not isinstance(key, str) or not key or "=" in key:
            _fail(path, f"grid: bad key {key!r} (a dotted config key such as stages.1.beta)")
        if key == "train.run_dir":
            _fail(path, "grid: train.run_dir is set by the sweep (run_dir/<variant name>)")
        if not isinstance(values, list) or not values:
            _fail(path, f"grid.{key} must be a non-empty list of values, got {values!r}")
        texts = []
        for v in values:
            try:
                texts.append(format_value(v))
            except TypeError:
                _fail(path, f"grid.{key}: {v!r} is not a scalar (number, string or bool)")
        if len(set(texts)) != len(texts):
            _fail(path, f"grid.{key}: repeated values {values!r}")
        axes.append([(key, t) for t in texts])
    points = []
    for combo in itertools.product(*axes):
        name = "__".join(_sanitise(f"{_short(k)}-{t}") for k, t in combo)
        points.append((name, tuple(f"{k}={t}" for k, t in combo)))
    return points


def _explicit(path: str, variants) -> list[tuple[str, tuple[str, ...]]]:
    if variants is None:
        return [("", ())]
    if not isinstance(variants, list) or not variants:
        _fail(path, f"variants must be a non-empty list of {{name, overrides}}, got {variants!r}")
    out = []
    for i, v in enumerate(variants):
        if not isinstance(v, dict):
            _fail(path, f"variants.{i} must be a mapping with name and overrides, got {v!r}")
        unknown = sorted(set(v) - set(VARIANT_KEYS))
        if unknown:
            _fail(path, f"variants.{i}: unknown key(s) {unknown} (allowed: {VARIANT_KEYS})")
        name = v.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            _fail(
                path,
                f"variants.{i}.name must be a non-empty name of letters, digits and ._=- "
                f"(it names the variant's directory), got {name!r}",
            )
        out.append((name, _string_list(path, f"variants.{i}.overrides", v.get("overrides"))))
    return out


def _risk_mu(base: Config, own: tuple[str, ...]) -> tuple[str, ...]:
    """The mu overrides a variant needs because its own overrides switch a stage to a risk
    whose mu means something else (`MU_MEANING`: a CVaR level vs an ERM coefficient) without
    giving that stage's mu: the new risk's `MU_DEFAULT`, added to the variant's overrides so
    the dry run, the results table and the frontier report show it."""
    given = dict(item.split("=", 1) for item in own)
    extra = []
    for key, risk in given.items():
        parts = key.strip().split(".")
        if len(parts) != 3 or parts[0] != "stages" or parts[2] != "risk" or not parts[1].isdigit():
            continue
        i, risk = int(parts[1]), risk.strip()
        if f"stages.{i}.mu" in given or i >= len(base.stages) or risk not in MU_MEANING:
            continue
        was = base.stages[i].risk
        if MU_MEANING[risk] is None or MU_MEANING[risk] == MU_MEANING.get(was):
            continue
        mu = MU_DEFAULT[risk]
        assert mu is not None  # every risk whose mu means something has a default
        extra.append(f"stages.{i}.mu={format_value(float(mu))}")
    return tuple(extra)


def _resolve_base(path: str, base) -> str:
    if not isinstance(base, str) or not base:
        _fail(path, f"base must be the path of a train config, got {base!r}")
    if os.path.exists(base):
        return base
    beside = os.path.join(os.path.dirname(path), base)
    if os.path.exists(beside):
        return beside
    _fail(path, f"base: {base!r} not found (relative to the cwd or to the sweep file)")


def load_sweep(
    path: str, *, mode: str | None = None, run_dir: str | None = None, overrides: tuple = ()
) -> Sweep:
    """Reads and validates a sweep file; `mode` and `run_dir` override the file's, `overrides`
    are appended to its shared ones (e.g. `data.path=...` from the command line).

    Raises SweepError naming `path` and the bad key or value; a variant whose config does not
    load names the variant and the config key.
    """
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except OSError as e:
        raise SweepError(f"{path}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise SweepError(f"{path}: not YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        _fail(path, "the top level must be a mapping with base, grid and/or variants")
    unknown = sorted(set(raw) - set(TOP_KEYS))
    if unknown:
        _fail(path, f"unknown key(s) {unknown} (allowed: {TOP_KEYS})")
    if "base" not in raw:
        _fail(path, "base: missing (the train config every variant starts from)")
    if raw.get("grid") is None and raw.get("variants") is None:
        _fail(path, "give a grid, variants or both")
    base = _resolve_base(path, raw["base"])
    shared = _string_list(path, "overrides", raw.get("overrides"))
    shared += _string_list(path, "command-line overrides", list(overrides))
    mode = str(mode or raw.get("mode", "sequential"))
    if mode not in MODES:
        _fail(path, f"mode must be one of {MODES}, got {mode!r}")
    stem = os.path.splitext(os.path.basename(path))[0]
    run_dir = run_dir or raw.get("run_dir", os.path.join("runs", f"sweep_{stem}"))
    if not isinstance(run_dir, str) or not run_dir:  # `run_dir: 5` is not the folder "5"
        _fail(path, f"run_dir must be a directory path (text), got {run_dir!r}")
    if "://" in run_dir:  # results, plots and shared stages are written with local file calls
        _fail(
            path,
            f"run_dir {run_dir}: sweeps write local directories only (object storage works for "
            "one run's train.run_dir: docs/run_directory.md)",
        )
    evaluation = raw.get("eval")
    if evaluation is not None and not isinstance(evaluation, dict):
        _fail(path, f"eval must be a mapping (see rsa_jax.sweep._eval), got {evaluation!r}")

    variant_devices = raw.get("variant_devices")
    if variant_devices is not None and (
        isinstance(variant_devices, bool)
        or not isinstance(variant_devices, int)
        or variant_devices < 1
    ):
        _fail(
            path,
            "variant_devices must be a positive number of devices (the vmap mode's variant "
            f"mesh axis), got {variant_devices!r}",
        )

    try:
        base_config = load_config(base, list(shared), check=False)
    except ConfigError as e:
        raise SweepError(f"{path}: base {base} with the shared overrides: {e}") from None
    variants, names = [], set()
    for (vname, vover), (gname, gover) in itertools.product(
        _explicit(path, raw.get("variants")), _grid_points(path, raw.get("grid"))
    ):
        name = "__".join(n for n in (vname, gname) if n)
        if name in names:
            _fail(path, f"two variants are named {name!r}")
        names.add(name)
        own = vover + gover
        own += _risk_mu(base_config, own)
        target = os.path.join(run_dir, name)
        try:
            config = load_config(base, [*shared, *own, f"train.run_dir={target}"])
        except ConfigError as e:
            raise SweepError(f"{path}: variant {name!r} ({', '.join(own)}): {e}") from None
        variants.append(Variant(name, own, config, label=vname))
    same: dict[str, str] = {}
    for v in variants:
        # Different texts can be one value (`[1, 1.0]`, `[0.1, 1e-1]`): two runs of one config.
        key = to_json(dataclasses.replace(v.config, train=_no_run_dir(v.config)))
        if key in same:
            _fail(
                path,
                f"variants {same[key]!r} and {v.name!r} have the same config (their values are "
                "equal, e.g. 1 and 1.0 in a grid); remove one",
            )
        same[key] = v.name
    if variant_devices is not None and len(variants) % variant_devices:
        _fail(
            path,
            f"variant_devices: {variant_devices} does not divide the {len(variants)} variants "
            "(each device group along the variant axis holds the same number; no padding)",
        )
    return Sweep(path, base, shared, tuple(variants), mode, run_dir, evaluation, variant_devices)


def _no_run_dir(config: Config):
    return dataclasses.replace(config.train, run_dir="")


def kernel_key(config: Config) -> tuple:
    """What selects each stage's compiled kernel: (loss, risk, version, split_vocab) per stage.

    Variants with equal keys (and equal shapes) share compiled steps; the rest compile anew.
    """
    return tuple(s.kernel for s in config.stages)


def kernel_label(config: Config) -> str:
    return " | ".join(s.kernel.label for s in config.stages)


def grouped(variants) -> list[list[Variant]]:
    """Variants grouped by kernel, groups in order of first appearance (sequential order)."""
    groups: dict[tuple, list[Variant]] = {}
    for v in variants:
        groups.setdefault(kernel_key(v.config), []).append(v)
    return list(groups.values())
