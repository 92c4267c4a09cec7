"""``load_chat_model``: one entry point for registry names, local directories and hub ids."""

from __future__ import annotations

import difflib
import json
import os
import time
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from rdt_interp.errors import CheckpointError, ConfigError
from rdt_interp.models.chat import ChatModel
from rdt_interp.models.offline import OFFLINE_MODELS, ensure_dequantized
from rdt_interp.models.random_init import random_llama_chat
from rdt_interp.models.registry import REGISTRY, RegistryEntry, lookup
from rdt_interp.models.tiny import build_tiny


def _dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        out = getattr(torch, str(dtype).replace("torch.", ""))
    except AttributeError:
        out = None
    if not isinstance(out, torch.dtype):
        raise CheckpointError(f"unknown dtype {dtype!r}", fix="use float32, bfloat16 or float16")
    return out


def _check_causal_lm_dir(path: Path) -> dict[str, Any]:
    cfg_path = path / "config.json"
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist",
                              fix="pass a directory that holds config.json and the weights")
    if not cfg_path.is_file():
        raise CheckpointError(f"{path} has no config.json: not a Hugging Face checkpoint",
                              fix="point at the directory that holds config.json")
    cfg = json.loads(cfg_path.read_text())
    archs = cfg.get("architectures") or []
    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    if cfg.get("model_type") not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or (
        archs and not any(a in causal for a in archs)
    ):
        raise CheckpointError(
            f"{path} is not a causal LM checkpoint (model_type={cfg.get('model_type')!r}, "
            f"architectures={archs})",
            fix="for OpenVLA use rdt_interp.models.openvla.load_openvla; for a chat model, "
            "point at a *ForCausalLM checkpoint",
        )
    weights = list(path.glob("*.safetensors")) + list(path.glob("*.bin"))
    if not weights:
        raise CheckpointError(f"{path} has a config but no weight files (*.safetensors / *.bin)")
    return cfg


Source = tuple[Literal["registry"], RegistryEntry] | tuple[Literal["directory"], Path] | tuple[Literal["hub"], str]


def resolve_chat_source(source: str | os.PathLike[str]) -> Source:
    """What ``source`` names, without loading anything: a registry entry, a directory or a hub id.

    Parameters
    ----------
    source
        A registry name (``rdt-interp models`` lists them), a local checkpoint directory, or a
        hub id (``org/name``).

    Returns
    -------
    kind, target
        ``("registry", RegistryEntry)``, ``("directory", Path)`` or ``("hub", str)``.

    Raises
    ------
    CheckpointError
        Neither of the three (a missing directory, or an unknown name); the message lists the
        registry names.

    Examples
    --------
    >>> resolve_chat_source("tiny-llama")[0]
    'registry'
    >>> resolve_chat_source("meta-llama/Llama-2-7b-chat-hf")
    ('hub', 'meta-llama/Llama-2-7b-chat-hf')
    """
    name = str(source)
    if name in REGISTRY:
        return "registry", lookup(name)
    path = Path(source).expanduser()
    if path.exists():
        return "directory", path
    pathlike = isinstance(source, os.PathLike) or name.startswith((".", "/", "~"))
    if name.count("/") == 1 and not pathlike:
        return "hub", name
    names = ", ".join(sorted(REGISTRY))
    if pathlike or os.sep in name:
        raise CheckpointError(f"checkpoint directory {path} does not exist",
                              fix="pass a directory that holds config.json and the weights, a hub id "
                              f"(org/name), or a registry name: {names}")
    close = difflib.get_close_matches(name, list(REGISTRY), n=1)
    raise CheckpointError(
        f"unknown model {name!r}: not a registry name, a checkpoint directory or a hub id (org/name)"
        + (f"; did you mean {close[0]!r}?" if close else ""),
        fix=f"use one of the registry names: {names} (`rdt-interp models` describes them), "
        "or pass a checkpoint directory",
    )


def check_chat_source(source: str | os.PathLike[str]) -> None:
    """Check, without loading weights, that :func:`load_chat_model` can find ``source``.

    Resolves the name (:func:`resolve_chat_source`), checks a directory's ``config.json``, and
    that an offline model's packages are installed. A hub id cannot be checked offline.

    Raises
    ------
    CheckpointError
        What :func:`load_chat_model` would raise later, after other work had been done.
    """
    kind, target = resolve_chat_source(source)
    if kind == "directory":
        _check_causal_lm_dir(target)  # type: ignore[arg-type]
    elif kind == "registry":
        entry: RegistryEntry = target  # type: ignore[assignment]
        if entry.kind == "offline-gguf":
            OFFLINE_MODELS[entry.name].part_paths()
        elif entry.kind == "hub" and os.environ.get(entry.dir_env or ""):
            _check_causal_lm_dir(Path(os.environ[entry.dir_env or ""]))


