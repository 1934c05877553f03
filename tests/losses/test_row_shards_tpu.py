"""The risk head on rows split over many chips, compiled by the TPU compiler: its loops step
over each chip's own rows (`row_shards`) instead of gathering blocks of logits at every step."""

from __future__ import annotations

import importlib.util
import os

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))

DEFAULT_CASES = {"test_risk_head_gathers_no_logits_across_chips": ["plain"]}


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu (tpu-compile)")
@pytest.mark.parametrize("mode", ["plain", "vmap"])
def test_risk_head_gathers_no_logits_across_chips(device_script, mode):
    """64 rows over the 32 chips of a v5p-64, `cvar_reference` through the fused head (value and
    gradient; `vmap`: over two values of mu, as a sweep). With `row_shards=1` (the library before
    it knew the rows' devices) 8 rows per block step are fewer than the chips, and the compiled
    loops all-gather blocks of float32 logits at every step; this is what cost Llama-3-70B 16 TB
    per chip per step (docs/scale.md). With `row_shards=32` nothing is gathered at all: the
    selection's histograms are per row and its loop takes no shortcut branch whose predicate
    would span chips (`_select._kth_pair_keys`), and under vmap the members' rows stay with
    their chip's own rows."""
    out = device_script(os.path.join(HERE, "row_shards_tpu_check.py"), mode, devices=1, timeout=900)
    old, new = out["shards1"], out["shards32"]
    assert old["float_gathers"] > 0  # the loss as it was: gathers of logits inside its loops
    assert new["float_gathers"] == 0 and new["all_gather_bytes"] == 0, out
