"""The grammars of the strings a spec holds: URIs, Kubernetes quantities, image references, URLs.

Why one module for both checks: the CLI, `leanserve run` and the operator validate with the
Python functions below (through the pydantic models), and the CRD carries the same grammar as an
OpenAPI ``pattern`` plus CEL rules, so that `kubectl apply` refuses what the schema can say. The
patterns use only what both RE2 (Go, the API server) and Python's ``re`` read the same way: no
look-arounds, no back-references. Each Python check refuses at least what its pattern refuses;
tests hold the two together.

Every refusal is a ValueError whose message says what is wrong and what is allowed; pydantic puts
the field's path in front of it.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

# --------------------------------------------------------------------------------------------
# names

DNS_1123_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
DNS_1123_SUBDOMAIN = rf"{DNS_1123_LABEL}(\.{DNS_1123_LABEL})*"
DNS_1123_LABEL_PATTERN = rf"^{DNS_1123_LABEL}$"
"""A namespace's name."""
DNS_1035_LABEL = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
"""metadata.name: it names a Service (DNS-1035: starts with a letter)."""
SECRET_NAME = rf"^({DNS_1123_SUBDOMAIN})?$"
"""A Secret's name (DNS-1123 subdomain), or empty for none."""
PY_IDENTIFIER = r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*"
S3_BUCKET = r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]"

MAX_URI = 1024
MAX_IMAGE = 512
MAX_URL = 2048

# --------------------------------------------------------------------------------------------
# URIs (DESIGN.md section 2)

URI_SCHEMES = ("file", "pvc", "s3", "package")
URI_ALLOWED = ("file:///ABSOLUTE/PATH, pvc://CLAIM/PATH, package://PYTHON_PACKAGE/PATH, "
               "or a relative path (one machine only)")
S3_UNSUPPORTED = "s3:// is not supported yet; use pvc:// or file://"
S3_SUPPORTED = False
"""Flip when something fills LEANSERVE_S3_ROOT in the Job (and boto3 is a dependency); the
parsing of s3://BUCKET/PATH below stays so that it only needs this switch."""

_PATH_CHARS = r"[^\\]"
URI_PATTERN = (
    "^("
    rf"file:///{_PATH_CHARS}+"
    rf"|pvc://{DNS_1123_SUBDOMAIN}(/{_PATH_CHARS}*)?"
    rf"|s3://{S3_BUCKET}(/{_PATH_CHARS}*)?"
    rf"|package://{PY_IDENTIFIER}(/{_PATH_CHARS}*)?"
    r"|[^/:\\][^:\\]*"
    ")$"
)
"""The CRD's pattern for a spec URI: one of the schemes with its parts, or a relative path (no
':', no leading '/'). `..` segments and percent-encoded separators are refused by CEL rules."""
OPTIONAL_URI_PATTERN = URI_PATTERN.replace("^(", "^(|", 1)

DOTDOT_CEL = "!self.matches('(^|/)[.][.](/|$)')"
ENCODED_CEL = "!self.matches('%(2[eEfF]|5[cC]|25)')"
URI_CEL = [
    {"rule": DOTDOT_CEL, "message": "'..' segments are refused"},
    {"rule": ENCODED_CEL,
     "message": "percent-encoded '.', '/', '\\' or '%' are refused (%2e %2f %5c %25)"},
]
_ENCODED = re.compile(r"%(2[eEfF]|5[cC]|25)")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class UriParts:
    """A spec URI split up: scheme ("" for a relative path), root (claim, bucket or package;
    "" for file:// and relative paths) and path (absolute for file://, else relative, no
    leading '/')."""

    scheme: str
    root: str
    path: str


