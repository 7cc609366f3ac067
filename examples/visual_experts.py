"""Delta-tune visual experts (Mono-InternVL) on a stream's own memory, then answer with them.

The visual experts head gives every decoder layer of a VLM's language model a visual FFN
beside its text FFN: memory tokens go through the expert, text through the frozen
original. This example writes a clip whose colours are known (red, green, blue), ingests
it, trains only the experts for a few steps to answer "Which colours appear, in order?",
saves them, and answers again with ``--head visual_experts:weights=DIR``, the switch
``vstream ask`` and ``vstream serve`` take.

    python examples/visual_experts.py --model llava-hf/llava-onevision-qwen2-0.5b-ov-hf --out experts/
    vstream ask clip.mp4 "Which colours appear?" --model ... --head visual_experts:weights=experts/

It needs a VLM that reads memory tokens (LLaVA-OneVision, Flash-VStream) whose language
model is LLaMA or Qwen2. New experts are copies of the text FFNs, so before training the
answers are exactly the base model's.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from vstream import synth
from vstream.models import GenerationConfig, load_model
from vstream.models.heads import attach_head
from vstream.session import Session, SessionConfig

QUESTION = "Which colours appear, in order?"
TARGET = "red, green, blue"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a VLM that reads memory tokens: hub id or folder")
    parser.add_argument("--out", default="experts", help="where the trained experts are saved (default experts/)")
    parser.add_argument("--steps", type=int, default=20, help="training steps (default 20)")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate (default 1e-3)")
    parser.add_argument("--seconds", type=float, default=12.0, help="length of the clip (default 12)")
    args = parser.parse_args()
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as folder:
        third = args.seconds / 3
        clip = synth.write_clip(Path(folder) / "colours.mp4", duration=args.seconds, fps=2, size=(96, 64), audio=False,
                                scenes=[(0.0, (220, 30, 30)), (third, (30, 200, 30)), (2 * third, (30, 30, 220))])
        model = load_model(args.model)
        experts = attach_head(model, "visual_experts")
        config = SessionConfig(asr=False, generation=GenerationConfig(max_new_tokens=12))
        with Session(model, config) as session:
            session.ingest(str(clip.path), progress=False)
            print(f"before: {session.ask(QUESTION).text!r}")
            context = session.context(QUESTION)
            optimizer = torch.optim.AdamW(experts.trainable_parameters(), lr=args.lr)
            for step in range(args.steps):
                optimizer.zero_grad()
                loss = experts.answer_loss(model, context, QUESTION, TARGET)
                loss.backward()
                optimizer.step()
                if step in (0, args.steps - 1):
                    print(f"step {step + 1}: loss {loss.item():.3f}")
            print(f"after:  {session.ask(QUESTION).text!r}")
        experts.save_experts(args.out)
        print(f"experts saved in {args.out}; use them with --head visual_experts:weights={args.out}")


if __name__ == "__main__":
    main()
