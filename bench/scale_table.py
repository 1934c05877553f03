"""Compiles every scale recipe for its TPU slice and regenerates the table of docs/scale.md.

Each recipe (a config in configs/scale/, its slice, and for the sweep the K and variant devices)
is compiled with `rsa_jax.compile.compile_config` (libtpu's compiler, no TPU, no weights), and its
numbers are kept in docs/scale.json. The table in docs/scale.md (between the `scale-table`
markers) and the `# Measured per chip` line of each recipe's header are then written from that
file, so the doc, the configs and the JSON always agree.

    python bench/scale_table.py                          # compile every recipe (slow), render
    python bench/scale_table.py --recipe paper_7b_qlora  # compile one, keep the others' numbers
    python bench/scale_table.py --render                 # rewrite the doc and headers only

Compiles take minutes each on a small host (a 70B program: more); run it in the background.
`rsa_jax.compile` keeps JAX's persistent compilation cache off: an executable compiled for topology
devices cannot be loaded back without a TPU client (jax 0.10.2 warns and compiles again).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "scale.md")
DATA = os.path.join(ROOT, "docs", "scale.json")
BEGIN, END = "<!-- scale-table:begin -->", "<!-- scale-table:end -->"
GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    config: str  # relative to the repository root
    topology: str
    slices: int = 1
    sweep: int | None = None
    variant_devices: int | None = None
    headers: tuple[str, ...] = ()  # extra files whose `# Measured per chip` line shows it

    @property
    def command(self) -> str:
        cmd = f"rsa-jax compile {self.config} --topology {self.topology}"
        if self.slices > 1:
            cmd += f" --slices {self.slices}"
        if self.sweep is not None:
            cmd += f" --sweep {self.sweep}"
        if self.variant_devices is not None:
            cmd += f" --variant-devices {self.variant_devices}"
        return cmd


RECIPES = [
    Recipe("paper_7b_qlora", "configs/scale/paper_7b_qlora_v5p8.yaml", "v5p-8"),
    Recipe("llama3_8b_full_v5p8", "configs/scale/llama3_8b_full_v5p8.yaml", "v5p-8"),
    Recipe("llama3_8b_full_v6e8", "configs/scale/llama3_8b_full_v6e8.yaml", "v6e-8"),
    Recipe("llama3_70b_qlora", "configs/scale/llama3_70b_qlora_v5p8.yaml", "v5p-8"),
    Recipe("llama3_70b_full", "configs/scale/llama3_70b_full_2xv5p64.yaml", "v5p-64", slices=2),
    Recipe(
        "llama3_8b_sweep_k8",
        "configs/scale/llama3_8b_qlora_sweep_base.yaml",
        "v5p-8",
        sweep=8,
        variant_devices=4,
        headers=("configs/sweeps/llama3_8b_risks.yaml",),
    ),
]
BY_NAME = {r.name: r for r in RECIPES}


def measure(recipe: Recipe, commit: str) -> dict:
    """Compiles the recipe's programs; the numbers of each, as docs/scale.json keeps them."""
    from rsa_jax.compile import compile_config
    from rsa_jax.config import load_config

    config = load_config(os.path.join(ROOT, recipe.config))
    t = time.perf_counter()
    reports = compile_config(
        config,
        recipe.topology,
        slices=recipe.slices,
        sweep=recipe.sweep,
        variant_devices=recipe.variant_devices,
        say=lambda line: print(line, file=sys.stderr, flush=True),
    )
    wall = time.perf_counter() - t
    programs = []
    for r in reports:
        colls = {}
        if r.collectives is not None:
            for (kind, axes), nbytes in r.collectives.bytes.items():
                colls[f"{kind} over {axes}"] = nbytes
        programs.append(
            dict(
                name=r.name,
                chips=r.chips,
                mesh=r.mesh,
                fits=r.fits,
                per_chip_gib=r.needed_bytes / GIB,
                hbm_gib=r.hbm / GIB,
                flops=r.flops,
                step_seconds_bound=r.step_seconds_bound,
                lower_seconds=r.lower_seconds,
                compile_seconds=r.compile_seconds,
                collectives=colls,
            )
        )
    return dict(command=recipe.command, commit=commit, wall_seconds=wall, programs=programs)


def _commit() -> str:
    """The commit the programs were compiled from (with "+dirty" for uncommitted changes)."""
    import subprocess

    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout

    head = git("rev-parse", "--short", "HEAD").strip() or "unknown"
    return head + ("+dirty" if git("status", "--porcelain", "rsa_jax").strip() else "")


def _human(nbytes: float) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if nbytes >= size:
            return f"{nbytes / size:.1f} {unit}"
    return f"{nbytes:.0f} B"


