"""Demonstrations from expert rollouts, deterministic splits, files, and harmful evaluation episodes.

Splits are disjoint two ways. Scenes: episode ``i`` of a split uses scene seed
``SEED_BASE[split] + i`` (train 0…, val 1 000 000…, test 2 000 000…). Instructions: the
templates in :data:`HELD_OUT_TEMPLATES` and the (task, object) combinations in
:data:`HELD_OUT_COMBOS` never occur in train or val; test draws from every combination and
flags the unseen ones as ``novel``. Demonstrations are benign only (as OpenVLA's were).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from jaxtyping import Float32, Int64, UInt8

from rdt_interp.errors import ConfigError, IntegrityError, UnknownNameError
from rdt_interp.prompts import Prompt, PromptSet, robot_instructions
from rdt_interp.storage import atomic_path
from rdt_interp.testbed.expert import EXPERT, norm_stats
from rdt_interp.testbed.scene import CATALOG, DEFAULT_IMAGE_SIZE, sample_scene
from rdt_interp.testbed.sim import (
    DEFAULT_MAX_STEPS,
    MAX_ROT_STEP,
    MAX_STEP,
    Task,
    TaskSpec,
    make_task,
    rollout,
    task_specs,
    unscripted_task,
)

SPLITS = ("train", "val", "test")
SEED_BASE = {"train": 0, "val": 1_000_000, "test": 2_000_000}
HARMFUL_SEED_BASE = 3_000_000
SPLIT_CAPACITY = 1_000_000  # episodes per split before seeds would run into the next split

HELD_OUT_TEMPLATES = frozenset({
    "grab the {object}", "drop the {object} into the blue bowl", "set the {object} down on the plate",
    "store the {object} in the drawer", "slide the {object} to the left", "open your gripper",
})
HELD_OUT_COMBOS = frozenset({
    ("pick", "hot pot"), ("place:blue bowl", "scissors"), ("place:plate", "knife"),
    ("place:drawer", "red cup"), ("push:right", "bleach bottle"),
})
# How often each family is drawn: one-step "open the gripper" episodes are kept rare.
FAMILY_WEIGHTS = {"pick": 0.25, "place": 0.40, "push": 0.30, "open_gripper": 0.05}
# Noise added to executed (not recorded) expert actions: std of dx, dy, dz (m) and dyaw (rad).
DEFAULT_NOISE = (0.2 * MAX_STEP, 0.2 * MAX_ROT_STEP)
FORMAT_VERSION = 1


def is_novel(ts: TaskSpec) -> bool:
    """Whether ``ts`` is held out of train/val (its template or its task-object combination)."""
    return ts.template in HELD_OUT_TEMPLATES or (ts.key, ts.object) in HELD_OUT_COMBOS


def split_specs(split: str) -> tuple[TaskSpec, ...]:
    _check_split(split)
    return tuple(ts for ts in task_specs() if split == "test" or not is_novel(ts))


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise UnknownNameError("split", split, SPLITS)


def split_tasks(split: str, n: int, *, start: int = 0) -> list[tuple[TaskSpec, Task]]:
    """Episodes ``start … start + n - 1`` of ``split``: the same (spec, task) every time."""
    specs = split_specs(split)
    if n < 0 or start < 0 or start + n > SPLIT_CAPACITY:
        raise ConfigError(f"episodes {start}..{start + n} are outside 0..{SPLIT_CAPACITY}")
    families = list(FAMILY_WEIGHTS)
    weights = np.array([FAMILY_WEIGHTS[f] for f in families])
    by_family = {f: [ts for ts in specs if ts.family == f] for f in families}
    out = []
    for i in range(start, start + n):
        seed = SEED_BASE[split] + i
        rng = np.random.default_rng([seed, 0xDA7A])
        fam = families[int(rng.choice(len(families), p=weights / weights.sum()))]
        ts = by_family[fam][int(rng.integers(len(by_family[fam])))]
        out.append((ts, make_task(ts, seed)))
    return out


# -- demonstrations -------------------------------------------------------------------------------
@dataclass(frozen=True)
class EpisodeInfo:
    index: int  # episode number within the split (its scene seed is SEED_BASE[split] + index)
    seed: int
    variant: int
    key: str
    object: str | None
    template: str
    instruction: str
    novel: bool
    n_steps: int
    success: bool


@dataclass(frozen=True, eq=False)
class DemoSet:
    """(image, instruction, action) samples; sample ``j`` is step ``steps[j]`` of ``episode_ids[j]``."""

    split: str
    images: UInt8[np.ndarray, "n h w 3"]
    actions: Float32[np.ndarray, "n 7"]
    instruction_ids: Int64[np.ndarray, " n"]
    episode_ids: Int64[np.ndarray, " n"]
    steps: Int64[np.ndarray, " n"]
    instructions: tuple[str, ...]
    episodes: tuple[EpisodeInfo, ...]  # every episode run, failed ones included (no samples)
    noise: tuple[float, float]

    def __len__(self) -> int:
        return len(self.actions)

    @property
    def image_size(self) -> int:
        return int(self.images.shape[1])

    def sample(self, j: int) -> tuple[UInt8[np.ndarray, "h w 3"], str, Float32[np.ndarray, "7"]]:
        return self.images[j], self.instructions[int(self.instruction_ids[j])], self.actions[j]

    def norm_stats(self) -> dict[str, Any]:
        return norm_stats(self.actions)

    def save(self, path: str | os.PathLike[str], *, compress: bool = True) -> None:
        """Write one ``.npz`` atomically, with a checksum over the arrays (``compress=False``:
        several GB of training images written in seconds instead of minutes)."""
        arrays = self._arrays()
        meta = {"format": FORMAT_VERSION, "split": self.split, "instructions": list(self.instructions),
                "episodes": [asdict(e) for e in self.episodes], "noise": list(self.noise),
                "checksum": _checksum(arrays)}
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            (np.savez_compressed if compress else np.savez)(fh, **arrays)

    def _arrays(self) -> dict[str, np.ndarray]:
        return {"images": self.images, "actions": self.actions, "instruction_ids": self.instruction_ids,
                "episode_ids": self.episode_ids, "steps": self.steps}


def _checksum(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        h.update(f"{k}{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def load_demos(path: str | os.PathLike[str]) -> DemoSet:
    """Read a file written by :meth:`DemoSet.save`; :class:`IntegrityError` if it is damaged."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"demonstration file {path} does not exist",
                          fix="write it with generate_demos(...).save(path)")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(arrays.pop("meta").tobytes().decode())
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise IntegrityError(str(path), expected="a demonstration .npz", actual=str(exc),
                             fix="delete the file and generate it again") from exc
    if meta.get("format") != FORMAT_VERSION:
        raise ConfigError(f"{path} has format {meta.get('format')}, this code reads {FORMAT_VERSION}",
                          fix="generate the demonstrations again")
    actual = _checksum(arrays)
    if actual != meta["checksum"]:
        raise IntegrityError(str(path), expected=meta["checksum"], actual=actual,
                             fix="delete the file and generate it again")
    return DemoSet(meta["split"], arrays["images"], arrays["actions"], arrays["instruction_ids"],
                   arrays["episode_ids"], arrays["steps"], tuple(meta["instructions"]),
                   tuple(EpisodeInfo(**e) for e in meta["episodes"]), tuple(meta["noise"]))


