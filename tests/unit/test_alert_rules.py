"""The Prometheus alert rules (deploy/prometheus/): promtool accepts them and
passes their unit tests, every alert has a case that fires and one that does
not, the PrometheusRule carries the same groups, and every series they read is
one the relay documents (or Prometheus itself has).

promtool comes with Debian's ``prometheus`` package (.ci/run installs it). A
test that needs it skips on a developer machine without it and fails in CI.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from relay.metrics import Metrics, SupervisorMetrics

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
RULES_DIR = REPO / "deploy" / "prometheus"
RULES = RULES_DIR / "konnect-relay.rules.yaml"
RULE_TESTS = RULES_DIR / "konnect-relay.rules.test.yaml"
# Where the PrometheusRule may live: exactly one of these files holds it.
# (shared-relay.yaml cannot yet: tests/integration/test_artifacts.py expects a
# fixed set of kinds there and validates it against the Kubernetes schema.)
RULE_MANIFESTS = (
    REPO / "deploy" / "kubernetes" / "shared-relay.yaml",
    REPO / "deploy" / "kubernetes" / "monitoring" / "prometheusrule.yaml",
)

GROUP = "konnect-relay"
JOB_MATCHER = 'job="konnect-relay"'
SEVERITIES = frozenset({"critical", "warning", "info"})
ANNOTATIONS = frozenset({"summary", "description", "runbook"})

# Series that Prometheus or every client library has, not the relay's own.
STANDARD_METRICS = frozenset({"up", "process_open_fds", "process_max_fds"})
# Of those, the names other exporters share: a rule must select the relay's job.
SHARED_METRICS = STANDARD_METRICS

HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
PROMTOOL_TIMEOUT = 30  # seconds; both runs take well under one


# ---------------------------------------------------------------- helpers


def promtool() -> str:
    """The promtool binary; skip without it on a developer machine, fail in CI."""
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail("promtool is not installed; CI must provide it (.ci/run)")
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    return found


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args],
        cwd=RULES_DIR,
        capture_output=True,
        text=True,
        timeout=PROMTOOL_TIMEOUT,
        check=False,
    )


def load_rules() -> dict[str, Any]:
    return yaml.safe_load(RULES.read_text())  # type: ignore[no-any-return]


def alert_rules() -> list[dict[str, Any]]:
    return [r for g in load_rules()["groups"] for r in g["rules"] if "alert" in r]


def alert_names() -> list[str]:
    return [r["alert"] for r in alert_rules()]


def duration_seconds(text: str) -> float:
    """A Prometheus duration ("90s", "1h30m", "0m") in seconds."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    parts = re.findall(r"(\d+)(ms|s|m|h|d|w|y)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a duration: {text!r}"
    return sum(int(n) * units[u] for n, u in parts)


# A PromQL token: a string, a number or duration, an identifier, or one character.
TOKEN = re.compile(
    r"""(?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
      | (?P<number>\d[\w.]*)
      | (?P<ident>[A-Za-z_:][\w:]*)
      | (?P<space>\s+)
      | (?P<other>.)""",
    re.VERBOSE,
)
OPERATOR_WORDS = frozenset({"and", "or", "unless", "bool", "offset", "inf", "nan"})
LABEL_LIST_WORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
# What follows the name of a function or aggregation (`sum by (host) (...)`).
AGGREGATION_NEXT = frozenset({"(", "by", "without"})


def selectors(expr: str) -> list[tuple[str, str]]:
    """(metric name, label matchers as written) of every selector in ``expr``.

    Enough of PromQL's lexical grammar for our rules: an identifier followed by
    ``(``, ``by`` or ``without`` is a function or aggregation, the lists after ``by``/``on``/... are
    label names, ``{...}`` are matchers and ``[...]`` ranges; strings, numbers
    and durations are skipped.
    """
    tokens = [(m.lastgroup, m.group()) for m in TOKEN.finditer(expr) if m.lastgroup != "space"]
    found: list[tuple[str, str]] = []
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        following = tokens[i + 1][1] if i + 1 < len(tokens) else ""
        if text in ("{", "["):
            i = closing(tokens, i, "}" if text == "{" else "]") + 1
        elif kind == "ident" and text in LABEL_LIST_WORDS and following == "(":
            i = closing(tokens, i + 1, ")") + 1
        elif (
            kind == "ident"
            and following not in AGGREGATION_NEXT
            and text.lower() not in OPERATOR_WORDS
        ):
            matchers = ""
            if following == "{":
                end = closing(tokens, i + 1, "}")
                matchers = "".join(t for _, t in tokens[i + 2 : end])
            found.append((text, matchers))
            i += 1
        else:
            i += 1
    return found


