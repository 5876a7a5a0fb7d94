"""Tokenizer loading, incremental detokenization and stop strings."""

from pagedserve.tokenizer.detokenizer import IncrementalDetokenizer
from pagedserve.tokenizer.tokenizer import load_tokenizer

__all__ = ["IncrementalDetokenizer", "load_tokenizer"]
