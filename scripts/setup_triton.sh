#!/usr/bin/env bash
# Installs what `sealnet serve --engine triton` needs into .triton/ (idempotent; ./dev calls it):
#   .triton/server  the nvidia-pytriton wheel, unpacked with --no-deps: only its tritonserver binary, libraries and
#                   Python backend are used, not its Python API (whose numpy < 2 and tritonclient pins would fight
#                   sealnet's own dependencies);
#   .triton/venv    the Python backend's virtualenv, made from /usr/bin/python3.11 because the backend's stub
#                   embeds that interpreter's libpython, with sealnet/runtime/triton/requirements-backend.txt and this
#                   checkout on its path (a .pth file).
# Exits 0 without installing (and says why) where Triton cannot run: not x86_64 Linux, or no python3.11 that
# the stub can embed; the Triton tests then skip with that reason.
set -euo pipefail
cd "$(dirname "$0")/.."
home=${SEALNET_TRITON_HOME:-.triton}
PYTRITON="nvidia-pytriton==0.7.0"
sys_py=/usr/bin/python3.11
if [ "$(uname -sm)" != "Linux x86_64" ]; then
  echo "[triton] skipped: the nvidia-pytriton wheel is for Linux x86_64 (this is $(uname -sm))" >&2; exit 0
fi
if [ ! -x "$sys_py" ] || ! "$sys_py" -c "import venv, ensurepip" 2>/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[triton] installing Debian's python3.11 and python3.11-venv (the backend stub embeds libpython3.11)" >&2
    apt-get install -y -q python3.11 python3.11-venv libpython3.11 >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q python3.11 python3.11-venv libpython3.11 \
           >/dev/null 2>&1; } || true
  fi
  if [ ! -x "$sys_py" ] || ! "$sys_py" -c "import venv, ensurepip" 2>/dev/null; then
    echo "[triton] skipped: needs $sys_py with venv (Debian: apt-get install python3.11-venv)" >&2; exit 0
  fi
fi
want=$( (echo "$PYTRITON"; cat sealnet/runtime/triton/requirements-backend.txt; "$sys_py" -V; pwd) | sha256sum | cut -d' ' -f1)
stamp="$home/.installed"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
echo "[triton] setting up $home (first run only): tritonserver from $PYTRITON and the backend virtualenv" >&2
rm -rf "$home/venv"
mkdir -p "$home"
"$sys_py" -m venv "$home/venv"
"$home/venv/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" >&2 || true
"$home/venv/bin/python" -m pip install -q -r sealnet/runtime/triton/requirements-backend.txt 2>&1 | grep -v "is ignored" >&2 || true
site=$("$home/venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
pwd > "$site/sealnet-checkout.pth"
if [ ! -x "$home/server/pytriton/tritonserver/bin/tritonserver" ]; then
  rm -rf "$home/server"
  "$home/venv/bin/python" -m pip install -q --no-deps --target "$home/server" "$PYTRITON" 2>&1 \
    | grep -v "is ignored" >&2 || true
fi
tt="$home/server/pytriton/tritonserver"
minor=$("$sys_py" -c "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')")
cp "$tt/python_backend_stubs/$minor/triton_python_backend_stub" "$tt/backends/python/"
venv_py="$(cd "$home/venv" && pwd)/bin/python"
# from / so that the checkout is found through the .pth file, as the backend's stub finds it
(cd / && "$venv_py" -c "import numpy, onnxruntime, grpc, cryptography, sealnet.runtime.triton.repo, sealnet.runtime.server") \
  || { echo "[triton] set-up of $home/venv failed: see the pip messages above" >&2; exit 1; }
echo "$want" > "$stamp"