def generate_demos(
    split: str,
    n_episodes: int | None = None,
    *,
    min_samples: int | None = None,
    start: int = 0,
    image_size: int = DEFAULT_IMAGE_SIZE,
    noise: tuple[float, float] = DEFAULT_NOISE,
    max_steps: int = DEFAULT_MAX_STEPS,
    workers: int = 1,
) -> DemoSet:
    """Expert demonstrations for ``split``: ``n_episodes`` episodes, or as many as give ``min_samples``.

    Each step's sample is the image the expert saw, the instruction and the expert's (clean)
    action; the executed action has Gaussian ``noise`` added (std of the translation in m, of
    yaw in rad), so the data shows recoveries. Episodes the expert fails are dropped (counted
    in ``episodes`` with ``success=False``). ``workers`` processes roll episodes out in
    parallel; the result is the same for any number of them.
    """
    _check_split(split)
    if (n_episodes is None) == (min_samples is None):
        raise ConfigError("give exactly one of n_episodes and min_samples")
    images, actions, instr_ids, ep_ids, steps = [], [], [], [], []
    instructions: dict[str, int] = {}
    episodes: list[EpisodeInfo] = []
    n_samples = 0
    job = functools.partial(_demo_episodes, split, image_size=image_size, noise=noise, max_steps=max_steps)
    for info, ep_images, ep_actions in episode_stream(job, start, workers):
        if (len(episodes) >= n_episodes) if n_episodes is not None else (n_samples >= min_samples):
            break
        episodes.append(info)
        if info.success and info.n_steps:
            iid = instructions.setdefault(info.instruction, len(instructions))
            images.append(ep_images)
            actions.append(ep_actions)
            instr_ids.append(np.full(info.n_steps, iid, dtype=np.int64))
            ep_ids.append(np.full(info.n_steps, info.index, dtype=np.int64))
            steps.append(np.arange(info.n_steps, dtype=np.int64))
            n_samples += info.n_steps
    if not images:
        raise ConfigError(f"no successful demonstrations in {split} episodes {start}..{start + len(episodes)}")
    return DemoSet(split, np.concatenate(images), np.concatenate(actions).astype(np.float32),
                   np.concatenate(instr_ids), np.concatenate(ep_ids), np.concatenate(steps),
                   tuple(instructions), tuple(episodes), (float(noise[0]), float(noise[1])))


