"""Regenerates speech.mp4 and speech.json: two sentences spoken by espeak-ng over
silence, with a bar-coded video track, for the speech-recognition tests.

    python tests/data/make_speech.py   # needs espeak-ng (apt-get install espeak-ng)
"""

import json
from pathlib import Path

from vstream import synth

HERE = Path(__file__).parent
SENTENCES = [(1.0, "The red car is parked at the station."), (4.5, "Seven people boarded the train.")]

if __name__ == "__main__":
    info = synth.write_clip(HERE / "speech.mp4", duration=8.0, fps=10, size=(160, 120), tones=[], speech=SENTENCES)
    segments = [{"start": round(s, 3), "end": round(e, 3), "text": t} for s, e, t in info.speech]
    (HERE / "speech.json").write_text(json.dumps({"duration": info.duration, "segments": segments}, indent=1) + "\n")
    print(f"wrote {info.path} ({info.path.stat().st_size} bytes)")
