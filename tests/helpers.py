"""Helpers shared by several test files."""

import numpy as np


def first_at_or_after(times: np.ndarray, fps: float | None) -> list[int]:
    """Brute force, independent of FrameSampler: for each instant k/fps, the first frame
    at or after it, once each; every frame when ``fps`` is None."""
    if fps is None:
        return list(range(len(times)))
    picked = []
    for k in range(int(times[-1] * fps) + 1):
        later = np.flatnonzero(times >= k / fps - 1e-6)
        if len(later) and (not picked or later[0] != picked[-1]):
            picked.append(int(later[0]))
    return picked


def wait_processed(client, stream: str, n: int, timeout: float = 20.0) -> dict:
    """A server stream's stats once its memory holds ``n`` frames (``client``: a
    ``vstream.client.Client``)."""
    import time

    deadline = time.monotonic() + timeout
    while (stats := client.stats(stream))["frames_processed"] < n:
        assert time.monotonic() < deadline, f"stream {stream}: only {stats['frames_processed']} of {n} frames processed"
        time.sleep(0.05)
    return stats
