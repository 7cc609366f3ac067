"""``vstream serve`` in a subprocess, for the server tests.

    server = ServerProcess(tmp_path / "main", "--model", folder, "--token", "secret")
    server.wait_ready()          # the address it bound (port * picks a free port)
    ...
    server.stop()                # SIGTERM: it saves its streams; returns the exit code
    server.kill()                # whatever state it is in; fixtures call it in teardown

The server's stdout and stderr go to files in its folder (a pipe nobody reads could
fill and block it); ``log()`` reads the stderr one. Torch gets one thread, as the test
process does, so answers computed on both sides are the same to the bit.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class ServerProcess:
    """Start ``vstream serve --bind tcp://127.0.0.1:* --threads 1 FLAGS`` with its
    output in ``folder`` and its saved streams in ``state_dir`` (default ``folder/state``)."""

    def __init__(self, folder: Path, *flags: str, state_dir: Path | None = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.state_dir = Path(state_dir) if state_dir is not None else self.folder / "state"
        self.address: str | None = None
        self._out, self._err = self.folder / "server.out", self.folder / "server.log"
        command = [sys.executable, "-m", "vstream", "serve", "--bind", "tcp://127.0.0.1:*", "--threads", "1",
                   "--state-dir", str(self.state_dir), *flags]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
        env.pop("VSTREAM_TOKEN", None)  # the flags say which servers want a token
        with open(self._out, "w") as out, open(self._err, "w") as err:
            self.process = subprocess.Popen(command, stdout=out, stderr=err, stdin=subprocess.DEVNULL, cwd=ROOT,
                                            env=env)

    def wait_ready(self, timeout: float = 60.0) -> str:
        """The address once the server listens; fails with its log if it exits first."""
        deadline = time.monotonic() + timeout
        while self.address is None:
            found = re.search(r"listening on (\S+)", self._out.read_text())
            if found:
                self.address = found.group(1)
            elif self.process.poll() is not None:
                raise RuntimeError(f"vstream serve exited with {self.process.returncode}:\n{self.log()}")
            elif time.monotonic() > deadline:
                raise TimeoutError(f"vstream serve not ready after {timeout} s:\n{self.log()}")
            else:
                time.sleep(0.05)
        return self.address

    def log(self) -> str:
        return self._err.read_text()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send ``sig`` and wait for the exit code (killed after ``timeout``)."""
        self.signal(sig)
        return self.wait(timeout)

    def signal(self, sig: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        """The exit code; the process is killed if it has not exited after ``timeout``."""
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
