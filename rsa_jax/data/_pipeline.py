"""The Grain pipeline: host shard -> per-epoch shuffle -> tokenise -> (length-group) -> batch.

Determinism and resume: every stage is a `grain.MapDataset` (random access by index), so the
iterator's state is one integer (`{"next_index": i}`) and `set_state` resumes exactly where
`get_state` was taken; it saves through Orbax with `grain.checkpoint.CheckpointSave/Restore`.

Multi-host: host p of P reads rows p, p + P, p + 2P, ... of the `floor(n / P) * P` first rows, so
the hosts' parts are disjoint, together cover the data, and are of equal size (every host yields
the same number of batches, as collectives need); the at most P - 1 rows left over are counted in
the report. Each host yields `batch_size / P` pairs per step.

drop_remainder: the stream runs across epoch boundaries (epoch e is shuffled with a seed derived
from `seed` and e), so only the very last batch of the whole stream can be partial; with
`drop_remainder=True` it is dropped and its pairs are counted.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Sequence

import grain
import numpy as np

from rsa_jax.data._config import DataConfig
from rsa_jax.data._sources import DataReport, PairRecord, load_pairs
from rsa_jax.data._tokenize import PairTokenizer, TokenizedPair, batch_shape, collate

log = logging.getLogger(__name__)

_CACHED_WINDOWS = 4


class _LengthGroupedBatches(Sequence):
    """Batches of `window` x `batch` consecutive examples sorted by length, cut, and reordered.

    Sorting inside a window puts pairs of similar length in the same batch, so buckets pad less;
    the batch order inside each window is then shuffled (seeded by the window index) so that the
    longest batches do not always come last. Random access, like every MapDataset.
    """

    def __init__(self, examples: grain.MapDataset, batch: int, window: int, seed: int, drop: bool):
        self._examples, self._batch, self._window, self._seed = examples, batch, window, seed
        n = len(examples)
        self._n_batches = n // batch if drop else -(-n // batch)
        # With drop_remainder the stream's last `n % batch` examples are left out BEFORE grouping,
        # so the final window never holds a partial batch that its shuffle could move forward.
        self._n_examples = self._n_batches * batch if drop else n
        # Grain's prefetch threads ask for nearby batches concurrently: keep a few windows,
        # behind a lock, so that no window is tokenised twice.
        self._cache: collections.OrderedDict[int, list[list[TokenizedPair]]] = (
            collections.OrderedDict()
        )
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._n_batches

    def _window_batches(self, w: int) -> list[list[TokenizedPair]]:
        with self._lock:
            if w not in self._cache:
                start = w * self._window * self._batch
                stop = min(start + self._window * self._batch, self._n_examples)
                items = [self._examples[i] for i in range(start, stop)]
                items.sort(key=lambda p: sum(p.longest()))  # stable: ties keep stream order
                batches = [items[i : i + self._batch] for i in range(0, len(items), self._batch)]
                order = np.random.default_rng([self._seed, w]).permutation(len(batches))
                self._cache[w] = [batches[j] for j in order]
                while len(self._cache) > _CACHED_WINDOWS:
                    self._cache.popitem(last=False)
            return self._cache[w]

    def __getitem__(self, j: int) -> list[TokenizedPair]:
        if not 0 <= j < self._n_batches:
            raise IndexError(j)
        return self._window_batches(j // self._window)[j % self._window]


def make_pair_dataset(
    pairs: Sequence[PairRecord],
    tokenizer,
    config: DataConfig,
    *,
    process_index: int = 0,
    process_count: int = 1,
    report: DataReport | None = None,
) -> grain.MapDataset:
    """A MapDataset of batches (dicts in the layout of `collate`) for this host.

    Args:
      pairs: every pair of the dataset (all hosts pass the same list, in the same order).
      tokenizer: a `transformers` tokenizer (local files only).
      config: the DataConfig.
      process_index, process_count: this host and the number of hosts (jax.process_index/count).
      report: where the rows left out by host balancing and `drop_remainder` are counted.
    Returns:
      grain.MapDataset whose items are batch dicts of numpy arrays with 2 * batch_size /
      process_count rows.
    """
    if config.batch_size % process_count:
        raise ValueError(
            f"data.batch_size={config.batch_size} pairs must be divisible by the "
            f"{process_count} processes"
        )
    local_batch = config.batch_size // process_count
    per_host = len(pairs) // process_count
    if per_host == 0:
        raise ValueError(f"{len(pairs)} pairs cannot feed {process_count} processes")
    report = report if report is not None else DataReport()
    if len(pairs) - per_host * process_count:
        report.dropped["host balance (rows beyond a multiple of the process count)"] += (
            len(pairs) - per_host * process_count
        )

    encode = PairTokenizer(tokenizer, config)
    examples = grain.MapDataset.source(pairs).slice(
        slice(process_index, per_host * process_count, process_count)
    )
    if config.shuffle:
        examples = examples.shuffle(seed=config.seed)  # a different order every epoch
    examples = examples.repeat(config.epochs).map(encode)
    leftover = len(examples) % local_batch
    if leftover and config.drop_remainder:
        report.dropped["final partial batch (drop_remainder)"] += leftover

    def to_batch(items: list[TokenizedPair]) -> dict[str, np.ndarray]:
        return collate(items, *batch_shape(items, config), encode.pad_id)

    if config.sort_window > 1:
        grouped = _LengthGroupedBatches(
            examples, local_batch, config.sort_window, config.seed, config.drop_remainder
        )
        return grain.MapDataset.source(grouped).map(to_batch)
    return examples.batch(local_batch, drop_remainder=config.drop_remainder, batch_fn=to_batch)


def make_pair_iterator(
    config: DataConfig,
    tokenizer,
    *,
    process_index: int = 0,
    process_count: int = 1,
) -> tuple[grain.DatasetIterator, DataReport]:
    """Reads `config.path` and returns this host's batch iterator and the data report.

    The iterator has `get_state()` / `set_state()`; save it with
    `grain.checkpoint.CheckpointSave(iterator)` inside an Orbax `Composite`.
    """
    pairs, report = load_pairs(config)
    dataset = make_pair_dataset(
        pairs,
        tokenizer,
        config,
        process_index=process_index,
        process_count=process_count,
        report=report,
    )
    left_out = report.dropped or report.skipped
    (log.warning if left_out else log.info)("data %s: %s", config.path, report.summary())
    read_options = grain.ReadOptions(num_threads=config.read_threads)
    return iter(dataset.to_iter_dataset(read_options)), report