def _collective_summary(colls: dict, top: int = 3) -> str:
    if not colls:
        return "none"
    items = sorted(colls.items(), key=lambda kv: -kv[1])[:top]
    return ", ".join(f"{k} {_human(v)}" for k, v in items)


def table(data: dict) -> str:
    head = (
        "| recipe | slice | program | per chip GiB | headroom GiB | compile s | "
        "FLOPs/step | step >= ms | largest collectives per step (per chip) | commit |"
    )
    lines = [head, "|" + "---|" * 10]
    for recipe in RECIPES:
        entry = data.get(recipe.name)
        if entry is None:
            lines.append(f"| {recipe.name} | {recipe.topology} | not compiled yet | | | | | | | |")
            continue
        where = recipe.topology + (f" x {recipe.slices}" if recipe.slices > 1 else "")
        commit = entry.get("commit", "unknown")
        for p in entry["programs"]:
            gib, hbm = p["per_chip_gib"], p["hbm_gib"]
            room = f"{hbm - gib:.1f}" if p["fits"] else f"**{hbm - gib:.1f} (does not fit)**"
            seconds = p["lower_seconds"] + p["compile_seconds"]
            lines.append(
                f"| {recipe.name} | {where} | {p['name']} | {gib:.1f} of {hbm:.0f} | {room} | "
                f"{seconds:.0f} | {p['flops']:.2e} | {p['step_seconds_bound'] * 1e3:.0f} | "
                f"{_collective_summary(p['collectives'])} | {commit} |"
            )
    commands = [f"- `{r.name}`: `{r.command}`" for r in RECIPES]
    return "\n".join(lines + ["", "Commands:", ""] + commands)


def header_line(entry: dict | None) -> str:
    """The `# Measured per chip` line of a recipe's config header."""
    if entry is None:
        return "# Measured per chip (rsa-jax compile, docs/scale.md): not compiled yet"
    parts = []
    for p in entry["programs"]:
        seconds = p["lower_seconds"] + p["compile_seconds"]
        parts.append(
            f"{p['name']} {p['per_chip_gib']:.1f} of {p['hbm_gib']:.0f} GiB, {seconds:.0f} s"
        )
    return "# Measured per chip (rsa-jax compile, docs/scale.md): " + "; ".join(parts)


CONTINUED = "#     "  # continuation lines of the measured line (deeper than a command's "#   ")


def _wrap_comment(line: str, width: int = 100) -> list[str]:
    out, cur = [], "#"
    for w in line[2:].split(" "):
        if len(cur) + 1 + len(w) > width and cur.strip("# "):
            out.append(cur)
            cur = CONTINUED[:-1]  # the joining space completes the indent
        cur += " " + w
    return out + [cur]


def render(data: dict) -> None:
    with open(DOC) as f:
        text = f.read()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{DOC}: the markers {BEGIN} and {END} are missing")
    before, rest = text.split(BEGIN, 1)
    after = rest.split(END, 1)[1]
    with open(DOC, "w") as f:
        f.write(before + BEGIN + "\n" + table(data) + "\n" + END + after)
    for recipe in RECIPES:
        for path in (recipe.config, *recipe.headers):
            full = os.path.join(ROOT, path)
            with open(full) as f:
                lines = f.read().split("\n")
            start = next(i for i, x in enumerate(lines) if x.startswith("# Measured per chip"))
            end = start + 1
            while (
                end < len(lines) and lines[end].startswith("#   ") and "rsa-jax" not in lines[end]
            ):
                end += 1
            new = _wrap_comment(header_line(data.get(recipe.name)))
            lines[start:end] = new
            with open(full, "w") as f:
                f.write("\n".join(lines))


def load() -> dict:
    if not os.path.exists(DATA):
        return {}
    with open(DATA) as f:
        return json.load(f)


def main():
    commit = _commit()  # at the start: later commits do not change what this run imported
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--recipe", action="append", choices=sorted(BY_NAME), help="only these")
    p.add_argument("--render", action="store_true", help="no compiles: rewrite doc and headers")
    args = p.parse_args()
    data = load()
    if not args.render:
        for name in args.recipe or [r.name for r in RECIPES]:
            print(f"compiling recipe {name} ...", file=sys.stderr, flush=True)
            measured = measure(BY_NAME[name], commit)
            # Reread: another run of this script (another recipe) may have written meanwhile.
            data = {**load(), name: measured}
            with open(DATA, "w") as f:  # after each recipe: a later failure keeps it
                json.dump(data, f, indent=1, sort_keys=True)
    render(data)
    print(table(data))


if __name__ == "__main__":
    main()
