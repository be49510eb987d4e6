"""Where a model's files live in the cluster, and where its Job writes.

URIs (DESIGN.md section 2) name stores; the Job and tritonserver see them as mounts (pvc://) or
read them remotely (s3://). This module is pure: it only turns URIs into other URIs and paths.
"""

from __future__ import annotations

import enum
import posixpath
from dataclasses import dataclass

from leanserve.api.spec import CompressedModelSpec
from leanserve.operator.constants import STORE_ROOT

CLUSTER_SCHEMES = "pvc://CLAIM/PATH, s3://BUCKET/PATH, package://PACKAGE/PATH, file:///PATH"


class Scheme(str, enum.Enum):
    PVC = "pvc"
    S3 = "s3"
    PACKAGE = "package"
    FILE = "file"
    RELATIVE = ""


@dataclass(frozen=True)
class StoreRef:
    scheme: Scheme
    root: str  # the claim, bucket or package ("" for file:// and relative paths)
    path: str  # inside the root, no leading slash (absolute for file://)

    @property
    def uri(self) -> str:
        if self.scheme is Scheme.RELATIVE:
            return self.path
        if self.scheme is Scheme.FILE:
            return f"file://{self.path}"
        return f"{self.scheme.value}://{self.root}/{self.path}".rstrip("/")

    def join(self, *parts: str) -> StoreRef:
        path = posixpath.join(self.path, *parts) if self.path else posixpath.join(*parts)
        return StoreRef(self.scheme, self.root, path)

    @property
    def parent(self) -> StoreRef:
        return StoreRef(self.scheme, self.root, posixpath.dirname(self.path.rstrip("/")))


def parse_uri(uri: str) -> StoreRef:
    """Split a URI into scheme, root and path; `..` segments are refused by the caller."""
    for scheme in (Scheme.PVC, Scheme.S3, Scheme.PACKAGE):
        prefix = f"{scheme.value}://"
        if uri.startswith(prefix):
            root, _, path = uri[len(prefix):].partition("/")
            return StoreRef(scheme, root, path.strip("/"))
    if uri.startswith("file://"):
        return StoreRef(Scheme.FILE, "", "/" + uri[len("file://"):].lstrip("/"))
    return StoreRef(Scheme.RELATIVE, "", uri)


def cluster_errors(spec: CompressedModelSpec) -> list[str]:
    """What makes a valid spec unusable in a cluster, one line each (field: what, allowed)."""
    errors: list[str] = []
    fields = [("spec.model.uri", spec.model.uri), ("spec.data.uri", spec.data.uri)]
    if spec.artifacts.uri:
        fields.append(("spec.artifacts.uri", spec.artifacts.uri))
    for name, uri in fields:
        ref = parse_uri(uri)
        if ".." in uri.split("/"):
            errors.append(f"{name}: '..' segments are refused (got {uri!r})")
        elif ref.scheme is Scheme.RELATIVE:
            errors.append(f"{name}: a relative path works on one machine only (got {uri!r}; "
                          f"allowed in a cluster: {CLUSTER_SCHEMES})")
        elif ref.scheme in (Scheme.PVC, Scheme.S3) and not ref.root:
            errors.append(f"{name}: {ref.scheme.value}:// needs a claim or bucket (got {uri!r})")
    store = spec.artifacts.uri or spec.model.uri
    if not errors and parse_uri(store).scheme not in (Scheme.PVC, Scheme.S3):
        errors.append("spec.artifacts.uri: a cluster needs a store for compressed models when "
                      f"spec.model.uri is not on one (got {store!r}; allowed: pvc://CLAIM/PATH, "
                      "s3://BUCKET/PATH)")
    return errors


def artifacts_ref(name: str, spec: CompressedModelSpec, recipe: str) -> StoreRef:
    """The directory a Job writes: spec.artifacts.uri/<name>/<hash>, else beside the model."""
    if spec.artifacts.uri:
        return parse_uri(spec.artifacts.uri).join(name, recipe)
    return parse_uri(spec.model.uri).parent.join("leanserve", name, recipe)


def claim_mount(claim: str) -> str:
    return posixpath.join(STORE_ROOT, claim)


def in_pod(uri: str) -> str:
    """The URI a pod uses: pvc:// becomes the file:// path where the claim is mounted."""
    ref = parse_uri(uri)
    if ref.scheme is Scheme.PVC:
        return "file://" + posixpath.join(claim_mount(ref.root), ref.path)
    return uri


def claims_of(*uris: str) -> list[str]:
    """The distinct PersistentVolumeClaims the URIs live on, in first-seen order."""
    seen: list[str] = []
    for uri in uris:
        ref = parse_uri(uri)
        if ref.scheme is Scheme.PVC and ref.root not in seen:
            seen.append(ref.root)
    return seen


def uses_s3(*uris: str) -> bool:
    return any(parse_uri(u).scheme is Scheme.S3 for u in uris)
