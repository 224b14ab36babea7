"""What the protected model reads from a Triton request and how its refusals reach the client (no Triton import:
the rules are tested without a server).

Credentials: tritonserver runs with `--grpc-header-forward-pattern` / `--http-header-forward-pattern` matching
`sealnet-license` and the client-identity header (default `x-forwarded-for`), so both arrive as request
parameters. A client can also set request parameters itself, so a name that appears twice (a trusted proxy's
header plus the client's own parameter) is refused rather than guessed. The identity header is read only when
trusted proxies are configured (runtime/identity.py: Triton does not tell its backends the peer's address);
otherwise it is ignored and the end client is unknown ('').

Errors: Triton has no UNAUTHENTICATED, PERMISSION_DENIED or RESOURCE_EXHAUSTED, so the sealnet status is the
first word of the message (`PERMISSION_DENIED: license: ...`; behind an ensemble Triton puts
`in ensemble 'MODEL', ` before it: `sealnet_status` reads either) and the Triton code is the nearest one
(`CODE_MAP`): license refusals -> INVALID_ARG (gRPC INVALID_ARGUMENT, HTTP 400); lockout, quota and the
trusted module down -> UNAVAILABLE (gRPC UNAVAILABLE, HTTP 503: retry later).
"""

from __future__ import annotations

import json
import re

import grpc

from sealnet.runtime.errors import RequestError, ServingError
from sealnet.runtime.identity import TrustedProxies

LICENSE_KEY = "sealnet-license"
DEFAULT_CLIENT_HEADER = "x-forwarded-for"

CODE_MAP = {
    grpc.StatusCode.INVALID_ARGUMENT: "INVALID_ARG",
    grpc.StatusCode.UNAUTHENTICATED: "INVALID_ARG",
    grpc.StatusCode.PERMISSION_DENIED: "INVALID_ARG",
    grpc.StatusCode.FAILED_PRECONDITION: "INVALID_ARG",
    grpc.StatusCode.NOT_FOUND: "NOT_FOUND",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "UNAVAILABLE",
    grpc.StatusCode.UNAVAILABLE: "UNAVAILABLE",
    grpc.StatusCode.DEADLINE_EXCEEDED: "UNAVAILABLE",
}

# label values of sealnet_refusals_total: a fixed vocabulary, never derived from what the client sent
REASONS = ("no_license", "license_refused", "revoked", "lockout", "quota", "module_unavailable", "invalid_input",
           "internal")


def forward_pattern(client_header: str = DEFAULT_CLIENT_HEADER) -> str:
    """The header names tritonserver must forward as request parameters (its --*-header-forward-pattern)."""
    return f"^({re.escape(LICENSE_KEY)}|{re.escape(client_header.lower())})$"


def credentials(parameters: str, client_header: str = DEFAULT_CLIENT_HEADER,
                proxies: TrustedProxies | None = None) -> tuple[str, str]:
    """(license token, end-client identity) from a request's parameters JSON; RequestError if either is
    given twice or is not a string, or the license is missing. The identity is '' unless `proxies` are
    configured (then: the right-most forwarded address that is not one of them)."""
    wanted = {LICENSE_KEY: "", client_header.lower(): ""}
    seen: set[str] = set()
    bad = grpc.StatusCode.INVALID_ARGUMENT
    try:
        pairs = json.loads(parameters or "{}", object_pairs_hook=list)
    except ValueError:
        raise RequestError(bad, "parameters: not valid JSON") from None
    for key, value in pairs if isinstance(pairs, list) else []:
        name = key.lower()
        if name not in wanted:
            continue
        if name in seen:
            raise RequestError(bad, f"header '{name}': given more than once (as a header and as a request "
                                    "parameter?); send it once")
        if not isinstance(value, str):
            raise RequestError(bad, f"header '{name}': must be a string")
        seen.add(name)
        wanted[name] = value.strip()
    token = wanted[LICENSE_KEY]
    if not token:
        raise RequestError(grpc.StatusCode.UNAUTHENTICATED, f"header '{LICENSE_KEY}': missing; send your license "
                           "token as a request header")
    return token, (proxies or TrustedProxies()).client(None, wanted[client_header.lower()])


def refusal_reason(error: ServingError) -> str:
    """The metric label for a refusal, from its status and the module's message prefix (never its content)."""
    text = str(error)
    code = error.code
    if code == grpc.StatusCode.UNAUTHENTICATED and text.startswith(f"header '{LICENSE_KEY}'"):
        return "no_license"
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return "quota" if text.startswith("quota") else "lockout"
    if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
        return "revoked" if text.startswith("revoked") else "license_refused"
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return "module_unavailable"
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return "invalid_input"
    return "internal"


_ENSEMBLE_PREFIX = re.compile(r"^in ensemble '[^']*', ")


def without_ensemble_prefix(message: str) -> str:
    """A Triton error message without the `in ensemble 'M', ` Triton puts before a composing model's error."""
    return _ENSEMBLE_PREFIX.sub("", message or "")


def sealnet_status(message: str) -> str:
    """The sealnet status a Triton error message starts with (after an ensemble's prefix), else ''."""
    word = without_ensemble_prefix(message).split(":", 1)[0]
    return word if word in grpc.StatusCode.__members__ else ""


def error_message(error: ServingError) -> str:
    """What the client reads: the sealnet status first (Triton's own codes cannot carry it)."""
    return f"{error.code.name}: {error}"
