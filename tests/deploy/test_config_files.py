"""Every config file in configs/ and deploy/ loads against the exact model it is for (STYLE rule 9).

- ``configs/*.yaml`` -> :class:`driftrl.config.DriftConfig` (``load_config``).
- ``deploy/runtime-env.yaml`` -> Ray's :class:`ray.runtime_env.RuntimeEnv`.
- ``deploy/k8s/*.yaml``: ``RayCluster``/``RayJob`` -> the KubeRay CRD's ``v1`` OpenAPI schema from
  ``../shared/kuberay/`` (offline, with ``jsonschema``), closed the way ``kubectl apply`` (strict field
  validation, its default) closes it; ``Service``, ``PersistentVolumeClaim`` and ``NetworkPolicy`` ->
  the Kubernetes JSON schemas of :data:`K8S_VERSION`, strict (unknown fields rejected), from the pinned
  ``kubernetes-validate`` package (offline); ``ServiceMonitor`` (a CRD of the Prometheus Operator) ->
  the structural checks below. Every pod template gets the security checks.
- ``deploy/grafana/*.json`` -> parses as a dashboard (its content is the pipeline engineer's).

The driftrl config inside each RayJob entrypoint (config path + overrides) validates too, and the
manifests agree with each other and with pyproject.toml (ray version, image tag, ports, volumes).
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import tomllib
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from driftrl.config import DriftConfig, load_config

REPO = Path(__file__).resolve().parents[2]
KUBERAY_DIR = REPO / ".." / "shared" / "kuberay"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
RAY_KINDS = tuple(CRD_FILES)
OTHER_KINDS = ("Service", "PersistentVolumeClaim", "NetworkPolicy", "ServiceMonitor")
# the Kubernetes release whose schemas the standard kinds are checked against (KubeRay 1.5 supports it)
K8S_VERSION = "1.33.0"
# where Ray, vLLM, Triton, DeepSpeed and matplotlib write inside a pod with a read-only root
# filesystem (HOME=/home/ray in deploy/Dockerfile); the submitter runs only the `ray` CLI
WRITABLE_PATHS = {
    "head": ("/tmp", "/home/ray/.cache", "/home/ray/.config", "/home/ray/.triton"),
    "worker": ("/tmp", "/home/ray/.cache", "/home/ray/.config", "/home/ray/.triton"),
    "submitter": ("/tmp", "/home/ray/.cache"),
}
# Where deploy/Dockerfile puts the repository inside the image (its WORKDIR).
IMAGE_REPO_DIR = "/home/ray/driftrl"
DNS_1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
# Env/arg names that hold credentials (HF_TOKEN, AWS_SECRET_ACCESS_KEY; not TOKENIZERS_PARALLELISM).
SECRET_NAME = re.compile(
    r"(^|_)(TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|ACCESS_KEY|CREDENTIALS?)(_|$)", re.IGNORECASE
)

CONFIG_FILES = sorted((REPO / "configs").glob("*.y*ml"))
DEPLOY_FILES = sorted(
    p for p in (REPO / "deploy").rglob("*") if p.is_file() and p.suffix in (".yaml", ".yml", ".json")
)
K8S_FILES = sorted((REPO / "deploy" / "k8s").glob("*.y*ml"))


# --- the KubeRay CRD schemas as JSON Schema -------------------------------------------------------


def close_schema(node: dict[str, Any]) -> dict[str, Any]:
    """An OpenAPI v3 CRD schema node as Draft 7 JSON Schema, closed against unknown fields.

    The API server *prunes* fields a structural schema does not declare, and ``kubectl apply``
    (field validation ``Strict``, its default) *rejects* them; a CRD schema says neither, it just
    omits ``additionalProperties``. So every object with ``properties`` and no
    ``additionalProperties`` / ``x-kubernetes-preserve-unknown-fields`` gets
    ``additionalProperties: false``. ``nullable`` adds ``null``; ``x-kubernetes-int-or-string``
    nodes already carry ``anyOf: [integer, string]``; other ``x-kubernetes-*`` keys only guide
    merging and CEL rules (not evaluated here) and are dropped. Field names are never mistaken for
    keywords: ``properties`` is walked as a mapping of names to schemas.
    """
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key == "nullable":
            continue
        if key == "properties":
            out[key] = {name: close_schema(sub) for name, sub in value.items()}
        elif key in ("items", "not") or (key == "additionalProperties" and isinstance(value, dict)):
            out[key] = close_schema(value)
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = [close_schema(sub) for sub in value]
        else:
            out[key] = value
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if (
        "properties" in node
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def _int_in(bits: int):
    def check(value: object) -> bool:
        return not isinstance(value, int) or -(2 ** (bits - 1)) <= value < 2 ** (bits - 1)

    return check


FORMATS = jsonschema.FormatChecker()
FORMATS.checks("int32")(_int_in(32))
FORMATS.checks("int64")(_int_in(64))


@cache
def crd_schema(kind: str) -> dict[str, Any]:
    """``spec.versions[name == v1].schema.openAPIV3Schema`` of the KubeRay CRD for ``kind``."""
    path = KUBERAY_DIR / CRD_FILES[kind]
    if not path.is_file():
        pytest.fail(
            f"KubeRay CRD {path.resolve()} is missing: the deploy tests validate against the CRDs in the "
            "`shared/kuberay/` folder beside the checkout (CI provides it)."
        )
    # The CRDs are 1-1.4 MB of YAML: libyaml's loader reads them in a fraction of the pure-Python time.
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    assert crd["spec"]["names"]["kind"] == kind
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return v1["schema"]["openAPIV3Schema"]


@cache
def crd_validator(kind: str, strict: bool = True) -> jsonschema.Draft7Validator:
    schema = close_schema(crd_schema(kind)) if strict else crd_schema(kind)
    return jsonschema.Draft7Validator(schema, format_checker=FORMATS)


def schema_errors(doc: dict[str, Any], strict: bool = True) -> list[str]:
    """Every violation of the CRD schema, as ``path: message`` lines (empty = valid)."""
    errors = crd_validator(doc["kind"], strict).iter_errors(doc)
    return sorted(f"{'.'.join(str(p) for p in e.absolute_path) or '(top)'}: {e.message}" for e in errors)


# --- reading manifests ----------------------------------------------------------------------------


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def all_manifests() -> list[tuple[str, dict[str, Any]]]:
    return [(f"{p.name}#{i}", d) for p in K8S_FILES for i, d in enumerate(documents(p))]


def of_kind(*kinds: str) -> list[dict[str, Any]]:
    return [d for _, d in all_manifests() if d["kind"] in kinds]


def cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


def pod_templates(doc: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """``(where, role, template)`` for every pod a RayCluster/RayJob creates; role head/worker/submitter."""
    name = doc["metadata"]["name"]
    spec = cluster_spec(doc)
    yield f"{name}.head", "head", spec["headGroupSpec"]["template"]
    for group in spec.get("workerGroupSpecs", []):
        yield f"{name}.{group['groupName']}", "worker", group["template"]
    if doc["kind"] == "RayJob" and "submitterPodTemplate" in doc["spec"]:
        yield f"{name}.submitter", "submitter", doc["spec"]["submitterPodTemplate"]


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return pod.get("initContainers", []) + pod["containers"]


def quantity(value: int | str) -> float:
    """A Kubernetes CPU/GPU quantity as a number: 8 -> 8, "64" -> 64, "500m" -> 0.5."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def entrypoint_config(entrypoint: str) -> tuple[Path, list[str]]:
    """The repo file and overrides of ``python -m driftrl.cli train --config <image path> [overrides]``."""
    words = shlex.split(entrypoint)
    assert words[:4] == ["python", "-m", "driftrl.cli", "train"], f"unexpected entrypoint {entrypoint!r}"
    args = words[4:]
    at = args.index("--config")
    image_path = args[at + 1]
    assert image_path.startswith(IMAGE_REPO_DIR + "/"), (
        f"--config {image_path} is not inside the image's repo"
    )
    return REPO / image_path.removeprefix(IMAGE_REPO_DIR + "/"), args[:at] + args[at + 2 :]


