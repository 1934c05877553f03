"""Options of the preference-pair pipeline, as one frozen dataclass the config tree embeds."""

from __future__ import annotations

import dataclasses

VIEWS = ("auto", "pairs", "helpfulness", "safety")
FORMATS = ("auto", "jsonl", "parquet", "arrow_dir")
ON_ERROR = ("raise", "skip")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the pairs come from, which side is chosen, and the static shapes of a batch."""

    # A JSON Lines file (.jsonl, or .json; a .json file holding one array of rows also works),
    # a .parquet file, or one split's directory written by `datasets` `save_to_disk`.
    # kind (rsa_jax.config.key_kind): the same pairs may be reached by another path.
    path: str = dataclasses.field(default="", metadata={"kind": "resume_ignored"})
    # "auto" picks by suffix (.jsonl/.json, .parquet) or directory (arrow_dir).
    format: str = "auto"
    # Which response of a row is chosen. "auto": TRL's prompt/chosen/rejected schema as given,
    # a PKU-SafeRLHF row by its better_response_id (as "helpfulness"); "pairs": TRL's schema
    # only; "helpfulness" / "safety": PKU-SafeRLHF rows, chosen = better_response_id /
    # safer_response_id. A stage's own `view` (stages.N.view) takes precedence when set.
    view: str = "auto"
    # Prompt template with a `{prompt}` field, e.g. SACPO's
    # "BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:". None: the tokenizer's chat template.
    template: str | None = None
    # Prompt tokens kept (truncated from the LEFT, so the end of the prompt survives): P.
    max_prompt_len: int = 128
    # Response tokens kept, EOS included (truncated from the RIGHT, EOS kept last): R.
    max_response_len: int = 384
    # Pairs per step across all hosts (B): a global batch has 2B rows (chosen, then rejected),
    # and each of H hosts yields a contiguous block of 2B / H of them.
    batch_size: int = 8
    # Shuffling seed; every epoch is shuffled differently (derived from this seed). Also seeds the
    # order of the batches inside a length-grouping window.
    seed: int = 0
    # False: every epoch reads the pairs in file order.
    shuffle: bool = True
    # Passes over the data; the stream runs on across epoch boundaries without a partial batch.
    epochs: int = 1
    # True: the stream's last partial batch is dropped (and counted). False: it is yielded with
    # fewer pairs (one extra compiled shape); single host only.
    drop_remainder: bool = True
    # Length buckets: a batch is padded to the smallest listed prompt length >= its longest prompt
    # and the smallest listed response length >= its longest response; () means always P and R.
    # Each (prompt, response) bucket is one compiled shape.
    prompt_buckets: tuple[int, ...] = ()
    response_buckets: tuple[int, ...] = ()
    # Batches per length-grouping window: pairs of a window are sorted by length before being cut
    # into batches (better padding efficiency with buckets); 1 disables grouping.
    sort_window: int = 1
    # Background threads that prepare batches ahead of the train step (Grain prefetch).
    read_threads: int = dataclasses.field(default=2, metadata={"kind": "resume_ignored"})
    # "raise": bad rows stop with an error naming file, line and field. "skip": they are skipped,
    # counted per reason and reported.
    on_error: str = "raise"
    # Held-out pairs for evaluation during training (train.eval_every), read under each stage's
    # view: a file of their own, or ...
    eval_path: str = dataclasses.field(default="", metadata={"kind": "resume_ignored"})
    # ... this fraction of each stage's pairs, drawn with `seed` and left out of training.
    eval_fraction: float = 0.0

    def __post_init__(self):
        checks = [
            (self.view in VIEWS, f"view must be one of {VIEWS}, got {self.view!r}"),
            (self.format in FORMATS, f"format must be one of {FORMATS}, got {self.format!r}"),
            (
                self.on_error in ON_ERROR,
                f"on_error must be one of {ON_ERROR}, got {self.on_error!r}",
            ),
            (self.max_prompt_len >= 1, f"max_prompt_len must be >= 1, got {self.max_prompt_len}"),
            (
                self.max_response_len >= 1,
                f"max_response_len must be >= 1 (room for EOS), got {self.max_response_len}",
            ),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.read_threads >= 0, f"read_threads must be >= 0, got {self.read_threads}"),
            (self.sort_window >= 1, f"sort_window must be >= 1, got {self.sort_window}"),
            (
                0 <= self.eval_fraction < 1,
                f"eval_fraction must lie in [0, 1), got {self.eval_fraction}",
            ),
            (
                not (self.eval_path and self.eval_fraction),
                "eval_path and eval_fraction are two ways to hold pairs out: set one",
            ),
            (
                self.template is None or "{prompt}" in self.template,
                f"template must contain '{{prompt}}', got {self.template!r}",
            ),
            (
                all(1 <= b <= self.max_prompt_len for b in self.prompt_buckets),
                f"prompt_buckets must lie in [1, max_prompt_len], got {self.prompt_buckets}",
            ),
            (
                all(1 <= b <= self.max_response_len for b in self.response_buckets),
                f"response_buckets must lie in [1, max_response_len], got {self.response_buckets}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"DataConfig: {message}")
