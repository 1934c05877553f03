"""`compile_config`: every program of a run, compiled for a TPU slice from any machine, reported.

    reports = compile_config(load_config("configs/rsa_cvar.yaml"), "v5p-8")
    print(all(r.fits for r in reports))

The programs are the ones `rsa-jax train` (each stage kind's step), with `sweep=K` `rsa-jax
sweep` in vmap mode (the K-variant step), and `rsa-jax eval` of the run (the sampler's batch)
would run, built abstractly
(`rsa_jax.compile._programs`) and compiled by libtpu for the slice's devices.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable

import jax

from rsa_jax.compile._presets import architecture
from rsa_jax.compile._programs import (
    SAMPLER,
    Program,
    sampler_program,
    sweep_programs,
    train_programs,
)
from rsa_jax.compile._report import (
    GIB,
    Collectives,
    Memory,
    collectives,
    memory_of,
    program_flops,
)
from rsa_jax.compile._topology import TpuSlice, topology_devices, tpu_slice
from rsa_jax.config import Config, ConfigError, mesh_shape, validate
from rsa_jax.models import LlamaConfig

# Programs loaded from JAX's persistent compilation cache (`train.compilation_cache_dir`): a
# repeated compile of the same program loads it, and its compile time is then the load's.
_cache_hits = [0]


def _count_cache_hits(event: str, **kwargs: str | int) -> None:
    if event == "/jax/compilation_cache/cache_hits":
        _cache_hits[0] += 1


jax.monitoring.register_event_listener(_count_cache_hits)

# The evaluation sampler's batch: `rsa-jax eval`'s default --max-new-tokens, and the rows an
# evaluation samples in all (64 prompts x --samples' default 16; the memory budget may cut a
# batch to fewer).
EVAL_MAX_NEW_TOKENS = 64
EVAL_ROWS = 1024

# XLA:TPU's two out-of-HBM messages: "Used 102.3G of 95.7G hbm" (buffer assignment, all of
# it), and "the total memory required for HLO temporaries (105.07G) exceeds available HBM
# (95.74G)" (the temporaries alone: a lower bound on what the program needs).
_HBM_OOM = re.compile(
    r"Used\s+([0-9.]+)([KMGT]?)\s+of\s+([0-9.]+)([KMGT]?)\s+hbm"
    r"|required for HLO temporaries\s+\(([0-9.]+)([KMGT]?)\)\s+exceeds available HBM",
    re.I,
)
_UNIT = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


@dataclasses.dataclass
class ProgramReport:
    name: str
    tpu: TpuSlice
    chips: int
    mesh: dict[str, int]
    flops: float  # analytic, per step, all chips together
    lower_seconds: float
    compile_seconds: float
    memory: Memory | None  # None when the compiler itself ran out of HBM
    collectives: Collectives | None
    needed_bytes: int  # per chip
    from_cache: bool = False  # loaded from the persistent compilation cache, not compiled
    created: dict[str, int] = dataclasses.field(default_factory=dict)  # within temporaries

    @property
    def hbm(self) -> int:
        return self.tpu.chip.hbm_bytes

    @property
    def fits(self) -> bool:
        return self.memory is not None and self.needed_bytes <= self.hbm

    @property
    def step_seconds_bound(self) -> float:
        """The step can take no less than its FLOPs at every chip's peak."""
        return self.flops / (self.chips * self.tpu.chip.peak_bf16_flops)

    def verdict(self) -> str:
        need, hbm = self.needed_bytes / GIB, self.hbm / GIB
        if self.fits:
            return f"fits: {need:.2f} GiB of {hbm:.0f} GiB per chip ({hbm - need:.2f} GiB free)"
        what = "needs" if self.memory is not None else "needs at least"
        return (
            f"does not fit: {self.name} {what} {need:.2f} GiB per chip, "
            f"{need - hbm:.2f} GiB over the {hbm:.0f} GiB of a {self.tpu.chip.generation} chip"
        )

    def lines(self, detail: int = 0) -> list[str]:
        """The report; `detail` > 0 adds the `detail` collectives moving the most bytes per
        step, each with the HLO computation it sits in and JAX's op name."""
        mesh = " x ".join(f"{a}={n}" for a, n in self.mesh.items())
        out = [f"{self.name} on {self.tpu.name} ({self.chips} chips, mesh {mesh}):"]
        out.append("  " + self.verdict())
        if self.memory is None and self.compile_seconds == 0:
            if self.name.startswith(SAMPLER):  # evaluation merges LoRA into float32 weights
                out.append("    (not compiled: the policy's float32 parameters alone exceed the")
                out.append("     chip's HBM; shard them over more chips)")
            else:
                out.append("    (not compiled: its parameters, optimizer state and reference alone")
                out.append("     exceed the chip's HBM; shard them over more chips or use LoRA)")
        if self.memory is not None:
            m = self.memory
            rows = [*m.roles.items(), ("argument layout padding", m.padding)]
            rows += [("outputs not donated", m.outputs), ("temporaries", m.temporaries)]
            rows += [("program code", m.code)]
            out += [f"    {role:<26} {n / GIB:9.3f} GiB" for role, n in rows]
            # Arrays the program makes itself (the sampler's KV cache), by their shapes and
            # shardings: XLA holds them among its temporaries as it lays them out.
            out += [f"    ({role}: {n / GIB:.3f} GiB by shape)" for role, n in self.created.items()]
        per_chip = self.flops / self.chips
        out.append(
            f"  FLOPs per step (analytic): {self.flops:.3e} in all, {per_chip:.3e} per chip; "
            f"step time >= {self.step_seconds_bound * 1e3:.1f} ms at "
            f"{self.tpu.chip.peak_bf16_flops / 1e12:.0f} TFLOP/s bf16 peak"
        )
        if self.collectives is not None:
            out.append("  collectives per step (per chip, full arrays over each group):")
            out += ["  " + line for line in self.collectives.lines()]
            if self.collectives.unknown_loops:
                out.append(
                    f"    ({self.collectives.unknown_loops} while loop(s) without a known trip "
                    "count: their bodies counted once)"
                )
            if detail > 0 and self.collectives.largest:
                out.append(f"  the {detail} largest collectives per step (per chip):")
                out += ["    " + op.line() for op in self.collectives.largest[:detail]]
        backend = "loading it from the compilation cache" if self.from_cache else "XLA:TPU"
        out.append(
            f"  compile time: {self.lower_seconds:.1f} s tracing and lowering + "
            f"{self.compile_seconds:.1f} s {backend}"
        )
        return out


