"""Deployment files in infra/: KubeRay RayJob, Ray cluster-launcher YAML, Dockerfile, README.

Offline and fast: the RayJob is validated against KubeRay's own RayJob CRD schema (stored in
infra/schemas/), the cluster YAML with Ray's own config validator, the Dockerfile by parsing it.
"""

from __future__ import annotations

import copy
import re
import shlex
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
RAYJOB = INFRA / "kuberay-rayjob.yaml"
CLUSTER = INFRA / "cluster.yaml"
DOCKERFILE = INFRA / "Dockerfile"
CRD = INFRA / "schemas" / "ray.io_rayjobs.yaml"
ENTRY_MODULE = "jobs.decompose"
# RayJob spec.submissionMode values (KubeRay ray-operator/apis/ray/v1/rayjob_types.go); the CRD types
# the field as a plain string, so the enum is checked here.
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}
SECRETISH = re.compile(r"(KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL)", re.I)

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRD is 1.4 MB: libyaml parses it in 0.3 s


def _load(path: Path):
    return yaml.load(path.read_text(), Loader=_Loader)


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return _load(RAYJOB)


@pytest.fixture(scope="module")
def cluster() -> dict:
    return _load(CLUSTER)


@pytest.fixture(scope="module")
def crd() -> dict:
    return _load(CRD)


# ---------------------------------------------------------------------------------------------- parsing

@pytest.mark.parametrize("path", [RAYJOB, CLUSTER, CRD], ids=lambda p: p.name)
def test_yaml_files_parse_to_one_mapping(path):
    docs = [d for d in yaml.load_all(path.read_text(), Loader=_Loader) if d is not None]
    assert len(docs) == 1 and isinstance(docs[0], dict), f"{path.name}: expected one YAML mapping"


def test_crd_file_names_its_source_and_license(crd):
    header = CRD.read_text()[:2000]
    assert "https://github.com/ray-project/kuberay" in header
    assert "ray-operator/config/crd/bases/ray.io_rayjobs.yaml" in header
    assert "Apache" in header
    assert crd["kind"] == "CustomResourceDefinition" and crd["metadata"]["name"] == "rayjobs.ray.io"


# ------------------------------------------------------------------------------------- KubeRay RayJob

def _crd_schema(crd: dict, api_version: str, kind: str) -> dict:
    group, _, version = api_version.partition("/")
    spec = crd["spec"]
    assert spec["group"] == group and spec["names"]["kind"] == kind, (api_version, kind)
    served = {v["name"]: v for v in spec["versions"] if v.get("served")}
    assert version in served, f"{api_version} is not served by the CRD (served: {sorted(served)})"
    return served[version]["schema"]["openAPIV3Schema"]


