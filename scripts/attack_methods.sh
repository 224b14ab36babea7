#!/usr/bin/env bash
# Attack suite (model attacks) against the MNIST passport V1 and DSN bundles (docs/security.md).
# Needs runs/passport/v1.pt (docs/passport.md) and runs/serial/dsn-acme.pt + owner.key (docs/serial.md).
set -euo pipefail
cd "$(dirname "$0")/.."
W=runs/method-attacks; rm -rf $W; mkdir -p $W
S="./dev sealnet"
$S license keygen $W/owner.key >/dev/null
$S keystore init $W/keystore >/dev/null
$S export runs/passport/v1.pt $W/passport-bundle --owner-key $W/owner.key --keystore-dir $W/keystore --model-id mnist-passport
$S export runs/serial/dsn-acme.pt $W/dsn-bundle --owner-key runs/serial/owner.key --keystore-dir $W/keystore --model-id mnist-dsn
SN=$(python3 -c "import json;print(json.load(open('$W/dsn-bundle/manifest.json'))['serial_number'])")
$S license issue --owner-key $W/owner.key --customer tester --model mnist-passport --serial SN-T --out $W/passport.license
$S license issue --owner-key runs/serial/owner.key --customer acme --model mnist-dsn --serial $SN --out $W/dsn.license
for m in passport dsn; do
  $S enclave --bundle $W/$m-bundle --keystore-dir $W/keystore --listen unix:/tmp/sn-att-$m.sock > $W/$m-enclave.log 2>&1 &
  echo $! > $W/$m.pid
done
sleep 8
for m in passport dsn; do
  $S attack --suite model --bundle $W/$m-bundle --enclave unix:/tmp/sn-att-$m.sock --license-file $W/$m.license --out $W/$m-report 2>$W/$m-attack.err | tail -20 || true
done
kill $(cat $W/passport.pid) $(cat $W/dsn.pid) || true
