"""Tokenization: what tokens are as bytes (:mod:`.vocab_bytes`), for byte-level probabilities and diagnostics."""
