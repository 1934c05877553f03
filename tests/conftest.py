"""Shared test support: running a check script on simulated CPU devices.

The multi-device checks run in a subprocess because XLA fixes the number of host devices when
jax starts; each script prints one JSON object as its last line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_device_script(script: str, *args: str, devices: int = 8, timeout: int = 600) -> dict:
    """Runs `python script args...` with `devices` simulated CPU devices and this checkout's
    rsa_jax first on the path; returns the JSON object of its last output line."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    env["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in [env.get("PYTHONPATH")] if p])
    done = subprocess.run(
        [sys.executable, script, *args], capture_output=True, text=True, env=env, timeout=timeout
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture
def device_script():
    """`run_device_script` as a fixture (conftest modules are not imported by tests)."""
    return run_device_script


@pytest.fixture(scope="session", autouse=True)
def _isolated_compilation_cache(tmp_path_factory):
    """Runs write JAX's persistent compilation cache under $XDG_CACHE_HOME (the
    `train.compilation_cache_dir: auto` default): the suite's goes to a temporary directory, so
    it neither fills nor reads the user's (and a second run of the suite compiles as the first).
    Matplotlib's font cache stays where it was."""
    home_cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    os.environ.setdefault("MPLCONFIGDIR", os.path.join(home_cache, "matplotlib"))
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg_cache"))


_CHECKED_MODULES: set[str] = set()  # modules whose DEFAULT_CASES keys were checked


@pytest.hookimpl(wrapper=True)
def pytest_pycollect_makeitem(collector, name, obj):
    """A test module's `DEFAULT_CASES = {"test_name": ["case id", ...]}` names the cases of a
    parametrized test that the default suite runs; its other cases are marked slow (the whole
    grid runs in `make test-slow`). The default suite must fit CI's budget on 2 cores, and one
    case of each behaviour catches what most of a grid would.

    Marked here, where a test's cases are made (all of them, before a node id or `-k` selects
    some), so a listed id that names no case, or a key that names no test, is an error: a
    renamed case or test cannot silently change what the default suite runs."""
    items = yield
    module = collector.getparent(pytest.Module).obj
    cases = getattr(module, "DEFAULT_CASES", {})
    if cases and module.__name__ not in _CHECKED_MODULES:
        _CHECKED_MODULES.add(module.__name__)
        unknown = [key for key in cases if not callable(getattr(module, key, None))]
        if unknown:
            raise pytest.UsageError(f"{module.__file__}: DEFAULT_CASES names no test: {unknown}")
    if name not in cases or not isinstance(items, list):
        return items
    ids = {item.callspec.id for item in items}
    missing = set(cases[name]) - ids
    if missing:
        raise pytest.UsageError(
            f"{module.__file__}: DEFAULT_CASES[{name!r}] names no such case: "
            f"{sorted(missing)} (cases: {sorted(ids)})"
        )
    for item in items:
        if item.callspec.id not in cases[name]:
            item.add_marker(pytest.mark.slow)
    return items