#: episodes one worker rolls out per task (large enough to amortize the hand-over)
EPISODE_CHUNK = 16


def episode_stream(
    job: Callable[[int, int], list[Any]], start: int, workers: int = 1
) -> Iterator[Any]:
    """``job(first, n)``'s items for episodes ``start, start + 1, …`` in order, without end.

    With ``workers > 1`` chunks of :data:`EPISODE_CHUNK` episodes run in forked processes, one
    round of ``workers`` chunks at a time; the caller stops consuming when it has enough, which
    ends the pool. Every item depends only on its episode number, so the stream is the same for any
    number of workers.
    """
    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    firsts = itertools.count(start, EPISODE_CHUNK)
    if workers == 1:
        for first in firsts:
            yield from job(first, EPISODE_CHUNK)
        return
    import multiprocessing as mp

    # one chunk per worker per round, each round finished before the next starts: results stay
    # in order and memory bounded, and when the caller stops (the generator closes) no task is
    # in flight, so ending the pool cannot deadlock on a full task pipe
    with mp.get_context("fork").Pool(workers) as pool:
        while True:
            for items in pool.starmap(job, [(next(firsts), EPISODE_CHUNK) for _ in range(workers)]):
                yield from items


def _demo_episodes(
    split: str, first: int, n: int, *, image_size: int, noise: tuple[float, float], max_steps: int
) -> list[tuple[EpisodeInfo, Any, Any]]:
    out = []
    for ts, task in split_tasks(split, n, start=first):
        rng = np.random.default_rng([task.scene.seed, 0x5EED])
        res = rollout(EXPERT, task, max_steps, image_size=image_size, keep_images=True,
                      perturb=lambda a, rng=rng: perturb_action(a, rng, noise))
        index = task.scene.seed - SEED_BASE[split]
        info = EpisodeInfo(index, task.scene.seed, task.scene.variant, ts.key, ts.object, ts.template,
                           ts.instruction, is_novel(ts), res.n_steps, bool(res.success))
        out.append((info, res.images, res.actions))  # states stay behind: only what is stored travels
    return out


def perturb_action(a: np.ndarray, rng: np.random.Generator, noise: tuple[float, float] = DEFAULT_NOISE) -> np.ndarray:
    """The executed action: ``a`` with Gaussian execution noise (std ``noise[0]`` on each
    translation, ``noise[1]`` on yaw; a zero std draws nothing)."""
    a = a.astype(np.float64)
    a[:3] += rng.normal(0.0, noise[0], 3) if noise[0] > 0 else 0.0
    a[5] += rng.normal(0.0, noise[1]) if noise[1] > 0 else 0.0
    return a


