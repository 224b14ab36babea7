"""Which keystore backend to open, and the command-line options that choose it (`sealnet export`,
`sealnet enclave`). Apart from the backends so that each backend imports only the interface
(enclave_sim/keystore.py) and this factory alone knows them all."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sealnet.enclave_sim.keystore import EmbeddedKeystore, Keystore, KeystoreError

KEYSTORE_BACKENDS = ("embedded", "tpm")


@dataclass(frozen=True)
class KeystoreSpec:
    """Which keystore to open: `embedded` (root key in `directory`, or $SEALNET_ROOT_KEY when None) or `tpm`
    (a TPM 2.0 reached through a TCTI string such as "swtpm:host=127.0.0.1,port=2321")."""

    backend: str = "embedded"
    directory: Path | None = None
    tcti: str | None = None

    def open(self) -> Keystore:
        if self.backend == "embedded":
            return EmbeddedKeystore.open(self.directory)
        if self.backend == "tpm":
            if not self.tcti:
                raise KeystoreError("--keystore tpm needs --tpm TCTI (e.g. swtpm:host=127.0.0.1,port=2321)")
            from sealnet.enclave_sim.tpm import TpmKeystore

            return TpmKeystore(self.tcti)
        raise KeystoreError(f"unknown keystore backend {self.backend!r}; choose one of {', '.join(KEYSTORE_BACKENDS)}")


def add_keystore_arguments(parser) -> None:
    """The --keystore / --keystore-dir / --tpm options shared by `sealnet export` and `sealnet enclave`."""
    parser.add_argument("--keystore", choices=KEYSTORE_BACKENDS, default="embedded", help="keystore backend")
    parser.add_argument("--keystore-dir", type=Path,
                        help="embedded keystore directory (sealnet keystore init); default: $SEALNET_ROOT_KEY")
    parser.add_argument("--tpm", metavar="TCTI", help="TPM for --keystore tpm, e.g. swtpm:host=127.0.0.1,port=2321")


def keystore_spec(args) -> KeystoreSpec:
    """The KeystoreSpec named by the options of add_keystore_arguments."""
    return KeystoreSpec(args.keystore, args.keystore_dir, args.tpm)