def split_uri(uri: str) -> UriParts:
    """Parse a spec URI by its scheme; ValueError says what is wrong and what is allowed.

    Refuses `..` in every form (plain, percent-encoded, behind backslashes), control
    characters, unknown schemes, absolute paths without file://, and roots that are not a
    claim (DNS-1123 subdomain), a bucket or a Python package. Does not refuse s3:// (see
    ``check_uri``).
    """
    if not uri:
        raise ValueError("must not be empty (allowed: " + URI_ALLOWED + ")")
    if len(uri) > MAX_URI:
        raise ValueError(f"is too long (allowed: at most {MAX_URI} characters)")
    if _CONTROL.search(uri):
        raise ValueError(f"{uri!r} contains a control character (allowed: {URI_ALLOWED})")
    if "\\" in uri:
        raise ValueError(f"{uri!r} contains a backslash (allowed: '/' separators only)")
    if _ENCODED.search(uri):
        raise ValueError(f"{uri!r} contains a percent-encoded '.', '/', '\\' or '%' "
                         "(not allowed: write the path plainly)")
    decoded = uri
    for _ in range(4):  # whatever decodes to '..' is refused too
        decoded = unquote(decoded)
    if ".." in decoded.replace("\\", "/").split("/"):
        raise ValueError(f"{uri!r} contains a '..' segment (not allowed; use a path "
                         "without '..')")
    scheme, sep, rest = uri.partition("://")
    if not sep:
        if uri.startswith("/"):
            raise ValueError(f"{uri!r} is an absolute path without a scheme (allowed: "
                             f"file://{uri})")
        if ":" in uri:
            raise ValueError(f"{uri!r} has an unknown scheme or a ':' in a relative path "
                             f"(allowed: {URI_ALLOWED})")
        return UriParts("", "", uri)
    if scheme not in URI_SCHEMES:
        raise ValueError(f"{uri!r}: scheme {scheme!r} is not allowed (allowed: {URI_ALLOWED})")
    if scheme == "file":
        if not rest.startswith("/") or not rest.strip("/"):
            raise ValueError(f"{uri!r} is not file:///ABSOLUTE/PATH (file:// takes no host; "
                             "three slashes, then the path)")
        return UriParts("file", "", rest)
    root, _, path = rest.partition("/")
    if not root:
        what = {"pvc": "claim", "s3": "bucket", "package": "package"}[scheme]
        raise ValueError(f"{uri!r} has no {what} (allowed: {scheme}://{what.upper()}/PATH)")
    if scheme == "pvc" and not (len(root) <= 253 and re.fullmatch(DNS_1123_SUBDOMAIN, root)):
        raise ValueError(f"{uri!r}: claim {root!r} is not a PersistentVolumeClaim name "
                         "(allowed: a DNS-1123 subdomain: lowercase letters, digits, '-' "
                         "and '.', starting and ending with a letter or digit)")
    if scheme == "s3":
        problem = bucket_problem(root)
        if problem:
            raise ValueError(f"{uri!r}: bucket {root!r} {problem}")
    if scheme == "package" and not re.fullmatch(PY_IDENTIFIER, root):
        raise ValueError(f"{uri!r}: {root!r} is not a Python package name (allowed: "
                         "identifiers such as my_models or org.models)")
    return UriParts(scheme, root, path.strip("/"))


def bucket_problem(bucket: str) -> str | None:
    """Why an S3 bucket name is not valid (S3's naming rules), or None."""
    if not re.fullmatch(S3_BUCKET, bucket):
        return ("is not an S3 bucket name (allowed: 3 to 63 lowercase letters, digits, '.' "
                "and '-', starting and ending with a letter or digit)")
    if ".." in bucket or ".-" in bucket or "-." in bucket:
        return "is not an S3 bucket name (no '..', '.-' or '-.')"
    if re.fullmatch(r"[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+", bucket):
        return "is not an S3 bucket name (not an IP address)"
    return None


@contextlib.contextmanager
def s3_enabled() -> Iterator[None]:
    """Accept s3:// inside the block (tests of the code paths kept for when s3 works)."""
    global S3_SUPPORTED
    before, S3_SUPPORTED = S3_SUPPORTED, True
    try:
        yield
    finally:
        S3_SUPPORTED = before


def check_uri(uri: str) -> str:
    """A URI a spec may name (the pydantic validator)."""
    parts = split_uri(uri)
    if parts.scheme == "s3" and not S3_SUPPORTED:
        raise ValueError(f"{uri!r}: {S3_UNSUPPORTED}")
    return uri


def check_optional_uri(uri: str) -> str:
    return uri if uri == "" else check_uri(uri)


# --------------------------------------------------------------------------------------------
# Kubernetes quantities

QUANTITY_PATTERN = (r"^\+?([0-9]+(\.[0-9]*)?|\.[0-9]+)"
                    r"(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E|[eE][-+]?[0-9]+)?$")
"""Kubernetes' quantity grammar (resource.Quantity), without a minus sign: a resource amount is
never negative. Decimal exponents are integers, as the API server parses them."""
QUANTITY_ALLOWED = "a Kubernetes quantity such as 500m, 2, 1.5, 4Gi, 128Mi or 1e3"


