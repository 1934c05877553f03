"""Preference-pair data: sources and stage views, tokenisation, static batches, Grain pipelines."""

from rsa_jax.data._config import VIEWS, DataConfig
from rsa_jax.data._pipeline import make_pair_dataset, make_pair_iterator
from rsa_jax.data._sources import (
    DataError,
    DataReport,
    PairRecord,
    load_pairs,
)
from rsa_jax.data._text import TextEncoder
from rsa_jax.data._tiny_tokenizer import train_bpe_tokenizer
from rsa_jax.data._tokenize import (
    PairTokenizer,
    TokenizedPair,
    batch_shape,
    collate,
    collate_rows,
    padding_efficiency,
)
from rsa_jax.data._toy import write_toy_data

__all__ = [
    "VIEWS",
    "DataConfig",
    "DataError",
    "DataReport",
    "PairRecord",
    "PairTokenizer",
    "TextEncoder",
    "TokenizedPair",
    "batch_shape",
    "collate",
    "collate_rows",
    "load_pairs",
    "make_pair_dataset",
    "make_pair_iterator",
    "padding_efficiency",
    "train_bpe_tokenizer",
    "write_toy_data",
]
