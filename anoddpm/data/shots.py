"""K-shot training sets (``data.shots``, ``data.shots_seed``): which good files a K-shot model trains on.

The draw is a pure function of (the sorted file list, K, seed): the toolkit and the benchmark's peer, given the same
folder and seed, see the same shots. The shots of K are the first K of one seeded order of the files, so a larger K
with the same seed keeps the smaller K's shots and adds to them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

SHOTS_STREAM = 33  # keeps the shots' random stream apart from the validation split's (seeded by train.seed alone)


def check_shots(k: int, available: int, where: str | Path) -> None:
    """ValueError naming --shots when `k` good images cannot be drawn from the `available` ones under `where`."""
    if not 1 <= k <= available:
        problem = "a K-shot model needs at least one good image" if k < 1 else f"only {available} are there"
        raise ValueError(f"--shots {k} (data.shots): {problem}; {where} holds {available} good training image(s): "
                         f"give --shots 1..{available}, or leave --shots out to train on all of them")


def draw_shots(files: Sequence[Path], k: int, seed: int, where: str | Path) -> list[Path]:
    """The K shots of `files` drawn with `seed`, in file order (ValueError naming --shots when K is not in
    1..len(files); `where` names the folder in that message)."""
    check_shots(k, len(files), where)
    ordered = sorted(files, key=lambda p: Path(p).as_posix())
    order = np.random.default_rng([SHOTS_STREAM, seed]).permutation(len(ordered))
    return [ordered[i] for i in sorted(order[:k].tolist())]
