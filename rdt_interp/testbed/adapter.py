"""``TestbedVLAAdapter``: the testbed VLA through the VLA adapter interface, and how to get one.

* :func:`load_testbed_vla` — the trained testbed VLA: Qwen2.5-Coder-0.5B-Instruct from the
  offline package (hash-verified) plus the committed delta (``rdt_interp/data/testbed``).
* :func:`build_tiny_testbed_vla` — the same architecture with a tiny random Qwen2 backbone and a
  tiny ViT, built in well under a second: the second VLA family for unit tests.

Decoder positions are ``[pads] <|endoftext|> [patches] In: What action should the robot take
to {instruction}?\\nOut: " "`` with roles::

    <|endoftext|> (the BOS)               BOS | TEXT | TEMPLATE
    patches                               IMAGE
    In: What action should the robot take to      TEXT | TEMPLATE
    {instruction}                         TEXT | INSTRUCTION
    ?\\nOut: and the trailing " "          TEXT | POST_INSTRUCTION
    pads                                  PAD

so captures, interventions and :func:`rdt_interp.tracing.generation.generate` work unchanged.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rdt_interp.errors import CheckpointError, ConfigError, IntegrityError
from rdt_interp.models.action_tokenizer import ActionTokenizer, NormStats
from rdt_interp.models.adapter import (
    EncodedBatch,
    PaddingSide,
    pad_sequences,
    position_ids_from_mask,
)
from rdt_interp.models.architectures import (
    BackboneArchitecture,
    model_components,
    register_architecture,
)
from rdt_interp.models.openvla.modeling import MultimodalLayout
from rdt_interp.models.openvla.prompt import OpenVLAPrompt
from rdt_interp.models.vla import VLAAdapter, VLARequest
from rdt_interp.roles import Role
from rdt_interp.testbed.model import (
    LoRASpec,
    TestbedVLA,
    TestbedVLAConfig,
    VisionSpec,
    images_to_pixels,
)

#: the unnormalization key of the testbed's action statistics
UNNORM_KEY = "testbed"
#: where the committed delta lives
DATA_DIR = Path(__file__).resolve().parents[1] / "data" / "testbed"
DELTA_FILE = "delta.safetensors"
MANIFEST_FILE = "manifest.json"
BASE_MODEL = "qwen2.5-coder-0.5b-instruct"
TINY_BASE = "tiny-qwen2"

# The testbed VLA wraps a Qwen2 causal LM (``language_model``); its components are the backbone's.
register_architecture(BackboneArchitecture("testbed-vla", ("TestbedVLA",)))


class TestbedVLAAdapter(VLAAdapter):
    """A :class:`TestbedVLA` with its tokenizer and action tokenizer."""

    __test__ = False

    def __init__(
        self,
        model: TestbedVLA,
        tokenizer: Any,
        norm_stats: Mapping[str, Any],
        *,
        name: str = "testbed-vla",
        constrain_actions: bool = False,
        random_weights: bool = False,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.constrain_actions = constrain_actions
        self.random_weights = random_weights
        if getattr(tokenizer, "bos_token_id", None) is None:
            raise ConfigError("the testbed VLA's tokenizer needs a bos_token (Qwen: <|endoftext|>)",
                              fix="set tokenizer.bos_token = '<|endoftext|>'")
        self._prompt = OpenVLAPrompt.for_tokenizer(tokenizer)
        n_text = len(tokenizer)
        cfg = model.config
        self._action_tokenizer = ActionTokenizer(
            vocab_size=model.vocab_size, n_bins=cfg.n_bins, action_dim=cfg.action_dim,
            norm_stats={UNNORM_KEY: NormStats.from_dict(norm_stats)})
        ids = [int(i) for i in self._action_tokenizer.token_ids]
        text_ids_in_range = [i for i in ids if i < n_text and not _is_placeholder(tokenizer, i)]
        if text_ids_in_range:
            raise ConfigError(f"action token ids {text_ids_in_range[:4]}… are text tokens of the tokenizer",
                              fix="the last n_bins embedding rows must be unused by text")
        self.norm_stats = dict(norm_stats)
        self.components = model_components(
            model, n_layers=int(model.language_model.config.num_hidden_layers))

    # -- structure -----------------------------------------------------------------------------
    @property
    def layers(self) -> nn.ModuleList:
        return self.components.layers

    @property
    def layers_path(self) -> str:
        return self.components.paths.layers

    @property
    def d_model(self) -> int:
        return int(self.model.language_model.config.hidden_size)

    @property
    def embed(self) -> nn.Module:
        return self.components.embed

    @property
    def final_norm(self) -> nn.Module:
        return self.components.final_norm

    @property
    def lm_head(self) -> nn.Module:
        return self.components.lm_head

    @property
    def action_tokenizer(self) -> ActionTokenizer:
        return self._action_tokenizer

    @property
    def num_patches(self) -> int:
        return self.model.num_patches

    @property
    def image_size(self) -> int:
        return self.model.config.vision.image_size

    @property
    def pixel_shape(self) -> tuple[int, int, int]:
        """``(channels, height, width)`` of one image's ``pixel_values``."""
        return 3, self.image_size, self.image_size

    @property
    def prompt(self) -> OpenVLAPrompt:
        return self._prompt

    @property
    def pad_token_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    # -- inputs --------------------------------------------------------------------------------
    def tokenize(self, instruction: str) -> tuple[list[int], list[int]]:
        """Prompt ids (BOS first, the trailing space token last) and their roles."""
        return self.prompt.tokenize(instruction)

    def encode(self, requests: Sequence[Any], *, padding_side: PaddingSide = "left") -> EncodedBatch:
        """Prompts + images -> one padded batch; roles etc. over ``text + patches`` positions."""
        reqs = [_as_request(r) for r in requests]
        if not reqs:
            raise ConfigError("encode() needs at least one request")
        pairs = [self.tokenize(r.instruction) for r in reqs]
        pixels = images_to_pixels([r.image_array() for r in reqs], self.image_size)
        return self.encode_tokens([p[0] for p in pairs], pixels, roles=[p[1] for p in pairs],
                                  padding_side=padding_side, texts=[r.instruction for r in reqs])

    def encode_tokens(
        self,
        input_ids: Sequence[Sequence[int]],
        pixel_values: Tensor,
        *,
        roles: Sequence[Sequence[int]],
        padding_side: PaddingSide = "left",
        texts: Sequence[str] = (),
    ) -> EncodedBatch:
        seqs = [list(map(int, s)) for s in input_ids]
        if len(seqs) != pixel_values.shape[0]:
            raise ConfigError(f"{len(seqs)} prompts for {pixel_values.shape[0]} images")
        ids, text_roles, text_mask = pad_sequences(seqs, roles, self.pad_token_id, padding_side)
        layout = MultimodalLayout.of(text_mask, self.num_patches)
        mask = layout.merge(text_mask, torch.tensor(1))
        rl = layout.merge(text_roles, torch.tensor(int(Role.IMAGE)))
        pos = position_ids_from_mask(mask)
        return EncodedBatch(
            inputs={"input_ids": ids, "attention_mask": text_mask, "pixel_values": pixel_values.to(self.dtype),
                    "position_ids": pos},
            roles=rl, attention_mask=mask, position_ids=pos, texts=list(texts), padding_side=padding_side,
        ).to(self.device)

    def prefill_kwargs(self, batch: EncodedBatch, *, use_cache: bool) -> dict[str, Any]:
        kw = super().prefill_kwargs(batch, use_cache=use_cache)
        if use_cache:
            kw["logits_to_keep"] = 1  # generation reads the last position only
        return kw

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "num_patches": self.num_patches, "image_size": self.image_size,
                "vocab_size": self.model.vocab_size}

    def __repr__(self) -> str:
        kind = "random" if self.random_weights else "trained"
        return (f"TestbedVLAAdapter({self.name!r}, {kind}, n_layers={self.n_layers}, d_model={self.d_model}, "
                f"patches={self.num_patches})")


