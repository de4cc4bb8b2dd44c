"""Static checks of the deployment and observability files.

The Dockerfile, docker-compose.yml, the Prometheus rules and config, the Grafana dashboard and
the Kubernetes manifests in ops/ are checked against the code they deploy: settings that
exist in :class:`enricher.config.Settings` (and load), metrics that :class:`Metrics` exports,
the metrics port and probe paths, the partition count, paths that exist. Prometheus files go
through ``promtool`` (Debian's ``prometheus`` package), including the alerts' unit tests.

No services and no Docker engine: the compose file and the image are not run here
(docs/operations.md says so). Fast: a few promtool calls.
"""

from __future__ import annotations

import importlib
import json
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterable, Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from enricher import cli, config
from enricher.metrics import Metrics

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
PROMETHEUS = REPO / "ops" / "prometheus"
GRAFANA = REPO / "ops" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "enricher.json"
K8S = REPO / "ops" / "k8s"
OPERATIONS_DOC = REPO / "docs" / "operations.md"

PROMTOOL_MISSING = (
    "promtool not found on PATH. It comes with Debian's `prometheus` package: run the project's"
    " install step (`make install`, i.e. `ops/devstack install`), or by hand"
    " `apt-get install -y --no-install-recommends prometheus`."
)
SETTING_NAMES = {f.name for f in fields(config.Settings)} - {"kafka"}
DEFAULTS = config.Settings()
# Samples each metric type exposes, by the family name prometheus_client reports.
SAMPLE_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
    "stateset": ("",),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "unknown": ("",),
}
# Series that Prometheus itself produces.
PROMETHEUS_SERIES = {"up", "ALERTS"}
OFFICIAL_IMAGES = {
    "kafka": "apache/kafka",
    "kafka-init": "apache/kafka",
    "redis": "redis",
    "prometheus": "prom/prometheus",
    "grafana": "grafana/grafana",
}
TOPIC_SETTINGS = ("input_topic", "output_topic", "dlq_topic", "session_events_topic")


# --------------------------------------------------------------------------- helpers


def load_yaml(path: Path) -> Any:
    return _yaml().safe_load(path.read_text())


def load_yaml_all(path: Path) -> list[Any]:
    return [doc for doc in _yaml().safe_load_all(path.read_text()) if doc is not None]


def _yaml() -> Any:
    # Imported by name: PyYAML ships no type stubs, and mypy needs none this way.
    try:
        return importlib.import_module("yaml")
    except ModuleNotFoundError:
        pytest.fail("PyYAML is missing: it is a test dependency (pip install -e '.[test]')")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail(PROMTOOL_MISSING)
    return subprocess.run(
        [binary, *args], capture_output=True, text=True, timeout=120, check=False, cwd=REPO
    )


def exported_metric_names() -> set[str]:
    """Every sample name a fresh :class:`Metrics` can expose, labelled children included."""
    names: set[str] = set()
    for family in Metrics().registry.collect():
        names.update(sample.name for sample in family.samples)
        names.update(family.name + suffix for suffix in SAMPLE_SUFFIXES[family.type])
    return names


def metric_names(promql: str) -> set[str]:
    """The enricher metrics and Prometheus' own series a PromQL expression reads."""
    found = set(re.findall(r"\b(enricher_[a-z0-9_]+)", promql))
    found.update(name for name in PROMETHEUS_SERIES if re.search(rf"\b{name}\b\s*[{{(\[]", promql))
    return found


def unknown_settings(names: Iterable[str]) -> list[str]:
    """``ENRICHER_*`` names that are neither a setting nor an ``ENRICHER_KAFKA_*`` pass-through."""
    unknown = []
    for name in names:
        if not name.startswith(config.ENV_PREFIX):
            continue
        key = name.removeprefix(config.ENV_PREFIX)
        if not key.startswith(config.KAFKA_PREFIX) and key.lower() not in SETTING_NAMES:
            unknown.append(name)
    return unknown


