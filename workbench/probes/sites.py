"""The site map: every place the workbench reads or writes inside a model, named once.

Names follow TransformerLens (``blocks.{l}.hook_resid_pre``, ...). Where each site lives in
a Hugging Face model is *not* written here per architecture: module paths come from
TransformerLens 4.x's architecture adapters (``transformer_lens.model_bridge.supported_architectures``,
~100 architectures: embedding, blocks, ``ln1``/``ln2``, post-norms ``ln1_post``/``ln2_post``,
attention with its ``q``/``k``/``v`` or fused ``qkv`` and ``o`` projections, MLP and its ``out``
projection, final norm, unembedding), the split of fused QKV projections from the same
adapters' ``split_qkv_matrix``, and which attention module returns the probabilities from
Hugging Face's own ``_can_record_outputs``. What this module adds is the *meaning* of each
site, identical on every architecture:

=====================================  =====================  ==================================================
site                                   shape                  meaning
=====================================  =====================  ==================================================
hook_embed                             (b, p, d_model)        token embedding (before positions / scaling)
blocks.{l}.hook_resid_pre              (b, p, d_model)        residual entering block l (HF ``hidden_states[l]``)
blocks.{l}.attn.hook_q / hook_k        (b, p, head, d_h)      query / key projections (before rotary)
blocks.{l}.attn.hook_v                 (b, p, kv_head, d_h)   value projections
blocks.{l}.attn.hook_mask              (b, 1, q, k)           additive mask entering the attention (editable)
blocks.{l}.attn.hook_pattern           (b, head, q, k)        attention probabilities (eager attention)
blocks.{l}.attn.hook_z                 (b, p, head, d_h)      each head's output before W_O (``sum_k A v``)
blocks.{l}.hook_attn_out               (b, p, d_model)        what attention adds to the residual
blocks.{l}.hook_mlp_out                (b, p, d_model)        what the MLP adds to the residual
blocks.{l}.hook_resid_post             (b, p, d_model)        residual leaving block l
ln_final.hook_normalized               (b, p, d_model)        final-norm output (HF ``hidden_states[-1]``)
hook_logits                            (b, p, vocab)          the model's output logits (after any soft-cap/scale)
=====================================  =====================  ==================================================

``resid_post = resid_pre + attn_out + mlp_out`` on every architecture: the update is read
where it enters the residual (the post-norm output in sandwich-norm models such as Gemma 2/3
and OLMo 2, the output projection in Bloom, whose attention adds the residual itself, scaled
by ``residual_multiplier`` in Granite). Weights: :meth:`SiteMap.W_O` gives the per-head output
weights (head, d_h, d_model), :meth:`SiteMap.W_E` / :meth:`SiteMap.W_U` the embedding and unembedding
matrices (vocab, d_model); :meth:`SiteMap.unembed` applies the final norm and unembedding
exactly as the model does (soft-capping and logit scales included).

A site that cannot be defined for a model is listed in :attr:`SiteMap.unsupported` with the
reason, and asking for it raises :class:`UnsupportedSiteError` before any forward pass.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

# name -> (shape, meaning); per-layer names carry "{l}".
SITES: dict[str, tuple[str, str]] = {
    "hook_embed": ("(b, p, d_model)", "token embedding"),
    "blocks.{l}.hook_resid_pre": ("(b, p, d_model)", "residual entering the block"),
    "blocks.{l}.attn.hook_q": ("(b, p, head, d_h)", "query projections (before rotary)"),
    "blocks.{l}.attn.hook_k": ("(b, p, kv_head, d_h)", "key projections (before rotary)"),
    "blocks.{l}.attn.hook_v": ("(b, p, kv_head, d_h)", "value projections"),
    "blocks.{l}.attn.hook_mask": ("(b, 1, q, k)", "additive attention mask entering the attention (edit: re-weight keys)"),
    "blocks.{l}.attn.hook_pattern": ("(b, head, q, k)", "attention probabilities"),
    "blocks.{l}.attn.hook_z": ("(b, p, head, d_h)", "each head's output before W_O"),
    "blocks.{l}.hook_attn_out": ("(b, p, d_model)", "what attention adds to the residual"),
    "blocks.{l}.hook_mlp_out": ("(b, p, d_model)", "what the MLP adds to the residual"),
    "blocks.{l}.hook_resid_post": ("(b, p, d_model)", "residual leaving the block"),
    "ln_final.hook_normalized": ("(b, p, d_model)", "final-norm output"),
    "hook_logits": ("(b, p, vocab)", "output logits"),
}

RESID_PRE = "blocks.{l}.hook_resid_pre"
RESID_POST = "blocks.{l}.hook_resid_post"
ATTN_OUT = "blocks.{l}.hook_attn_out"
MLP_OUT = "blocks.{l}.hook_mlp_out"
Q, K, V = "blocks.{l}.attn.hook_q", "blocks.{l}.attn.hook_k", "blocks.{l}.attn.hook_v"
PATTERN = "blocks.{l}.attn.hook_pattern"
MASK = "blocks.{l}.attn.hook_mask"
Z = "blocks.{l}.attn.hook_z"
EMBED = "hook_embed"
FINAL_NORM = "ln_final.hook_normalized"
LOGITS = "hook_logits"


def is_layer_site(site: str) -> bool:
    return "{l}" in site


class UnsupportedArchitectureError(RuntimeError):
    """No maintained adapter knows this model's layout: the workbench cannot place its probes."""


