"""Least privilege: what a CompressedModel may make the operator do (settings.PolicySettings).

Whoever may create a CompressedModel would otherwise get the operator's rights: choose the image
it runs, tolerate every taint, mount any Secret of the namespace, and have the operator GET any
URL. Each check here is pure; ``refusals`` gives one line per refused field ("spec.FIELD: what,
allowed: ..."), and the planner turns them into condition Ready=False, reason Forbidden, with
nothing created. Secrets are the one input read from the cluster: the handler GETs each Secret a
spec names (its metadata only) and passes its labels in.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from leanserve.api.spec import CompressedModelSpec, Toleration
from leanserve.operator.builders import serving_image
from leanserve.operator.constants import Label
from leanserve.operator.settings import OperatorSettings

ALLOW_VALUE = "true"

# A Secret a spec names, as the handler found it: its labels, or None when it does not exist.
SecretLabels = Mapping[str, str] | None


def run_images(settings: OperatorSettings) -> tuple[str, ...]:
    """The operator's own images: always allowed."""
    return (settings.serving.image, settings.job.image)


def image_allowed(image: str, settings: OperatorSettings) -> bool:
    for entry in (*run_images(settings), *settings.policy.images):
        if image == entry or (entry.endswith("/") and image.startswith(entry)):
            return True
    return False


def _describe_images(settings: OperatorSettings) -> str:
    return ", ".join(dict.fromkeys((*run_images(settings), *settings.policy.images)))


def toleration_allowed(t: Toleration, allowed: Mapping[str, Any]) -> bool:
    """Whether ``t`` tolerates no more than ``allowed`` does (a missing field there is any)."""
    if allowed.get("key") and t.key != allowed["key"]:
        return False  # no key in t (every taint) is wider than one key
    if allowed.get("effect") and t.effect != allowed["effect"]:
        return False  # no effect in t (every effect) is wider than one effect
    every_value = allowed.get("operator") == "Exists" or allowed.get("value") is None
    if not every_value:
        return (t.operator or "Equal") == "Equal" and (t.value or "") == allowed["value"]
    return True


def _describe_toleration(t: Mapping[str, Any]) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in t.items() if v not in (None, "")) + "}"


def normal_url(url: str) -> str:
    return url.strip().rstrip("/")


def prometheus_url_allowed(url: str, settings: OperatorSettings) -> bool:
    return normal_url(url) in {normal_url(u) for u in settings.policy.prometheus_urls}


def prometheus_problem(url: str, settings: OperatorSettings) -> str | None:
    if prometheus_url_allowed(url, settings):
        return None
    return (f"spec.autoscaling.prometheusUrl: {url!r} is not in the operator's allowed "
            f"Prometheus URLs ({', '.join(settings.policy.prometheus_urls) or 'none'}); the "
            "operator sends no request to it")


def secret_refs(spec: CompressedModelSpec) -> list[tuple[str, str]]:
    """(field, Secret name) for every Secret the spec names."""
    refs = []
    if spec.artifacts.secret_name:
        refs.append(("spec.artifacts.secretName", spec.artifacts.secret_name))
    return refs


def refusals(spec: CompressedModelSpec, settings: OperatorSettings,
             secrets: Mapping[str, SecretLabels] | None = None) -> list[str]:
    """One line per field that asks for more than the settings allow (empty: allowed).

    ``secrets`` maps each name of ``secret_refs`` to the Secret's labels (None: no such
    Secret); a name missing from it was not checked and is refused.
    """
    out: list[str] = []
    image = serving_image(spec.serving.image, settings)
    if not image_allowed(image, settings):
        out.append(f"spec.serving.image: {spec.serving.image!r} is not in the operator's allowed "
                   f"images/registries ({_describe_images(settings)})")
    allowed = settings.policy.tolerations
    for i, pool in enumerate(spec.node_pools):
        for j, t in enumerate(pool.tolerations):
            if not any(toleration_allowed(t, a) for a in allowed):
                out.append(f"spec.nodePools[{i}].tolerations[{j}]: "
                           f"{_describe_toleration(t.to_wire())} is not an allowed toleration "
                           f"(allowed: {', '.join(map(_describe_toleration, allowed)) or 'none'}"
                           "; a toleration without a key tolerates every taint)")
    problem = prometheus_problem(spec.autoscaling.prometheus_url, settings)
    if problem:
        out.append(problem)
    found = secrets or {}
    label = f"{Label.ALLOW_REFERENCE.value}: \"{ALLOW_VALUE}\""
    for fieldname, name in secret_refs(spec):
        if name not in found:
            out.append(f"{fieldname}: Secret {name!r} could not be checked for label {label}")
            continue
        labels = found[name]
        if labels is None:
            out.append(f"{fieldname}: Secret {name!r} does not exist in this namespace")
        elif labels.get(Label.ALLOW_REFERENCE.value) != ALLOW_VALUE:
            out.append(f"{fieldname}: Secret {name!r} does not carry label {label}; a spec may "
                       "reference only Secrets their owner opted in with it")
    return out
