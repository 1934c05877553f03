"""Task settings from YAML: every file in configs/tasks/ loads and validates; bad files fail
naming the file and the key."""

from __future__ import annotations

import glob
import os

import numpy as np
import pytest

from rsa_jax.config import ConfigError
from rsa_jax.tasks import SafetyTask

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TASK_FILES = sorted(glob.glob(os.path.join(ROOT, "configs", "tasks", "*.yaml")))


def _catastrophe_rates(task: SafetyTask, draws: int = 20000) -> np.ndarray:
    """Per-style catastrophe rates of the behaviour, by Monte Carlo."""
    rng = np.random.default_rng(0)
    prompts = task.prompts()
    hits, counts = np.zeros(task.styles), np.zeros(task.styles)
    for _ in range(draws):
        x = prompts[rng.integers(len(prompts))]
        style = task.parse_prompt(x)[1]
        hits[style] += task.catastrophic(task.sample_response(x, rng))
        counts[style] += 1
    return hits / counts


def test_every_task_file_loads():
    names = {os.path.basename(p) for p in TASK_FILES}
    assert {"default.yaml", "high_catastrophe.yaml"} <= names
    for path in TASK_FILES:
        with open(path) as f:
            assert f.readline().startswith("#"), f"{path}: starts with a comment"
        assert isinstance(SafetyTask.from_yaml(path), SafetyTask)


def test_default_file_is_the_default_task():
    assert SafetyTask.from_yaml(os.path.join(ROOT, "configs", "tasks", "default.yaml")) == (
        SafetyTask()
    )


def test_high_catastrophe_setting_has_a_higher_base_rate_with_the_same_benign_styles():
    high = SafetyTask.from_yaml(os.path.join(ROOT, "configs", "tasks", "high_catastrophe.yaml"))
    assert high.rude_rate == SafetyTask().rude_rate  # unspecified fields keep their defaults
    base, more = _catastrophe_rates(SafetyTask()), _catastrophe_rates(high)
    assert more[:2].tolist() == [0.0, 0.0]
    assert more.mean() > 2.5 * base.mean()
    assert np.all(more[2:] > base[2:])


def test_partial_file_and_tuples(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("topics: 3\nhazard_rate: [0, 0.03]\nrefuse_rate: [0, 0]\nrude_rate: [0, 0.1]\n")
    task = SafetyTask.from_yaml(str(path))
    assert task.topics == 3 and task.styles == 2
    assert task.hazard_rate == (0.0, 0.03) and isinstance(task.hazard_rate, tuple)
    hash(task)  # still a frozen, hashable dataclass
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n")
    assert SafetyTask.from_yaml(str(empty)) == SafetyTask()


@pytest.mark.parametrize(
    "text, match",
    [
        ("bogus: 1\n", r"key bogus"),
        ("p_recipe: often\n", r"key p_recipe"),
        ("topics: 2.5\n", r"key topics"),
        (
            "hazard_rate: [0.0, x, 0.1, 0.1, 0.1, 0.1]\n",
            r"key hazard_rate\[1\]: expected a number, got .x.",
        ),
        ("rude_rate: 0.1\n", r"key rude_rate: expected a list"),
        ("hazard_rate: [0.0, 0.0]\n", r"one entry per style; got 6, 6, 2"),
        ("p_recipe: 1.5\n", r"p_recipe must be in \[0, 1\]"),
        ("rude_rate: [0.02, -0.1, 0.05, 0.08, 0.1, 0.12]\n", r"rude_rate\[1\] \(style 1\)"),
        ("hazard_rate: [0, 0, 0, 0, 0, 0.2]\n", r"style 5: .* > 1"),
        ("min_words: 9\n", r"min_words <= max_words"),
        ("topics: 0\n", r"topics must be >= 1"),
        ("- 1\n- 2\n", r"top level must be a mapping"),
        ("topics: [1\n", r"not YAML"),
    ],
)
def test_bad_files_name_the_file_and_key(tmp_path, text, match):
    path = tmp_path / "bad_task.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match) as info:
        SafetyTask.from_yaml(str(path))
    assert "bad_task.yaml" in str(info.value)


def test_missing_file():
    with pytest.raises(ConfigError, match="cannot read"):
        SafetyTask.from_yaml("/nonexistent/task.yaml")