def rayjob_config(doc: dict[str, Any]) -> DriftConfig:
    path, overrides = entrypoint_config(doc["spec"]["entrypoint"])
    return load_config(path, overrides)


# --- checks of standard kinds and pods ------------------------------------------------------------


def pod_security_problems(where: str, pod: dict[str, Any]) -> list[str]:
    """What keeps a pod spec from the security baseline: non-root, no privilege, secrets by reference."""
    problems = []
    pod_ctx = pod.get("securityContext", {})
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(flag):
            problems.append(f"{where}: {flag} is set")
    for c in containers(pod):
        at = f"{where}/{c['name']}"
        ctx = c.get("securityContext", {})
        if not ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot")):
            problems.append(f"{at}: runAsNonRoot is not true")
        if ctx.get("runAsUser", pod_ctx.get("runAsUser")) == 0:
            problems.append(f"{at}: runs as uid 0")
        if ctx.get("privileged"):
            problems.append(f"{at}: privileged")
        if ctx.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{at}: allowPrivilegeEscalation is not false")
        if "ALL" not in ctx.get("capabilities", {}).get("drop", []):
            problems.append(f"{at}: capabilities do not drop ALL")
        if ctx.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{at}: readOnlyRootFilesystem is not true")
        for env in c.get("env", []):
            if SECRET_NAME.search(env["name"]) and "value" in env:
                problems.append(f"{at}: {env['name']} is inline; use valueFrom.secretKeyRef")
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref is not None and not (ref.get("name") and ref.get("key")):
                problems.append(f"{at}: secretKeyRef of {env['name']} needs name and key")
        resources = c.get("resources", {})
        for kind in ("requests", "limits"):
            for res in ("cpu", "memory", "ephemeral-storage"):
                if res not in resources.get(kind, {}):
                    problems.append(f"{at}: no {kind}.{res}")
        if resources.get("limits", {}).get("nvidia.com/gpu") != resources.get("requests", {}).get(
            "nvidia.com/gpu", resources.get("limits", {}).get("nvidia.com/gpu")
        ):
            problems.append(f"{at}: nvidia.com/gpu requests differ from limits")
        tag = c["image"].rsplit("/", 1)[-1].partition(":")[2]
        if tag in ("", "latest") and "@sha256:" not in c["image"]:
            problems.append(f"{at}: image {c['image']} has no pinned tag")
    for volume in pod.get("volumes", []):
        empty_dir = volume.get("emptyDir")
        if empty_dir is not None and "sizeLimit" not in empty_dir:
            problems.append(f"{where}: emptyDir {volume['name']} has no sizeLimit")
    return problems


