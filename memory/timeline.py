"""``Timeline``: when each cluster of a memory was on screen, in bounded space.

A cluster (a STAR temporal centroid) stands for frames from anywhere in the stream; its
time span alone cannot say whether a scene was on screen once for an hour or three
times for a minute. The timeline keeps, per cluster, its **runs** (spans of time its
frames came in without the picture cutting away in between) and how many separate
times it **appeared** (runs started).

Cuts. A cut is a frame far from the one before it: its squared distance to the previous
frame, over their mean squared norm, is above ``cut_ratio`` times the running average of
that measure (an exponential average over the frames that were no cut) and above
``cut_floor``. So camera motion and a moving object raise the bar, and a change of
scene clears it. The cuts number the **shots** (the frames between two cuts). A run is
one cluster's frames within one shot: a frame joining a cluster continues the cluster's
newest run when it is of the same shot, and starts a new run (an appearance) when not.
So the frames of one scene shared between two clusters (split by a moving object) still
make one run in each, and a scene that comes back after something else was on screen
makes a new one.

Joining clusters. When the writer joins two clusters, their runs are merged in time
order, and runs of the same shot become one (the frames of one shot, split between the
two clusters); the count of appearances is the sum of both less the runs that became one.

Bounded: at most ``max_runs`` runs per cluster. When a cluster would hold more, the two
runs with the shortest gap between them are joined into one span, so old appearances
blur into wider spans but are still counted. Per frame: one distance over the frame's
temporal-grid features and a few scalar operations, whatever the stream's length.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch


@dataclass(frozen=True)
class SceneRuns:
    """One scene on the timeline (one cluster, or the clusters of one scene together).

    Attributes:
        runs: ``((start, end), ...)`` seconds, in time order.
        appearances: how many separate times it was on screen (``len(runs)`` unless old
            runs were blurred together); None where the memory policy keeps no runs
            (then ``runs`` is the cluster's whole span).
        frames: how many frames it stands for.
        mean: its mean token ``[D]`` when asked for (``StreamMemory.timeline(means=True)``).
    """

    runs: tuple[tuple[float, float], ...]
    appearances: int | None
    frames: float
    mean: torch.Tensor | None = None

    @property
    def start(self) -> float:
        return self.runs[0][0]

    @property
    def end(self) -> float:
        return self.runs[-1][1]

    def within(self, start: float | None, end: float | None) -> SceneRuns | None:
        """This scene with only its runs that overlap ``[start, end]`` seconds (either
        bound None: open), its appearances counted over them; None when it has none there."""
        runs = tuple(run for run in self.runs if (start is None or run[1] >= start) and (end is None or run[0] <= end))
        if not runs:
            return None
        return replace(self, runs=runs, appearances=None if self.appearances is None else len(runs))


def scene_groups(distances: torch.Tensor, norms: torch.Tensor, bar: float) -> list[list[int]]:
    """Clusters of one scene together: ``n`` clusters, with the squared distances between
    their centroids ``[n, n]`` and their squared norms ``[n]``, grouped so that two whose
    change (squared distance over mean squared norm, as between two frames) is at most
    ``bar`` are in one group (single linkage). A scene split among clusters (by a moving
    object, or by its length) is one group; two scenes a cut apart are two. Groups in the
    order of their first cluster."""
    n = norms.shape[0]
    change = distances / ((norms[:, None] + norms[None, :]) / 2).clamp_min(1e-12)
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in torch.nonzero(torch.triu(change <= bar, diagonal=1)).tolist():
        parent[root(j)] = root(i)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(root(i), []).append(i)
    return list(groups.values())


class Timeline:
    """Runs of ``clusters`` cluster slots, at most ``max_runs`` each, from frames of
    ``width`` features; see the module docstring for ``cut_ratio`` and ``cut_floor``."""

    def __init__(self, clusters: int, max_runs: int, width: int, cut_ratio: float, cut_floor: float,
                 device: torch.device | str = "cpu"):
        self.max_runs, self.cut_ratio, self.cut_floor = max_runs, cut_ratio, cut_floor
        self.runs = np.zeros((clusters, max_runs, 4), np.float64)  # [K, R, (start s, end s, first shot, last shot)]
        self.run_count = np.zeros(clusters, np.int64)  # runs held per slot
        self.appearances = np.zeros(clusters, np.int64)  # separate appearances per slot
        self.previous = torch.zeros(width, device=device)  # the previous frame's features
        self.cuts = np.array([0.0, 0.0, np.nan])  # frames seen (0, 1: 2 or more), shot number, average change

    def tensors(self) -> dict[str, torch.Tensor]:
        """The state as tensors sharing this timeline's memory (saved, and restored in place)."""
        return {"timeline.runs": torch.from_numpy(self.runs), "timeline.run_count": torch.from_numpy(self.run_count),
                "timeline.appearances": torch.from_numpy(self.appearances), "timeline.previous": self.previous,
                "timeline.cuts": torch.from_numpy(self.cuts)}

    def gram(self, frames: torch.Tensor) -> torch.Tensor:
        """``[T + 1, T + 1]`` float64 for the next frames ``[T, width]``: the Gram matrix of the
        previous frame and these (three small ops on the frames' device, read back by the
        caller with its other results; ``changes`` gives each frame's values for ``observe``)."""
        both = torch.cat([self.previous[None], frames]).double()
        self.previous.copy_(frames[-1])
        return both @ both.T

    @staticmethod
    def changes(gram: list[list[float]]) -> list[tuple[float, float]]:
        """From ``gram``'s matrix (as lists): each frame's squared distance to the frame before
        it and their mean squared norm (float64 products: no cancellation to speak of)."""
        return [(gram[i][i] + gram[i + 1][i + 1] - 2 * gram[i][i + 1], (gram[i][i] + gram[i + 1][i + 1]) / 2)
                for i in range(len(gram) - 1)]

    def observe(self, squared: float, mean_norm: float) -> None:
        """See the next frame (its ``changes``: squared distance to the frame before, mean
        squared norm) before it joins a cluster: a new shot begins if it is a cut."""
        if self.cuts[0]:
            change = squared / max(mean_norm, 1e-12)
            if change > self.bar():
                self.cuts[1] += 1
            else:  # the average change, NaN until a change that is no cut
                average = self.cuts[2]
                self.cuts[2] = change if np.isnan(average) else 0.9 * average + 0.1 * change
        self.cuts[0] = 1.0

    def place(self, slot: int, t: float) -> None:
        """Slot ``slot`` now holds one frame, at ``t`` seconds, of the current shot."""
        shot = self.cuts[1]
        self.runs[slot, 0] = (t, t, shot, shot)
        self.run_count[slot] = self.appearances[slot] = 1

    def extend(self, slot: int, t: float) -> None:
        """A frame at ``t`` seconds (not before the slot's newest), of the current shot,
        joined slot ``slot``."""
        n, shot = int(self.run_count[slot]), self.cuts[1]
        if self.runs[slot, n - 1, 3] == shot:
            self.runs[slot, n - 1, 1] = t
            return
        self.appearances[slot] += 1
        self._write(slot, self.runs[slot, :n].tolist() + [[t, t, shot, shot]])

    def join(self, a: int, b: int) -> None:
        """Slot ``b``'s runs join slot ``a``'s (slot ``b`` is then free to ``place``)."""
        merged, self.appearances[a] = self.merged([a, b])
        self._write(a, merged)

    def merged(self, slots: list[int]) -> tuple[list[list[float]], int]:
        """The runs of ``slots`` together, in time order, runs of one shot made one, and
        their count of appearances: the sum of theirs less the runs made one."""
        runs = sorted(run for slot in slots for run in self.runs[slot, : self.run_count[slot]].tolist())
        merged = [runs[0]]
        for run in runs[1:]:
            last = merged[-1]
            if run[2] <= last[3]:  # of a shot the run before reaches: one appearance
                last[1], last[3] = max(last[1], run[1]), max(last[3], run[3])
            else:
                merged.append(run)
        appearances = sum(int(self.appearances[slot]) for slot in slots) - (len(runs) - len(merged))
        return merged, max(appearances, len(merged))

    def bar(self) -> float:
        """The change over which a frame is a cut, now (``cut_floor`` before any average)."""
        average = self.cuts[2]
        return max(0.0 if np.isnan(average) else self.cut_ratio * average, self.cut_floor)

    def _write(self, slot: int, runs: list[list[float]]) -> None:
        """Store ``runs`` (in time order) in ``slot``, first joining the two with the shortest
        gap between them while there are more than ``max_runs``."""
        while len(runs) > self.max_runs:
            i = min(range(len(runs) - 1), key=lambda j: runs[j + 1][0] - runs[j][1])
            runs[i : i + 2] = [[runs[i][0], runs[i + 1][1], runs[i][2], runs[i + 1][3]]]
        self.runs[slot, : len(runs)] = runs
        self.run_count[slot] = len(runs)

    def runs_of(self, slot: int) -> tuple[tuple[tuple[float, float], ...], int]:
        """Slot ``slot``'s runs ``((start, end), ...)`` seconds and its count of appearances."""
        n = int(self.run_count[slot])
        return tuple((float(s), float(e)) for s, e, _, _ in self.runs[slot, :n]), int(self.appearances[slot])
