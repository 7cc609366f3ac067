"""The HTTP API and the page of ``vstream serve --http``, in a real headless Chromium
(Debian's ``chromium``, driven by Playwright with the system browser; the Makefile
installs it) and through plain HTTP.

One server process for the module: the embedded offline models (whisper tiny.en,
MiniLM, SmolLM2, MobileNetV2, PP-OCR), a token, a 1 MB upload limit.
"""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from playwright.sync_api import expect, sync_playwright
from server_process import ServerProcess

from vstream import Frame
from vstream.client import Client
from vstream.config import cache_dir

pytestmark = pytest.mark.timeout(300)

TOKEN = "web-secret"
SPEECH = Path(__file__).parent / "data" / "speech.mp4"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    """``(http address, zeromq address)`` of a ``vstream serve --http`` process."""
    server = ServerProcess(tmp_path_factory.mktemp("web"), "--http", "127.0.0.1:0", "--token", TOKEN,
                           "--max-upload-bytes", "1000000", "--max-new-tokens", "24")
    try:
        address = server.wait_ready(timeout=180)
        http = re.search(r"page and HTTP API on (\S+)", (server.folder / "server.out").read_text()).group(1)
        yield http, address, server
    finally:
        assert server.stop(timeout=60) == 0
        server.kill()


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def request(method: str, url: str, body: bytes | None = None, token: str | None = TOKEN,
            content_type: str = "application/json") -> tuple[int, dict, bytes]:
    headers = {"Content-Type": content_type}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body, method=method, headers=headers),
                                    timeout=60) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def raw_post(http: str, path: str, headers: dict, body: bytes) -> tuple[int, bytes]:
    """A POST written by hand on a socket (urllib keeps sending a body the server has
    already refused, and fails with a broken pipe): ``(status, body)``."""
    import socket

    host, port = http.removeprefix("http://").split(":")
    head = "".join(f"{name}: {value}\r\n" for name, value in
                   {"Host": host, "Authorization": f"Bearer {TOKEN}", "Connection": "close", **headers}.items())
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\n{head}\r\n".encode() + body)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    status_line, _, rest = reply.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


def error_code(body: bytes) -> str:
    return json.loads(body)["error"]["code"]


def test_the_page_uploads_a_clip_answers_as_it_generates_and_shows_the_evidence(web, browser, tmp_path):
    http, _, _ = web
    page = browser.new_page(viewport={"width": 390, "height": 844})  # a phone-width screen
    page.goto(http)
    page.fill("#token", TOKEN)
    page.dispatch_event("#token", "change")
    page.set_input_files("#upload", str(SPEECH))
    expect(page.locator("#title")).to_contain_text("Stream", timeout=30_000)
    stream = page.locator("#title").inner_text().split()[-1]
    deadline = time.monotonic() + 90
    while True:  # the upload is fed into the stream: 8 frames, the speech transcribed
        stats = json.loads(request("GET", f"{http}/api/streams/{stream}")[2])
        if stats["frames_processed"] == 8 and stats["transcript_segments"] >= 1:
            break
        assert time.monotonic() < deadline, stats
        time.sleep(0.2)
    expect(page.locator("#transcript")).to_contain_text("red car", timeout=10_000)
    expect(page.locator("#latest")).to_have_attribute("src", re.compile("/frame"), timeout=10_000)
    tokens_seen = []
    page.expose_function("sawAnswer", lambda text: tokens_seen.append(text))
    page.evaluate("""() => new MutationObserver(() => window.sawAnswer(document.querySelector('#answer').textContent))
                     .observe(document.querySelector('#answer'), {childList: true, characterData: true, subtree: true})""")
    page.fill("#question", "Where is the red car parked?")
    page.press("#question", "Enter")  # the keyboard asks
    expect(page.locator("#answer")).to_have_attribute("data-done", "true", timeout=60_000)
    assert "station" in page.locator("#answer").inner_text().lower()
    assert len({text for text in tokens_seen if text}) >= 3  # the answer grew piece by piece
    evidence = page.locator("#timeline .evidence").first
    t = float(evidence.get_attribute("data-t"))
    assert 0.9 <= t <= 3.4  # the sentence "The red car is parked at the station." is at 0.9-3.4 s
    evidence.click()
    expect(page.locator("#viewer")).to_be_visible()
    assert re.match(r"0:0[0-4] \(transcript", page.locator("#viewer .time").inner_text())
    assert page.evaluate("document.querySelector('#viewer img').naturalWidth") > 0
    assert page.evaluate("document.documentElement.scrollWidth") <= 390  # nothing wider than the phone
    page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
    page.close()


