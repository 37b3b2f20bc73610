"""Tokenization, chat templates and stateless incremental detokenization."""