def _is_placeholder(tokenizer: Any, i: int) -> bool:
    tok = tokenizer.convert_ids_to_tokens(i)
    return isinstance(tok, str) and tok.startswith("[PAD") and tok.endswith("]")


def _as_request(r: Any) -> VLARequest:
    if isinstance(r, VLARequest):
        return r
    if isinstance(r, Mapping) and "instruction" in r and "image" in r:
        return VLARequest(str(r["instruction"]), r["image"])
    raise ConfigError(f"cannot make a VLA request from {type(r).__name__}",
                      fix="pass VLARequest(instruction, image) objects")


# -- the tiny random variant ------------------------------------------------------------------------
TINY_VOCAB = 528  # 259 byte-tokenizer ids, 13 unused rows, 256 action rows (like the real layout)


def tiny_tokenizer() -> Any:
    """tiny-qwen2's byte tokenizer with ``<|endoftext|>`` as BOS (as the offline Qwen tokenizer)."""
    from rdt_interp.models.tiny import TINY_SPECS, byte_tokenizer

    tok = byte_tokenizer(TINY_SPECS["tiny-qwen2"])
    tok.bos_token = "<|endoftext|>"
    return tok


def tiny_norm_stats() -> dict[str, Any]:
    """Action statistics at the simulator's limits (no demonstrations needed)."""
    from rdt_interp.testbed.sim import MAX_ROT_STEP, MAX_STEP

    lim = [MAX_STEP] * 3 + [MAX_ROT_STEP] * 3 + [1.0]
    return {"q01": [-v for v in lim[:6]] + [0.0], "q99": lim, "mask": [True] * 6 + [False]}


