"""The Kubernetes manifests (deploy/k8s): every rendered resource is valid against the
Kubernetes API schemas (kubernetes-validate), and ports, probes, env names, commands and
image tags agree with recstack/settings.py, the CLI, the server and the images."""

from __future__ import annotations

import copy
import json
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from _deploy_fixtures import CONTAINER_SPECIFIC, embedded_triton_flags, stages, triton_flags
from _kustomize import KustomizeError, render

from recstack.cli import build_parser
from recstack.settings import PROJECT_ROOT, Settings

K8S = PROJECT_ROOT / "deploy" / "k8s"
OVERLAYS = {name: K8S / "overlays" / name for name in ("dev", "prod")}
PROMOTE_JOB = K8S / "jobs" / "promote-job.yaml"
TRAIN_JOB = K8S / "jobs" / "train-job.yaml"
# The Kubernetes minor the manifests target (grpc probes need 1.27+, the preStop sleep
# action 1.30+); kubernetes-validate ships the schemas.
KUBERNETES_VERSION = "1.33.0"
# Custom resources the API schemas do not cover; checked by hand below.
CUSTOM_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}


def validate(doc: dict[str, Any]) -> None:
    """Raise if ``doc`` is not a valid resource (unknown fields included)."""
    import kubernetes_validate

    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def promote_job(release: str = "7", reason: str = "test") -> dict[str, Any]:
    """The promotion Job as `envsubst` fills it in (docs/deploy.md)."""
    text = PROMOTE_JOB.read_text().replace("${RELEASE_ID}", release)
    return yaml.safe_load(text.replace("${REASON}", reason))


def jobs() -> dict[str, dict[str, Any]]:
    """The Jobs created by hand (deploy/k8s/jobs), as created."""
    return {"promote": promote_job(), "train": yaml.safe_load(TRAIN_JOB.read_text())}