def partition_count() -> int:
    """The input topic's partition count, as the CLI states it (``enricher batch --partitions``)."""
    args = cli.parser().parse_args(["batch", "--input", "in.jsonl", "--output", "out.jsonl"])
    count: int = args.partitions
    return count


def seconds(duration: str | int | float) -> float:
    """A compose duration (``45s``, ``1m30s``, ``500ms``) in seconds."""
    if isinstance(duration, int | float):
        return float(duration)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"bad duration {duration!r}"
    return sum(float(number) * units[unit] for number, unit in parts)


# --------------------------------------------------------------------------- Prometheus


def alert_rules() -> list[dict[str, Any]]:
    groups = load_yaml(PROMETHEUS / "alerts.yml")["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


@pytest.mark.promtool
def test_alert_rules_pass_promtool_check() -> None:
    result = promtool("check", "rules", "ops/prometheus/alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.promtool
def test_alert_rules_unit_tests_pass() -> None:
    result = promtool("test", "rules", "ops/prometheus/alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.promtool
def test_prometheus_config_passes_promtool_check() -> None:
    """Also resolves ``rule_files`` relative to the config, as Prometheus in compose does."""
    result = promtool("check", "config", "ops/prometheus/prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout, result.stdout


def test_prometheus_scrapes_the_enricher_metrics_port() -> None:
    document = load_yaml(PROMETHEUS / "prometheus.yml")
    assert document["rule_files"] == ["alerts.yml"]
    jobs = {job["job_name"]: job for job in document["scrape_configs"]}
    # EnricherInstanceDown and EnricherAbsent select job="enricher".
    enricher = jobs["enricher"]
    assert enricher.get("metrics_path", "/metrics") == "/metrics"
    ports = [sd["port"] for sd in enricher.get("dns_sd_configs", [])]
    targets = [t for sc in enricher.get("static_configs", []) for t in sc["targets"]]
    ports += [int(target.rsplit(":", 1)[1]) for target in targets]
    assert ports, "the enricher job has no targets"
    assert set(ports) == {compose_metrics_port()}


def test_every_alert_is_complete() -> None:
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names)), f"duplicate alert names: {names}"
    for rule in rules:
        where = rule["alert"]
        assert rule.get("for"), f"{where}: no `for:`"
        assert rule["labels"]["severity"] in ("warning", "critical"), where
        annotations = rule["annotations"]
        assert annotations.get("summary") and annotations.get("description"), where
        assert annotations["runbook"] == f"docs/operations.md#{where.lower()}", where


def test_the_required_alerts_exist() -> None:
    expressions = {rule["alert"]: " ".join(rule["expr"].split()) for rule in alert_rules()}
    wanted = {
        "EnricherConsumerLagGrowing": ("enricher_consumer_lag_records", "deriv("),
        "EnricherNoProgress": ("rate(enricher_records_consumed_total[5m])", "== 0"),
        "EnricherDeadLetterRatioHigh": (
            "enricher_records_dead_lettered_total",
            "enricher_records_consumed_total",
        ),
        "EnricherRedisErrors": ("rate(enricher_redis_errors_total",),
        "EnricherTransactionAborts": ('enricher_transactions_total{outcome="aborted"}',),
        "EnricherInstanceDown": ("up{", "== 0"),
    }
    for alert, fragments in wanted.items():
        assert alert in expressions, f"missing alert {alert}"
        for fragment in fragments:
            assert fragment in expressions[alert], f"{alert}: {fragment!r} not in its expr"


def test_every_alert_is_unit_tested_both_ways() -> None:
    """alerts_test.yml makes each alert fire somewhere and stay quiet somewhere."""
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in load_yaml(PROMETHEUS / "alerts_test.yml")["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert names - fires == set(), "alerts never tested firing"
    assert names - quiet == set(), "alerts never tested staying quiet"


def test_alert_rules_use_exported_metrics() -> None:
    exported = exported_metric_names() | PROMETHEUS_SERIES
    for rule in alert_rules():
        used = metric_names(rule["expr"])
        assert used, f"{rule['alert']}: no metric found in its expr"
        assert used <= exported, f"{rule['alert']}: unknown metrics {used - exported}"


def test_every_alert_has_a_runbook_section() -> None:
    headings = set(re.findall(r"^#{2,4} (\S+)\s*$", OPERATIONS_DOC.read_text(), re.MULTILINE))
    for rule in alert_rules():
        assert rule["alert"] in headings, f"docs/operations.md: no section {rule['alert']}"


# --------------------------------------------------------------------------- Grafana


def dashboard_panels() -> Iterator[dict[str, Any]]:
    def walk(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in panels:
            yield panel
            yield from walk(panel.get("panels", []))

    yield from walk(json.loads(DASHBOARD.read_text())["panels"])


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and template variable."""
    document = json.loads(DASHBOARD.read_text())
    queries = [
        (f"panel {panel['id']} {panel['title']!r} {target['refId']}", target["expr"])
        for panel in dashboard_panels()
        for target in panel.get("targets", [])
    ]
    for variable in document["templating"]["list"]:
        if variable["type"] == "query":
            queries.append((f"variable {variable['name']}", variable["definition"]))
    return queries


def datasource_uid() -> str:
    provisioning = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yaml")
    (source,) = provisioning["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090", "the compose service and its port"
    uid: str = source["uid"]
    return uid


def test_dashboard_panels_use_the_provisioned_datasource() -> None:
    uid = datasource_uid()
    document = json.loads(DASHBOARD.read_text())
    for panel in dashboard_panels():
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": uid}, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == uid, panel["title"]
    for variable in document["templating"]["list"]:
        assert variable["datasource"]["uid"] == uid, variable["name"]


def test_dashboard_layout() -> None:
    panels = list(dashboard_panels())
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
    assert json.loads(DASHBOARD.read_text())["uid"] == "session-enricher"


def test_dashboard_uses_exported_metrics() -> None:
    exported = exported_metric_names() | PROMETHEUS_SERIES
    for where, expr in dashboard_queries():
        used = metric_names(expr)
        assert used, f"{where}: no metric found in {expr!r}"
        assert used <= exported, f"{where}: unknown metrics {used - exported}"


def test_dashboard_shows_what_operators_need() -> None:
    text = "\n".join(expr for _, expr in dashboard_queries())
    for fragment in (
        "enricher_records_consumed_total",
        "enricher_records_produced_total",
        "enricher_records_dead_lettered_total",
        "sum by (partition) (enricher_consumer_lag_records",
        "sum by (clock, le) (rate(enricher_end_to_end_latency_seconds_bucket",
        "enricher_batch_duration_seconds_bucket",
        "sum by (cause) (rate(enricher_sessions_started_total",
        "sum by (reason) (rate(enricher_records_dead_lettered_total",
        "sum by (operation, le) (rate(enricher_redis_duration_seconds_bucket",
        "sum by (operation) (rate(enricher_redis_errors_total",
        "sum by (outcome) (rate(enricher_transactions_total",
        "enricher_assigned_partitions",
        "enricher_rebalances_total",
    ):
        assert fragment in text, f"no dashboard query has {fragment!r}"
    for quantile in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({quantile}, sum by (clock, le)" in text


@pytest.mark.promtool
def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """Grafana's variables replaced, each query becomes a recording rule for promtool."""
    rules = []
    for index, (where, expr) in enumerate(dashboard_queries()):
        promql = expr.replace("$__rate_interval", "1m").replace("$__interval", "1m")
        promql = re.sub(r"\$\w+", ".*", promql)
        if where.startswith("variable"):  # label_values(selector, label) -> the selector
            promql = re.sub(r"^label_values\((.*), \w+\)$", r"\1", promql)
        rules.append({"record": f"dashboard:query_{index}", "expr": promql})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_provisioning_matches_compose() -> None:
    providers = load_yaml(GRAFANA / "provisioning" / "dashboards" / "enricher.yaml")
    (provider,) = providers["providers"]
    grafana = compose()["services"]["grafana"]
    mounts = dict(volume.split(":")[:2] for volume in grafana["volumes"])
    assert mounts["./ops/grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./ops/grafana/provisioning"] == "/etc/grafana/provisioning"


# --------------------------------------------------------------------------- compose


def compose() -> dict[str, Any]:
    document: dict[str, Any] = load_yaml(COMPOSE)
    return document


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        return dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def compose_metrics_port() -> int:
    env = environment(compose()["services"]["enricher"])
    return int(env.get("ENRICHER_METRICS_PORT", DEFAULTS.metrics_port))


def test_compose_images_are_the_official_ones() -> None:
    services = compose()["services"]
    for name, repository in OFFICIAL_IMAGES.items():
        image = services[name]["image"]
        assert image.rsplit(":", 1)[0] == repository, f"{name}: {image}"
    assert services["redis"]["image"].split(":")[1].startswith("7"), "redis 7"
    for name in ("enricher", "loadgen"):
        build = services[name]["build"]
        assert (REPO / build["context"] / build.get("dockerfile", "Dockerfile")) == DOCKERFILE
        assert services[name]["image"] == services["enricher"]["image"], "one image for both"


def test_compose_paths_exist() -> None:
    document = compose()
    named = set(document.get("volumes") or {})
    for name, service in document["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                assert (REPO / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in named, f"{name}: volume {source} is not declared"
        build = service.get("build")
        if build is not None:
            assert (REPO / build["context"]).is_dir(), name


def test_compose_enricher_settings_exist_and_load() -> None:
    services = compose()["services"]
    for name, service in services.items():
        assert unknown_settings(environment(service)) == [], f"{name}: unknown ENRICHER_* vars"
    enricher = environment(services["enricher"])
    settings = config.load(env=enricher, require=cli._RUN_REQUIRED)
    assert settings.salt != config.DEFAULT_SALT
    loadgen = environment(services["loadgen"])
    assert config.load(env=loadgen, require=("bootstrap_servers",)).bootstrap_servers == (
        settings.bootstrap_servers
    )


def test_compose_commands_parse() -> None:
    services = compose()["services"]
    settings = config.load(env=environment(services["enricher"]))
    run = cli.parser().parse_args(services["enricher"]["command"])
    assert run.command == "run"
    generate = cli.parser().parse_args(services["loadgen"]["command"])
    assert generate.command == "generate"
    assert generate.topic == settings.input_topic
    assert generate.rate == 200
    assert services["loadgen"]["healthcheck"] == {"disable": True}, "no HTTP server in generate"


def test_compose_enricher_probe_port_and_shutdown() -> None:
    enricher = compose()["services"]["enricher"]
    port = compose_metrics_port()
    assert port == DEFAULTS.metrics_port
    assert any(str(item).split(":")[-1] == str(port) for item in enricher["ports"])
    probe = " ".join(enricher["healthcheck"]["test"])
    assert f"127.0.0.1:{port}/readyz" in probe
    shutdown = float(
        environment(enricher).get("ENRICHER_SHUTDOWN_TIMEOUT", DEFAULTS.shutdown_timeout)
    )
    assert seconds(enricher["stop_grace_period"]) > shutdown


def test_compose_start_order() -> None:
    services = compose()["services"]
    conditions = {
        name: {dep: spec["condition"] for dep, spec in service.get("depends_on", {}).items()}
        for name, service in services.items()
    }
    assert conditions["kafka-init"] == {"kafka": "service_healthy"}
    assert conditions["enricher"] == {
        "kafka-init": "service_completed_successfully",
        "redis": "service_healthy",
    }
    assert conditions["loadgen"]["kafka-init"] == "service_completed_successfully"
    for name in ("kafka", "redis"):
        assert services[name]["healthcheck"]["test"], f"{name} needs a healthcheck"


def test_compose_creates_the_topics_with_the_partition_count() -> None:
    services = compose()["services"]
    script = " ".join(services["kafka-init"]["command"])
    settings = config.load(env=environment(services["enricher"]))
    for topic in (getattr(settings, name) for name in TOPIC_SETTINGS):
        assert topic and topic in script, f"kafka-init does not create {topic!r}"
    assert f"--partitions {partition_count()}" in script
    assert "--create --if-not-exists" in script


def test_compose_kafka_and_redis_setup() -> None:
    services = compose()["services"]
    kafka = environment(services["kafka"])
    assert "broker" in kafka["KAFKA_PROCESS_ROLES"] and "controller" in kafka["KAFKA_PROCESS_ROLES"]
    assert "PLAINTEXT://kafka:9092" in kafka["KAFKA_ADVERTISED_LISTENERS"]
    assert kafka["KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR"] == "1"
    bootstrap = environment(services["enricher"])["ENRICHER_BOOTSTRAP_SERVERS"]
    assert bootstrap == "kafka:9092"
    command = services["redis"]["command"]
    assert command[command.index("--appendonly") + 1] == "yes"


# --------------------------------------------------------------------------- Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        pending += stripped
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        logical.append(pending)
        pending = ""
    assert not pending, "a continuation line runs off the end"
    return [(item.split(None, 1)[0].upper(), item.split(None, 1)[1]) for item in logical]


def test_dockerfile_runs_the_console_script_as_non_root() -> None:
    instructions = dockerfile_instructions()
    users = [args for op, args in instructions if op == "USER"]
    assert users, "no USER line"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"runs as {users[-1]}"
    entrypoints = [json.loads(args) for op, args in instructions if op == "ENTRYPOINT"]
    assert entrypoints[-1] == ["enricher"]
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["enricher"] == "enricher.cli:main"
    commands = [json.loads(args) for op, args in instructions if op == "CMD"]
    assert commands[-1] == ["run"]
    assert cli.parser().parse_args(commands[-1]).command == "run"


def test_dockerfile_base_port_and_healthcheck() -> None:
    instructions = dockerfile_instructions()
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in [f"{op} {args}" for op, args in instructions]
    bases = {args.split()[0] for op, args in instructions if op == "FROM"}
    assert bases == {"${PYTHON_IMAGE}"}, "every stage on python:3.11-slim"
    exposed = [args for op, args in instructions if op == "EXPOSE"]
    assert exposed == [str(DEFAULTS.metrics_port)]
    (healthcheck,) = [args for op, args in instructions if op == "HEALTHCHECK"]
    assert "/healthz" in healthcheck and f"'{DEFAULTS.metrics_port}'" in healthcheck
    assert "urllib" in healthcheck, "python:3.11-slim has no curl"
    assert any("pip install ." in args for op, args in instructions if op == "RUN")


def test_dockerfile_copies_what_exists_and_is_not_ignored() -> None:
    ignored = {
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for needed in (".devstack", "ops/.cache", "node_modules", ".git"):
        assert needed in ignored, f".dockerignore lacks {needed}"
    for op, args in dockerfile_instructions():
        if op != "COPY" or args.startswith("--from"):
            continue
        *sources, _ = args.split()
        for source in sources:
            assert (REPO / source).exists(), f"COPY {source}: no such path"
            assert source.rstrip("/") not in ignored, f"COPY {source}: excluded by .dockerignore"


def dockerfile_uid() -> int:
    users = [args for op, args in dockerfile_instructions() if op == "USER"]
    return int(users[-1].split(":")[0])


# --------------------------------------------------------------------------- Kubernetes


def manifests() -> dict[tuple[str, str], dict[str, Any]]:
    """(kind, name) -> object, from every ops/k8s/*.yaml but the kustomization."""
    objects: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for document in load_yaml_all(path):
            if document.get("kind") == "Kustomization":
                continue
            assert {"apiVersion", "kind", "metadata"} <= set(document), path.name
            key = (document["kind"], document["metadata"]["name"])
            assert key not in objects, f"{key} defined twice"
            objects[key] = document
    return objects


def deployment() -> dict[str, Any]:
    (found,) = [o for (kind, _), o in manifests().items() if kind == "Deployment"]
    return found


def container() -> dict[str, Any]:
    found: dict[str, Any]
    (found,) = deployment()["spec"]["template"]["spec"]["containers"]
    return found


def configmap_env() -> dict[str, str]:
    refs = [ref["configMapRef"]["name"] for ref in container().get("envFrom", [])]
    objects = manifests()
    env: dict[str, str] = {}
    for name in refs:
        assert ("ConfigMap", name) in objects, f"no ConfigMap {name}"
        env.update({k: str(v) for k, v in objects[("ConfigMap", name)]["data"].items()})
    return env


def k8s_metrics_port() -> int:
    return int(configmap_env().get("ENRICHER_METRICS_PORT", DEFAULTS.metrics_port))


def test_k8s_manifests_parse_and_kustomization_lists_them() -> None:
    objects = manifests()
    kinds = {kind for kind, _ in objects}
    assert {
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "ScaledObject",
        "ConfigMap",
        "Secret",
    } <= kinds
    kustomization = load_yaml(K8S / "kustomization.yaml")
    for resource in kustomization["resources"]:
        assert (K8S / resource).is_file(), resource
    assert "secret.example.yaml" not in kustomization["resources"], "never apply the example"


def test_k8s_probes_hit_the_metrics_port() -> None:
    spec = container()
    ports = {port["name"]: port["containerPort"] for port in spec["ports"]}
    port = k8s_metrics_port()
    assert ports["metrics"] == port == DEFAULTS.metrics_port
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = spec[probe]["httpGet"]
        assert get["path"] == path, probe
        assert ports.get(get["port"], get["port"]) == port, probe
    annotations = deployment()["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port)
    assert annotations["prometheus.io/path"] == "/metrics"


def test_k8s_grace_period_outlasts_the_shutdown_timeout() -> None:
    grace = deployment()["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    configured = float(configmap_env().get("ENRICHER_SHUTDOWN_TIMEOUT", 0))
    assert grace > max(DEFAULTS.shutdown_timeout, configured)


def test_k8s_deployment_shape_and_security() -> None:
    spec = deployment()["spec"]
    assert spec["replicas"] == 3
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == dockerfile_uid()
    security = container()["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert container()["args"] == ["run"]
    resources = container()["resources"]
    assert resources["requests"] and resources["limits"]
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()


def test_k8s_transactional_id_comes_from_the_pod_name() -> None:
    env = {item["name"]: item for item in container()["env"]}
    fields_used = {
        name: item["valueFrom"]["fieldRef"]["fieldPath"]
        for name, item in env.items()
        if "fieldRef" in item.get("valueFrom", {})
    }
    value = env["ENRICHER_TRANSACTIONAL_ID"]
    direct = value.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
    referenced = {
        fields_used.get(name) for name in re.findall(r"\$\((\w+)\)", value.get("value", ""))
    }
    assert direct == "metadata.name" or "metadata.name" in referenced


def test_k8s_settings_exist_and_load() -> None:
    objects = manifests()
    secret = objects[("Secret", "session-enricher")]["stringData"]
    env = {item["name"]: item for item in container()["env"]}
    for source, names in (
        ("ConfigMap", configmap_env()),
        ("Deployment env", env),
        ("Secret example", secret),
    ):
        assert unknown_settings(names) == [], f"{source}: unknown ENRICHER_* variables"
    for name, item in env.items():
        ref = item.get("valueFrom", {}).get("secretKeyRef")
        if ref is not None:
            assert ("Secret", ref["name"]) in objects, f"{name}: no Secret {ref['name']}"
            assert ref["key"] in secret, f"{name}: the Secret example has no key {ref['key']}"
    merged = {**configmap_env(), **{k: str(v) for k, v in secret.items()}}
    merged["ENRICHER_TRANSACTIONAL_ID"] = "namespace.session-enricher-abc12-xyz34"
    config.load(env=merged, require=cli._RUN_REQUIRED)


def test_k8s_service_and_pdb_select_the_pods() -> None:
    objects = manifests()
    labels = deployment()["spec"]["template"]["metadata"]["labels"]
    (service,) = [o for (kind, _), o in objects.items() if kind == "Service"]
    assert service["spec"]["selector"].items() <= labels.items()
    (port,) = service["spec"]["ports"]
    assert port["port"] == k8s_metrics_port() and port["targetPort"] == "metrics"
    (pdb,) = [o for (kind, _), o in objects.items() if kind == "PodDisruptionBudget"]
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_k8s_scaled_object_scales_on_lag_up_to_the_partition_count() -> None:
    objects = manifests()
    (scaled,) = [o for (kind, _), o in objects.items() if kind == "ScaledObject"]
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == deployment()["metadata"]["name"]
    assert spec["minReplicaCount"] == 1
    assert spec["maxReplicaCount"] == partition_count()
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "kafka"
    metadata = trigger["metadata"]
    settings = config.load(env=configmap_env())
    assert metadata["consumerGroup"] == settings.group_id
    assert metadata["topic"] == settings.input_topic
    assert metadata["bootstrapServers"] == settings.bootstrap_servers
    assert int(metadata["lagThreshold"]) > 0
    auth = objects[("TriggerAuthentication", trigger["authenticationRef"]["name"])]
    secret = objects[("Secret", "session-enricher")]["stringData"]
    for ref in auth["spec"]["secretTargetRef"]:
        assert ref["key"] in secret, ref


def test_k8s_network_policy_admits_only_named_clients_to_the_metrics_port() -> None:
    (policy,) = [o for (kind, _), o in manifests().items() if kind == "NetworkPolicy"]
    assert policy["apiVersion"] == "networking.k8s.io/v1"
    assert "networkpolicy.yaml" in load_yaml(K8S / "kustomization.yaml")["resources"]
    spec = policy["spec"]
    labels = deployment()["spec"]["template"]["metadata"]["labels"]
    assert set(spec["podSelector"]) == {"matchLabels"}
    assert spec["podSelector"]["matchLabels"].items() <= labels.items()
    assert spec["podSelector"]["matchLabels"] == deployment()["spec"]["selector"]["matchLabels"]
    assert spec["policyTypes"] == ["Ingress"]
    container_ports = {port["name"]: port["containerPort"] for port in container()["ports"]}
    peers: list[dict[str, Any]] = []
    assert spec["ingress"]
    for rule in spec["ingress"]:
        assert rule.get("from"), "a rule without `from` admits every source"
        assert rule.get("ports"), "a rule without `ports` opens every port"
        for port in rule["ports"]:
            assert port.get("protocol", "TCP") == "TCP" and "endPort" not in port
            assert container_ports.get(port["port"], port["port"]) == k8s_metrics_port()
        for peer in rule["from"]:
            assert "ipBlock" not in peer
            for selector in (peer.get("namespaceSelector"), peer.get("podSelector")):
                # {} would select every namespace (or every pod of one).
                assert selector is None or selector.get("matchLabels"), peer
            peers.append(peer)

    def pod_labels(peer: dict[str, Any]) -> dict[str, str]:
        labels: dict[str, str] = peer.get("podSelector", {}).get("matchLabels", {})
        return labels

    prometheus = [p for p in peers if pod_labels(p).get("app.kubernetes.io/name") == "prometheus"]
    assert prometheus and all("namespaceSelector" in p for p in prometheus)
    clients = [p for p in peers if pod_labels(p).get("session-enricher/api-client") == "true"]
    assert clients
    assert "session-enricher/api-client" in OPERATIONS_DOC.read_text()
