"""Training throughput: records per second through ``vstream train`` from features
extracted once, against decoding each record's video again at every step, in the same
run on the same data.

Data: ``--records`` synthetic clips (``vstream.synth``: a moving square and a frame
counter, ``--seconds`` long at 30 fps, no audio) with one question and answer each; a
tiny random Flash-VStream checkpoint in the released layout (2-layer LLaMA, CLIP tower
of 8×8 patches; built as the tests build theirs, from ``tests/tiny_models.py``), its
projector trained, one epoch, nothing held out, one torch thread. ``extract_s`` is the
one-off extraction (``vstream extract``); ``features_rps`` trains on the stored
features; ``decode_rps`` runs the same training where each sample's memory comes from
its video read whole again (ingestion at 1 fps, the frame encoder, the memory); the
ratio is the point: with a 7B LLM the training step costs more and the ratio shrinks,
the decode saved per record stays. Each training is run ``--repeat`` times (a fresh
output folder each, so none resumes), the best taken.

Last line: ``RESULT features_rps=... decode_rps=... speedup=... extract_s=... records=... repeat=...``.

Run: ``python benchmarks/train_throughput.py [--records 12] [--seconds 20] [--repeat 3]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from vstream import synth
from vstream.data import read_conversations
from vstream.extract import extract_features, extract_record
from vstream.session import SessionConfig, model_and_encoder
from vstream.train import TrainConfig, train

ANSWERS = ("the red square moves left", "a blue circle appears")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=12)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the tiny checkpoint builders
    from tiny_models import tiny_clip, tiny_flash_vstream

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        model = str(tiny_flash_vstream(root / "flash", tiny_clip(root / "clip"))[0])
        records = []
        for i in range(args.records):
            synth.write_clip(root / f"clip{i}.mp4", duration=args.seconds, fps=30.0, audio=False)
            records.append({"id": f"clip{i}", "video": f"clip{i}.mp4",
                            "conversations": [{"from": "human", "value": "<video>\nWhat happens?"},
                                              {"from": "gpt", "value": ANSWERS[i % 2]}]})
        data = root / "train.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in records))
        session = SessionConfig(asr=False, ocr=False)
        started = time.perf_counter()
        report = extract_features(data, root / "features", model, session, progress=False)
        extract_s = time.perf_counter() - started
        assert report.extracted == args.records, report

        def run(name: str, features_of=None) -> float:
            """Records per second of the best of ``--repeat`` trainings."""
            best = float("inf")
            for attempt in range(args.repeat):
                config = TrainConfig(model=model, data=str(data), features=str(root / "features"),
                                     out=str(root / f"{name}-{attempt}"), held_out=0.0, epochs=1, device="cpu")
                started = time.perf_counter()
                train(config, progress=False, features_of=features_of)
                best = min(best, time.perf_counter() - started)
            return args.records / best

        by_id = {record.id: record for record in read_conversations(data)}
        chat, encoder = model_and_encoder(model, session)
        features_rps = run("from-features")
        decode_rps = run("from-video", lambda sample: extract_record(by_id[sample.id], chat, encoder, session))
    print(f"{args.records} records of {args.seconds:g} s: extraction {extract_s:.1f} s once; training "
          f"(best of {args.repeat}) {features_rps:.2f} records/s from features, {decode_rps:.2f} records/s decoding "
          "each video")
    print(f"RESULT features_rps={features_rps:.2f} decode_rps={decode_rps:.2f} speedup={features_rps / decode_rps:.2f} "
          f"extract_s={extract_s:.1f} records={args.records} repeat={args.repeat}")


if __name__ == "__main__":
    main()
