"""Tiny randomly initialised models of many architectures, built offline from transformers' config classes.

They carry no knowledge (random weights) but every structural quirk of their family:
fused QKV (GPT-2, GPT-NeoX, Bloom, Falcon, Phi-3, GPTBigCode), parallel attention + MLP
(GPT-J, GPT-NeoX, Falcon, Phi, Cohere), sandwich post-norms (Gemma 2/3, OLMo 2),
grouped and multi-query KV heads, ALiBi (Bloom), MoE MLPs (Mixtral, Qwen2-MoE, OLMoE),
learned positions (GPT-2, OPT, GPTBigCode). The parity tests run every probe on each of
them against Hugging Face's own outputs.

``tiny_model("gpt2")`` builds one (seeded, SmolLM2's tokenizer, 2 layers, d_model 64);
``load_model("tiny-random-gpt2")`` does the same; ``save_tiny_model("gpt_neox", folder)``
writes a Hugging Face folder that ``load_model(folder)`` reads back, as a user's own model.
"""

from __future__ import annotations

import torch

# Config fields that differ from the shared tiny shape, per architecture (names as the config
# class spells them). Only what the config class needs to build a consistent tiny model.
TINY_ARCHITECTURES: dict[str, dict] = {
    "gpt2": {},
    "gpt_neox": {"rotary_pct": 0.5},
    "gptj": {"rotary_dim": 8},
    "opt": {"word_embed_proj_dim": 64, "ffn_dim": 128},
    "bloom": {},
    "falcon": {"new_decoder_architecture": False, "multi_query": True, "parallel_attn": True, "alibi": False},
    "gpt_bigcode": {"multi_query": True},
    "llama": {"tie_word_embeddings": True},
    "mistral": {"sliding_window": 4},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2": {},
    "qwen3": {},
    "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                  "shared_expert_intermediate_size": 64},
    "phi": {"partial_rotary_factor": 0.5},
    "phi3": {},
    "gemma": {},
    "gemma2": {"sliding_window": 4},
    "gemma3_text": {"sliding_window": 4, "layer_types": ["sliding_attention", "full_attention"]},
    "olmo": {},
    "olmo2": {},
    "olmoe": {"num_experts": 4, "num_experts_per_tok": 2},
    "cohere": {},
    "stablelm": {"partial_rotary_factor": 0.5},
    "starcoder2": {},
    "granite": {},
}

TINY_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=256)

TINY_PREFIX = "tiny-random-"
RANDOM_PREFIX = "random-"


def tiny_config(architecture: str, vocab_size: int, special_ids: dict | None = None, overrides: dict | None = None):
    """The config of a tiny ``architecture`` model (eager attention, no dropout); ``overrides`` replace fields
    (``num_hidden_layers`` with its ``layer_types``, for a stand-in as deep as a real model)."""
    from transformers import CONFIG_MAPPING

    if architecture not in TINY_ARCHITECTURES:
        raise ValueError(f"no tiny model for {architecture!r}; tiny architectures: {', '.join(TINY_ARCHITECTURES)}.")
    cls = CONFIG_MAPPING[architecture]
    default = cls()
    # shared shape fields the config class does not know (GPT-2 has no KV-head count) are left out
    shape = {k: v for k, v in TINY_SHAPE.items() if hasattr(default, k) and not isinstance(getattr(type(default), k, None), property)}
    config = cls(**{**shape, **TINY_ARCHITECTURES[architecture], "vocab_size": vocab_size, **(special_ids or {}),
                    **(overrides or {})})
    config._attn_implementation = "eager"
    return config


def tiny_stand_in(config) -> torch.nn.Module:
    """A random model of ``config``'s architecture and depth at tiny width: it has the same module paths and runs
    them in the same order as the real model (used to learn that order for a model whose weights are elsewhere)."""
    from transformers import AutoModelForCausalLM

    overrides = {"num_hidden_layers": config.num_hidden_layers}
    if getattr(config, "layer_types", None) is not None:
        overrides["layer_types"] = list(config.layer_types)
    try:
        small = tiny_config(config.model_type, 512, overrides=overrides)
    except ValueError as err:
        raise ValueError(f"{config.model_type}: {err}") from err
    return AutoModelForCausalLM.from_config(small, attn_implementation="eager").eval()


