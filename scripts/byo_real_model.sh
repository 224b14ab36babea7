#!/usr/bin/env bash
# A real architecture nobody in this project wrote (torchvision's ResNet-18, random init) through
# `sealnet inspect`, `protect sealed-head`, `export` and `serve` on the CPU, each step timed: docs/byo.md.
#
#   scripts/byo_real_model.sh [WORKDIR]       (default runs/byo-resnet18; about 10 minutes on 2 cores)
#
# torchvision's PyPI wheel does not load beside the project's CPU torch 2.13.0, so this sets up its own
# virtualenv, .byo-venv/, with torch 2.14.1 + torchvision 0.29.1 (CUDA builds, run on the CPU; about 5.5 GB)
# and timm (whose resnet18 is listed too, as `--model timm:resnet18`).
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-runs/byo-resnet18}
venv=.byo-venv
if [ ! -f "$venv/.installed" ]; then
  echo "[byo] setting up $venv (torch 2.14.1 + torchvision 0.29.1 + sealnet[train])" >&2
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" >&2 || true
  "$venv/bin/python" -m pip install -q "torch==2.14.1" "torchvision==0.29.1" 2>&1 | grep -v "is ignored" >&2 || true
  "$venv/bin/python" -m pip install -q -e ".[train]" timm 2>&1 | grep -v "is ignored" >&2 || true
  "$venv/bin/python" -c "import torchvision, timm, sealnet" || { echo "[byo] set-up failed (see pip above)" >&2; exit 1; }
  touch "$venv/.installed"
fi
sn="$venv/bin/sealnet"
model=examples/byo/resnet18_torchvision.py:resnet18
rm -rf "$work" && mkdir -p "$work"
timings="$work/timings.txt"
step() {  # step NAME COMMAND...: run it, print and record its wall time
  local name=$1; shift
  local start=$SECONDS
  "$@"
  echo "$name $((SECONDS - start)) s" | tee -a "$timings"
}
step data "$venv/bin/python" scripts/byo_example_data.py --out "$work"
data=(--data "imagefolder:$work/mnist-png" --image-size 32)
step inspect "$sn" inspect --model "$model" "${data[@]}" --split-at layer3 | tee "$work/inspect.txt"
"$sn" inspect --model timm:resnet18 "${data[@]}" --split-at layer3 | tee "$work/inspect-timm.txt"
step protect "$sn" protect sealed-head --model "$model" "${data[@]}" --split-at layer3 --public-data digits \
  --public-epochs 3 --epochs 3 --head-epochs 6 --max-drop 0.05 --out "$work/protected.pt" 2>&1 \
  | grep -v "epoch [0-9]" | tee "$work/protect.txt"
"$sn" license keygen "$work/owner.key" >/dev/null
"$sn" keystore init "$work/keystore" >/dev/null
step export "$sn" export "$work/protected.pt" "$work/bundle" --owner-key "$work/owner.key" \
  --keystore-dir "$work/keystore" --model-id resnet18-byo
"$sn" license issue --owner-key "$work/owner.key" --customer acme --model resnet18-byo --serial SN-1 \
  --out "$work/acme.license" >/dev/null
sock=$(mktemp -d /tmp/sn-byo-XXXX)/enclave.sock
"$sn" enclave --bundle "$work/bundle" --keystore-dir "$work/keystore" --listen "unix:$sock" \
  >"$work/enclave.log" 2>&1 &
enclave=$!
port=$("$venv/bin/python" -c "from sealnet.processes import free_port; print(free_port())")
"$sn" serve --bundle "$work/bundle" --enclave "unix:$sock" --listen "127.0.0.1:$port" >"$work/serve.log" 2>&1 &
server=$!
trap 'kill $server $enclave 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do grep -q "KServe v2 endpoint" "$work/serve.log" 2>/dev/null && break; sleep 0.5; done
step serve "$sn" infer --server "127.0.0.1:$port" --model resnet18-byo --license-file "$work/acme.license" \
  "${data[@]}" --count 1000 --batch-size 100 | tee "$work/infer.txt"
echo "[byo] done: $work/ (timings.txt, inspect.txt, protect.txt, infer.txt)"
