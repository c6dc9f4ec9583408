"""A toy model source with a known answer: a Markov chain over characters, two tokenizers, a tiny trained Llama.

Reproduces the validation set-up of "Understanding and Mitigating Tokenization Bias in
Language Models" (Phan, Havasi, Muckley & Ullrich, 2024): text is drawn from a known
Markov chain over a small alphabet, tokenised with a multi-character vocabulary, and a
small causal transformer is trained on the tokens. Because the chain is known, every
estimate of ``P(next char | previous chars)`` read from the model can be scored against
the truth.

What could be checked of the paper's set-up: the search tool reached only its abstract
and summaries, which say the validation uses a Markov chain, maximum-prefix encoding and
BPE, and that the corrected estimate recovers the transition probabilities while naive
prompting does not. Everything more specific below is our choice (the chain's order and
its two-letter alphabet follow our recollection of the paper, not a verified reading):

- chain: a 3rd-order Markov chain over ``"A"``/``"B"`` (ASCII, so characters are bytes);
  transition probabilities drawn once from a seed, each ``P(A | context)`` uniform in
  [0.1, 0.9]; the first ``order`` characters of a sequence uniform. The study samples
  20,000 sequences of 48 characters.
- tokenizers: maximum-prefix encoding over a hand-picked vocabulary with multi-character
  tokens (:data:`MPE_TOKENS`), and BPE with 6 merges trained on the sampled corpus. Both
  add a start token ``<s>``; training sequences end in ``</s>``.
- model: a 2-layer ``LlamaForCausalLM`` (d_model 64, 4 heads, 83k parameters) trained
  with AdamW (peak learning rate 3e-3, warm-up then cosine) for 800 steps of 128
  sequences on one CPU thread (minutes).

This module is the "models" layer of the experiment: it makes chains, corpora,
tokenizers and trained :class:`~workbench.models.ModelHandle` checkpoints. Estimates and
errors live in :mod:`workbench.analyses.tokenization_bias`.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from ..threads import single_thread
from .loading import ModelHandle

ALPHABET = ("A", "B")
BOS, EOS = "<s>", "</s>"
# Hand-picked MPE vocabulary: every single character can still be followed by something
# under greedy longest match (a vocabulary holding both "AA" and "AB" would make the token
# "A" appear only at the end of a text), while longer tokens constrain what may follow the
# shorter ones, which is where the bias of naive prompting comes from.
MPE_TOKENS = ("A", "B", "AA", "ABB", "BAB", "BBA")


# --------------------------------------------------------------------------- the chain


@dataclass(frozen=True)
class MarkovChain:
    """A k-th order Markov chain over single ASCII characters.

    ``transitions[i, j] = P(x_{n+1} = alphabet[j] | x_{n-k+1..n} = contexts[i])`` with the
    contexts of length ``order`` in lexicographic order of the alphabet (``"AAA"``,
    ``"AAB"``, ...). The first ``order`` characters of every sequence are uniform.
    """

    alphabet: tuple[str, ...]
    order: int
    transitions: np.ndarray = field(repr=False)

    def __post_init__(self):
        alphabet = tuple(self.alphabet)
        if len(alphabet) < 2 or any(len(c) != 1 or not c.isascii() or not c.isprintable() for c in alphabet):
            raise ValueError(f"the alphabet must be two or more distinct printable ASCII characters, got {alphabet!r}.")
        if len(set(alphabet)) != len(alphabet):
            raise ValueError(f"the alphabet {alphabet!r} repeats a character.")
        if self.order < 1:
            raise ValueError(f"order must be 1 or more, got {self.order}.")
        matrix = np.asarray(self.transitions, dtype=np.float64)
        shape = (len(alphabet) ** self.order, len(alphabet))
        if matrix.shape != shape:
            raise ValueError(f"transitions must have shape {shape} (contexts x next character), got {matrix.shape}.")
        if (matrix < 0).any() or not np.allclose(matrix.sum(axis=1), 1.0):
            raise ValueError("every row of transitions must be a probability distribution (>= 0, summing to 1).")
        object.__setattr__(self, "alphabet", alphabet)
        object.__setattr__(self, "transitions", matrix)

    @classmethod
    def random(cls, alphabet: Sequence[str] = ALPHABET, order: int = 3, seed: int = 0, floor: float = 0.1) -> "MarkovChain":
        """A chain with seeded random transitions, every probability at least ``floor``.

        Rows are ``floor + (1 - n * floor) * Dirichlet(1)``; for two characters that is
        ``P(A | context)`` uniform in ``[floor, 1 - floor]``.
        """
        n = len(alphabet)
        if not 0 <= floor < 1 / n:
            raise ValueError(f"floor must be in [0, 1/{n}), got {floor}.")
        rng = np.random.default_rng(seed)
        rows = rng.dirichlet(np.ones(n), size=n**order)
        return cls(tuple(alphabet), order, floor + (1 - n * floor) * rows)

    @property
    def contexts(self) -> list[str]:
        """Every context of ``order`` characters, in the row order of ``transitions``."""
        return ["".join(p) for p in itertools.product(self.alphabet, repeat=self.order)]

    def transition_matrix(self) -> xr.DataArray:
        """The true ``P(next_char | context)`` as a labelled array. Dims: (context, next_char)."""
        return xr.DataArray(
            self.transitions,
            dims=("context", "next_char"),
            coords={"context": self.contexts, "next_char": list(self.alphabet)},
            name="probability",
            attrs={"order": self.order},
        )

    def _context_index(self, chars: np.ndarray) -> np.ndarray:
        """Row index of the context formed by the last ``order`` columns of ``chars`` (alphabet indices)."""
        n = len(self.alphabet)
        index = np.zeros(chars.shape[0], dtype=np.int64)
        for column in chars[:, -self.order:].T:
            index = index * n + column
        return index

    def sample(self, n_sequences: int, length: int, seed: int = 0) -> list[str]:
        """``n_sequences`` strings of ``length`` characters drawn from the chain (seeded)."""
        if length <= self.order:
            raise ValueError(f"length must exceed the chain's order {self.order}, got {length}.")
        if n_sequences < 1:
            raise ValueError(f"n_sequences must be 1 or more, got {n_sequences}.")
        rng = np.random.default_rng(seed)
        n = len(self.alphabet)
        chars = np.empty((n_sequences, length), dtype=np.int64)
        chars[:, : self.order] = rng.integers(0, n, size=(n_sequences, self.order))
        cumulative = np.cumsum(self.transitions, axis=1)
        for pos in range(self.order, length):
            rows = cumulative[self._context_index(chars[:, :pos])]
            u = rng.random(n_sequences)[:, None]
            chars[:, pos] = np.minimum((u > rows).sum(axis=1), n - 1)
        table = np.array(self.alphabet)
        return ["".join(row) for row in table[chars]]

    def log_probability(self, text: str) -> float:
        """``log P(text)`` under the chain (uniform first ``order`` characters)."""
        unknown = set(text) - set(self.alphabet)
        if unknown:
            raise ValueError(f"{text!r} has characters outside the alphabet {self.alphabet}: {sorted(unknown)}.")
        index = {c: i for i, c in enumerate(self.alphabet)}
        head = min(self.order, len(text))
        logp = -head * math.log(len(self.alphabet))
        rows = {c: i for i, c in enumerate(self.contexts)}
        for pos in range(self.order, len(text)):
            logp += math.log(self.transitions[rows[text[pos - self.order : pos]], index[text[pos]]])
        return logp


# --------------------------------------------------------------------------- tokenizers


def _wrap(tokenizer, name: str):
    """A ``tokenizers.Tokenizer`` as a transformers fast tokenizer that prepends ``<s>``."""
    from tokenizers import decoders, processors
    from transformers import PreTrainedTokenizerFast

    tokenizer.decoder = decoders.Fuse()  # tokens are plain characters: decoding concatenates them
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, tokenizer.token_to_id(BOS))]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=EOS,
                                   unk_token=EOS)
    fast.name_or_path = name
    return fast


def mpe_tokenizer(tokens: Sequence[str] = MPE_TOKENS):
    """Maximum-prefix encoding over ``tokens``: repeatedly emit the longest token that prefixes the rest of the text.

    "Understanding and Mitigating Tokenization Bias in Language Models" (Phan et al.,
    2024): ``encode(x) = t_1 encode(x[len(t_1):])`` with ``t_1 = argmax_{t in V, x starts
    with t} len(t)``. Built as a ``tokenizers`` WordLevel model behind a ``Split``
    pre-tokenizer whose pattern is the alternation of the tokens, longest first: a regex
    engine scanning left to right takes, at each position, the first alternative that
    matches, which is the longest token. (A WordPiece model with an empty
    continuing-subword prefix and no pre-tokenizer encodes the same way; the tests check
    both against a direct greedy loop. WordPiece is not used because
    :mod:`workbench.vocab_bytes` refuses WordPiece models.) Characters outside the tokens
    encode as ``</s>`` (unknown). Ids: ``<s>`` 0, ``</s>`` 1, then ``tokens`` in order.
    """
    import re

    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    tokens = list(dict.fromkeys(tokens))
    if not tokens or any(not t or not t.isascii() or t in (BOS, EOS) for t in tokens):
        raise ValueError(f"MPE tokens must be non-empty ASCII strings other than {BOS}/{EOS}, got {tokens!r}.")
    missing = sorted({c for t in tokens for c in t} - set(tokens))
    if missing:
        raise ValueError(
            f"every character used in a token must also be a token of its own, or some texts cannot be "
            f"encoded; add {missing} to the MPE tokens."
        )
    vocab = {BOS: 0, EOS: 1, **{t: i + 2 for i, t in enumerate(tokens)}}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=EOS))
    longest_first = "|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(longest_first), behavior="isolated")
    return _wrap(tokenizer, "mpe:" + ",".join(tokens))


def bpe_tokenizer(corpus: Sequence[str], n_merges: int = 6, alphabet: Sequence[str] = ALPHABET):
    """Byte-pair encoding trained on ``corpus`` with ``n_merges`` merges over ``alphabet``.

    "Understanding and Mitigating Tokenization Bias in Language Models" (Phan et al.,
    2024), their second encoding: start from single characters, repeatedly merge the most
    frequent adjacent pair; ``encode`` applies the learned merges in rank order. No
    pre-tokenizer, so each sequence is one word. Ids: ``<s>`` 0, ``</s>`` 1, the alphabet,
    then the merged tokens.
    """
    from tokenizers import Tokenizer, models, trainers

    if n_merges < 1:
        raise ValueError(f"n_merges must be 1 or more (a BPE without merges is a character tokenizer), got {n_merges}.")
    if not corpus:
        raise ValueError("the BPE tokenizer needs a non-empty corpus to learn merges from.")
    tokenizer = Tokenizer(models.BPE(unk_token=EOS))  # unknown characters: </s>, not dropped
    trainer = trainers.BpeTrainer(
        vocab_size=2 + len(alphabet) + n_merges, special_tokens=[BOS, EOS], initial_alphabet=list(alphabet),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer)
    return _wrap(tokenizer, f"bpe:{n_merges}-merges")


def tokenizer_tokens(tokenizer) -> list[str]:
    """The non-special tokens of ``tokenizer``, by id."""
    special = set(tokenizer.all_special_ids)
    return [t for t, i in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]) if i not in special]


# --------------------------------------------------------------------------- the toy model


@dataclass(frozen=True)
class TrainingConfig:
    """How the toy transformer is built and trained (seeded; CPU-sized defaults; the study uses 800 steps of 128)."""

    steps: int = 2000
    batch_size: int = 32
    learning_rate: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    hidden_size: int = 64
    intermediate_size: int = 128
    layers: int = 2
    heads: int = 4
    seed: int = 0
    checkpoint_steps: tuple[int, ...] = (100, 250, 500, 1000, 2000)

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be 1 or more, got {self.steps} and {self.batch_size}.")
        bad = [s for s in self.checkpoint_steps if not 1 <= s <= self.steps]
        if bad:
            raise ValueError(f"checkpoint steps {bad} fall outside 1..{self.steps}; every checkpoint must be a step that runs.")
        if self.hidden_size % self.heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by heads {self.heads}.")


def toy_model(tokenizer, config: TrainingConfig, max_positions: int) -> torch.nn.Module:
    """A freshly initialised small ``LlamaForCausalLM`` for ``tokenizer`` (seeded by ``config.seed``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        num_key_value_heads=config.heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    llama._attn_implementation = "eager"
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        return LlamaForCausalLM(llama)


def encode_corpus(tokenizer, corpus: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``<s> encode(text) </s>`` for every text, right-padded: (input_ids, labels with -100 on padding)."""
    encoded = tokenizer(list(corpus))["input_ids"]
    eos = tokenizer.eos_token_id
    width = max(len(ids) for ids in encoded) + 1
    input_ids = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), -100, dtype=torch.long)
    for row, ids in enumerate(encoded):
        ids = ids + [eos]
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(ids)] = torch.tensor(ids)
    return input_ids, labels


def _learning_rate(step: int, config: TrainingConfig) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _weights_hash(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().numpy().tobytes())
    return digest.hexdigest()


def train_toy_model(
    tokenizer,
    corpus: Sequence[str],
    config: TrainingConfig = TrainingConfig(),
    *,
    name: str = "markov",
    save_dir: str | Path | None = None,
    progress: bool = True,
) -> dict[int, ModelHandle]:
    """Train a small Llama on ``corpus`` tokenised by ``tokenizer``; return a handle per checkpoint step.

    Next-token cross-entropy on ``<s> encode(text) </s>``, AdamW, batches drawn at random
    (seeded) from the corpus, gradient norm clipped at 1. With ``save_dir``, each
    checkpoint is also written as a Hugging Face folder ``save_dir/step-<n>`` (weights,
    config, tokenizer) that ``workbench.load_model(folder)`` opens. Steps -> handles, in
    step order; each handle is an independent copy in eval mode. Runs on one CPU thread
    (see :func:`single_thread`).
    """
    with single_thread():
        return _train(tokenizer, corpus, config, name, save_dir, progress)


def _train(tokenizer, corpus, config, name, save_dir, progress) -> dict[int, ModelHandle]:
    from tqdm.auto import tqdm

    input_ids, labels = encode_corpus(tokenizer, corpus)
    attention_mask = (labels != -100).long()
    model = toy_model(tokenizer, config, max_positions=max(64, input_ids.shape[1]))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay,
                                  betas=(0.9, 0.98))
    generator = torch.Generator().manual_seed(config.seed)
    checkpoints: dict[int, ModelHandle] = {}
    wanted = set(config.checkpoint_steps)
    bar = tqdm(range(1, config.steps + 1), desc=f"training {name}", unit="step", disable=not progress, leave=False)
    running = None
    for step in bar:
        rows = torch.randint(0, input_ids.shape[0], (config.batch_size,), generator=generator)
        width = int(attention_mask[rows].sum(dim=1).max())  # drop columns that are padding for the whole batch
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(step - 1, config)
        loss = model(input_ids=input_ids[rows, :width], attention_mask=attention_mask[rows, :width],
                     labels=labels[rows, :width]).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if step % 25 == 0:
            bar.set_postfix(loss=f"{running:.4f}")
        if step in wanted:
            checkpoints[step] = _checkpoint(model, tokenizer, name, step, running, config, save_dir)
    bar.close()
    return checkpoints


def _checkpoint(model, tokenizer, name, step, loss, config, save_dir) -> ModelHandle:
    snapshot = copy.deepcopy(model).eval().requires_grad_(False)
    snapshot.config.workbench_training = {**asdict(config), "step": step, "smoothed_loss": loss}
    source = f"trained in memory ({name}, step {step})"
    if save_dir is not None:
        from transformers.utils import logging as hf_logging

        folder = Path(save_dir) / f"step-{step}"
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # one "writing shards" bar per tiny checkpoint is noise
        try:
            snapshot.save_pretrained(folder, safe_serialization=True)
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        tokenizer.save_pretrained(folder)
        source = str(folder)
    return ModelHandle(name=f"{name}-step{step}", hf_model=snapshot, tokenizer=tokenizer, source=source,
                       file_hash=_weights_hash(snapshot))