def tiny_model(architecture: str = "llama", seed: int = 0):
    """A seeded, randomly initialised 2-layer ``architecture`` model behind a :class:`ModelHandle`."""
    from transformers import AutoModelForCausalLM

    from .loading import ModelHandle, _tiny_tokenizer

    tokenizer = _tiny_tokenizer()
    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id}
    config = tiny_config(architecture, len(tokenizer), special)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        hf_model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    hf_model.config.architectures = [type(hf_model).__name__]
    hf_model.eval()
    return ModelHandle(name=f"{TINY_PREFIX}{architecture}", hf_model=hf_model, tokenizer=tokenizer,
                       source=f"random init, seed {seed}", file_hash=f"{architecture}-seed-{seed}")


# Real models' shapes with random weights: for GPU checks and timings where the weights cannot
# travel (the GPU machine takes 64 MiB of files). Vocabulary and special ids: SmolLM2's tokenizer.
REAL_SHAPES: dict[str, dict] = {
    # SmolLM2-135M's own config (the embedded default model)
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                         rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, tie_word_embeddings=True),
    # Llama-3.2-1B's layers (16 x d_model 2048, 32 query / 8 KV heads); with SmolLM2's 49,152-token
    # vocabulary instead of 128,256 it has 1.07 B parameters
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                     rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, tie_word_embeddings=True),
    # Llama-3-8B's layers (32 x d_model 4096, 32 query / 8 KV heads of 128, MLP 14336); with SmolLM2's
    # vocabulary 7.4 B parameters
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, head_dim=128, max_position_embeddings=8192,
                       rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, tie_word_embeddings=False),
}


def random_shaped_model(shape: str, *, device: str = "cpu", dtype: str = "float32", seed: int = 0):
    """A seeded random-init Llama with the layer shapes of ``shape`` (see ``REAL_SHAPES``), built on
    ``device`` in ``dtype`` (eager attention), behind a :class:`ModelHandle`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from .loading import DTYPES, ModelHandle, _tiny_tokenizer

    if shape not in REAL_SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(REAL_SHAPES)}.")
    tokenizer = _tiny_tokenizer()
    config = LlamaConfig(**REAL_SHAPES[shape], vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[device] if device.startswith("cuda") else []), torch.device(device):
        torch.manual_seed(seed)
        default = torch.get_default_dtype()
        torch.set_default_dtype(DTYPES[dtype])  # built in its dtype: an 8B model never exists in float32
        try:
            hf_model = LlamaForCausalLM(config)
        finally:
            torch.set_default_dtype(default)
    hf_model.config.architectures = ["LlamaForCausalLM"]
    hf_model.eval().requires_grad_(False)
    return ModelHandle(name=f"{RANDOM_PREFIX}{shape}", hf_model=hf_model, tokenizer=tokenizer,
                       source=f"random init with {shape}'s shape, seed {seed}", file_hash=f"random-{shape}-seed-{seed}")


def save_tiny_model(architecture: str, folder, seed: int = 0) -> None:
    """Write a tiny model as an ordinary Hugging Face folder (weights, config, tokenizer)."""
    handle = tiny_model(architecture, seed)
    handle.hf_model.save_pretrained(folder)
    handle.tokenizer.save_pretrained(folder)


def architecture_table() -> list[dict]:
    """One row per tested architecture: its Hugging Face class, the structure it exercises, and the
    probes it cannot give (with why). Built from tiny models (small vocabulary, no tokenizer), ~2 s."""
    from transformers import AutoModelForCausalLM

    from ..probes.catalog import unsupported_probes
    from ..probes.sites import SiteMap

    rows = []
    for arch in TINY_ARCHITECTURES:
        config = tiny_config(arch, vocab_size=128, special_ids={"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2})
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
        sm = SiteMap(model)
        parts = sm._block_parts
        structure = []
        if sm.part_path(0, "attn", "qkv"):
            structure.append("fused QKV")
        if "Parallel" in type(sm.adapter.component_mapping["blocks"]).__name__:
            structure.append("parallel attn+MLP")
        if "ln1_post" in parts:
            structure.append("post-norms")
        if sm.n_kv_heads < sm.n_heads:
            structure.append("multi-query" if sm.n_kv_heads == 1 else "grouped KV")
        if "MoE" in type(parts["mlp"]).__name__:
            structure.append("MoE MLP")
        if "pos_embed" in sm.adapter.component_mapping:
            structure.append("learned positions")
        if getattr(config, "alibi", False) or arch == "bloom":
            structure.append("ALiBi")
        rows.append({"architecture": arch, "class": type(model).__name__, "structure": ", ".join(structure) or "pre-norm",
                     "unsupported_probes": unsupported_probes(sm)})
    return rows
