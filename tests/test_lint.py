import shutil
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.skipif(shutil.which("ruff") is None and not (Path(sys.executable).parent / "ruff").exists(),
                    reason="ruff not installed (pip install -e '.[test]')")
def test_ruff_clean():
    root = Path(__file__).resolve().parent.parent
    ruff = Path(sys.executable).parent / "ruff"
    proc = subprocess.run([str(ruff) if ruff.exists() else "ruff", "check", str(root)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
