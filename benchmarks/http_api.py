"""Question latency through the HTTP API against the ZeroMQ client, and the page's time to
its first answer token, in one run.

``vstream serve --http`` runs in a process of its own (the embedded SmolLM2 and the
pixel encoder, no ASR, no OCR, one torch thread); one stream holds ``--frames`` frames.
The same question is asked ``--repeats`` times each way, alternating: through
``Client.ask`` (ZeroMQ), through ``POST /api/streams/ID/ask`` (HTTP, JSON answer), and
in the page in headless Chromium (the question submitted -> the first piece of the answer shown,
and -> the whole answer). Medians; ``http_ratio`` = HTTP / ZeroMQ (target <= 1.2).

    python benchmarks/http.py [--frames 30] [--repeats 15] [--max-new-tokens 16]

Last line: ``RESULT http_ratio=<http / zeromq median> zmq_ms=... http_ms=... page_first_token_ms=...
page_answer_ms=...``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

from vstream import Frame
from vstream.client import Client

QUESTION = "What colour was the screen?"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def start_server(folder: Path, max_new_tokens: int) -> tuple[subprocess.Popen, str, str]:
    out = folder / "server.out"
    command = [sys.executable, "-m", "vstream", "serve", "--bind", "tcp://127.0.0.1:*", "--http", "127.0.0.1:0",
               "--threads", "1", "--encoder", "pixels", "--no-asr", "--no-ocr", "--state-dir", str(folder / "state"),
               "--max-new-tokens", str(max_new_tokens)]
    process = subprocess.Popen(command, stdout=out.open("w"), stderr=(folder / "server.log").open("w"),
                               env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONSAFEPATH": "1"})
    deadline = time.monotonic() + 180
    while not (found := re.search(r"listening on (\S+)", out.read_text())):
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError((folder / "server.log").read_text())
        time.sleep(0.1)
    http = re.search(r"page and HTTP API on (\S+)", out.read_text()).group(1)
    return process, found.group(1), http


def ask_http(http: str, stream: str) -> float:
    body = json.dumps({"question": QUESTION}).encode()
    began = time.perf_counter()
    with urllib.request.urlopen(urllib.request.Request(f"{http}/api/streams/{stream}/ask", data=body, method="POST",
                                                       headers={"Content-Type": "application/json"})) as response:
        json.loads(response.read())
    return time.perf_counter() - began


def ask_zmq(client: Client, stream: str) -> float:
    began = time.perf_counter()
    client.ask(stream, QUESTION)
    return time.perf_counter() - began


def page_times(http: str, stream: str, repeats: int) -> tuple[float, float]:
    """Median ms from Enter to the first piece of the answer shown, and to the whole answer."""
    from playwright.sync_api import sync_playwright

    first, whole = [], []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.goto(http)
        page.locator(f"#streams button[data-stream='{stream}']").click()
        page.fill("#question", QUESTION)
        for _ in range(repeats):
            timing = page.evaluate("""() => new Promise((done) => {
                const answer = document.querySelector('#answer');
                answer.textContent = ''; delete answer.dataset.done;
                let first = null;
                const start = performance.now();
                const seen = new MutationObserver(() => {
                    if (first === null && answer.textContent) first = performance.now() - start;
                    if (answer.dataset.done === 'true') { seen.disconnect(); done([first, performance.now() - start]); }
                });
                seen.observe(answer, {childList: true, characterData: true, subtree: true, attributes: true});
                document.querySelector('#ask').requestSubmit();
            })""")
            first.append(timing[0])
            whole.append(timing[1])
        browser.close()
    return statistics.median(first), statistics.median(whole)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU(s)", flush=True)
    folder = Path(tempfile.mkdtemp(prefix="vstream-http-bench-"))
    process, address, http = start_server(folder, args.max_new_tokens)
    try:
        with Client(address, ask_timeout=300) as client:
            stream = client.open_stream()
            colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
            client.send_source(stream, [Frame(np.full((360, 640, 3), colours[i // 10 % 3], np.uint8), float(i), i)
                                        for i in range(args.frames)])
            while client.stats(stream)["frames_processed"] < args.frames:
                time.sleep(0.05)
            ask_zmq(client, stream), ask_http(http, stream)  # warm both paths
            zmq, web = [], []
            for _ in range(args.repeats):
                zmq.append(ask_zmq(client, stream))
                web.append(ask_http(http, stream))
            first, whole = page_times(http, stream, args.repeats)
    finally:
        process.terminate()
        process.wait(timeout=60)
    zmq_ms, http_ms = 1000 * statistics.median(zmq), 1000 * statistics.median(web)
    print(f"ZeroMQ {zmq_ms:.1f} ms, HTTP {http_ms:.1f} ms ({http_ms / zmq_ms:.3f}x); page: first token "
          f"{first:.0f} ms, whole answer {whole:.0f} ms", flush=True)
    print(f"RESULT http_ratio={http_ms / zmq_ms:.3f} zmq_ms={zmq_ms:.1f} http_ms={http_ms:.1f} "
          f"page_first_token_ms={first:.0f} page_answer_ms={whole:.0f}")


if __name__ == "__main__":
    main()