def _strict(schema):
    """Reject unknown fields like the API server's strict field validation (`kubectl apply` default):
    an object schema that lists `properties` allows nothing else unless it preserves unknown fields."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def rayjob_validator(crd, rayjob):
    schema = _strict(_crd_schema(crd, rayjob["apiVersion"], rayjob["kind"]))
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    cls.check_schema(schema)
    return cls(schema)


def _errors(validator, doc) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def test_rayjob_validates_against_kuberay_crd(rayjob, rayjob_validator):
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    assert _errors(rayjob_validator, rayjob) == []


@pytest.mark.parametrize("mutate", [
    lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"].update(rayStartParam={"num-cpus": "0"}),  # typo
    lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].update(replicas="four"),
    lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}),
    lambda d: d["spec"]["rayClusterSpec"]["authOptions"].update(mode="tokens"),
    lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].pop("groupName"),
], ids=["unknown-field", "wrong-type", "rayStartParams-not-string", "bad-enum", "missing-required"])
def test_crd_validation_catches_mistakes(rayjob, rayjob_validator, mutate):
    bad = copy.deepcopy(rayjob)
    mutate(bad)
    assert _errors(rayjob_validator, bad), "the CRD validation accepted a broken RayJob"


def _containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def test_rayjob_head_runs_no_work(rayjob):
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    for c in _containers(head):
        for section in ("requests", "limits"):
            assert "nvidia.com/gpu" not in c.get("resources", {}).get(section, {}), "no GPU on the head"


def test_rayjob_gpu_workers_with_shm(rayjob):
    groups = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert groups
    for g in groups:
        assert 0 <= g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"], g["groupName"]
        assert g["maxReplicas"] >= 1
        pod = g["template"]["spec"]
        memory_volumes = {v["name"] for v in pod.get("volumes", [])
                          if v.get("emptyDir", {}).get("medium") == "Memory"}
        ray_container = _containers(g)[0]  # KubeRay treats the first container as the Ray container
        assert int(ray_container["resources"]["limits"]["nvidia.com/gpu"]) >= 1, g["groupName"]
        shm = [m for m in ray_container.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"]
        assert len(shm) == 1 and shm[0]["name"] in memory_volumes, "/dev/shm must be an emptyDir medium Memory"


def test_rayjob_entrypoint_runs_the_decompose_module(rayjob):
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", ENTRY_MODULE], argv[:3]
    module_file = REPO / (ENTRY_MODULE.replace(".", "/") + ".py")
    assert module_file.is_file(), f"{module_file.relative_to(REPO)} is missing"
    opts = {a.split("=", 1)[0]: (a.split("=", 1)[1] if "=" in a else (argv[i + 1] if i + 1 < len(argv) else ""))
            for i, a in enumerate(argv) if a.startswith("--")}
    assert opts["--input"].startswith("s3://") and opts["--output"].startswith("s3://")
    # the module's own parser takes every flag (fit settings are derived from FitConfig, not spelled out)
    from jobs.decompose import build_parser

    args = build_parser().parse_args(argv[3:])
    assert args.input == opts["--input"] and args.output == opts["--output"]


def test_rayjob_lifecycle(rayjob):
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0
    assert spec["submissionMode"] in SUBMISSION_MODES


def test_rayjob_same_image_and_settings_on_head_and_workers(rayjob):
    rcs = rayjob["spec"]["rayClusterSpec"]
    containers = [_containers(rcs["headGroupSpec"])[0]] + [_containers(g)[0] for g in rcs["workerGroupSpecs"]]
    assert len({c["image"] for c in containers}) == 1, "head and workers must run the same image"
    for c in containers:
        env = {e["name"]: e for e in c.get("env", [])}
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert "secretKeyRef" in env[name]["valueFrom"], f"{name} must come from a Secret"
        endpoint = env["AWS_ENDPOINT_URL"]["valueFrom"]["secretKeyRef"]
        assert endpoint.get("optional") is True, "AWS_ENDPOINT_URL is optional (only for MinIO etc.)"
        assert env["MLFLOW_TRACKING_URI"].get("value", "").startswith(("http://", "https://"))
        for name, e in env.items():  # nothing secret-looking as a literal value
            if SECRETISH.search(name):
                assert "value" not in e and "secretKeyRef" in e.get("valueFrom", {}), name


def test_rayjob_token_auth_from_secret(rayjob):
    rcs = rayjob["spec"]["rayClusterSpec"]
    auth = rcs["authOptions"]
    assert auth["mode"] == "token" and auth["secretName"]
    # KubeRay refuses authOptions.mode token without rayVersion >= 2.52.0 (utils/validation.go)
    version = tuple(int(x) for x in rcs["rayVersion"].split("."))
    assert version >= (2, 52, 0)


def test_one_ray_version_everywhere(rayjob, cluster, dockerfile):
    """Head, workers, driver and submitter must run the same Ray: the RayJob's rayVersion, the image
    tags (Dockerfile, cluster.yaml) and the version pinned by cluster.yaml's setup commands agree."""
    version = rayjob["spec"]["rayClusterSpec"]["rayVersion"]
    base = [args for op, args in dockerfile if op == "FROM"][0]
    assert base.startswith(f"rayproject/ray:{version}-"), base
    assert cluster["docker"]["image"].startswith(f"rayproject/ray:{version}-"), cluster["docker"]["image"]
    pins = re.findall(r"ray\[[\w,]*\]==([\d.]+)", "\n".join(cluster["setup_commands"]))
    assert pins == [version], pins


# ------------------------------------------------------------------------------ Ray cluster launcher

def test_cluster_yaml_passes_rays_validator(cluster):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(cluster)))  # what `ray up` runs before bootstrapping
    bad = copy.deepcopy(cluster)
    bad["available_node_types"]["ray.head.default"]["min_worker"] = 0  # typo: must be rejected
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))


def test_cluster_yaml_layout(cluster):
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "the head runs no tasks"
    workers = [t for name, t in types.items() if name != cluster["head_node_type"]]
    assert workers and all(t["resources"].get("GPU", 0) >= 1 for t in workers)
    docker = cluster["docker"]
    assert re.fullmatch(r"rayproject/ray:\d+\.\d+\.\d+-py311-cu12\d", docker["image"]), docker["image"]
    assert "--env RAY_AUTH_MODE=token" in docker["run_options"]
    assert "~/.ray/auth_token" in cluster["file_mounts"]
    setup = "\n".join(cluster["setup_commands"])
    assert "pip install -e ~/unziplora" in setup
    assert re.search(r"pip install --no-deps \"?open-clip-torch", setup)
    assert "download.pytorch.org/whl/cu12" in setup
    assert any("--num-cpus=0" in c for c in cluster["head_start_ray_commands"])


# ------------------------------------------------------------------------------------------ Dockerfile

def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    instructions, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue
        current += " " + stripped
        if current.endswith("\\"):
            current = current[:-1]
            continue
        op, _, args = current.strip().partition(" ")
        instructions.append((op.upper(), args.strip()))
        current = ""
    return instructions


def _expand(text: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables.get(m[1] or m[2], m[0]), text)


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    """Instructions with ARG defaults and ENV values substituted."""
    variables, out = {}, []
    for op, args in _dockerfile():
        if op in ("ARG", "ENV"):
            for name, value in re.findall(r'(\w+)=("[^"]*"|\S+)', args):
                variables[name] = _expand(value.strip('"'), variables)
        out.append((op, _expand(args, variables)))
    return out