def writable_path_problems(where: str, role: str, pod: dict[str, Any]) -> list[str]:
    """Paths a read-only container must still write, each an emptyDir mount."""
    empty_dirs = {v["name"] for v in pod.get("volumes", []) if "emptyDir" in v}
    problems = []
    for c in pod["containers"]:
        mounted = {m["mountPath"] for m in c.get("volumeMounts", []) if m["name"] in empty_dirs}
        for path in WRITABLE_PATHS[role]:
            if path not in mounted:
                problems.append(f"{where}/{c['name']}: {path} is not a writable emptyDir mount")
    return problems


def manifest_problems(doc: dict[str, Any]) -> list[str]:
    """Security and exposure problems of one manifest (empty = fine)."""
    kind = doc["kind"]
    name = doc.get("metadata", {}).get("name", "")
    problems = [] if DNS_1123_LABEL.match(name) else [f"{kind} name {name!r} is not a DNS-1123 label"]
    # The CRDs declare metadata as a bare object (the API server checks ObjectMeta itself).
    meta = doc.get("metadata", {})
    if unknown := set(meta) - {"name", "namespace", "labels", "annotations"}:
        problems.append(f"{kind} {name}: unexpected metadata keys {sorted(unknown)}")
    for field in ("labels", "annotations"):
        if not all(isinstance(v, str) for v in meta.get(field, {}).values()):
            problems.append(f"{kind} {name}: metadata.{field} values must be strings")
    if kind in RAY_KINDS:
        head = cluster_spec(doc)["headGroupSpec"]
        if head.get("serviceType", "ClusterIP") != "ClusterIP":
            problems.append(f"{name}: head service type {head['serviceType']} (only ClusterIP)")
        if head.get("headService", {}).get("spec", {}).get("type", "ClusterIP") != "ClusterIP":
            problems.append(f"{name}: headService type is not ClusterIP")
        if head.get("enableIngress"):
            problems.append(f"{name}: ingress enabled")
        if cluster_spec(doc).get("authOptions", {}).get("mode") != "token":
            problems.append(f"{name}: Ray token authentication is off (authOptions.mode: token)")
        for where, role, template in pod_templates(doc):
            problems += pod_security_problems(where, template["spec"])
            problems += writable_path_problems(where, role, template["spec"])
    elif kind == "Service":
        if doc["spec"].get("type") != "ClusterIP":
            problems.append(
                f"Service {name}: type {doc['spec'].get('type')!r} (must be ClusterIP, explicitly)"
            )
        if doc["spec"].get("externalIPs"):
            problems.append(f"Service {name}: externalIPs")
    elif kind == "Secret":
        problems.append(f"Secret {name}: secrets are created by the operator of the cluster, never committed")
    return problems


