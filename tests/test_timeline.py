"""The memory's timeline: when each cluster was on screen and how many separate times,
in bounded space, through the STAR writer, save and load, and into the scene notes."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from test_memory import GRID, small_config

from vstream.errors import ConfigError
from vstream.memory import StarConfig, StarMemory
from vstream.memory.bank import thumbnail_slot_bytes
from vstream.memory.timeline import Timeline

torch.set_num_threads(1)


def timeline(clusters: int = 2, max_runs: int = 4) -> Timeline:
    return Timeline(clusters, max_runs, width=WIDTH, cut_ratio=3.0, cut_floor=0.5)


WIDTH = 64
SCENES = torch.randn(4, WIDTH, generator=torch.Generator().manual_seed(0))


def shown(line: Timeline, slot: int, scene: int, t: float, first: bool = False, wobble: float = 0.2) -> None:
    """A frame of ``scene`` at ``t`` seconds (with some motion) joins ``slot``."""
    frame = SCENES[scene] + wobble * torch.randn(WIDTH, generator=torch.Generator().manual_seed(int(t)))
    line.observe(*line.changes(line.gram(frame[None]).tolist())[0])
    (line.place if first else line.extend)(slot, t)


def test_a_cut_away_and_back_is_a_new_appearance_and_motion_is_not():
    line = timeline()
    shown(line, 0, scene=0, t=0.0, first=True)
    for t in (1.0, 2.0, 9.0):  # motion, and a frame late: still the same run (no cut)
        shown(line, 0, scene=0, t=t)
    shown(line, 1, scene=1, t=10.0, first=True)  # a cut to another scene
    shown(line, 1, scene=1, t=11.0)
    for t in (12.0, 13.0):
        shown(line, 0, scene=0, t=t)  # and back
    assert line.runs_of(0) == (((0.0, 9.0), (12.0, 13.0)), 2) and line.runs_of(1) == (((10.0, 11.0),), 1)
    assert line.cuts[1] == 2  # two cuts: to scene 1 and back


def test_frames_of_one_scene_shared_by_two_clusters_are_one_run_each():
    """A moving object splits a scene's frames between two clusters: no cut, one run each."""
    line = timeline()
    shown(line, 0, scene=0, t=0.0, first=True)
    shown(line, 1, scene=0, t=1.0, first=True)
    for t in range(2, 12):
        shown(line, t % 2, scene=0, t=float(t))
    assert line.runs_of(0) == (((0.0, 10.0),), 1) and line.runs_of(1) == (((1.0, 11.0),), 1)
    line.join(0, 1)  # overlapping runs: one scene, one appearance
    assert line.runs_of(0) == (((0.0, 11.0),), 1)


def test_past_max_runs_the_closest_runs_blur_together_and_are_still_counted():
    line = timeline(max_runs=3)
    shown(line, 0, scene=0, t=0.0, first=True)
    for t in (10.0, 20.0, 25.0, 40.0):  # scene 0 comes back after scene 1 each time
        shown(line, 1, scene=1, t=t - 1, first=t == 10.0)
        shown(line, 0, scene=0, t=t)
    runs, appearances = line.runs_of(0)
    # 20 and 25 s are the closest pair, then 0 and 10 s (the earlier of two equal gaps)
    assert runs == ((0.0, 10.0), (20.0, 25.0), (40.0, 40.0)) and appearances == 5


def test_joining_two_clusters_merges_their_runs_in_time_order():
    line = timeline()
    shown(line, 0, scene=0, t=0.0, first=True)
    shown(line, 1, scene=0, t=1.0, first=True)  # shot 0, split between both clusters
    shown(line, 0, scene=0, t=2.0)
    shown(line, 1, scene=1, t=5.0)  # shot 1
    shown(line, 0, scene=0, t=10.0)  # shot 2
    shown(line, 1, scene=1, t=20.0)  # shot 3
    assert line.runs_of(0)[1] == 2 and line.runs_of(1)[1] == 3
    line.join(0, 1)
    # the runs of shot 0 become one: 2 + 3 - 1 appearances
    assert line.runs_of(0) == (((0.0, 2.0), (5.0, 5.0), (10.0, 10.0), (20.0, 20.0)), 4)


def alternating_stream(sequence: list[tuple[int, int]], dim: int = 16, seed: int = 0):
    """Frames of distinct scenes, one per second: ``sequence`` is ``(scene, frames)`` in
    order; returns the frames and their times."""
    generator = torch.Generator().manual_seed(seed)
    patterns = torch.randn(1 + max(s for s, _ in sequence), GRID * GRID, dim, generator=generator) * 3
    scenes = [s for s, n in sequence for _ in range(n)]
    frames = patterns[scenes] + 0.05 * torch.randn(len(scenes), GRID * GRID, dim, generator=generator)
    return frames, [float(t) for t in range(len(scenes))]


