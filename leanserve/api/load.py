"""Reading CompressedModel specs from YAML, with errors a user can act on.

Every problem becomes one line ``spec.path.to.field: what is wrong (allowed: ...)``; nothing here
lets a pydantic or YAML traceback reach the user.
"""

from __future__ import annotations

import enum
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from leanserve.api.spec import API_VERSION, KIND, CompressedModel, CompressedModelSpec
from leanserve.api.validators import DNS_1123_LABEL_PATTERN, LABEL_VALUE_PATTERN, SECRET_NAME


class SpecError(Exception):
    """A spec that cannot be used; ``errors`` holds one line per problem."""

    def __init__(self, errors: list[str], source: str = "") -> None:
        self.errors = errors
        self.source = source
        super().__init__("; ".join(errors))


@dataclass
class LoadedSpec:
    """A validated CompressedModel and where it came from (relative URIs resolve against it)."""

    resource: CompressedModel
    base_dir: Path | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.resource.metadata.name

    @property
    def spec(self) -> CompressedModelSpec:
        return self.resource.spec


def load_file(path: str | Path) -> list[LoadedSpec]:
    """Every CompressedModel document in a YAML file; raises SpecError naming each problem."""
    p = Path(path)
    if not p.exists():
        raise SpecError([f"{p}: no such file"], str(p))
    if p.is_dir():
        raise SpecError([f"{p}: is a directory, expected a YAML file"], str(p))
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError([f"{p}: cannot read ({exc})"], str(p)) from None
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError([f"{p}: invalid YAML{where}: {problem}"], str(p)) from None
    if not docs:
        raise SpecError([f"{p}: no YAML documents in the file"], str(p))
    loaded, errors = [], []
    for i, doc in enumerate(docs):
        prefix = f"document {i + 1}: " if len(docs) > 1 else ""
        try:
            loaded.append(LoadedSpec(parse(doc), p.resolve().parent, doc))
        except SpecError as exc:
            errors.extend(prefix + e for e in exc.errors)
    if errors:
        raise SpecError(errors, str(p))
    return loaded


def load_one(path: str | Path) -> LoadedSpec:
    specs = load_file(path)
    if len(specs) != 1:
        raise SpecError([f"{path}: expected one CompressedModel, found {len(specs)}"], str(path))
    return specs[0]


def parse(doc: Any) -> CompressedModel:
    """Validate one document (a dict from YAML or from the API server)."""
    if not isinstance(doc, dict):
        raise SpecError([f"expected a mapping (a CompressedModel), got {type(doc).__name__}"])
    api_version, kind = doc.get("apiVersion"), doc.get("kind")
    if kind != KIND or api_version != API_VERSION:
        raise SpecError([f"apiVersion/kind: got {api_version}/{kind} "
                         f"(allowed: {API_VERSION}/{KIND})"])
    try:
        return CompressedModel.model_validate(doc)
    except ValidationError as exc:
        raise SpecError(format_errors(exc)) from None


def format_errors(exc: ValidationError) -> list[str]:
    out = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(x) for x in err["loc"] if not _is_union_tag(x))
        message = _describe(err, loc)
        # Cross-field validators name the field they blame as "path: message".
        sub = _FIELD_PREFIX.match(message) if err["type"] == "value_error" else None
        if sub:
            loc, message = f"{loc}.{sub.group(1)}" if loc else sub.group(1), sub.group(2)
        out.append(f"{loc or '(document)'}: {message}")
    return sorted(dict.fromkeys(out))


_FIELD_PREFIX = re.compile(r"^([A-Za-z0-9_.]+): (.*)$", re.S)


def _is_union_tag(part: Any) -> bool:
    # pydantic inserts e.g. "int" / "str" / "function-after[...]" into union locations
    return isinstance(part, str) and (part in ("int", "str", "float", "bool")
                                      or part.startswith("function-"))


def _describe(err: dict[str, Any], loc: str) -> str:
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    got = f" (got {value!r})" if not isinstance(value, (dict, list)) else ""
    if kind == "extra_forbidden":
        allowed = _allowed_fields(loc)
        return "unknown field" + (f" (allowed: {', '.join(allowed)})" if allowed else "")
    if kind == "missing":
        return "required field is missing"
    if kind in ("enum", "literal_error"):
        expected = ctx.get("expected", "")
        return f"{value!r} is not allowed (allowed: {expected.replace(chr(39), '')})"
    bounds = {"greater_than": ("gt", "> "), "greater_than_equal": ("ge", ">= "),
              "less_than": ("lt", "< "), "less_than_equal": ("le", "<= ")}
    if kind in bounds:
        key, sign = bounds[kind]
        return f"must be {sign}{ctx[key]}{got}"
    if kind == "string_pattern_mismatch":
        if ctx.get("pattern") == DNS_1123_LABEL_PATTERN:
            return f"{value!r} is not a namespace name (allowed: lowercase letters, digits and " \
                   "'-', starting and ending with a letter or digit)"
        if ctx.get("pattern") == LABEL_VALUE_PATTERN:
            return f"{value!r} is not a label value (allowed: at most 63 letters, digits, '-', " \
                   "'_' and '.', starting and ending with a letter or digit, or empty)"
        if ctx.get("pattern") == SECRET_NAME:
            return f"{value!r} is not a Secret name (allowed: a DNS-1123 subdomain: lowercase " \
                   "letters, digits, '-' and '.')"
        return f"{value!r} is not a valid name (allowed: lowercase letters, digits and '-', " \
               "starting with a letter)"
    if kind == "finite_number":
        return f"must be a finite number{got}"
    if kind == "too_short":
        return f"needs at least {ctx.get('min_length')} item(s)"
    if kind == "too_long":
        return f"has too many items or characters (allowed: at most {ctx.get('max_length')})"
    if kind == "string_too_short":
        return "must not be empty"
    if kind == "string_too_long":
        return f"is too long (allowed: at most {ctx.get('max_length')} characters)"
    if kind == "value_error":
        return str(ctx.get("error", err["msg"])).removeprefix("Value error, ")
    if kind.endswith("_type") or kind.endswith("_parsing"):
        want = kind.removesuffix("_type").removesuffix("_parsing").replace("_", " ")
        want = {"model": "mapping", "dict": "mapping", "list": "list", "int": "integer",
                "float": "number", "bool": "boolean", "string": "string"}.get(want, want)
        article = "an" if want[:1] in "aeiou" else "a"
        return f"expected {article} {want}{got}"
    return err["msg"] + got


def _allowed_fields(loc: str) -> list[str]:
    """The field names allowed at the parent of loc (for 'unknown field' messages)."""
    model: Any = CompressedModel
    parts = loc.split(".")[:-1]
    for part in parts:
        if part.isdigit():
            continue
        fields = {(f.alias or n): f for n, f in model.model_fields.items()}
        if part not in fields:
            return []
        model = _inner_model(fields[part].annotation)
        if model is None:
            return []
    return sorted((f.alias or n) for n, f in model.model_fields.items())


def _inner_model(tp: Any) -> type[BaseModel] | None:
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tp
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return None
    for arg in typing.get_args(tp):
        found = _inner_model(arg)
        if found is not None:
            return found
    return None