def check_standard_kind(doc: dict[str, Any]) -> None:
    """The non-Ray kinds we ship: Kubernetes' own schema (strict) where it has one, then our rules."""
    kind = doc["kind"]
    if kind != "ServiceMonitor":
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as err:
            where = ".".join(str(p) for p in err.path) or "(top)"
            pytest.fail(f"{kind} {doc['metadata']['name']}: {where}: {err.message}")
    if kind == "Service":
        assert doc["apiVersion"] == "v1"
        assert doc["spec"]["selector"], "a Service without a selector"
        for port in doc["spec"]["ports"]:
            assert port["name"] and isinstance(port["port"], int) and port["protocol"] in ("TCP", "UDP")
    elif kind == "PersistentVolumeClaim":
        assert doc["apiVersion"] == "v1"
        assert set(doc["spec"]["accessModes"]) <= {
            "ReadWriteOnce",
            "ReadOnlyMany",
            "ReadWriteMany",
            "ReadWriteOncePod",
        }
        assert re.fullmatch(r"\d+(Ki|Mi|Gi|Ti|Pi)", doc["spec"]["resources"]["requests"]["storage"])
    elif kind == "NetworkPolicy":
        assert doc["apiVersion"] == "networking.k8s.io/v1"
        assert "Ingress" in doc["spec"]["policyTypes"]
    elif kind == "ServiceMonitor":
        assert doc["apiVersion"] == "monitoring.coreos.com/v1"
        assert doc["spec"]["selector"]["matchLabels"]
        for endpoint in doc["spec"]["endpoints"]:
            assert endpoint["port"] and endpoint["path"].startswith("/")
    else:
        pytest.fail(f"no check for kind {kind}: add one here before shipping it")


# --- rule 9: every config file against its model --------------------------------------------------


def validate_deploy_file(path: Path) -> None:
    rel = path.relative_to(REPO / "deploy").as_posix()
    if rel == "runtime-env.yaml":
        from ray.runtime_env import RuntimeEnv

        RuntimeEnv(**yaml.safe_load(path.read_text()))
    elif rel.startswith("k8s/"):
        for doc in documents(path):
            assert doc["kind"] in RAY_KINDS + OTHER_KINDS, f"{rel}: unexpected kind {doc['kind']}"
            if doc["kind"] in RAY_KINDS:
                assert doc["apiVersion"] == "ray.io/v1"
                assert schema_errors(doc) == [], f"{rel} {doc['kind']} violates the KubeRay CRD"
                if doc["kind"] == "RayJob":
                    rayjob_config(doc)
            else:
                check_standard_kind(doc)
            assert manifest_problems(doc) == [], rel
    elif rel.startswith("grafana/") and path.suffix == ".json":
        dashboard = json.loads(path.read_text())
        assert dashboard["uid"] and isinstance(dashboard["panels"], list)
    else:
        pytest.fail(f"deploy/{rel}: no validator for this file; add it to validate_deploy_file")