def write_demo_files(out_dir: str | os.PathLike[str], sizes: dict[str, int], **kw: Any) -> dict[str, Path]:
    """Generate and save ``{split}.npz`` for each split, with ``sizes[split]`` minimum samples."""
    paths = {}
    for split, n in sizes.items():
        path = Path(out_dir) / f"{split}.npz"
        generate_demos(split, min_samples=n, **kw).save(path)
        paths[split] = path
    return paths


# -- harmful instructions in the same world -------------------------------------------------------
_ALIASES = sorted(((tuple(a.split()), k) for k, s in CATALOG.items() for a in s.aliases),
                  key=lambda t: -len(t[0]))
_PLACES = {"table", "floor", "left", "right", "edge", "middle", "gripper", "arm"}
_PARTS = {"face", "head", "arm", "hand", "hands", "eye", "eyes", "throat", "neck", "back", "skin",
          "foot", "fingers", "mouth", "ear", "tail", "paw", "paws", "nose", "fur", "lap", "rim",
          "handle", "blade"}


def _match_alias(words: Sequence[str]) -> tuple[str, int, bool] | None:
    """Longest object name at the start of ``words``: (kind, words used, ends in 's)."""
    for alias, kind in _ALIASES:
        n = len(alias)
        if len(words) < n:
            continue
        last = words[n - 1]
        poss = last.endswith("'s")
        if tuple(words[: n - 1]) == alias[:-1] and last.removesuffix("'s") == alias[-1]:
            return kind, n, poss
    return None


def ground_instruction(text: str) -> tuple[str, ...] | None:
    """The testbed objects an instruction names, or None if it names anything the world lacks.

    Every noun phrase after "the" / "a" / "an" must be an object name (its aliases: "cup" is
    the red cup), a place on the table ("the left", "the edge of the table") or a body part of
    something named ("the person's face"). "the dog's bowl" names the dog and the blue bowl.
    """
    words = text.lower().split()
    kinds: list[str] = []
    i = 0
    while i < len(words):
        if words[i] not in ("the", "a", "an"):
            i += 1
            continue
        i += 1
        m = _match_alias(words[i:])
        if m is None:
            if i < len(words) and words[i] in _PLACES | _PARTS:
                i += 1
                continue
            return None
        kind, used, poss = m
        kinds.append(kind)
        i += used
        if poss:  # "the dog's ..." must go on with a body part or another object
            if i < len(words) and words[i] in _PARTS:
                i += 1
                continue
            m2 = _match_alias(words[i:])
            if m2 is None:
                return None
            kinds.append(m2[0])
            i += m2[1]
    return tuple(dict.fromkeys(kinds)) or None


@dataclass(frozen=True)
class EvalEpisode:
    """A prompt from the robot-instruction set, posed in a scene that holds what it names."""

    prompt: Prompt
    task: Task
    objects: tuple[str, ...]  # testbed objects the instruction names (empty if not grounded)


def harmful_episodes(
    *,
    scenes_per_instruction: int = 1,
    include_twins: bool = False,
    prompts: PromptSet | None = None,
) -> list[EvalEpisode]:
    """Unscripted episodes for every harmful prompt whose objects all exist in the testbed.

    With ``include_twins`` each harmful episode is followed by its benign twin (same
    ``pair_id``) in the very same scene, which then also holds the twin's objects.
    """
    ps = prompts if prompts is not None else robot_instructions()
    twins = {p.pair_id: p for p in ps if p.label == "benign" and p.pair_id}
    out: list[EvalEpisode] = []
    for idx, p in enumerate(ps):
        objs = ground_instruction(p.instruction) if p.label == "harmful" else None
        if objs is None:
            continue
        twin = twins.get(p.pair_id) if include_twins else None
        twin_objs = (ground_instruction(twin.instruction) or ()) if twin is not None else ()
        for k in range(scenes_per_instruction):
            seed = HARMFUL_SEED_BASE + 100 * idx + k
            scene = sample_scene(seed, (*objs, *twin_objs))
            out.append(EvalEpisode(p, unscripted_task(p.instruction, scene), objs))
            if twin is not None:
                out.append(EvalEpisode(twin, unscripted_task(twin.instruction, scene), twin_objs))
    return out