class UnsupportedSiteError(RuntimeError):
    """A site (and so the probes and interventions that need it) cannot be defined for this model."""


@dataclass(frozen=True)
class SiteSpec:
    """Where one site is read in one layer: a module's input or output, and how to view it.

    ``index``: which element of a tuple input/output (the positional argument for inputs).
    ``to_site`` maps the raw tensor to the site's shape; ``from_site`` maps an edited site
    tensor back (None: the site can be read but not edited).
    """

    path: str
    module: torch.nn.Module
    io: str  # "input" | "output"
    index: int = 0  # -1: an input passed by keyword only
    kwarg: str | None = None  # input passed by keyword under this name, when not positional
    to_site: Callable[[torch.Tensor], torch.Tensor] | None = None
    from_site: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None  # (edited, raw) -> raw


class SiteMap:
    """Resolves site names to modules of one Hugging Face causal LM (see the module docstring)."""

    def __init__(self, hf_model: torch.nn.Module):
        self.hf_model = hf_model
        self.config = hf_model.config
        self.architecture = self.config.model_type
        self.adapter = _adapter(hf_model)
        mapping = self.adapter.component_mapping
        self.n_layers = self.config.num_hidden_layers
        self.n_heads = self.config.num_attention_heads
        self.d_model = self.config.hidden_size
        self.head_dim = getattr(self.config, "head_dim", None) or self.d_model // self.n_heads
        self.n_kv_heads = self.n_heads  # read from the value projection's size once the map is built
        self.unsupported: dict[str, str] = {}

        blocks = mapping["blocks"]
        self.blocks_path = blocks.name
        self._block_parts = {k: v for k, v in (blocks.submodules or {}).items()}
        self.paths: dict[str, str | None] = {
            "embed": mapping["embed"].name if "embed" in mapping else None,
            "ln_final": mapping["ln_final"].name if "ln_final" in mapping else None,
            "unembed": mapping["unembed"].name if "unembed" in mapping else None,
        }
        for key in ("embed", "ln_final", "unembed"):
            if self.paths[key] is not None and self._module(self.paths[key]) is None:
                self.paths[key] = None
        self.attention_flag_needed = "attentions" not in (getattr(hf_model, "_can_record_outputs", None) or {})
        self.residual_multiplier = float(getattr(self.config, "residual_multiplier", 1.0) or 1.0)
        self._check_sites()
        if V not in self.unsupported:  # grouped / multi-query KV heads, whatever the config calls them
            v_spec = self.spec(V, 0)
            out = self._value_width(v_spec)
            self.n_kv_heads = out // self.head_dim

    # ------------------------------------------------------------------ modules

    def _module(self, path: str | None):
        if path is None:
            return None
        try:
            return self.hf_model.get_submodule(path)
        except AttributeError:
            return None

    def block_path(self, layer: int) -> str:
        self.check_layer(layer)
        return f"{self.blocks_path}.{layer}"

    def part_path(self, layer: int, *names: str) -> str | None:
        """Path of a block component (``"attn"``, ``"attn", "o"``, ``"ln2_post"`` ...), None if absent."""
        parts, bridge, path = self._block_parts, None, self.block_path(layer)
        for name in names:
            bridge = parts.get(name)
            if bridge is None:
                return None
            if bridge.name:  # a component without a module of its own (OPT's MLP) adds no path
                path = f"{path}.{bridge.name}"
            parts = bridge.submodules or {}
        return path if self._module(path) is not None else None

    def block(self, layer: int) -> torch.nn.Module:
        return self._module(self.block_path(layer))

    @property
    def ln_final(self) -> torch.nn.Module:
        return self._module(self.paths["ln_final"])

    def check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.n_layers:
            raise IndexError(f"layer {layer} is out of range: this {self.architecture} model has layers 0..{self.n_layers - 1}.")

    # ------------------------------------------------------------------ sites

    def _check_sites(self) -> None:
        """Fill :attr:`unsupported` from layer 0's layout (every block has the same layout)."""
        for site in SITES:
            try:
                self.spec(site, 0 if is_layer_site(site) else None)
            except UnsupportedSiteError as err:
                self.unsupported[site] = str(err)

    def require(self, sites) -> None:
        """Raise before any forward pass if one of ``sites`` cannot be defined for this model."""
        missing = [s for s in dict.fromkeys(sites) if s in self.unsupported]
        if missing:
            raise UnsupportedSiteError("; ".join(f"{s}: {self.unsupported[s]}" for s in missing))

    def spec(self, site: str, layer: int | None) -> SiteSpec:
        """Where ``site`` is read in ``layer`` (None for global sites)."""
        if site not in SITES:
            raise KeyError(f"unknown site {site!r}; sites: {', '.join(SITES)}.")
        if site in self.unsupported:
            raise UnsupportedSiteError(f"{site}: {self.unsupported[site]}")
        arch = self.architecture
        if site == EMBED:
            return self._spec(self.paths["embed"], "output", site)
        if site == FINAL_NORM:
            return self._spec(self.paths["ln_final"], "output", site)
        if site == LOGITS:
            return SiteSpec("", self.hf_model, "output", to_site=lambda out: out.logits)
        if site == RESID_PRE:
            return self._spec(self.block_path(layer), "input", site, kwarg="hidden_states")
        if site == RESID_POST:
            return self._spec(self.block_path(layer), "output", site)
        if site in (ATTN_OUT, MLP_OUT):
            return self._update_spec(site, layer)
        if site == PATTERN:
            path = self.part_path(layer, "attn")
            # the probabilities are returned after use: editing them would change nothing, so they are read-only
            return self._spec(path, "output", site, index=1, editable=False)
        if site == MASK:
            return self._spec(self.part_path(layer, "attn"), "input", site, index=-1, kwarg="attention_mask",
                              from_site=lambda y, raw: y)
        if site == Z:
            path = self.part_path(layer, "attn", "o")
            if path is None:
                raise UnsupportedSiteError(f"{arch}: the adapter names no attention output projection")
            heads = self.n_heads
            return self._spec(path, "input", site,
                              to_site=lambda x: x.view(*x.shape[:-1], heads, -1),
                              from_site=lambda y, raw: y.reshape(raw.shape))
        if site in (Q, K, V):
            return self._qkv_spec(site, layer)
        raise AssertionError(site)

    def _spec(self, path, io, site, editable: bool = True, **kw) -> SiteSpec:
        """A spec; a plain read (no ``to_site``) of a tensor the model goes on to use is editable as is."""
        module = self._module(path)
        if module is None:
            raise UnsupportedSiteError(f"{self.architecture}: no module for {site} (path {path!r})")
        if editable and "to_site" not in kw and "from_site" not in kw:
            kw["from_site"] = lambda y, raw: y
        return SiteSpec(path, module, io, **kw)

    def _update_spec(self, site: str, layer: int) -> SiteSpec:
        """What a sublayer adds to the residual, read where it is added."""
        sub, post = ("attn", "ln1_post") if site == ATTN_OUT else ("mlp", "ln2_post")
        if self.architecture == "opt" and not getattr(self.config, "do_layer_norm_before", True):
            raise UnsupportedSiteError("post-LayerNorm OPT normalises after adding: its sublayer updates do not add up")
        path = self.part_path(layer, post)
        if path is None:
            # the output projection is what is added (Bloom's attention and MLP add the residual themselves)
            path = self.part_path(layer, sub, "o" if sub == "attn" else "out") or self.part_path(layer, sub)
        if path is None:
            raise UnsupportedSiteError(f"{self.architecture}: the adapter names no {sub} module")
        m = self.residual_multiplier
        if m != 1.0:  # Granite: residual + update * residual_multiplier
            return self._spec(path, "output", site, to_site=lambda x: x * m, from_site=lambda y, raw: y / m)
        return self._spec(path, "output", site, from_site=lambda y, raw: y)

    def _qkv_spec(self, site: str, layer: int) -> SiteSpec:
        which = {Q: "q", K: "k", V: "v"}[site]
        d_h = self.head_dim
        path = self.part_path(layer, "attn", which)
        if path is not None:
            return self._spec(path, "output", site, to_site=lambda x: x.view(*x.shape[:-1], -1, d_h),
                              from_site=lambda y, raw: y.reshape(raw.shape))
        fused = self.part_path(layer, "attn", "qkv")
        if fused is None:
            raise UnsupportedSiteError(f"{self.architecture}: the adapter names no {which} or fused qkv projection")
        rows = self._fused_rows(layer)["qkv".index(which)]
        return self._spec(fused, "output", site, to_site=lambda x: x[..., rows.to(x.device)].view(*x.shape[:-1], -1, d_h),
                          from_site=lambda y, raw: raw.index_copy(-1, rows.to(raw.device), y.flatten(-2).to(raw.dtype)))

    def _fused_rows(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Output features of the fused QKV projection that form Q, K and V, found by running the
        adapter's own ``split_qkv_matrix`` on a copy whose weights hold their row numbers (cached per layer)."""
        cache = self.__dict__.setdefault("_rows", {})
        if layer not in cache:
            cache[layer] = self._split_rows(layer)
        return cache[layer]

    def _split_rows(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        attn_bridge = self._block_parts["attn"]
        attn = self._module(self.part_path(layer, "attn"))
        qkv_name = attn_bridge.submodules["qkv"].name
        real = getattr(attn, qkv_name)
        fake = type(real).__new__(type(real))
        torch.nn.Module.__init__(fake)
        fake.__dict__.update({k: v for k, v in real.__dict__.items() if k not in ("_parameters", "_buffers", "_modules")})
        conv1d = type(real).__name__ == "Conv1D"  # GPT-2 style: weight (in, out)
        n_out = real.weight.shape[1] if conv1d else real.weight.shape[0]
        index = torch.arange(n_out, dtype=torch.float64)
        weight = index[None, :].expand(real.weight.shape[0], -1) if conv1d else index[:, None].expand(-1, real.weight.shape[1])
        fake.weight = torch.nn.Parameter(weight.clone(), requires_grad=False)
        fake.bias = torch.nn.Parameter(index.clone(), requires_grad=False) if getattr(real, "bias", None) is not None else None
        proxy = _Proxy(attn, qkv_name, fake)
        split = attn_bridge.split_qkv_matrix
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            parts = split(proxy)
        return tuple(p.weight.detach()[:, 0].round().long() for p in parts)

    def _value_width(self, spec: SiteSpec) -> int:
        if self.part_path(0, "attn", "v") is None:  # fused QKV
            return len(self._fused_rows(0)[2])
        module = spec.module
        return module.weight.shape[1] if type(module).__name__ == "Conv1D" else module.weight.shape[0]

    # ------------------------------------------------------------------ weights

    def W_O(self, layer: int) -> torch.Tensor:
        """Per-head output weights, (head, d_h, d_model): head h writes ``z_h @ W_O[h]``."""
        path = self.part_path(layer, "attn", "o")
        if path is None:
            raise UnsupportedSiteError(f"{self.architecture}: the adapter names no attention output projection")
        weight = _weight(self._module(path))
        if type(self._module(path)).__name__ != "Conv1D":
            weight = weight.T  # nn.Linear stores (out, in)
        return weight.reshape(self.n_heads, self.head_dim, -1) * self.residual_multiplier

    def W_E(self) -> torch.Tensor:
        """The input embedding matrix, (vocab, d_model) (before any scaling the model applies)."""
        module = self._module(self.paths["embed"])
        if module is None or getattr(module, "weight", None) is None:
            raise UnsupportedSiteError(f"{self.architecture}: the adapter names no input embedding with a weight matrix")
        return _weight(module)

    def W_U(self) -> torch.Tensor:
        """The unembedding matrix, (vocab, d_model): row t scores token t (logits = final-norm state @ W_U.T)."""
        module = self._module(self.paths["unembed"])
        if module is None or getattr(module, "weight", None) is None:
            raise UnsupportedSiteError(f"{self.architecture}: the adapter names no unembedding with a weight matrix")
        weight = _weight(module)
        return weight.T if type(module).__name__ == "Conv1D" else weight

    def tied_embeddings(self) -> bool:
        """Whether the unembedding is the input embedding (one tensor, as in SmolLM2 and Gemma 3)."""
        embed, unembed = self._module(self.paths["embed"]), self._module(self.paths["unembed"])
        if getattr(embed, "weight", None) is None or getattr(unembed, "weight", None) is None:
            return False
        if embed.weight is unembed.weight:  # one Parameter (also when accelerate keeps it off-device)
            return True
        return embed.weight.device.type != "meta" and embed.weight.data_ptr() == unembed.weight.data_ptr()

    def unembed(self, states: torch.Tensor, *, normalized: bool = False) -> torch.Tensor:
        """Logits from residual states exactly as the model computes its output:
        final norm (unless ``normalized``), unembedding, then the model's soft-cap or scale."""
        if self.paths["unembed"] is None:
            raise UnsupportedSiteError(f"{self.architecture}: no unembedding found")
        if not normalized:
            if self.ln_final is None:
                raise UnsupportedSiteError(f"{self.architecture}: no final norm found")
            states = self.ln_final(states)
        logits = self._module(self.paths["unembed"])(states)
        cfg = self.config
        if getattr(cfg, "logit_scale", None) is not None:  # Cohere
            logits = logits * cfg.logit_scale
        if getattr(cfg, "logits_scaling", None) is not None:  # Granite
            logits = logits / cfg.logits_scaling
        cap = getattr(cfg, "final_logit_softcapping", None)
        if cap:  # Gemma 2/3
            logits = torch.tanh(logits / cap) * cap
        return logits


def _weight(module: torch.nn.Module) -> torch.Tensor:
    """``module.weight``, or, when accelerate offloaded the module (``device_map`` with ``"disk"`` or CPU offload:
    between forwards the parameter sits on the meta device), a copy loaded from accelerate's offload store."""
    weight = module.weight
    if weight.device.type != "meta":
        return weight
    from accelerate.utils import align_module_device, has_offloaded_params

    if not has_offloaded_params(module):
        raise UnsupportedSiteError(f"{type(module).__name__}.weight is on the meta device and not offloaded by "
                                   "accelerate: load the model's weights before reading them")
    with align_module_device(module):
        return module.weight.detach().clone()


class _Proxy:
    """The attention module, with its fused QKV projection swapped for a stand-in."""

    def __init__(self, module, name, replacement):
        self._module, self._name, self._replacement = module, name, replacement

    def __getattr__(self, key):
        return self._replacement if key == self._name else getattr(self._module, key)


def _adapter(hf_model):
    """TransformerLens' architecture adapter for this Hugging Face model (no bridge is built)."""
    from transformer_lens.factories.architecture_adapter_factory import ArchitectureAdapterFactory
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_config_from_hf
    from transformer_lens.model_bridge.sources._hf_format import determine_architecture_from_hf_config

    config = hf_model.config
    if not getattr(config, "architectures", None):
        config.architectures = [type(hf_model).__name__]
    logging.getLogger("transformer_lens").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arch = determine_architecture_from_hf_config(config)
            bridge_config = build_bridge_config_from_hf(config, arch, getattr(config, "_name_or_path", "") or arch, torch.float32)
            adapter = ArchitectureAdapterFactory.select_architecture_adapter(bridge_config)
    except Exception as err:
        from ..models.tiny import TINY_ARCHITECTURES

        raise UnsupportedArchitectureError(
            f"{type(hf_model).__name__} ({config.model_type}) is not supported: TransformerLens has no architecture "
            f"adapter for it ({str(err)[:120]}). Tested architectures: {', '.join(TINY_ARCHITECTURES)}; "
            "`workbench models --architectures` lists them with any probe each cannot give."
        ) from None
    if "blocks" not in adapter.component_mapping:
        raise UnsupportedArchitectureError(f"{type(hf_model).__name__}: its adapter names no transformer blocks.")
    return adapter