@pytest.mark.parametrize("path", CONFIG_FILES + DEPLOY_FILES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_config_file_loads_against_its_model(path: Path) -> None:
    if path.parent == REPO / "configs":
        assert isinstance(load_config(path), DriftConfig)
    else:
        validate_deploy_file(path)


def test_the_folders_hold_what_the_tests_expect() -> None:
    assert (REPO / "configs" / "qwen2.5-7b-dapo.yaml") in CONFIG_FILES
    kinds = sorted(d["kind"] for _, d in all_manifests())
    assert kinds.count("RayCluster") == 2 and kinds.count("RayJob") == 2, kinds
    assert {"Service", "PersistentVolumeClaim", "NetworkPolicy", "ServiceMonitor"} <= set(kinds)


# --- the validator rejects what a cluster would reject --------------------------------------------


def _single_node_cluster() -> dict[str, Any]:
    (doc,) = documents(REPO / "deploy" / "k8s" / "raycluster-single-node.yaml")
    return copy.deepcopy(doc)


def test_unknown_field_is_rejected_where_kubectl_strict_rejects_it() -> None:
    doc = _single_node_cluster()
    doc["spec"]["workerGroupSpecs"][0]["replica"] = 1  # typo of `replicas`
    # The CRD itself leaves objects open (the API server would silently prune the key) ...
    assert schema_errors(doc, strict=False) == []
    # ... the closed schema reports it, as `kubectl apply` does.
    assert schema_errors(doc) == [
        "spec.workerGroupSpecs.0: Additional properties are not allowed ('replica' was unexpected)"
    ]


def test_unknown_container_field_is_rejected() -> None:
    doc = _single_node_cluster()
    doc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["securityContex"] = {}
    errors = schema_errors(doc)
    assert len(errors) == 1 and "'securityContex' was unexpected" in errors[0], errors


@pytest.mark.parametrize(
    ("mutate", "where"),
    [
        (
            lambda d: d["spec"]["workerGroupSpecs"][0].__setitem__("replicas", "two"),
            "spec.workerGroupSpecs.0.replicas",
        ),
        # int32 field: 2**31 is one past the largest value.
        (
            lambda d: d["spec"]["workerGroupSpecs"][0].__setitem__("maxReplicas", 2**31),
            "spec.workerGroupSpecs.0.maxReplicas",
        ),
        # rayStartParams values are strings (a bare 0 is a common mistake).
        (
            lambda d: d["spec"]["headGroupSpec"]["rayStartParams"].__setitem__("num-gpus", 0),
            "spec.headGroupSpec.rayStartParams.num-gpus",
        ),
        (lambda d: d["spec"]["workerGroupSpecs"][0].pop("groupName"), "spec.workerGroupSpecs.0"),
        (lambda d: d["spec"].pop("headGroupSpec"), "spec"),
        (
            lambda d: d["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"][
                "limits"
            ].__setitem__("memory", "512 GB"),
            "spec.workerGroupSpecs.0.template.spec.containers.0.resources.limits.memory",
        ),
    ],
    ids=["replicas-string", "int32-overflow", "start-param-int", "no-group-name", "no-head", "bad-quantity"],
)
def test_wrong_types_and_missing_fields_are_rejected(mutate, where: str) -> None:
    doc = _single_node_cluster()
    mutate(doc)
    errors = schema_errors(doc)
    assert errors and all(e.startswith(where + ":") for e in errors), errors


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda c, p: c["securityContext"].__setitem__("privileged", True), "/ray-head: privileged"),
        (
            lambda c, p: c["securityContext"].pop("allowPrivilegeEscalation"),
            "allowPrivilegeEscalation is not false",
        ),
        (lambda c, p: p["securityContext"].pop("runAsNonRoot"), "runAsNonRoot is not true"),
        (lambda c, p: p.__setitem__("hostNetwork", True), "hostNetwork is set"),
        (lambda c, p: c["env"].append({"name": "HF_TOKEN", "value": "hf_x"}), "HF_TOKEN is inline"),
        (lambda c, p: c["resources"]["limits"].pop("memory"), "no limits.memory"),
        (lambda c, p: c.__setitem__("image", "registry.example.com/driftrl:latest"), "has no pinned tag"),
        (lambda c, p: c["securityContext"].pop("readOnlyRootFilesystem"), "readOnlyRootFilesystem is not true"),
        (lambda c, p: c["resources"]["limits"].pop("ephemeral-storage"), "no limits.ephemeral-storage"),
        (
            lambda c, p: next(v for v in p["volumes"] if v["name"] == "scratch")["emptyDir"].pop("sizeLimit"),
            "emptyDir scratch has no sizeLimit",
        ),
        (
            lambda c, p: c["volumeMounts"].remove(next(m for m in c["volumeMounts"] if m["mountPath"] == "/tmp")),
            "/tmp is not a writable emptyDir mount",
        ),
    ],
    ids=[
        "privileged", "escalation", "root", "host-network", "inline-token", "no-memory-limit", "latest",
        "writable-root", "no-ephemeral-limit", "unbounded-emptydir", "no-tmp",
    ],
)  # fmt: skip
def test_security_check_reports_each_violation(mutate, expected: str) -> None:
    doc = _single_node_cluster()
    pod = doc["spec"]["headGroupSpec"]["template"]["spec"]
    mutate(pod["containers"][0], pod)
    problems = manifest_problems(doc)
    assert len(problems) == 1 and expected in problems[0], problems