def test_the_page_watches_a_live_stream_pushed_through_the_client(web, browser):
    http, address, _ = web
    with Client(address, token=TOKEN) as client:
        stream = client.open_stream()
        page = browser.new_page()
        page.goto(f"{http}/")
        page.fill("#token", TOKEN)
        page.dispatch_event("#token", "change")
        button = page.locator(f"#streams button[data-stream='{stream}']")
        expect(button).to_be_visible(timeout=10_000)
        button.click()
        stop = threading.Event()

        def push() -> None:
            i = 0
            while not stop.is_set():
                colour = (255, 40, 40) if i // 3 % 2 else (40, 40, 255)
                client.send_frame(stream, Frame(np.full((72, 128, 3), colour, np.uint8), float(i), i), lossless=True)
                i += 1
                time.sleep(0.2)

        pusher = threading.Thread(target=push)
        pusher.start()
        try:
            expect(page.locator("#stats")).to_contain_text(re.compile(r"[1-9]\d* frames"), timeout=20_000)
            shown = int(page.locator("#stats").inner_text().split()[0])
            first = page.locator("#latest").get_attribute("src")
            expect(page.locator("#latest")).not_to_have_attribute("src", first, timeout=10_000)  # it refreshes
            assert page.evaluate("document.querySelector('#latest').naturalWidth") > 0  # a real JPEG came
            expect(page.locator("#stats")).not_to_contain_text(f"{shown} frames", timeout=30_000)  # and more frames
        finally:
            stop.set()
            pusher.join()
        page.close()
        client.close_stream(stream)


def test_the_api_refuses_bad_input_clearly_and_keeps_serving(web, tmp_path):
    http, _, _ = web
    assert request("GET", f"{http}/api/health", token=None)[0] == 401
    status, _, body = request("GET", f"{http}/api/streams", token="wrong")
    assert status == 401 and error_code(body) == "auth"
    status, _, body = request("POST", f"{http}/api/upload?name=notes.txt", b"not a video at all" * 100,
                              content_type="text/plain")
    assert status == 400 and "notes.txt" in json.loads(body)["error"]["message"]
    # over the limit, declared (refused before the body is read) and undeclared (counted as it comes)
    status, body = raw_post(http, "/api/upload?name=big.mp4", {"Content-Length": "1000001"}, b"")
    assert status == 413 and error_code(body) == "too_large"
    chunk = b"\0" * 1_000_001
    status, body = raw_post(http, "/api/upload?name=big.mp4", {"Transfer-Encoding": "chunked"},
                            f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n0\r\n\r\n")
    assert status == 413 and error_code(body) == "too_large"
    status, _, body = request("GET", f"{http}/api/streams/nosuchstream/ask?question=hi")
    assert status == 404 and error_code(body) == "unknown_stream"
    status, _, body = request("POST", f"{http}/api/streams", b"[1, 2", content_type="application/json")
    assert status == 400
    opened = json.loads(request("POST", f"{http}/api/streams", b"{}")[2])["stream"]
    assert request("DELETE", f"{http}/api/streams/{opened}")[0] == 200
    status, _, body = request("GET", f"{http}/api/streams/{opened}/frame")
    assert status == 404 and error_code(body) == "unknown_stream"  # a closed stream
    # an answer's event stream dropped after its first bytes: the server goes on serving
    stream = json.loads(request("POST", f"{http}/api/streams", b"{}")[2])["stream"]
    raw = urllib.request.urlopen(urllib.request.Request(
        f"{http}/api/streams/{stream}/ask?question=What%20is%20shown%3F",
        headers={"Authorization": f"Bearer {TOKEN}"}), timeout=60)
    raw.read(5)
    raw.close()
    status, _, body = request("GET", f"{http}/api/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    assert request("DELETE", f"{http}/api/streams/{stream}")[0] == 200
    spec = json.loads(request("GET", f"{http}/openapi.json")[2])
    assert "/api/streams/{stream}/ask" in spec["paths"] and spec["openapi"].startswith("3.")
    assert not list((cache_dir() / "uploads").glob("*.upload"))  # refused uploads are gone; fed ones too


def test_hostile_uploads_end_in_a_clear_error_or_a_stream_and_the_server_serves_on(web):
    """Mutants of the speech clip (``test_fuzz_media``'s) uploaded to the server itself."""
    import random

    from test_fuzz_media import KINDS, mutant

    http, address, server = web
    data, rng = SPEECH.read_bytes(), random.Random(7)
    outcomes = []
    for i in range(16):
        status, _, body = request("POST", f"{http}/api/upload?name=mutant-{i}.mp4", mutant(data, rng, KINDS[i % len(KINDS)]),
                                  content_type="video/mp4")
        assert status in (201, 400), (status, body)
        outcomes.append(status)
        if status == 400:
            assert f"mutant-{i}.mp4" in json.loads(body)["error"]["message"]
    assert 201 in outcomes and 400 in outcomes
    with Client(address, token=TOKEN, timeout=60) as client:  # a close writes what was fed and saves it
        stream = client.open_stream()  # an honest stream beside them works
        client.send_frame(stream, Frame(np.zeros((72, 128, 3), np.uint8), 0.0, 0), lossless=True)
        assert client.ask(stream, "What is shown?")["answer"]
        client.close_stream(stream)
        for listed in client.list_streams():
            client.close_stream(listed["stream"])
    assert "Traceback" not in server.log()
