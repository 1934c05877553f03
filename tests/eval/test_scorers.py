"""The scorer interface: loading user scorers and validating their output."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from rsa_jax.eval import Scorer, load_scorer, score_samples

SCORER_MODULE = """
import numpy as np

def length_scorer(prompts, responses):
    cost = np.array([float(len(r)) for r in responses])
    return {"reward": -cost, "cost": cost}

length_scorer.catastrophe_threshold = 3.0

class Oracle:
    catastrophe_threshold = 1.0

    def __call__(self, prompts, responses):
        n = len(responses)
        return {"reward": np.ones(n), "cost": np.zeros(n), "catastrophic": np.ones(n, bool)}

    @classmethod
    def make(cls):
        return cls()

class NeedsArgs:
    def __init__(self, path):
        self.path = path

NOT_CALLABLE = 3
"""


@pytest.fixture
def scorer_module(tmp_path, monkeypatch):
    (tmp_path / "my_scorers.py").write_text(SCORER_MODULE)
    (tmp_path / "broken_scorers.py").write_text("import not_a_real_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_scorers"


def test_load_scorer_function_class_and_dotted(scorer_module):
    fn = load_scorer(f"{scorer_module}:length_scorer")
    assert fn.__name__ == "length_scorer"
    oracle = load_scorer(f"{scorer_module}:Oracle")
    assert type(oracle).__name__ == "Oracle"  # the class was instantiated
    assert isinstance(oracle, Scorer)
    made = load_scorer(f"{scorer_module}:Oracle.make")  # a bound classmethod, used as is
    assert made.__name__ == "make"


@pytest.mark.parametrize(
    "spec, error, match",
    [
        ("my_scorers", ValueError, "'my_scorers' must look like 'package.module:attr'"),
        (":x", ValueError, "must look like"),
        ("no_such_pkg_xyz.mod:f", ImportError, "'no_such_pkg_xyz.mod:f': no module named"),
        ("broken_scorers:f", ImportError, "'broken_scorers:f': importing 'broken_scorers'"),
        ("my_scorers:missing", AttributeError, "'my_scorers:missing'.*no attribute 'missing'"),
        ("my_scorers:NOT_CALLABLE", TypeError, "NOT_CALLABLE is a int, not callable"),
        ("my_scorers:NeedsArgs", TypeError, "cannot build NeedsArgs with no arguments"),
    ],
)
def test_load_scorer_errors_name_the_spec(scorer_module, spec, error, match):
    with pytest.raises(error, match=match):
        load_scorer(spec)


def test_score_samples_threshold_and_explicit_flags(scorer_module):
    prompts = ["p0", "p0", "p1"]
    responses = ["ab", "abcd", "abc"]
    scores = score_samples(
        load_scorer(f"{scorer_module}:length_scorer"), prompts, responses, [0, 0, 1], [0.1, 0, 2]
    )
    np.testing.assert_array_equal(scores.cost, [2.0, 4.0, 3.0])
    np.testing.assert_array_equal(scores.catastrophic, [False, True, True])  # cost >= 3
    np.testing.assert_array_equal(scores.logratio, [0.1, 0.0, 2.0])
    oracle = score_samples(load_scorer(f"{scorer_module}:Oracle"), prompts, responses, [0, 0, 1])
    assert oracle.catastrophic.all() and oracle.logratio is None  # the explicit flags win


def _fixed(output, threshold=None):
    def scorer(prompts, responses):
        return output

    if threshold is not None:
        scorer.catastrophe_threshold = threshold
    return scorer


@pytest.mark.parametrize(
    "output, match",
    [
        ([1, 2], "returned a list, expected a dict"),
        ({"cost": np.zeros(2)}, "returned no 'reward'"),
        ({"reward": np.zeros(3), "cost": np.zeros(2)}, "'reward' has shape \\(3,\\)"),
        ({"reward": np.zeros(2), "cost": np.array([0.0, np.nan])}, "'cost' has a non-finite"),
        ({"reward": np.array(["a", "b"]), "cost": np.zeros(2)}, "'reward' has dtype"),
        (
            {"reward": np.zeros(2), "cost": np.zeros(2), "catastrophic": np.zeros(2)},
            "'catastrophic' must be a \\(2,\\) bool array",
        ),
    ],
)
def test_score_samples_errors_name_the_scorer(output, match):
    with pytest.raises(ValueError, match=f"scorer .*_fixed.<locals>.scorer.*{match}"):
        score_samples(_fixed(output, threshold=1.0), ["p", "p"], ["a", "b"], [0, 0])


def test_score_samples_input_checks():
    ok = _fixed({"reward": np.zeros(2), "cost": np.zeros(2)})
    with pytest.raises(ValueError, match="no 'catastrophic' and has no catastrophe_threshold"):
        score_samples(ok, ["p", "p"], ["a", "b"], [0, 0])
    with pytest.raises(ValueError, match="different lengths"):
        score_samples(ok, ["p"], ["a", "b"], [0, 0])
    with pytest.raises(ValueError, match="different lengths.*'logratio': 3"):
        score_samples(ok, ["p", "p"], ["a", "b"], [0, 0], logratio=np.zeros(3))
    with pytest.raises(ValueError, match="scoring with .*SampleScores.prompt must hold integers"):
        score_samples(_fixed({"reward": [0.0, 1], "cost": [0, 1]}, 1), "pp", "ab", [0.0, 1.0])


def test_a_module_in_the_working_directory_is_found_as_python_m_does(tmp_path, monkeypatch):
    # The `rsa-jax` console script's sys.path starts at the script's directory, not the working
    # directory: emulate it by taking both "" and the working directory off the path.
    (tmp_path / "cwd_scorer_mod.py").write_text(SCORER_MODULE)
    monkeypatch.chdir(tmp_path)
    path = [p for p in sys.path if p not in ("", str(tmp_path))]
    monkeypatch.setattr(sys, "path", path)
    monkeypatch.delitem(sys.modules, "cwd_scorer_mod", raising=False)
    scorer = load_scorer("cwd_scorer_mod:length_scorer")
    assert scorer(["p"], ["abcd"])["cost"].tolist() == [4.0]
    assert sys.path == path  # the working directory was on the path for that import only
    with pytest.raises(ImportError, match="no module named 'not_here_mod'"):
        load_scorer("not_here_mod:x")
