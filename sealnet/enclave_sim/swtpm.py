"""A software TPM 2.0 (swtpm) on loopback, for tests and the demo of the `tpm` keystore backend.

`SwtpmProcess` starts `swtpm socket --tpm2` on two free loopback ports (the TSS "swtpm" TCTI reaches the
command channel on PORT and the control channel on PORT+1, so the two must be adjacent) with its state in a
directory (a private temporary one unless given), waits until it answers, and stops it on exit.
`python -m sealnet.enclave_sim.swtpm --state-dir D` runs one in the foreground and prints its TCTI string.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import IO

HOST = "127.0.0.1"


def swtpm_unavailable() -> str | None:
    """Why swtpm plus tpm2-pytss cannot be used on this machine, or None when they can."""
    if shutil.which("swtpm") is None:
        return "swtpm is not installed (apt-get install swtpm swtpm-tools)"
    try:
        from tpm2_pytss import TCTILdr
    except (ImportError, OSError) as exc:  # OSError: libtss2 itself is missing
        return f"tpm2-pytss cannot be imported ({exc}); pip install tpm2-pytss (needs libtss2-dev)"
    if not TCTILdr.is_available("swtpm"):
        return "the TSS swtpm TCTI (libtss2-tcti-swtpm.so) is not installed (apt-get install libtss2-dev)"
    return None


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def _free_port_pair() -> int:
    """A port P such that P and P+1 are both free on loopback right now (swtpm may still lose a race)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        if port < 65535 and _port_is_free(port + 1):
            return port
    raise RuntimeError("could not find two adjacent free loopback ports for swtpm")


def _accepts(port: int) -> bool:
    try:
        socket.create_connection((HOST, port), timeout=0.2).close()
    except OSError:
        return False
    return True


class SwtpmProcess:
    """A running swtpm; use as a context manager. `.tcti` is the string to give ESAPI / TpmKeystore."""

    def __init__(self, state_dir: Path | None = None, *, port: int | None = None, timeout: float = 10.0):
        self._given_state_dir = Path(state_dir) if state_dir is not None else None
        self._given_port = port
        self.timeout = timeout
        self.port = 0
        self.state_dir: Path | None = None
        self._tempdir: tempfile.TemporaryDirectory[str] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def tcti(self) -> str:
        """The TCTI string for tpm2-pytss (and tpm2-tools' -T / $TPM2TOOLS_TCTI)."""
        if self._proc is None:
            raise RuntimeError("swtpm is not running; call start() or use `with SwtpmProcess() as tpm:`")
        return f"swtpm:host={HOST},port={self.port}"

    def start(self) -> SwtpmProcess:
        """Start swtpm and wait until both its channels accept connections (at most `timeout` seconds)."""
        if shutil.which("swtpm") is None:
            raise RuntimeError("swtpm is not installed (apt-get install swtpm swtpm-tools)")
        if self._given_state_dir is None:
            self._tempdir = tempfile.TemporaryDirectory(prefix="sealnet-swtpm-")  # mkdtemp: mode 0700
            self.state_dir = Path(self._tempdir.name)
        else:
            self.state_dir = self._given_state_dir
            self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            mode = stat.S_IMODE(self.state_dir.stat().st_mode)
            if mode & 0o077:  # the state holds the TPM's seeds: whoever reads it can impersonate this TPM
                raise RuntimeError(
                    f"{self.state_dir} is accessible by others (mode {mode:o}); run chmod 700 {self.state_dir}"
                )
        # A port chosen here may be taken before swtpm binds it: retry with a fresh pair a few times.
        attempts = 1 if self._given_port is not None else 3
        error = ""
        for _ in range(attempts):
            self.port = self._given_port if self._given_port is not None else _free_port_pair()
            error = self._launch()
            if not error:
                return self
        self.stop()
        raise RuntimeError(error)

    def _launch(self) -> str:
        """Run swtpm once; return "" when it is ready, else why not (the process is then gone)."""
        self._log = tempfile.TemporaryFile(prefix="swtpm-", suffix=".log")  # closed by _terminate
        cmd = [
            "swtpm", "socket", "--tpm2",
            "--server", f"type=tcp,port={self.port},bindaddr={HOST}",
            "--ctrl", f"type=tcp,port={self.port + 1},bindaddr={HOST}",
            "--flags", "not-need-init,startup-clear",
            "--tpmstate", f"dir={self.state_dir}",
        ]
        self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                break
            # Someone else may listen on these ports: ready only if our process is still alive afterwards.
            if _accepts(self.port) and _accepts(self.port + 1) and self._proc.poll() is None:
                return ""
            time.sleep(0.02)
        exited = self._proc.poll()
        log = self._read_log()
        self._terminate()
        if exited is None:
            return f"swtpm did not accept connections on {HOST}:{self.port} within {self.timeout:g} s; log: {log}"
        return f"swtpm exited with status {exited} (ports {self.port}/{self.port + 1}); log: {log}"

    def _read_log(self) -> str:
        if self._log is None:
            return ""
        self._log.seek(0)
        return self._log.read()[-2000:].decode(errors="replace").strip() or "(empty)"

    def _terminate(self) -> None:
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.terminate()  # swtpm saves its state on SIGTERM
                try:
                    self._proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
            self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def wait(self) -> int:
        """Block until swtpm exits (foreground use); return its exit status."""
        if self._proc is None:
            raise RuntimeError("swtpm is not running")
        return self._proc.wait()

    def stop(self) -> None:
        """Stop swtpm and delete the state directory if it was a temporary one."""
        self._terminate()
        if self._tempdir is not None:
            self._tempdir.cleanup()
            self._tempdir = None

    def __enter__(self) -> SwtpmProcess:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """Run a software TPM in the foreground until Ctrl-C, printing the TCTI string to use with it."""
    parser = argparse.ArgumentParser(prog="python -m sealnet.enclave_sim.swtpm", description=main.__doc__)
    parser.add_argument("--state-dir", type=Path,
                        help="TPM state directory, kept across runs (default: a temporary one, deleted on exit)")
    parser.add_argument("--port", type=int, help="command port; the control port is PORT+1 (default: free ones)")
    args = parser.parse_args(argv)
    reason = swtpm_unavailable()
    if reason:
        print(f"error: {reason}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # run the finally below: stop swtpm, not orphan it
    tpm = SwtpmProcess(args.state_dir, port=args.port)
    try:
        tpm.start()
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        print(f"swtpm running, state in {tpm.state_dir}")
        print(f"TCTI: {tpm.tcti}")
        print(f"  e.g. --keystore tpm --tpm {tpm.tcti}   (tpm2-tools: export TPM2TOOLS_TCTI={tpm.tcti})", flush=True)
        return tpm.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        tpm.stop()


if __name__ == "__main__":
    sys.exit(main())