def _out_of_memory(error: Exception) -> int | None:
    """The bytes per chip the compiler said it needed, if `error` is its out-of-HBM error."""
    m = _HBM_OOM.search(str(error))
    if m is None:
        return None
    size, unit = (m.group(1), m.group(2)) if m.group(1) else (m.group(5), m.group(6))
    return int(float(size) * _UNIT[unit.upper()])


def _model(config: Config) -> LlamaConfig | None:
    try:
        return architecture(config.model.path)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(str(e)) from None


def compile_config(
    config: Config,
    topology: str,
    *,
    slices: int = 1,
    sweep: int | None = None,
    variant_devices: int | None = None,
    sampler: bool = True,
    eval_rows: int = EVAL_ROWS,
    max_new_tokens: int = EVAL_MAX_NEW_TOKENS,
    say: Callable[[str], None] = print,
) -> list[ProgramReport]:
    """Compiles every program of `config` for `slices` slices of `topology` and reports each:
    the stage steps (or with `sweep=K` the vmap sweep's), then with `sampler` the evaluation
    sampler (`sampler_program`: batches of up to `eval_rows` rows, `max_new_tokens` each).

    Raises ConfigError (TopologyError) for an unknown slice, a mesh that does not divide its
    chips or a model path that is neither a preset nor a directory. A program that does not
    fit is reported (`fits` False), not raised.
    """
    tpu = tpu_slice(topology)
    # No persistent compilation cache: an executable compiled for topology devices cannot be
    # loaded back without a TPU client (jax 0.10.2 warns "PjRtCompiler must be constructed
    # with a Client" and compiles again), so the entries would only fill the disk.
    config = dataclasses.replace(
        config, train=dataclasses.replace(config.train, compilation_cache_dir="")
    )
    llama = _model(config)
    devices = topology_devices(topology, slices)
    where = f"{topology}" + (f" x {slices} slices" if slices > 1 else "")
    try:
        if sweep is None or variant_devices is None:
            mesh_shape(config.mesh, len(devices))
        validate(config, device_count=len(devices) // (variant_devices or 1))
    except ConfigError as e:
        raise ConfigError(f"{e} (on {where}: {len(devices)} chips)") from None
    programs: list[Program] = []
    if sweep is None:
        programs += train_programs(config, devices, llama)
    else:
        programs += sweep_programs(config, devices, llama, sweep, variant_devices)
    if sampler and sweep is None:
        programs.append(
            sampler_program(
                config,
                devices,
                llama,
                hbm_bytes=tpu.chip.hbm_bytes,
                eval_rows=eval_rows,
                max_new_tokens=max_new_tokens,
            )
        )
    reports = []
    for program in programs:
        mesh = dict(program.mesh.shape)
        flops = program_flops(program.llama, program.shape)
        inputs = sum(program.roles.values())
        if inputs > tpu.chip.hbm_bytes:  # no compile can make it fit: say so at once
            say(f"not compiling {program.name}: its inputs alone exceed a chip's HBM")
            reports.append(
                ProgramReport(
                    program.name,
                    tpu,
                    program.mesh.size,
                    mesh,
                    flops,
                    0.0,
                    0.0,
                    None,
                    None,
                    inputs,
                    created=program.created,
                )
            )
            continue
        say(f"compiling {program.name} for {where} ...")
        t0 = time.perf_counter()
        lowered = program.lower()
        t1 = time.perf_counter()
        compiled, error, hits = None, None, _cache_hits[0]
        try:
            compiled = lowered.compile()
        except Exception as e:  # noqa: BLE001 - only the out-of-HBM error is a result
            if _out_of_memory(e) is None:
                raise
            error = e
        t2 = time.perf_counter()
        from_cache = _cache_hits[0] > hits
        how = "loaded from the compilation cache" if from_cache else "compiled"
        say(f"{how} {program.name} in {t2 - t0:.1f} s")
        if compiled is None:
            assert error is not None
            needed = _out_of_memory(error) or 0
            memory, colls = None, None
        else:
            memory = memory_of(compiled, program.roles)
            needed = memory.total
            colls = collectives(compiled.as_text(), mesh)
        reports.append(
            ProgramReport(
                program.name,
                tpu,
                program.mesh.size,
                mesh,
                flops,
                t1 - t0,
                t2 - t1,
                memory,
                colls,
                needed,
                from_cache,
                program.created,
            )
        )
    return reports


def report(
    reports: list[ProgramReport], say: Callable[[str], None] = print, detail: int = 0
) -> int:
    """Prints each report (`detail`: `ProgramReport.lines`); returns 0 when every program fits,
    else 1 after one line per program that does not (naming it and by how much)."""
    for r in reports:
        for line in r.lines(detail):
            say(line)
    failing = [r for r in reports if not r.fits]
    for r in failing:
        say(f"error: {r.verdict()}")
    return 1 if failing else 0


def run_compile(
    config: Config,
    topology: str,
    *,
    slices: int = 1,
    sweep: int | None = None,
    variant_devices: int | None = None,
    sampler: bool = True,
    eval_rows: int = EVAL_ROWS,
    max_new_tokens: int = EVAL_MAX_NEW_TOKENS,
    collectives_detail: int = 0,
    say: Callable[[str], None] = print,
) -> int:
    """`rsa-jax compile`: compiles every program, prints the reports (with
    `collectives_detail` > 0 that many of each program's largest collectives, and where they
    come from), returns the exit status (`report`)."""
    say(tpu_slice(topology).describe())
    reports = compile_config(
        config,
        topology,
        slices=slices,
        sweep=sweep,
        variant_devices=variant_devices,
        sampler=sampler,
        eval_rows=eval_rows,
        max_new_tokens=max_new_tokens,
        say=say,
    )
    return report(reports, say, collectives_detail)