def load_chat_model(
    source: str | os.PathLike[str],
    *,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    device_map: str | dict[str, Any] | None = None,
    system_prompt: str | None = None,
    template: str = "model",
    seed: int = 0,
    local_files_only: bool | None = None,
) -> ChatModel:
    """Load a chat LM and wrap it in a :class:`ChatModel`.

    ``source`` is a registry name (``rdt_interp.models.registry.REGISTRY``), a local checkpoint
    directory, or a hub id (needs network unless it is in the local HF cache). ``device_map``
    (e.g. ``"auto"``) spreads a model over several GPUs and overrides ``device``. Random-weight
    registry entries (``llama-2-7b-random``) are built on ``device``; ``device="meta"`` builds
    the structure only (no memory), for dry runs of real-scale configs.
    ``template="reference"`` renders prompts in Arditi et al.'s format for the model family where
    the registry knows one (Qwen: no default system turn); other models keep their own template.
    """
    if template not in ("reference", "model"):
        raise ConfigError(f"template must be 'reference' or 'model', got {template!r}",
                          fix="template='reference' (Arditi et al.'s prompt format) or 'model' (the tokenizer's)")
    dt = _dtype(dtype)
    kind, target = resolve_chat_source(source)
    if kind == "registry":
        entry: RegistryEntry = target  # type: ignore[assignment]
        name = entry.name
        forced = entry.reference_template if template == "reference" else None
        if entry.kind == "tiny":
            model, tok = build_tiny(name, seed=seed, dtype=dt)
            return ChatModel(model.to(device), tok, name=name, system_prompt=system_prompt,
                             random_weights=True, chat_template=forced,
                             template_name="reference" if forced else "model")
        if entry.kind == "random":
            cm = random_llama_chat(dtype=dt, device=device, seed=seed)
            cm.system_prompt = system_prompt
            return cm
        if entry.kind == "offline-gguf":
            path = ensure_dequantized(OFFLINE_MODELS[name])
            return _load_dir(path, name=name, dtype=dt, device=device, device_map=device_map,
                             system_prompt=system_prompt, chat_template=None, forced_template=forced)
        local = os.environ.get(entry.dir_env or "")
        if local:
            _check_causal_lm_dir(Path(local))
        return _load_dir(Path(local) if local else entry.hub_id, name=name, dtype=dt, device=device,
                         device_map=device_map, system_prompt=system_prompt,
                         chat_template=entry.chat_template, forced_template=forced,
                         local_files_only=local_files_only)
    if kind == "directory":
        path: Path = target  # type: ignore[assignment]
        _check_causal_lm_dir(path)
        return _load_dir(path, name=path.name, dtype=dt, device=device, device_map=device_map,
                         system_prompt=system_prompt, chat_template=None)
    return _load_dir(str(target), name=str(target), dtype=dt, device=device, device_map=device_map,
                     system_prompt=system_prompt, chat_template=None,
                     local_files_only=local_files_only)


def _load_dir(
    target: str | Path | None,
    *,
    name: str,
    dtype: torch.dtype,
    device: str | torch.device,
    device_map: str | dict[str, Any] | None,
    system_prompt: str | None,
    chat_template: str | None,
    forced_template: str | None = None,
    local_files_only: bool | None = None,
) -> ChatModel:
    if target is None:
        raise CheckpointError(f"no checkpoint location known for {name}")
    kw: dict[str, Any] = {}
    if local_files_only is not None:
        kw["local_files_only"] = local_files_only
    t0 = time.perf_counter()
    try:
        tok = AutoTokenizer.from_pretrained(target, **kw)
        model = AutoModelForCausalLM.from_pretrained(
            target, dtype=dtype, device_map=device_map, **kw
        )
    except OSError as exc:
        raise CheckpointError(
            f"could not load {target}: {exc}".splitlines()[0],
            fix="download the checkpoint and pass its directory (or set the registry's env var, "
            "e.g. RDT_INTERP_LLAMA2_CHAT_DIR for llama-2-7b-chat)",
        ) from exc
    if device_map is None:
        model = model.to(device)
    if forced_template is not None:
        template, template_name = forced_template, "reference"
    else:
        template = chat_template if getattr(tok, "chat_template", None) is None else None
        template_name = "model"
    cm = ChatModel(model, tok, name=name, system_prompt=system_prompt, chat_template=template,
                   template_name=template_name)
    cm.load_seconds = time.perf_counter() - t0
    return cm