def test_exposed_services_are_reported() -> None:
    doc = _single_node_cluster()
    doc["spec"]["headGroupSpec"]["serviceType"] = "LoadBalancer"
    del doc["spec"]["authOptions"]
    assert manifest_problems(doc) == [
        "driftrl-single-node: head service type LoadBalancer (only ClusterIP)",
        "driftrl-single-node: Ray token authentication is off (authOptions.mode: token)",
    ]
    (service,) = documents(REPO / "deploy" / "k8s" / "metrics-service.yaml")
    service["spec"]["type"] = "NodePort"
    assert manifest_problems(service) == [
        "Service driftrl-metrics: type 'NodePort' (must be ClusterIP, explicitly)"
    ]


# --- the manifests agree with each other, the config and pyproject --------------------------------


def test_rayjob_embeds_the_raycluster_of_its_variant() -> None:
    clusters = {d["metadata"]["name"]: d for d in of_kind("RayCluster")}
    for job in of_kind("RayJob"):
        assert job["spec"]["rayClusterSpec"] == clusters[job["metadata"]["name"]]["spec"], job["metadata"][
            "name"
        ]


def test_ray_version_and_image_tag_follow_pyproject() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    (ray_pin,) = [d for d in project["dependencies"] if d.startswith("ray[")]
    ray_version = ray_pin.split("==")[1]
    for doc in of_kind(*RAY_KINDS):
        assert cluster_spec(doc)["rayVersion"] == ray_version
        for where, _, template in pod_templates(doc):
            for c in containers(template["spec"]):
                assert c["image"].endswith(f"/driftrl:{project['version']}"), (where, c["image"])


def test_rayjob_entrypoint_config_validates_and_fits_the_cluster() -> None:
    for job in of_kind("RayJob"):
        cfg = rayjob_config(job)
        name = job["metadata"]["name"]
        groups = cluster_spec(job)["workerGroupSpecs"]

        def capacity(res: str, groups=groups) -> float:
            return sum(
                g["replicas"] * quantity(c["resources"]["limits"].get(res, 0))
                for g in groups
                for c in g["template"]["spec"]["containers"]
            )

        gpus = (
            cfg.rollout.num_actors * cfg.rollout.num_gpus
            + cfg.learner.data_parallel_size * cfg.learner.num_gpus
        )
        cpus = (
            cfg.rollout.num_actors * cfg.rollout.num_cpus
            + cfg.learner.data_parallel_size * cfg.learner.num_cpus
        )
        assert gpus == capacity("nvidia.com/gpu"), (
            f"{name}: the run needs {gpus} GPUs, the workers have another count"
        )
        assert cpus <= capacity("cpu"), f"{name}: the run needs {cpus} CPUs"
        head_params = cluster_spec(job)["headGroupSpec"]["rayStartParams"]
        assert head_params["num-gpus"] == "0" and head_params["num-cpus"] == "0"
        # Prometheus must reach the driver inside the head pod.
        assert cfg.metrics.host == "0.0.0.0"
        assert cfg.run.ray_address == "auto"


def test_custom_resources_of_worker_groups_match_their_gpus() -> None:
    for doc in of_kind(*RAY_KINDS):
        for group in cluster_spec(doc)["workerGroupSpecs"]:
            raw = group["rayStartParams"].get("resources")
            if raw is None:
                continue
            # KubeRay passes the value to `ray start --resources=<value>` through a shell: a quoted JSON.
            assert raw.startswith('"') and raw.endswith('"'), raw
            resources = json.loads(raw[1:-1].replace('\\"', '"'))
            (limit,) = [
                c["resources"]["limits"]["nvidia.com/gpu"] for c in group["template"]["spec"]["containers"]
            ]
            assert resources == {group["groupName"]: limit}


