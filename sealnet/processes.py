"""Child processes for the demo, the benchmark and the attack suite: started with a log file, stopped politely."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

DEMO_MODEL_ID = "mnist-cnn-generator"  # the bundle `sealnet demo` and `sealnet attack --demo` build
SEALED_HEAD_DEMO_MODEL_ID = "mnist-sealed-head"  # the same with --method sealed-head


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A TCP port free on loopback right now (the caller binds it soon after), never one this process was given
    before: the kernel may offer a just-released port again, and two services asked for ports in a row (Triton's
    HTTP and metrics ports) must not get the same one."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def sealnet_command(*args: str) -> list[str]:
    """`sealnet ARGS` run by this interpreter, so children use the same environment."""
    return [sys.executable, "-m", "sealnet", *args]


def start_logged(cmd: list[str], log_path: Path) -> subprocess.Popen:
    """Start `cmd` with stdout and stderr going to `log_path`."""
    with open(log_path, "wb") as log:  # the child keeps its own descriptor
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)


def stop_all(procs: list[subprocess.Popen], timeout: float = 10) -> None:
    """SIGTERM every process still running, then SIGKILL those that do not exit within `timeout`."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