def closing(tokens: list[tuple[str | None, str]], start: int, close: str) -> int:
    """Index of the token that closes the bracket at ``start`` (no nesting needed)."""
    for j in range(start + 1, len(tokens)):
        if tokens[j][1] == close:
            return j
    raise AssertionError(f"unclosed {tokens[start][1]!r}")


def metric_names(expr: str) -> set[str]:
    return {name for name, _ in selectors(expr)}


def readme_metrics() -> set[str]:
    """Metric names in README.md's metrics table (first column)."""
    return set(re.findall(r"^\| `(konnect_relay_\w+)` \|", README.read_text(), re.MULTILINE))


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def readme_anchors() -> set[str]:
    anchors: set[str] = set()
    fenced = False
    for line in README.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"#{1,6} (.+)", line)):
            anchors.add(github_slug(m.group(1)))
    return anchors


def exported_names() -> set[str]:
    """Sample names the relay's and the supervisor's registries expose, with or
    without samples yet (a labelled series appears on first use)."""
    names: set[str] = set()
    for registry in (Metrics().registry, SupervisorMetrics().registry):
        for family in registry.collect():
            if family.type == "counter":
                names.add(family.name + "_total")
            elif family.type == "info":
                names.add(family.name + "_info")
            elif family.type == "histogram":
                names.update(family.name + s for s in ("", *HISTOGRAM_SUFFIXES))
            else:
                names.add(family.name)
    return names


# ---------------------------------------------------------------- promtool