def test_dockerfile_base_image_is_the_ray_gpu_image(dockerfile, rayjob):
    base = [args for op, args in dockerfile if op == "FROM"]
    assert len(base) == 1
    version = rayjob["spec"]["rayClusterSpec"]["rayVersion"]
    assert re.fullmatch(rf"rayproject/ray:{re.escape(version)}-py311-cu12\d", base[0]), base[0]


def test_dockerfile_copies_and_installs_the_project(dockerfile):
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    needed = {"pyproject.toml", "unziplora", "pipeline", "jobs"}
    needed |= {p.rstrip("*").split(".")[0] for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    if isinstance(pyproject["project"].get("readme"), str):
        needed.add(pyproject["project"]["readme"])  # the build reads it
    copied = set()
    for op, args in dockerfile:
        if op == "COPY":
            sources = [a for a in args.split() if not a.startswith("--")][:-1]
            copied |= {s.rstrip("/") for s in sources}
    assert needed <= copied, f"not copied: {sorted(needed - copied)}"
    runs = [args for op, args in dockerfile if op == "RUN"]
    install = [i for i, r in enumerate(runs) if re.search(r"pip install (\S+ )*-e \.(\s|$)", r)]
    assert install, "the project is not installed with pip install -e ."
    torch = [i for i, r in enumerate(runs) if "pip install" in r and "download.pytorch.org/whl/cu12" in r
             and "torch" in r.split("cu12", 1)[1]]
    assert torch and torch[0] < install[0], "a CUDA torch build must be installed before the project"


def test_dockerfile_installs_open_clip_without_deps(dockerfile):
    commands = [c for op, args in dockerfile if op == "RUN" for c in re.split(r"&&|;", args)]
    clip = [c for c in commands if "open-clip-torch" in c]
    assert clip and all("pip install" in c and "--no-deps" in c for c in clip), clip


def test_dockerfile_hf_cache_volume_and_no_secrets(dockerfile):
    env = {}
    for op, args in dockerfile:
        if op in ("ENV", "ARG"):
            for name, value in re.findall(r'(\w+)=("[^"]*"|\S+)', args):
                env[name] = value.strip('"')
                assert not SECRETISH.search(name), f"{op} {name}: secrets are given at run time, not built in"
    assert env.get("HF_HOME", "").startswith("/")
    volumes = " ".join(args for op, args in dockerfile if op == "VOLUME")
    assert env["HF_HOME"] in volumes, "HF_HOME must be a VOLUME"
    users = [args for op, args in dockerfile if op == "USER"]
    assert users and users[-1] not in ("root", "0")


# ------------------------------------------------------------------------------------------- secrets

_SECRET_PATTERNS = {
    "AWS access key id": re.compile(r"\b(AKIA|ASIA|AGPA|AIDA|AROA|ANPA)[0-9A-Z]{16}\b"),
    "AWS secret access key": re.compile(
        r"(?i)aws_?secret_?access_?key['\"]?\s*[:=]\s*['\"]?[A-Za-z0-9/+=]{40}(?![A-Za-z0-9/+=])"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "GitHub token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36,}\b"),
    "Hugging Face token": re.compile(r"\bhf_[A-Za-z0-9]{30,}\b"),
}


def _find_secrets(text: str) -> list[str]:
    return [name for name, pattern in _SECRET_PATTERNS.items() if pattern.search(text)]


def test_secret_scanner_detects_planted_secrets():
    fake_id = "AKIA" + "Q" * 16
    fake_secret = "AWS_SECRET_ACCESS_KEY=" + "a1B2/c3D4+" * 4
    assert _find_secrets(f"key: {fake_id}") == ["AWS access key id"]
    assert _find_secrets(fake_secret) == ["AWS secret access key"]
    assert _find_secrets("AWS_SECRET_ACCESS_KEY=...") == []


@pytest.mark.parametrize("path", sorted(p for p in INFRA.rglob("*") if p.is_file()),
                         ids=lambda p: str(p.relative_to(INFRA)))
def test_no_literal_secrets_in_infra(path):
    assert _find_secrets(path.read_text(errors="replace")) == []


# ---------------------------------------------------------------------------------------- documentation

def test_readme_documents_auth_s3_and_mlflow_settings():
    text = (INFRA / "README.md").read_text()
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "~/.ray/auth_token",
                 "ray get-auth-token", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL",
                 "MLFLOW_TRACKING_URI", "HF_HOME", "docker build", "kubectl apply", "ray up", "ray job submit"):
        assert name in text, name


def test_documented_ray_auth_names_match_installed_ray():
    """The env var and token path in README/YAML are the ones the installed Ray reads."""
    setup = pytest.importorskip("ray._private.authentication.authentication_token_setup")
    assert setup.AUTH_MODE_ENV_VAR == "RAY_AUTH_MODE"
    assert setup._get_default_token_path() == Path.home() / ".ray" / "auth_token"
