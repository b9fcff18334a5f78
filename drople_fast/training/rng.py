"""Every random state a run depends on: seeding, data-loader workers, and the capture / restore that
makes a resumed run bitwise the uninterrupted one (python, numpy, torch CPU and CUDA, the loader's
generator)."""
from __future__ import annotations

import random
from typing import Dict, List

import numpy as np
import torch

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def worker_init(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def _np_state() -> List:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]


def _set_np_state(state: List) -> None:
    name, keys, pos, has_gauss, gauss = state
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))


def rng_state(loader_gen: torch.Generator) -> Dict:
    state = {"torch": torch.get_rng_state(), "numpy": _np_state(), "random": list(random.getstate()),
             "loader": loader_gen.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict, loader_gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    _set_np_state(state["numpy"])
    version, internal, gauss = state["random"]
    random.setstate((version, tuple(internal), gauss))
    loader_gen.set_state(state["loader"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