def job_specs() -> dict[str, dict[str, Any]]:
    return {name: job["spec"]["template"]["spec"] for name, job in jobs().items()}


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {name: render(folder) for name, folder in OVERLAYS.items()}


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def pod_specs(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Workload name -> its pod spec (Deployments, StatefulSets, Jobs, CronJobs)."""
    out = {}
    for d in docs:
        spec = d.get("spec", {})
        if d["kind"] == "CronJob":
            spec = spec["jobTemplate"]["spec"]
        if "template" in spec:
            out[d["metadata"].get("name") or d["metadata"]["generateName"]] = spec["template"][
                "spec"
            ]
    return out


def env_fields() -> dict[str, str]:
    """RECSTACK_* variable -> Settings field."""
    out = {}
    for name, field in Settings.model_fields.items():
        out[field.alias or f"RECSTACK_{name.upper()}"] = name
    return out


# --------------------------------------------------------------------- schema validation
@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_every_rendered_resource_is_valid(rendered, overlay: str):
    docs = rendered[overlay]
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
            "CronJob", "ConfigMap", "PersistentVolumeClaim"} <= kinds  # fmt: skip
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CUSTOM_KINDS:
            continue
        validate(doc)
        assert (
            doc["metadata"]["namespace"]
            == yaml.safe_load((OVERLAYS[overlay] / "kustomization.yaml").read_text())["namespace"]
        )


@pytest.mark.parametrize("job", ["promote", "train"])
def test_jobs_are_valid(job: str):
    validate(jobs()[job])


def test_validation_rejects_a_wrong_manifest(rendered):
    """The check can fail: a port as text, an unknown field, a missing required field."""
    import kubernetes_validate

    deployment = by_kind(rendered["dev"], "Deployment")["recstack-orchestrator"]
    breakages = [
        lambda d: d["spec"]["template"]["spec"]["containers"][0]["ports"][0].update(
            containerPort="grpc"
        ),
        lambda d: d["spec"]["template"]["spec"]["containers"][0].update(imagePullPolcy="Always"),
        lambda d: d["spec"].pop("selector"),
    ]
    for breakage in breakages:
        broken = copy.deepcopy(deployment)
        breakage(broken)
        with pytest.raises(kubernetes_validate.ValidationError):
            validate(broken)


def test_renderer_refuses_what_it_does_not_render(tmp_path: Path):
    (tmp_path / "kustomization.yaml").write_text("resources: []\nnamePrefix: x-\n")
    with pytest.raises(KustomizeError, match="namePrefix"):
        render(tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        "resources: []\npatches:\n  - target: {kind: Deployment, name: nope}\n    patch: '[]'\n"
    )
    with pytest.raises(KustomizeError, match="matches no resource"):
        render(tmp_path)


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_renderer_agrees_with_kubectl_kustomize(rendered, overlay: str):
    """Where kubectl is installed (not by `make setup`), its Kustomize renders the same."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed; the Python renderer alone is checked")
    out = subprocess.run(
        [kubectl, "kustomize", str(OVERLAYS[overlay])],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip

    def key(d: dict[str, Any]) -> str:
        return f"{d['kind']}/{d['metadata']['name']}"

    theirs = sorted(yaml.safe_load_all(out), key=key)
    assert sorted(rendered[overlay], key=key) == theirs


# ------------------------------------------------------------------ agreement: settings
@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_env_names_are_settings_and_ports_are_the_defaults(rendered, overlay: str):
    docs = rendered[overlay]
    fields = env_fields()
    defaults = Settings()
    config = by_kind(docs, "ConfigMap")["recstack-config"]["data"]
    names = set(config)
    for spec in pod_specs(docs).values():
        for container in spec["containers"]:
            env = container.get("env", [])
            names |= {e["name"] for e in env if e["name"].startswith("RECSTACK")}
    unknown = names - set(fields)
    assert not unknown, f"not settings: {sorted(unknown)}"
    ports = {n: v for n, v in config.items() if n.endswith("_PORT")}
    assert ports, "the ConfigMap names every port"
    for name, value in ports.items():
        assert int(value) == getattr(defaults, fields[name]), name
    for name, value in config.items():
        Settings.model_validate({fields[name]: value})  # each value parses as the setting
    assert config["RECSTACK_ORCHESTRATOR_PRUNES_TRITON"] == "false"


def container(docs: list[dict[str, Any]], workload: str) -> dict[str, Any]:
    return pod_specs(docs)[workload]["containers"][0]


def named_ports(c: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in c["ports"]}


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_orchestrator_ports_probes_and_metrics(rendered, overlay: str):
    # orchestrator/server.py registers its health entry under this name (SERVICE_NAME);
    # read from the generated module, not the server, which imports Feast and torch.
    from orchestrator.recommender_pb2 import DESCRIPTOR

    service_name = DESCRIPTOR.services_by_name["Recommender"].full_name
    docs = rendered[overlay]
    s = Settings()
    c = container(docs, "recstack-orchestrator")
    assert named_ports(c) == {
        "grpc": s.orchestrator_grpc_port,
        "http": s.orchestrator_http_port,
        "metrics": s.orchestrator_metrics_port,
    }
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == s.orchestrator_grpc_port, probe
    # Readiness on the Recommender's own health entry (NOT_SERVING while draining).
    assert c["readinessProbe"]["grpc"]["service"] == service_name
    pod = by_kind(docs, "Deployment")["recstack-orchestrator"]["spec"]["template"]
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(s.orchestrator_metrics_port)
    service = by_kind(docs, "Service")["recstack-orchestrator"]
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == named_ports(c)
    assert c["args"] == ["serve", "orchestrator"]
    env = {e["name"]: e for e in c["env"]}
    assert "$(POD_NAME)" in env["RECSTACK_EVENTS_DIR"]["value"]
    assert list(env).index("POD_NAME") < list(env).index("RECSTACK_EVENTS_DIR")


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_triton_ports_readiness_and_flags(rendered, overlay: str):
    from orchestrator.triton_server import REPOSITORY_KEY_HEADER

    docs = rendered[overlay]
    s = Settings()
    c = container(docs, "recstack-triton")
    assert named_ports(c) == {
        "http": s.triton_http_port,
        "grpc": s.triton_grpc_port,
        "metrics": s.triton_metrics_port,
    }
    assert c["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    flags = triton_flags(c["args"])
    embedded = embedded_triton_flags()
    assert {k: flags[k] for k in embedded if k not in CONTAINER_SPECIFIC} == {
        k: v for k, v in embedded.items() if k not in CONTAINER_SPECIFIC
    }
    key = "$(RECSTACK_TRITON_REPOSITORY_KEY)"
    assert flags["http-restricted-api"] == f"model-repository:{REPOSITORY_KEY_HEADER}={key}"
    assert flags["grpc-restricted-protocol"] == f"model-repository:{REPOSITORY_KEY_HEADER}={key}"
    # Triton serves the repository whose configs the orchestrators send when they load.
    orch_env = {e["name"]: e for e in container(docs, "recstack-orchestrator")["env"]}
    assert flags["model-repository"] == orch_env["RECSTACK_MODEL_REPOSITORY"]["value"]
    pod = by_kind(docs, "Deployment")["recstack-triton"]["spec"]["template"]
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(s.triton_metrics_port)
    service = by_kind(docs, "Service")["recstack-triton"]
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == named_ports(c)


def test_dev_redis_listens_where_settings_look(rendered):
    docs = rendered["dev"]
    config = by_kind(docs, "ConfigMap")["recstack-config"]["data"]
    redis = by_kind(docs, "Service")[config["RECSTACK_REDIS_HOST"]]
    assert [p["port"] for p in redis["spec"]["ports"]] == [int(config["RECSTACK_REDIS_PORT"])]
    args = container(docs, "recstack-redis")["args"]
    assert args[args.index("--port") + 1] == config["RECSTACK_REDIS_PORT"]
    assert "recstack-redis" not in by_kind(rendered["prod"], "Service")  # external there


# ---------------------------------------------------------------- agreement: CLI, images
def recstack_commands(c: dict[str, Any]) -> list[list[str]]:
    """The `recstack` argument lists a container runs (the image's entrypoint, or the
    `recstack ...` commands of a shell script), with $VARS filled in."""
    if not c.get("command"):
        return [c["args"]]
    assert c["command"][:2] == ["/bin/sh", "-ec"], c["command"]
    script = re.sub(r'"\$[A-Z_]+"', "7", " ".join(c["args"]))
    parts = [shlex.split(part) for part in script.split("&&")]
    return [p[1:] for p in parts if p[0] == "recstack"]


def test_every_recstack_command_parses_with_the_cli(rendered):
    seen = set()
    for docs in rendered.values():
        for name, spec in {**pod_specs(docs), **job_specs()}.items():
            for c in spec["containers"]:
                if not c["image"].split(":")[0].split("/")[-1].startswith("recstack"):
                    continue
                if "triton" in c["image"].split(":")[0].split("/")[-1]:
                    continue
                for argv in recstack_commands(c):
                    args = build_parser().parse_args(argv)
                    seen.add(args._run)
                    assert not getattr(args, "detach", False), f"{name}: {argv}"
    assert {
        "orchestrator.server:cli",
        "exporters.feast_ops:cli_materialize",
        "exporters.triton_configs:cli",
        "exporters.release_ops:cli_promote",
        "exporters.feast_ops:cli_apply",
        "exporters.pipeline:cli",
    } <= seen, seen


def test_a_command_the_cli_does_not_know_fails(rendered):
    c = copy.deepcopy(container(rendered["dev"], "recstack-materialize"))
    c["args"] = ["features", "materialise"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(recstack_commands(c)[0])


def test_image_tags_are_the_project_version_and_images_exist(rendered):
    version = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]["version"]
    images = set()
    for docs in rendered.values():
        for spec in pod_specs(docs).values():
            images |= {c["image"] for c in spec["containers"]}
    images |= {c["image"] for spec in job_specs().values() for c in spec["containers"]}
    ours = {i for i in images if i.split(":")[0].split("/")[-1].startswith("recstack")}
    assert ours and all(i.endswith(f":{version}") for i in ours), ours
    names = {i.split(":")[0].split("/")[-1] for i in ours}
    # recstack <- orchestrator.Dockerfile (app), recstack-tools <- its tools stage,
    # recstack-triton <- triton.Dockerfile.
    orch = stages(PROJECT_ROOT / "deploy/images/orchestrator.Dockerfile")
    assert names == {"recstack", "recstack-tools", "recstack-triton"} and "tools" in orch
    assert (PROJECT_ROOT / "deploy/images/triton.Dockerfile").exists()
    others = images - ours
    assert all(re.search(r":\d+\.\d+\.\d+", i) for i in others), others  # pinned


def test_the_image_env_agrees_with_the_configmap(rendered):
    """Paths the image sets are the ones the manifests mount and configure."""
    text = (PROJECT_ROOT / "deploy/images/orchestrator.Dockerfile").read_text()
    image_env = dict(re.findall(r"(RECSTACK_[A-Z_]+)=(\S+)", text))
    config = by_kind(rendered["dev"], "ConfigMap")["recstack-config"]["data"]
    for name, value in image_env.items():
        assert name in env_fields(), name
        if name in config:
            assert config[name] == value, name


# --------------------------------------------------------------------- volumes, monitors
@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_mounts_name_volumes_and_claims_exist(rendered, overlay: str):
    docs = rendered[overlay]
    claims = set(by_kind(docs, "PersistentVolumeClaim"))
    specs = {**pod_specs(docs), **job_specs()}
    for name, spec in specs.items():
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for c in spec["containers"]:
            for mount in c.get("volumeMounts", []):
                templates = [
                    t["metadata"]["name"]
                    for d in docs
                    if d["kind"] == "StatefulSet"
                    for t in d["spec"].get("volumeClaimTemplates", [])
                ]
                assert mount["name"] in volumes or mount["name"] in templates, (name, mount)
        for v in volumes.values():
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in claims, (name, v)


def test_service_monitors_select_services_and_ports(rendered):
    docs = rendered["prod"]
    monitors = [d for d in docs if d["kind"] == "ServiceMonitor"]
    assert {m["metadata"]["name"] for m in monitors} == {
        "recstack-orchestrator",
        "recstack-triton",
    }
    services = list(by_kind(docs, "Service").values())
    for m in monitors:
        wanted = m["spec"]["selector"]["matchLabels"]
        hits = [s for s in services if wanted.items() <= s["metadata"]["labels"].items()]
        assert len(hits) == 1, m["metadata"]["name"]
        ports = {p["name"] for p in hits[0]["spec"]["ports"]}
        assert {e["port"] for e in m["spec"]["endpoints"]} <= ports


def test_hpa_and_pdb_target_the_orchestrator(rendered):
    for docs in rendered.values():
        deployment = by_kind(docs, "Deployment")["recstack-orchestrator"]
        hpa = by_kind(docs, "HorizontalPodAutoscaler")["recstack-orchestrator"]
        assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
        assert "replicas" not in deployment["spec"]  # the HPA owns the count
        pdb = by_kind(docs, "PodDisruptionBudget")["recstack-orchestrator"]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert container(docs, "recstack-orchestrator")["resources"]["requests"]["cpu"]


# ------------------------------------------------------------------------------ Grafana
PROMQL_WORDS = {"sum", "by", "rate", "increase", "histogram_quantile", "max", "le", "without"}
# Triton's own metrics (its /metrics on the metrics port), labels model and version.
TRITON_METRICS = {"nv_inference_request_success", "nv_inference_compute_infer_duration_us",
                  "nv_inference_count"}  # fmt: skip


def orchestrator_metrics() -> dict[str, set[str]]:
    """Exposed sample name -> label names, from orchestrator/metrics.py's collectors."""
    from prometheus_client.metrics import MetricWrapperBase

    from orchestrator import metrics

    out: dict[str, set[str]] = {}
    for value in vars(metrics).values():
        if not isinstance(value, MetricWrapperBase):
            continue
        labels = set(value._labelnames)
        for metric in value.describe():
            suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}
            for suffix in suffixes.get(metric.type, [""]):
                out[metric.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return out


def test_dashboard_queries_name_real_metrics_and_labels():
    path = K8S / "base" / "grafana-dashboard.json"
    dashboard = json.loads(path.read_text())
    known = orchestrator_metrics()
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert exprs
    used = set()
    for expr in exprs:
        for name in re.findall(r"\b(recstack_[a-z_]+|nv_[a-z_]+)\b", expr):
            used.add(name)
            assert name in known or name in TRITON_METRICS, f"unknown metric {name} in {expr}"
        for group in re.findall(r"by \(([^)]*)\)", expr):
            labels = {x.strip() for x in group.split(",")}
            names = re.findall(r"\b(recstack_[a-z_]+)\b", expr)
            for name in names:
                assert labels <= known[name] | {"le"}, f"{name} has no label {labels}: {expr}"
    # The per-stage and per-release views are there.
    assert {"recstack_stage_seconds_bucket", "recstack_recommendations_total",
            "recstack_release_info"} <= used  # fmt: skip
    assert any("stage" in e and "release" in e for e in exprs)