def test_the_star_memory_counts_how_many_times_each_scene_came_back(tmp_path):
    """Three scenes, red coming back three times: the timeline has red's three runs, at
    their times, whichever clusters the writer joined on the way; it is saved and loaded."""
    red, grey, blue = 0, 1, 2
    sequence = [(grey, 20), (red, 5), (grey, 10), (red, 4), (blue, 15), (red, 6), (grey, 8)]
    frames, times = alternating_stream(sequence)
    memory = StarMemory(small_config(temporal_length=3, retrieved_length=1))
    for i in range(0, len(times), 7):  # in uneven batches, as a stream arrives
        memory.extend(frames[i : i + 7], times[i : i + 7])
    scenes = memory.timeline()
    assert [scene.appearances for scene in scenes] == [3, 3, 1]  # grey, red, blue by first appearance
    grey_runs, red_runs, blue_runs = (scene.runs for scene in scenes)
    assert red_runs == ((20.0, 24.0), (35.0, 38.0), (54.0, 59.0))
    assert grey_runs == ((0.0, 19.0), (25.0, 34.0), (60.0, 67.0))
    assert blue_runs == ((39.0, 53.0),)
    assert [scene.frames for scene in scenes] == [38.0, 15.0, 15.0]
    memory.save(tmp_path / "saved")
    again = StarMemory.load(tmp_path / "saved")
    assert [(s.runs, s.appearances) for s in again.timeline()] == [(s.runs, s.appearances) for s in scenes]
    with_means = memory.timeline(means=True)
    assert all(scene.mean is not None and scene.mean.shape == (16,) for scene in with_means)


def test_the_timeline_stays_bounded_over_many_appearances():
    memory = StarMemory(small_config(temporal_length=2, retrieved_length=1, timeline_runs=4))
    frames, times = alternating_stream([(i % 2, 3) for i in range(60)])  # two scenes, 30 times each
    memory.extend(frames, times)
    scenes = memory.timeline()
    assert [scene.appearances for scene in scenes] == [30, 30]
    assert all(len(scene.runs) == 4 for scene in scenes)
    assert scenes[0].start == 0.0 and scenes[1].end == 179.0  # the ends survive the blurring
    assert memory.runs.runs.shape == (2, 4, 4)  # allocated once, whatever the stream's length


def test_timeline_settings_are_checked():
    for fields, name in (({"timeline_runs": 0}, "timeline_runs"), ({"cut_ratio": 0.5}, "cut_ratio"),
                         ({"cut_floor": -0.1}, "cut_floor")):
        with pytest.raises(ConfigError, match=name):
            StarConfig(**fields)


@pytest.mark.parametrize("disk_frames", [None, 80])
def test_retrieval_takes_the_longest_scenes_so_far_at_every_read(disk_frames):
    """Twelve scenes of shuffled lengths into 25 clusters: while there are more clusters
    than scenes, long scenes are split among several, and ranking clusters alone let a
    shorter scene kept whole outweigh a long one. Grouped into scenes, the retrieved
    frames are from the three longest scenes so far at every read from frame 100 on;
    also when the bank's disk cap holds 80 of the 359 frames (the frames retrieval
    reads are kept)."""
    from test_memory import scene_of, scene_stream

    lengths = [17, 45, 9, 60, 23, 38, 12, 51, 30, 6, 41, 27]
    frames, times, scene = scene_stream(lengths, noise=0.3)
    config = small_config(temporal_length=25, retrieved_length=3)
    if disk_frames:
        slot = config.bank.grid**2 * frames.shape[2] * 2 + thumbnail_slot_bytes(config.bank)
        config.bank = replace(config.bank, disk_gb=disk_frames * slot / 2**30)
    with StarMemory(config) as memory:
        for i, (frame, t) in enumerate(zip(frames, times), 1):
            memory.add(frame, t)
            if i < 100 or i % 20:
                continue
            seen = torch.bincount(scene[:i], minlength=len(lengths)).tolist()
            longest = sorted(sorted(range(len(lengths)), key=lambda s: (-seen[s], s))[:3])
            out = memory.tokens()
            retrieved = sorted({scene_of(start, scene) for kind, (start, _) in zip(out.kinds, out.spans)
                                if kind == "retrieved"})
            assert retrieved == longest, f"at frame {i}: seen {seen}"
            assert len(memory.timeline()) == sum(1 for n in seen if n)  # one line per scene so far
        if disk_frames:
            assert len(memory.bank.kept_ids()) <= disk_frames < len(memory.bank)
            assert memory.bank.disk_bytes() <= config.bank.disk_gb * 2**30
