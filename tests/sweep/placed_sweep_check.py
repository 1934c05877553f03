"""Run in a subprocess with 8 simulated CPU devices (the device count is fixed per process): a
vmap sweep with its K axis on the `variant` mesh axis (`variant_devices`) against the same sweep
on one device. Prints one JSON line: per-step loss and final-parameter differences, the
shardings the spied stages held, and the compile count of each step.

    python tests/sweep/placed_sweep_check.py lora   # K=4 over variant=4 x data=2, nf4 base
    python tests/sweep/placed_sweep_check.py full   # K=2 over variant=2 x fsdp=2 x tensor=2
    ... lora --collectives   # also each placed step's collectives that cross variant groups
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)

import dataclasses  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402
from test_lora_sweep import TINY, _losses  # noqa: E402

from rsa_jax.data import write_toy_data  # noqa: E402
from rsa_jax.sweep import load_sweep, run_sweep  # noqa: E402
from rsa_jax.training import Engine, load_adapters
from rsa_jax.training._engine import cached_steps, clear_step_cache

# Both stages ERM and Adam's eps 1e-6, so that the two programs, which sum in other orders (the
# batch is split over data), agree to rounding: see the module docstring of test_placed_sweep.
SHARED = [
    "checkpoint.every=0",
    "stages.0.view=safety",
    "stages.0.risk=erm",
    "stages.0.mu=0.5",
    "stages.0.steps=2",
    "stages.1.steps=2",
    "stages.1.risk=erm",
    "stages.1.mu=0.5",
    "optim.eps=1.0e-6",
]
CASES = {
    "lora": dict(
        overrides=[
            "model.lora.rank=4",
            "model.lora.base_storage=nf4",
            "model.lora.block_size=16",
        ],
        variants=[
            {"name": "a"},
            {"name": "b", "overrides": ["stages.0.beta=0.05", "optim.weight_decay=0.1"]},
            {"name": "c", "overrides": ["optim.learning_rate=5.0e-4"]},
            {"name": "d", "overrides": ["stages.0.mu=0.8", "stages.1.beta=0.05"]},
        ],
        variant_devices=4,
    ),
    "full": dict(
        overrides=["mesh.fsdp=2", "mesh.tensor=2"],
        variants=[
            {"name": "a"},
            {"name": "b", "overrides": ["stages.0.beta=0.05", "optim.weight_decay=0.1"]},
        ],
        variant_devices=2,
    ),
}


def _specs(tree) -> list:
    return [
        [str(x.sharding.spec), list(x.shape)]
        for x in jax.tree.leaves(tree)
        if isinstance(x, jax.Array)
    ]


# An instruction of one of these ops (tuple-shaped results and async -start forms included).
_COLLECTIVE = re.compile(
    r" (all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(-start)?\("
)


def _device_groups(line: str) -> list[list[int]]:
    """The device groups of one collective of XLA's HLO text: explicit `replica_groups={{..}}`,
    the iota form `[G,S]<=[dims]T(perm)`, or a permute's source-target pairs."""
    if m := re.search(r"replica_groups=\{(\{[0-9,{}]*\})\}", line):
        return [[int(x) for x in g.split(",") if x] for g in re.findall(r"\{([0-9,]*)\}", m[1])]
    if m := re.search(r"replica_groups=\[([0-9,]+)\]<=\[([0-9,]+)\](?:T\(([0-9,]+)\))?", line):
        shape, dims = [[int(x) for x in g.split(",")] for g in (m[1], m[2])]
        ids = np.arange(int(np.prod(dims))).reshape(dims)
        if m[3]:
            ids = ids.transpose([int(x) for x in m[3].split(",")])
        return ids.reshape(shape).tolist()
    if m := re.search(r"source_target_pairs=\{([0-9,{}]*)\}", line):
        return [[int(x) for x in p.split(",")] for p in re.findall(r"\{([0-9,]+)\}", m[1])]
    return []


def cross_group_collectives(engine, stage) -> tuple[int, list[str]]:
    """(collectives in the stage's compiled step, those whose device groups span several
    variant groups), from XLA's partitioned HLO (one extra compile)."""
    batch = engine.place(next(engine.stage_batches(stage.index)[0]))
    text = stage.step_fn.lower(stage.state, stage.reference, batch, stage.hyper).compile()
    ids = np.asarray(engine.layout.mesh.device_ids)
    group_of = {int(d): i for i in range(ids.shape[0]) for d in ids[i].ravel()}
    lines = [line for line in text.as_text().splitlines() if _COLLECTIVE.search(line)]
    cross = [
        line.strip()[:160]
        for line in lines
        if any(len({group_of[d] for d in g}) > 1 for g in _device_groups(line))
    ]
    return len(lines), cross


