"""The Grain pipeline: per-epoch shuffle -> tokenise -> (length-group) -> batch -> host rows.

Determinism and resume: every stage is a `grain.MapDataset` (random access by index), so the
iterator's state is one integer (`{"next_index": i}`, the global batch index) and `set_state`
resumes exactly where `get_state` was taken; it saves through Orbax with
`grain.checkpoint.CheckpointSave/Restore`.

Multi-host: every host walks the same global stream of batches of B = batch_size pairs (same
shuffle, same length grouping, same bucket shape), and host h of H yields rows
[h * 2B/H, (h+1) * 2B/H) of the global [2B, L] batch. So the hosts' blocks are disjoint, they
cover every row, all hosts agree on L, and the global array that
`jax.make_array_from_process_local_data` assembles from them (process-contiguous batch sharding)
is exactly the single-host batch: rows [0, B) chosen, [B, 2B) rejected. Without buckets a host
tokenises only its own rows; with buckets or length grouping it tokenises the whole global batch
to agree on its shape (redundant work across hosts, cheap next to a train step).

drop_remainder: the stream runs across epoch boundaries (epoch e is shuffled with a seed derived
from `seed` and e), so only the very last batch of the whole stream can be partial; with
`drop_remainder=True` it is dropped and its pairs are counted. Several hosts need
`drop_remainder=True` (a partial batch's rows need not split evenly across hosts).
"""

from __future__ import annotations

import collections
import functools
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any, cast

import grain
import numpy as np

from rsa_jax.data._config import DataConfig
from rsa_jax.data._sources import DataReport, PairRecord, load_pairs
from rsa_jax.data._tokenize import (
    PairTokenizer,
    TokenizedPair,
    batch_shape,
    collate_rows,
    length_key,
)

log = logging.getLogger(__name__)

_CACHED_WINDOWS = 4


