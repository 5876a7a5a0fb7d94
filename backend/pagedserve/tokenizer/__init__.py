"""Tokenizer loading, incremental detokenization and stop strings."""

from pagedserve.tokenizer.detokenizer import IncrementalDetokenizer
from pagedserve.tokenizer.tokenizer import bad_words_token_ids, load_tokenizer

__all__ = ["IncrementalDetokenizer", "bad_words_token_ids", "load_tokenizer"]
