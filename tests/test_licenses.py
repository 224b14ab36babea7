import time

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sealnet.licenses import LicenseError, inspect_license, issue_license, verify_license, write_owner_key


@pytest.fixture
def owner():
    return Ed25519PrivateKey.generate()


def _issue(owner, **kw):
    args = {"customer_id": "acme", "model_id": "m1", "serial_number": "SN-1", "valid_seconds": 60} | kw
    return issue_license(owner, **args)


def test_valid_license_round_trips(owner):
    lic = verify_license(_issue(owner), owner.public_key(), model_id="m1")
    assert (lic.customer_id, lic.model_id, lic.serial_number) == ("acme", "m1", "SN-1")
    assert lic.expires_at - lic.not_before == 60


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda o: _issue(o, model_id="m2"), "is for model 'm2'"),
        (lambda o: _issue(o, not_before=int(time.time()) - 120), "expired"),
        (lambda o: _issue(o, not_before=int(time.time()) + 600), "not valid yet"),
        (lambda o: _issue(Ed25519PrivateKey.generate()), "bad signature"),
        (lambda o: "garbage", "not a sealnet token"),
        (lambda o: "", "empty"),
        (lambda o: "sn1.!!!.???", "base64url"),
        (lambda o: "sn1." + "A" * 5000, "longer than"),
    ],
)
def test_invalid_licenses_are_refused_with_a_reason(owner, make, reason):
    with pytest.raises(LicenseError, match=reason):
        verify_license(make(owner), owner.public_key(), model_id="m1")


def test_tampered_payload_fails_the_signature(owner):
    import base64
    import json

    prefix, payload, sig = _issue(owner).split(".")
    fields = json.loads(base64.urlsafe_b64decode(payload + "=="))
    fields["expires_at"] += 10**8
    forged = base64.urlsafe_b64encode(json.dumps(fields).encode()).rstrip(b"=").decode()
    with pytest.raises(LicenseError, match="bad signature"):
        verify_license(f"{prefix}.{forged}.{sig}", owner.public_key(), model_id="m1")


def test_inspect_decodes_without_trusting(owner):
    lic = inspect_license(_issue(Ed25519PrivateKey.generate(), customer_id="zed"))
    assert lic.customer_id == "zed"


def test_owner_key_file_is_private_and_never_overwritten(tmp_path):
    key, pub = write_owner_key(tmp_path / "owner.key")
    assert key.stat().st_mode & 0o777 == 0o600 and pub.read_text().startswith("-----BEGIN PUBLIC KEY")
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        write_owner_key(tmp_path / "owner.key")