class _LengthGroupedBatches:
    """Batches of `window` x `batch` consecutive examples sorted by length, cut, and reordered.

    Sorting inside a window (by `key`, e.g. `length_key`) puts pairs of similar length in the same
    batch, so buckets pad less; the batch order inside each window is then shuffled (seeded by the
    window index) so that the longest batches do not always come last. Random access, like every
    MapDataset: a grain `RandomAccessDataSource` (`__len__`, `__getitem__` by int; no slices).
    """

    def __init__(
        self,
        examples: grain.MapDataset,
        batch: int,
        window: int,
        seed: int,
        drop: bool,
        key: Callable[[TokenizedPair], Any],
    ):
        self._examples, self._batch, self._window, self._seed = examples, batch, window, seed
        self._key = key
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
                # A MapDataset yields None only for filtered-out elements; `examples` has no filter.
                items = cast(list[TokenizedPair], [self._examples[i] for i in range(start, stop)])
                items.sort(key=self._key)  # stable: ties keep stream order
                batches = [items[i : i + self._batch] for i in range(0, len(items), self._batch)]
                # A partial batch (drop_remainder=False) stays last: the stream's last batch.
                n_full = len(items) // self._batch
                order = np.random.default_rng([self._seed, w]).permutation(n_full)
                self._cache[w] = [batches[j] for j in order] + batches[n_full:]
                while len(self._cache) > _CACHED_WINDOWS:
                    self._cache.popitem(last=False)
            return self._cache[w]

    def __getitem__(self, index: int) -> list[TokenizedPair]:
        if not 0 <= index < self._n_batches:
            raise IndexError(index)
        return self._window_batches(index // self._window)[index % self._window]


def host_rows(batch: int, process_index: int, process_count: int) -> list[tuple[int, bool]]:
    """(pair index, is chosen) of each row of this host's block of a global batch of `batch` pairs.

    Global row r < B is pair r's chosen sequence, row B + i pair i's rejected one; host h of H
    owns rows [h * 2B/H, (h+1) * 2B/H).
    """
    per_host = 2 * batch // process_count
    first = process_index * per_host
    return [(r % batch, r < batch) for r in range(first, first + per_host)]


def make_pair_dataset(
    pairs: Sequence[PairRecord],
    tokenizer,
    config: DataConfig,
    *,
    process_index: int = 0,
    process_count: int = 1,
    report: DataReport | None = None,
) -> grain.MapDataset:
    """A MapDataset of this host's blocks of the global batches (the layout of `collate`).

    Args:
      pairs: every pair of the dataset (all hosts pass the same list, in the same order).
      tokenizer: a `transformers` tokenizer (local files only).
      config: the DataConfig.
      process_index, process_count: this host and the number of hosts (jax.process_index/count).
      report: where the pairs left out by `drop_remainder` are counted.
    Returns:
      grain.MapDataset whose items are dicts of numpy arrays with 2 * batch_size / process_count
      rows: this host's rows of the global [2 * batch_size, L] batch.
    """
    b = config.batch_size
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, {process_count})")
    if (2 * b) % process_count:
        raise ValueError(
            f"the 2 * data.batch_size = {2 * b} rows of a batch must be divisible by the "
            f"{process_count} processes"
        )
    if process_count > 1 and not config.drop_remainder:
        raise ValueError("several processes need data.drop_remainder=True (equal host blocks)")
    report = report if report is not None else DataReport()
    encode = PairTokenizer(tokenizer, config)
    mine = host_rows(b, process_index, process_count)
    fixed_shape = not (config.prompt_buckets or config.response_buckets or config.sort_window > 1)

    examples = grain.MapDataset.source(pairs)
    if config.shuffle:
        examples = examples.shuffle(seed=config.seed)  # a different order every epoch
    examples = examples.repeat(config.epochs)
    leftover = len(examples) % b
    if leftover and config.drop_remainder:
        report.dropped["final partial batch (drop_remainder)"] += leftover
    if len(examples) < b and config.drop_remainder:
        source = pairs[0].origin.rsplit(":", 1)[0] if len(pairs) else "the data"
        raise ValueError(
            f"{source}: {len(examples)} pairs over {config.epochs} epoch(s) make no full batch of "
            f"data.batch_size={b} ({report.summary()}); lower data.batch_size or add pairs"
        )

    def rows_of(n_pairs: int) -> list[tuple[int, bool]]:
        return mine if n_pairs == b else host_rows(n_pairs, 0, 1)  # a partial batch: 1 host

    def from_records(records: Sequence[PairRecord]) -> dict[str, np.ndarray]:
        """No buckets: tokenise only the prompts and responses of this host's rows."""
        prompts: dict[int, np.ndarray] = {}
        rows = []
        for i, chosen in rows_of(len(records)):
            rec = records[i]
            if i not in prompts:
                prompts[i] = encode.prompt_ids(rec.prompt, rec.origin)
            rows.append((prompts[i], encode.response_ids(rec.chosen if chosen else rec.rejected)))
        return collate_rows(rows, config.max_prompt_len, config.max_response_len, encode.pad_id)

    def from_tokenized(items: Sequence[TokenizedPair]) -> dict[str, np.ndarray]:
        """Buckets: the shape comes from the whole global batch, the same on every host."""
        rows = [
            (items[i].prompt, items[i].chosen if chosen else items[i].rejected)
            for i, chosen in rows_of(len(items))
        ]
        return collate_rows(rows, *batch_shape(items, config), encode.pad_id)

    if fixed_shape:
        return examples.batch(b, drop_remainder=config.drop_remainder, batch_fn=from_records)
    tokenized = examples.map(encode)
    if config.sort_window > 1:
        grouped = _LengthGroupedBatches(
            tokenized,
            b,
            config.sort_window,
            config.seed,
            config.drop_remainder,
            key=functools.partial(length_key, config=config),
        )
        return grain.MapDataset.source(grouped).map(from_tokenized)
    return tokenized.batch(b, drop_remainder=config.drop_remainder, batch_fn=from_tokenized)


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