@pytest.mark.timeout(PROMTOOL_TIMEOUT + 10)
def test_promtool_checks_the_rules() -> None:
    result = run_promtool("check", "rules", RULES.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


@pytest.mark.timeout(PROMTOOL_TIMEOUT + 10)
def test_promtool_unit_tests_pass() -> None:
    result = run_promtool("test", "rules", RULE_TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------- the rule tests


def test_the_unit_tests_load_the_rule_file() -> None:
    tests = yaml.safe_load(RULE_TESTS.read_text())
    assert tests["rule_files"] == [RULES.name]


def cases_by_alert() -> dict[str, list[tuple[int, float, bool]]]:
    """alertname -> (test index, eval time in seconds, fires) of each case."""
    tests = yaml.safe_load(RULE_TESTS.read_text())
    cases: dict[str, list[tuple[int, float, bool]]] = {}
    for index, test in enumerate(tests["tests"]):
        for case in test.get("alert_rule_test", []):
            at = duration_seconds(case["eval_time"])
            cases.setdefault(case["alertname"], []).append((index, at, bool(case["exp_alerts"])))
    return cases


def test_unit_tests_name_only_alerts_that_exist() -> None:
    # promtool passes `exp_alerts: []` for an alert name that no rule has.
    assert set(cases_by_alert()) <= set(alert_names())


@pytest.mark.parametrize("alert", alert_names())
def test_alert_has_a_firing_and_a_quiet_case(alert: str) -> None:
    cases = cases_by_alert().get(alert, [])
    assert any(fires for *_, fires in cases), f"no test case fires {alert}"
    assert any(not fires for *_, fires in cases), f"no test case where {alert} stays quiet"


@pytest.mark.parametrize("alert", alert_names())
def test_alert_is_tested_across_its_for_boundary(alert: str) -> None:
    """Quiet at one evaluation, firing at the next, in the same test: the
    evaluation before `for:` has passed, when the alert is still pending."""
    step = duration_seconds(yaml.safe_load(RULE_TESTS.read_text())["evaluation_interval"])
    cases = cases_by_alert().get(alert, [])
    quiet = {(test, at) for test, at, fires in cases if not fires}
    assert any(fires and (test, at - step) in quiet for test, at, fires in cases), (
        f"{alert}: no firing case right after a quiet one"
    )


# ---------------------------------------------------------------- the rules


def test_one_group_of_alerts() -> None:
    groups = load_rules()["groups"]
    assert [g["name"] for g in groups] == [GROUP]
    names = alert_names()
    assert len(names) == len(set(names)), "an alert name is used twice"


@pytest.mark.parametrize("rule", alert_rules(), ids=alert_names())
def test_alert_has_for_severity_and_annotations(rule: dict[str, Any]) -> None:
    duration_seconds(rule["for"])
    assert set(rule["labels"]) == {"severity"}
    assert rule["labels"]["severity"] in SEVERITIES
    assert set(rule["annotations"]) == ANNOTATIONS
    assert all(v.strip() for v in rule["annotations"].values())


@pytest.mark.parametrize("rule", alert_rules(), ids=alert_names())
def test_runbook_points_at_readme_sections(rule: dict[str, Any]) -> None:
    anchors = re.findall(r"(?<![/\w])README\.md#([\w-]+)", rule["annotations"]["runbook"])
    assert anchors, "the runbook names no README.md section"
    assert set(anchors) <= readme_anchors(), sorted(set(anchors) - readme_anchors())


@pytest.mark.parametrize("rule", alert_rules(), ids=alert_names())
def test_expression_reads_only_known_metrics(rule: dict[str, Any]) -> None:
    known = STANDARD_METRICS | readme_metrics()
    names = metric_names(rule["expr"])
    assert names, f"no metric found in {rule['expr']!r}"
    unknown = {
        n for n in names if n not in known and n.removesuffix(suffix(n)) not in readme_metrics()
    }
    assert not unknown, f"not in README.md's metrics table: {sorted(unknown)}"


def suffix(name: str) -> str:
    return next((s for s in HISTOGRAM_SUFFIXES if name.endswith(s)), "")


@pytest.mark.parametrize("rule", alert_rules(), ids=alert_names())
def test_shared_metrics_are_selected_by_job(rule: dict[str, Any]) -> None:
    """`up` and process_* exist for every target: without the job matcher a rule
    would alert on other programs (and the sed in the rule file's header would
    not reach it)."""
    for name, matchers in selectors(rule["expr"]):
        if name in SHARED_METRICS:
            assert JOB_MATCHER in matchers.replace(" ", ""), f"{name} without {JOB_MATCHER}"


@pytest.mark.parametrize(
    "name", sorted({n for r in alert_rules() for n in metric_names(r["expr"])} - {"up"})
)
def test_metric_is_exported_by_the_relay(name: str) -> None:
    """A rule over a series nobody exports can never fire."""
    if name in exported_names():
        return
    pytest.fail(f"no registry of the relay exports {name}")


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ('up{job="konnect-relay"} == 0', [("up", 'job="konnect-relay"')]),
        ("absent(up{job = 'x'})", [("up", "job='x'")]),
        (
            "sum by (host) (rate(konnect_relay_tunnel_reconnects_total[5m])) > 0.2",
            [("konnect_relay_tunnel_reconnects_total", "")],
        ),
        ("sum(rate(x[5m])) without (instance, pod)", [("x", "")]),
        ("sum without (instance) (x)", [("x", "")]),
        ('a{r="e"} unless a{r="e"} offset 15m', [("a", 'r="e"'), ("a", 'r="e"')]),
        ("max by (job) (a / on (job) group_left (worker) b) > bool 0.8", [("a", ""), ("b", "")]),
        ('c{reason="x or y", le="+Inf"} or d', [("c", 'reason="x or y",le="+Inf"'), ("d", "")]),
        ("histogram_quantile(0.9, sum by (le) (rate(h_bucket[1h30m])))", [("h_bucket", "")]),
        ("vector(1) > Inf", []),
    ],
)
def test_selectors(expr: str, expected: list[tuple[str, str]]) -> None:
    assert selectors(expr) == expected


@pytest.mark.parametrize(
    ("heading", "slug"),
    [
        ("Metrics and admin endpoints", "metrics-and-admin-endpoints"),
        ("`konnect-relay doctor`", "konnect-relay-doctor"),
        ("Kong's error messages", "kongs-error-messages"),
        ("Through an SSH bastion", "through-an-ssh-bastion"),
    ],
)
def test_github_slug(heading: str, slug: str) -> None:
    assert github_slug(heading) == slug


# ---------------------------------------------------------------- Kubernetes


def prometheus_rules() -> list[tuple[Path, dict[str, Any]]]:
    return [
        (path, doc)
        for path in RULE_MANIFESTS
        if path.exists()
        for doc in yaml.safe_load_all(path.read_text())
        if doc and doc.get("kind") == "PrometheusRule"
    ]


def test_prometheus_rule_carries_exactly_the_rule_files_groups() -> None:
    found = prometheus_rules()
    assert len(found) == 1, f"expected one PrometheusRule, found {[str(p) for p, _ in found]}"
    _, rule = found[0]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["name"] == GROUP
    assert set(rule["spec"]) == {"groups"}
    assert rule["spec"]["groups"] == load_rules()["groups"]
