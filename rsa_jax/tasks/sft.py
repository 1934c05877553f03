"""Supervised fine-tuning of a small Llama from scratch on a task's behaviour, written as a local
Hugging Face directory (config.json, model.safetensors, tokenizer) that every stage then loads.

Each step draws fresh (prompt, response) samples from the task's behaviour, so the model is fitted
to the behaviour's distribution rather than to a finite set. Loss: mean next-token cross-entropy
over response tokens (EOS included).

Always full fine-tuning: the model starts from random weights, so there is no pretrained base
for LoRA adapters to adapt (a random frozen base plus rank-r deltas cannot fit the behaviour).
SFT with adapters on a pretrained base is `NextTokenObjective` on a LoRA `Engine`, the frozen
argument being `engine.frozen(None)` (tested in tests/training/test_lora_train.py).
"""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np
import optax

from rsa_jax.config import Config, MeshConfig, ModelConfig, StageConfig
from rsa_jax.data import DataConfig, PairTokenizer, collate_rows
from rsa_jax.losses import LossHyper
from rsa_jax.models import save_hf, tiny_config
from rsa_jax.tasks.safety import TEMPLATE, SafetyTask, make_tokenizer
from rsa_jax.training import Engine, Hyper, Layout, NextTokenObjective, Stage, state_shardings

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    # The style dependence (refusal, rude and hazard rates per style) is worth about 0.01-0.02
    # nats per token; the tiny model picks it up only after a plateau of about 1,000 steps of 64
    # samples (before that it conditions on the topic alone and emits catastrophes at the average
    # rate on every style). 2,000 steps fit it (tests/tasks/test_sft_styles.py); 600 did not.
    steps: int = 2000
    batch_size: int = 64
    learning_rate: float = 3e-3
    warmup_steps: int = 30
    seed: int = 0
    # Model size (a tiny Llama; the vocabulary is the task's).
    hidden_size: int = 64
    intermediate_size: int = 192
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2


def _encode(pair_tokenizer: PairTokenizer, prompts, responses, prompt_len, response_len):
    """Rows [prompt | response + EOS] in the data pipeline's batch layout."""
    rows = [
        (pair_tokenizer.prompt_ids(p, "SFT prompt"), pair_tokenizer.response_ids(r))
        for p, r in zip(prompts, responses, strict=True)
    ]
    return collate_rows(rows, prompt_len, response_len, pair_tokenizer.pad_id)


def train_sft(
    task: SafetyTask, out_dir: str, prompts: list[str], config: SFTConfig = SFTConfig()
) -> dict:
    """Trains on samples of `task`'s behaviour for `prompts`; writes the HF directory `out_dir`.

    Returns a summary: the first and last losses, and the behaviour's own per-token entropy on a
    held batch (the lowest cross-entropy any model can reach), for a sanity check of the fit.
    """
    tokenizer = make_tokenizer(task)
    llama = tiny_config(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.hidden_size // config.num_attention_heads,
        max_position_embeddings=64,
    )
    model_config = ModelConfig(
        path="tiny", compute_dtype="float32", remat=False, init_seed=config.seed
    )
    run = Config(model=model_config, data=DataConfig(batch_size=config.batch_size))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, config.learning_rate, config.warmup_steps, config.steps, config.learning_rate * 0.05
    )
    # A user optax transformation: SFT's schedule is fixed, so nothing needs tracing.
    engine = Engine(
        run,
        layout=Layout.single_device(MeshConfig().rules),
        tx=optax.adamw(schedule, weight_decay=0.0),
        tokenizer=tokenizer,
        llama=llama,
    )
    rng = np.random.default_rng(config.seed)
    prompt_len, response_len = 5, task.max_response_tokens()
    pair_tokenizer = PairTokenizer(
        tokenizer,
        DataConfig(template=TEMPLATE, max_prompt_len=prompt_len, max_response_len=response_len),
    )

    def batches():  # fresh samples of the behaviour every step
        while True:
            chosen = [prompts[i] for i in rng.integers(0, len(prompts), config.batch_size)]
            responses = [task.sample_response(p, rng) for p in chosen]
            yield _encode(pair_tokenizer, chosen, responses, prompt_len, response_len)

    state = engine.new_state(engine.initial)
    objective = NextTokenObjective()
    stage = Stage(
        index=0,
        config=StageConfig(name="sft"),
        state=state,
        reference=None,
        batches=batches(),
        total=config.steps,
        step_fn=engine.compiled_step(objective, state_shardings(state)),
        hyper=Hyper(LossHyper.create(), None),
    )
    losses = []
    t0 = time.perf_counter()
    engine.fit(stage, lambda stage, metrics, *_: losses.append(float(metrics["loss"])))
    params = stage.state.params
    save_hf(engine.model.module(params), out_dir, tokenizer=tokenizer)
    summary = dict(
        steps=config.steps,
        first_loss=losses[0],
        last_loss=float(np.mean(losses[-20:])),
        seconds=time.perf_counter() - t0,
        out_dir=out_dir,
    )
    log.info("SFT: %s", summary)
    return summary