def tiny_language_model(seed: int = 0, *, hidden_size: int = 64, n_layers: int = 4) -> Any:
    """A seeded random Qwen2 laid out like the real backbone: GQA, untied, text + unused + 256 action rows."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = tiny_tokenizer()
    cfg = Qwen2Config(vocab_size=TINY_VOCAB, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                      num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=1024, tie_word_embeddings=False,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Qwen2ForCausalLM(cfg).eval()


def build_tiny_testbed_vla(
    seed: int = 0,
    *,
    hidden_size: int = 64,
    n_layers: int = 4,
    vision: VisionSpec | None = None,
    merge: bool = True,
    lora: LoRASpec | None = None,
) -> TestbedVLAAdapter:
    """A random testbed VLA: tiny Qwen2 (GQA, untied, 528-row vocabulary) + tiny ViT (16 patches).

    Every trained part is random (LoRA ``B`` too, so the low-rank path is not a no-op), then the
    model is merged like the real one unless ``merge=False``.
    """
    t0 = time.perf_counter()
    tok = tiny_tokenizer()
    lm = tiny_language_model(seed, hidden_size=hidden_size, n_layers=n_layers)
    vcfg = TestbedVLAConfig(vision=vision or VisionSpec(image_size=64, patch_size=16, hidden_size=32, depth=1,
                                                        num_heads=2, mlp_dim=64),
                            lora=lora or LoRASpec(rank=4, alpha=8.0))
    model = TestbedVLA(lm, vcfg, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.lora_layers().values():
            m.lora_B.normal_(0.0, 0.02, generator=gen)
        assert model.action_embed is not None and model.action_head is not None
        model.action_embed.normal_(0.0, 0.02, generator=gen)
        model.action_head.normal_(0.0, 0.02, generator=gen)
    if merge:
        model.merge_()
    adapter = TestbedVLAAdapter(model, tok, tiny_norm_stats(), name=f"tiny-testbed-vla-{seed}",
                                random_weights=True)
    adapter.load_seconds = time.perf_counter() - t0
    return adapter


# -- the trained testbed VLA ------------------------------------------------------------------------
def load_base_model() -> Any:
    """Qwen2.5-Coder-0.5B-Instruct from the offline package (GGUF sha256-verified when dequantized)."""
    from rdt_interp.models import load_chat_model

    chat = load_chat_model(BASE_MODEL)
    tok = chat.tokenizer
    if getattr(tok, "bos_token", None) is None:  # transformers < 5.2x drops it when saving the GGUF's tokenizer
        tok.bos_token = tok.convert_ids_to_tokens(int(chat.model.config.bos_token_id))
    return chat


def load_testbed_vla(
    path: str | os.PathLike[str] | None = None,
    *,
    merge: bool = True,
    constrain_actions: bool = False,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> TestbedVLAAdapter:
    """The trained testbed VLA: offline base weights + the delta in ``path`` (default: committed),
    on ``device`` in ``dtype`` (the delta is applied in fp32 first).

    Checks the base model's GGUF sha256 and weight digest against the ones recorded at training
    time and the delta file's sha256 against the manifest (:class:`IntegrityError` otherwise).
    """
    from rdt_interp.models.adapter import model_digest
    from rdt_interp.models.offline import OFFLINE_MODELS
    from rdt_interp.storage import read_json, sha256_file

    t0 = time.perf_counter()
    root = Path(path) if path is not None else DATA_DIR
    manifest_path, delta_path = root / MANIFEST_FILE, root / DELTA_FILE
    if not manifest_path.is_file() or not delta_path.is_file():
        raise CheckpointError(f"{root} has no trained testbed VLA ({MANIFEST_FILE} + {DELTA_FILE})",
                              fix="train one: rdt-interp testbed train --out DIR, then pass DIR")
    manifest = read_json(manifest_path)
    actual = sha256_file(delta_path)
    if actual != manifest["delta"]["sha256"]:
        raise IntegrityError(str(delta_path), expected=manifest["delta"]["sha256"], actual=actual,
                             fix="restore the file from git (git show HEAD:<path>) or retrain")
    base = manifest["base"]
    if base["name"] == BASE_MODEL:
        want_base = base["gguf_sha256"]
        if want_base != OFFLINE_MODELS[BASE_MODEL].sha256:
            raise IntegrityError(f"the testbed delta was trained on another base than {BASE_MODEL}",
                                 expected=want_base, actual=OFFLINE_MODELS[BASE_MODEL].sha256,
                                 fix="retrain the testbed VLA on the installed base model")
        chat = load_base_model()
        lm, tok = chat.model, chat.tokenizer
    elif base["name"] == TINY_BASE:  # pipeline tests train on a tiny random backbone
        lm, tok = tiny_language_model(int(base["seed"])), tiny_tokenizer()
    else:
        raise CheckpointError(f"{manifest_path} names an unknown base model {base['name']!r}",
                              fix=f"the testbed VLA is trained on {BASE_MODEL}")
    base_digest = model_digest(lm)
    if base_digest != base["weights_digest"]:
        raise IntegrityError(f"weights of the base model {base['name']}", expected=base["weights_digest"],
                             actual=base_digest,
                             fix="the dequantized cache differs from the one trained on; delete "
                                 "~/.cache/rdt-interp/models/qwen2.5-coder-0.5b-instruct-* and reload")
    model = TestbedVLA(lm, TestbedVLAConfig.from_dict(manifest["config"]), seed=0)
    from safetensors.torch import load_file

    model.load_delta_(load_file(str(delta_path)), where=str(delta_path))
    if merge:
        model.merge_()
    model.to(device=device, dtype=dtype)
    adapter = TestbedVLAAdapter(model.eval(), tok, manifest["norm_stats"],
                                name="testbed-vla" if base["name"] == BASE_MODEL else f"testbed-vla@{root}",
                                constrain_actions=constrain_actions, random_weights=base["name"] != BASE_MODEL)
    adapter.manifest = manifest
    adapter.load_seconds = time.perf_counter() - t0
    return adapter