def spy_on_stages(seen: list, collectives: bool = False) -> None:
    """Records what each stage that `Engine.fit` ran held, after it ran: the placed state's and
    reference's shardings and shapes (the real run's arrays, nothing rebuilt)."""
    fit = Engine.fit

    def spied(self, stage, *args, **kwargs):
        counted = None
        if collectives and self.layout.mesh.size > 1:
            counted = cross_group_collectives(self, stage)
        done = fit(self, stage, *args, **kwargs)
        ref = stage.reference
        seen.append(
            {
                "mesh": dict(self.layout.mesh.shape),
                "params": _specs(stage.state.params),
                "opt_state": _specs(stage.state.opt_state),
                "step": _specs(stage.state.step),
                "hyper": _specs(stage.hyper),
                "collectives": counted,
                "base": _specs(ref["base"]) if self.model.lora is not None else None,
                # The model definition's shapes: what one unstacked copy of the base has.
                "base_shapes": [list(x.shape) for x in jax.tree.leaves(self.model.base_abstract)]
                if self.model.lora is not None
                else None,
                "param_shapes": [
                    list(x.shape) for x in jax.tree.leaves(self.model.abstract_params())
                ],
                "reference": _specs(ref["adapters"] if self.model.lora is not None else ref),
            }
        )
        return done

    Engine.fit = spied


# `--cvar`: stage 1 on cvar_reference instead, so the risk head's selection runs vmapped under the
# variant axis (its batching rule joins the members' rows in one loop).
CVAR = ["stages.0.risk=cvar_reference", "stages.0.mu=0.9"]


def main(case: str, collectives: bool = False, cvar: bool = False) -> None:
    assert len(jax.devices()) == 8, jax.devices()
    spec = CASES[case]
    work = tempfile.mkdtemp(prefix="placed_sweep_")
    data = os.path.join(work, "pairs.jsonl")
    write_toy_data(data, rows=32)
    doc = {
        "base": TINY,
        "overrides": [f"data.path={data}", *SHARED, *spec["overrides"], *(CVAR if cvar else [])],
        "variants": spec["variants"],
        "mode": "vmap",
        "run_dir": os.path.join(work, "one"),
    }
    path = os.path.join(work, "sweep.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(doc, f)
    seen: list = []
    spy_on_stages(seen, collectives)

    one = load_sweep(path)
    assert one.variant_devices is None
    clear_step_cache()
    assert [r["status"] for r in run_sweep(one)["variants"]] == ["done"] * len(one.variants)
    one_compiles = [fn._cache_size() for fn in cached_steps()]

    placed = dataclasses.replace(
        load_sweep(path, run_dir=os.path.join(work, "placed")),
        variant_devices=spec["variant_devices"],
    )
    clear_step_cache()
    assert [r["status"] for r in run_sweep(placed)["variants"]] == ["done"] * len(one.variants)
    placed_compiles = [fn._cache_size() for fn in cached_steps()]

    loss_diff, param_diff, finals, per_variant = 0.0, 0.0, [], {}
    for a, b in zip(one.variants, placed.variants, strict=True):
        la, lb = _losses(a.run_dir), _losses(b.run_dir)
        assert la.keys() == lb.keys() and len(la) == 4, (la, lb)
        per_variant[a.name] = [abs(la[key] - lb[key]) for key in sorted(la)]
        loss_diff = max(loss_diff, *(abs(la[key] - lb[key]) for key in la))
        # Read back the way eval/export/frontier read a run directory (nothing vmap-specific).
        _, pa = load_adapters(a.run_dir)
        _, pb = load_adapters(b.run_dir)
        assert pa.keys() == pb.keys()
        diffs = {k: float(np.max(np.abs(np.asarray(pa[k]) - np.asarray(pb[k])))) for k in pa}
        worst = max(diffs, key=diffs.__getitem__)
        per_variant[a.name] = per_variant[a.name] + [worst, diffs[worst]]
        param_diff = max(param_diff, diffs[worst])
        finals.append(np.concatenate([np.ravel(np.asarray(v)) for v in pb.values()]))
    # The variants really differ (their own hyperparameters): the comparison is not vacuous.
    spread = min(
        float(np.abs(finals[i] - finals[j]).max()) for i in range(len(finals)) for j in range(i)
    )
    out = {
        "loss_diff": loss_diff,
        "param_diff": param_diff,
        "variant_spread": spread,
        "per_variant_loss_diff": per_variant,
        "one_compiles": one_compiles,
        "placed_compiles": placed_compiles,
        "stages": seen,
        "k": len(one.variants),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main(
        sys.argv[1] if len(sys.argv) > 1 else "lora",
        "--collectives" in sys.argv,
        "--cvar" in sys.argv,
    )
