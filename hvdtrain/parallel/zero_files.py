"""A sharded optimizer's state written by every rank in parallel, and read back by any world (torch only).

Rank r's file is its own state as it holds it, nothing copied or gathered: for each bucket of its layout
(parallel.zero), the wrapped optimizer's state of its slice (flat tensors such as Adam's moments, and scalars such
as its step count) and where each piece of a parameter lies in that slice, (index, start, end, at): elements
[start, end) of the flattened parameter `index` (its position in the optimizer's order) are elements
[at, at + end - start) of the slice.

`Pieces` indexes such files (or a whole, torch-format state, as one piece per parameter) by parameter; a reader then
copies out exactly the elements it needs. A sharded optimizer of any world size takes its slices from them (each
rank reads its own part, never the whole state: loaded with mmap, only those bytes are read), and `consolidate`
makes torch's ordinary state_dict from them (what an unsharded job, or `hvdtrain checkpoint consolidate`, needs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Optional

import torch

FORMAT = 1
# State entries that are one number per parameter tensor rather than one per element (parallel.zero's).
SCALAR_STATE = ("step", "mu_product", "eta", "mu")


def payload(buckets: Iterable, states: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """A rank's file: its buckets' pieces and its slices' state (the live tensors: torch.save writes them as they
    are, no copy)."""
    return {
        "format": FORMAT,
        "buckets": [
            {"pieces": [(p.index, p.start, p.end, p.at) for p in b.pieces], "state": state}
            for b, state in zip(buckets, states)
        ],
    }


def is_flat(value: Any) -> bool:
    """A state entry with one value per element (a moment, a momentum), not one per parameter (a step count)."""
    return torch.is_tensor(value) and value.dim() == 1


class Pieces:
    """Every saved piece of every parameter: index -> [(state, start, end, at)], state holding flat tensors whose
    elements [at, at + end - start) are the parameter's flattened elements [start, end)."""

    def __init__(self) -> None:
        self.by_index: dict[int, list[tuple[dict[str, Any], int, int, int]]] = {}

    @classmethod
    def of_files(cls, paths: Iterable[Path]) -> Pieces:
        """The pieces of the ranks' files, mapped (torch.load mmap=True): what a reader copies out is all it reads."""
        pieces = cls()
        for path in paths:
            saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            for bucket in saved["buckets"]:
                for index, start, end, at in bucket["pieces"]:
                    pieces.by_index.setdefault(index, []).append((bucket["state"], start, end, at))
        return pieces

    @classmethod
    def of_state(cls, state: dict[int, dict[str, Any]]) -> Pieces:
        """A torch-format state ({position: {name: tensor shaped like the parameter, or a scalar}}) as one piece
        per parameter."""
        pieces = cls()
        for index, entry in state.items():
            flat = {k: v.reshape(-1) if torch.is_tensor(v) and v.dim() >= 1 else v for k, v in entry.items()}
            size = max((v.numel() for v in flat.values() if is_flat(v)), default=0)
            pieces.by_index[index] = [(flat, 0, size, 0)]
        return pieces

    def keys(self, indices: Iterable[int]) -> list[str]:
        return sorted({k for i in indices for state, *_ in self.by_index.get(i, []) for k in state})

    def scalar(self, indices: Iterable[int], key: str) -> Optional[Any]:
        """A per-parameter entry (the same in every piece of these parameters)."""
        for i in indices:
            for state, *_ in self.by_index.get(i, []):
                if key in state:
                    v = state[key]
                    return v.clone() if torch.is_tensor(v) else v
        return None

    def copy(self, index: int, start: int, end: int, key: str, out: torch.Tensor) -> None:
        """Elements [start, end) of parameter `index`'s entry `key` into `out` (of end - start elements)."""
        for state, s, e, at in self.by_index.get(index, []):
            lo, hi = max(start, s), min(end, e)
            if lo < hi and key in state:
                out[lo - start : hi - start] = state[key][at + lo - s : at + hi - s]

    def flat_like(self, indices: Iterable[int], key: str) -> Optional[torch.Tensor]:
        for i in indices:
            for state, *_ in self.by_index.get(i, []):
                if is_flat(state.get(key)):
                    return state[key]
        return None


def consolidate(pieces: Pieces, shapes: list[list[int]], param_groups: list[dict[str, Any]]) -> dict[str, Any]:
    """Torch's ordinary optimizer state_dict from the pieces: each parameter's (shape `shapes[index]`) entries
    whole, its scalars, the groups' settings."""
    state: dict[int, dict[str, Any]] = {}
    for index, shape in enumerate(shapes):
        if index not in pieces.by_index:
            continue  # no gradient, no state
        numel = int(torch.Size(shape).numel())
        entry: dict[str, Any] = {}
        for key in pieces.keys([index]):
            like = pieces.flat_like([index], key)
            if like is None or (key in SCALAR_STATE and like.numel() == 1):
                entry[key] = pieces.scalar([index], key)
                continue
            whole = torch.zeros(numel, dtype=like.dtype)
            pieces.copy(index, 0, numel, key, whole)
            entry[key] = whole.view(shape)
        state[index] = entry
    return {"state": state, "param_groups": param_groups}
