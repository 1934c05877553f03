"""Worker of test_score_models.py's sharded test: score models on 8 simulated CPU devices.

Scores the same texts with each format's random directory on one device and on a (2, 2, 2)
mesh (parameters sharded by the training rules, rows split over `data`), and prints one JSON
object: the largest score difference per format and whether a parameter really was split.
"""

import json
import sys
import tempfile

import jax
import numpy as np
from jax.sharding import NamedSharding

from rsa_jax.config import MeshConfig
from rsa_jax.data import train_bpe_tokenizer
from rsa_jax.eval import placement_for
from rsa_jax.eval.judges import ScoreModel
from rsa_jax.testing.score_models import write_score_dir

PROMPTS = ["How do I bake bread?", "hi", "How do I kill a stuck Python process?"] * 3
RESPONSES = ["Mix flour and bake.", "hello", "Run kill -9 PID, or pkill by name."] * 3


def main() -> int:
    assert jax.device_count() == 8, jax.device_count()
    tokenizer = train_bpe_tokenizer()
    one = placement_for(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    mesh = placement_for(MeshConfig(data=2, fsdp=2, tensor=2))
    out = {}
    with tempfile.TemporaryDirectory() as root:
        for fmt in ("safe_rlhf", "qwen2_seq_cls"):
            path = f"{root}/{fmt}"
            write_score_dir(path, fmt, tokenizer=tokenizer)
            single = ScoreModel.load(path, placement=one).score(PROMPTS, RESPONSES)
            model = ScoreModel.load(path, placement=mesh)
            sharded = model.score(PROMPTS, RESPONSES, memory_budget=1)  # 2 rows per batch
            split = any(
                isinstance(leaf.sharding, NamedSharding)
                and leaf.addressable_shards[0].data.size < leaf.size
                for leaf in jax.tree.leaves(jax.tree.map(lambda v: v, model.backbone))
                if hasattr(leaf, "sharding")
            )
            out[fmt] = {"max_diff": float(np.max(np.abs(single - sharded))), "split": split}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