def check_quantity(value: Any) -> int | str:
    """A resource amount: a non-negative integer or a quantity string."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{value!r} is not a quantity (allowed: {QUANTITY_ALLOWED})")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{value!r} is negative (allowed: {QUANTITY_ALLOWED})")
        return value
    if len(value) > 64 or not re.fullmatch(QUANTITY_PATTERN, value):
        raise ValueError(f"{value!r} is not a quantity (allowed: {QUANTITY_ALLOWED})")
    return value


RESOURCE_NAME = r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"


def check_resources(values: dict[str, Any]) -> dict[str, Any]:
    for key in values:
        if len(key) > 253 or not re.fullmatch(RESOURCE_NAME, key):
            raise ValueError(f"{key!r} is not a resource name (allowed: e.g. cpu, memory, "
                             "nvidia.com/gpu)")
    return values


# --------------------------------------------------------------------------------------------
# labels (nodeSelector) and taints (tolerations)

_LABEL_NAME = r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]"
LABEL_VALUE_PATTERN = rf"^({_LABEL_NAME})?$"
"""A label value: empty, or up to 63 letters, digits, '-', '_' and '.', alphanumeric at both
ends."""
LABEL_ALLOWED = ("a label key [PREFIX/]NAME: PREFIX a DNS-1123 subdomain of at most 253 "
                 "characters, NAME at most 63 letters, digits, '-', '_' and '.', starting and "
                 "ending with a letter or digit")


def label_key_problem(key: str) -> str | None:
    prefix, slash, name = key.rpartition("/")
    if slash and not (prefix and len(prefix) <= 253 and re.fullmatch(DNS_1123_SUBDOMAIN, prefix)):
        return f"{key!r} is not {LABEL_ALLOWED}"
    if not (name and len(name) <= 63 and re.fullmatch(_LABEL_NAME, name)):
        return f"{key!r} is not {LABEL_ALLOWED}"
    return None


def check_label_keys(labels: dict[str, str]) -> dict[str, str]:
    for key in labels:
        problem = label_key_problem(key)
        if problem:
            raise ValueError(problem)
    return labels


# --------------------------------------------------------------------------------------------
# image references (the distribution reference grammar)

_DOMAIN_PART = r"([a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"({_DOMAIN_PART}(\.{_DOMAIN_PART})*|\[[0-9a-fA-F:]+\])(:[0-9]+)?"
_PATH_PART = r"[a-z0-9]+(([._]|__|-+)[a-z0-9]+)*"
_TAG = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*([-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
IMAGE_PATTERN = rf"^({_DOMAIN}/)?{_PATH_PART}(/{_PATH_PART})*(:{_TAG})?(@{_DIGEST})?$"
IMAGE_ALLOWED = "[REGISTRY[:PORT]/]NAME[:TAG][@DIGEST], e.g. nvcr.io/nvidia/tritonserver:24.08-py3"


def check_image(value: str) -> str:
    if len(value) > MAX_IMAGE or not re.fullmatch(IMAGE_PATTERN, value):
        raise ValueError(f"{value!r} is not an image reference (allowed: {IMAGE_ALLOWED})")
    return value


# --------------------------------------------------------------------------------------------
# URLs

_HOST = (r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?"
         r"(\.[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?)*)")
HTTP_URL_PATTERN = rf"^https?://{_HOST}(:[0-9]{{1,5}})?(/[^\s?#\\]*)?$"
"""http(s)://HOST[:PORT][/PATH]: no credentials, query or fragment."""


def check_http_url(value: str) -> str:
    allowed = "http://HOST[:PORT][/PATH] or https://..., e.g. http://prometheus:9090"
    scheme = value.partition("://")[0] if "://" in value else ""
    if scheme not in ("http", "https"):
        got = f"scheme {scheme!r}" if scheme else "no scheme"
        raise ValueError(f"{value!r} has {got} (allowed: {allowed})")
    if len(value) > MAX_URL or not re.fullmatch(HTTP_URL_PATTERN, value):
        raise ValueError(f"{value!r} is not a plain URL (allowed: {allowed}; no user:password@, "
                         "query or fragment)")
    port = re.match(r"^https?://[^/]*:([0-9]+)(/|$)", value)
    if port and not 1 <= int(port.group(1)) <= 65535:
        raise ValueError(f"{value!r}: port {port.group(1)} is out of range (allowed: 1-65535)")
    return value