def test_metrics_service_reaches_the_driver_port_of_the_head_pods() -> None:
    (service,) = of_kind("Service")
    selector = service["spec"]["selector"]
    (port,) = service["spec"]["ports"]
    for doc in of_kind(*RAY_KINDS):
        metrics_port = (
            rayjob_config(doc).metrics.port if doc["kind"] == "RayJob" else DriftConfig().metrics.port
        )
        for where, role, template in pod_templates(doc):
            labels = template["metadata"].get("labels", {})
            selected = selector.items() <= labels.items()
            assert selected == (role == "head"), f"{where}: the Service must select exactly the head pods"
            if role != "head":
                continue
            (container,) = template["spec"]["containers"]
            named = {p["name"]: p["containerPort"] for p in container["ports"]}
            assert named[port["targetPort"]] == port["port"] == metrics_port, where
            annotations = template["metadata"]["annotations"]
            assert annotations["prometheus.io/scrape"] == "true"
            assert annotations["prometheus.io/port"] == str(metrics_port)
    (monitor,) = of_kind("ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == [port["name"]]


def test_every_ray_pod_mounts_the_run_volume_where_the_run_writes() -> None:
    claims = {d["metadata"]["name"] for d in of_kind("PersistentVolumeClaim")}
    for doc in of_kind(*RAY_KINDS):
        root_dir = rayjob_config(doc).run.root_dir if doc["kind"] == "RayJob" else "/mnt/driftrl/runs"
        for where, role, template in pod_templates(doc):
            if role == "submitter":
                continue
            pod = template["spec"]
            volumes = {v["name"]: v for v in pod["volumes"]}
            (container,) = pod["containers"]
            mounts = {
                m["mountPath"]: volumes[m["name"]]["persistentVolumeClaim"]["claimName"]
                for m in container["volumeMounts"]
                if "persistentVolumeClaim" in volumes[m["name"]]
            }
            assert any(root_dir.startswith(path + "/") for path in mounts), (where, mounts, root_dir)
            assert set(mounts.values()) <= claims, where
            hf_home = {e["name"]: e.get("value") for e in container["env"]}["HF_HOME"]
            assert any(hf_home.startswith(path + "/") for path in mounts), where


def test_rayjob_runtime_env_matches_the_submit_runtime_env() -> None:
    from ray.runtime_env import RuntimeEnv

    submit_env = yaml.safe_load((REPO / "deploy" / "runtime-env.yaml").read_text())
    for job in of_kind("RayJob"):
        job_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
        RuntimeEnv(**job_env)
        assert job_env == {"env_vars": submit_env["env_vars"]}
    assert not {"pip", "uv", "conda", "container", "image_uri"} & submit_env.keys()
    assert not any(SECRET_NAME.search(k) for k in submit_env["env_vars"])
    assert {".venv/", ".git/", "runs/"} <= set(submit_env["excludes"])


# --- probes on the driver's /healthz, the network policy -------------------------------------------


def probe_url(probe: dict[str, Any]) -> str:
    """The URL an exec probe of the form ``python -c "...urlopen('<url>', ...)"`` opens."""
    command = probe["exec"]["command"]
    assert command[:2] == ["python", "-c"], command
    (url,) = re.findall(r"urlopen\('([^']+)'", command[2])
    return url


def test_rayjob_submitters_probe_the_drivers_healthz_and_the_head_does_not() -> None:
    (service,) = of_kind("Service")
    (port,) = service["spec"]["ports"]
    expected = f"http://{service['metadata']['name']}:{port['port']}/healthz"
    for job in of_kind("RayJob"):
        assert rayjob_config(job).metrics.port == port["port"]
        for where, role, template in pod_templates(job):
            (container,) = template["spec"]["containers"]
            probes = {
                k: container[k] for k in ("startupProbe", "readinessProbe", "livenessProbe") if k in container
            }
            if role == "submitter":
                assert set(probes) == {"startupProbe", "readinessProbe", "livenessProbe"}, where
                assert {k: probe_url(v) for k, v in probes.items()} == dict.fromkeys(probes, expected)
                # a run is ended only after a long unhealthy stretch, not at one slow learner step
                live = probes["livenessProbe"]
                assert live["periodSeconds"] * live["failureThreshold"] >= 600, where
            else:
                # KubeRay submits the job once the head is ready: a head probe on the driver would
                # wait for itself (and restart long-lived clusters between runs)
                assert not probes, where


def test_the_probe_command_fails_on_503_and_on_no_server_and_passes_on_200() -> None:
    import subprocess
    import sys

    from driftrl.metrics import MetricsServer, RunTelemetry

    (job, *_) = of_kind("RayJob")
    (container,) = job["spec"]["submitterPodTemplate"]["spec"]["containers"]
    command = container["livenessProbe"]["exec"]["command"]
    telemetry = RunTelemetry(heartbeat_timeout_s=60)
    server = MetricsServer(telemetry, host="127.0.0.1", port=0).start()
    try:
        # the same command, with this machine's python and the test server in place of the Service
        code = command[2].replace(probe_url(container["livenessProbe"]), f"{server.url}/healthz")
        local = [sys.executable, "-c", code]

        def exit_code() -> int:
            return subprocess.run(local, capture_output=True, timeout=60).returncode

        assert exit_code() == 0
        telemetry.heartbeats["learner"] = 0.0  # last heard of in 1970: /healthz answers 503
        assert exit_code() != 0
    finally:
        server.stop()
    assert exit_code() != 0  # nothing listening


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, f"evaluator knows matchLabels only: {selector}"
    return selector.get("matchLabels", {}).items() <= labels.items()


def ingress_allowed(policy: dict[str, Any], port: int, peer: dict[str, str], same_namespace: bool) -> bool:
    """Whether ``policy`` lets a pod with labels ``peer`` reach ``port`` (NetworkPolicy semantics)."""
    for rule in policy["spec"]["ingress"]:
        ports = {p["port"] for p in rule.get("ports", [])}
        if ports and port not in ports:
            continue
        for source in rule.get("from", []):
            namespace_ok = "namespaceSelector" in source or same_namespace
            if namespace_ok and _selects(source.get("podSelector", {}), peer):
                return True
    return False


def test_network_policy_opens_the_ports_to_prometheus_the_operator_and_the_run_only() -> None:
    (policy,) = of_kind("NetworkPolicy")
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    # it covers every pod of every manifest
    for doc in of_kind(*RAY_KINDS):
        for where, _, template in pod_templates(doc):
            assert _selects(policy["spec"]["podSelector"], template["metadata"]["labels"]), where
    run_pod = {"app.kubernetes.io/name": "driftrl", "app.kubernetes.io/component": "ray-worker"}
    prometheus = {"app.kubernetes.io/name": "prometheus"}
    operator = {"app.kubernetes.io/name": "kuberay-operator"}
    stranger = {"app": "someone-else"}
    metrics, ray_metrics, dashboard, client, gcs = 9464, 8080, 8265, 10001, 6379
    expected = {
        (metrics, "run"): True, (ray_metrics, "run"): True, (dashboard, "run"): True, (client, "run"): True,
        (gcs, "run"): True,
        (metrics, "prometheus"): True, (ray_metrics, "prometheus"): True, (dashboard, "prometheus"): False,
        (client, "prometheus"): False,
        (dashboard, "operator"): True, (metrics, "operator"): False, (client, "operator"): False,
        (metrics, "stranger"): False, (dashboard, "stranger"): False, (client, "stranger"): False,
        (gcs, "stranger"): False,
    }  # fmt: skip
    peers = {"run": run_pod, "prometheus": prometheus, "operator": operator, "stranger": stranger}
    for (port, who), allowed in expected.items():
        # Prometheus and the operator usually run in their own namespaces; the rest is in ours
        other_namespace = who in ("prometheus", "operator")
        got = ingress_allowed(policy, port, peers[who], same_namespace=not other_namespace)
        assert got == allowed, (port, who)
    # the run's pods of another namespace are strangers too (their podSelector rule has no namespaceSelector)
    assert not ingress_allowed(policy, client, run_pod, same_namespace=False)
