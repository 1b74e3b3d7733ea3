"""The shipped cluster files: Ray launcher configs (cluster/aws, cluster/gcp), KubeRay manifests
(cluster/kuberay), the MLflow deployment (cluster/mlflow), the node image (cluster/docker) and
the cluster experiment configs (configs/cluster-*.yaml). Fast, offline.

They must parse and have the shape their tools read, and pass a security scan generated over
every shipped file. The scan's rules (each has a failing example in `test_scanner_flags`):

1. No literal secrets. A key or variable named like a secret (password, passwd, secret,
   token, api/access/private key, credential; not ...Name/...Ref/...Path/...File/...Id/...Arn,
   which name a secret rather than hold one) may only hold an empty value or a reference to the
   environment (`$VAR`, `${VAR...}`, `$(VAR)`); Kubernetes env entries named like a secret must
   use `valueFrom`; no Kubernetes Secret with data; no URL with an inline password; no
   `--password`/`--token`/`--secret` flag with a literal. (Also applied to docs/cluster.md.)
2. Nothing listens on all interfaces without authentication. A file that binds the Ray
   dashboard, GCS or client server to 0.0.0.0 (`dashboard-host`, `--dashboard-host`,
   `--node-ip-address`) must turn Ray token auth on in that file (RAY_AUTH_MODE=token or
   KubeRay authOptions mode token); an `mlflow server` command with `--host 0.0.0.0` must run
   `--app-name basic-auth`. No Kubernetes Service of type LoadBalancer/NodePort, no Ingress,
   hostNetwork or hostPort, KubeRay head serviceType ClusterIP only; every docker-compose port
   is published on an explicit non-0.0.0.0 address (loopback by default); no launcher
   security-group rule open to 0.0.0.0/0.
3. Ray token auth on every Ray node definition: every `ray start` in a launcher config runs
   with RAY_AUTH_MODE=token (and setup writes the token file); every Ray container of every
   KubeRay cluster (head, worker groups, autoscaler sidecar) gets RAY_AUTH_MODE=token and
   RAY_AUTH_TOKEN from a Secret, unless the cluster sets authOptions mode token.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_DIRS = ("cluster/aws", "cluster/gcp", "cluster/kuberay", "cluster/mlflow", "cluster/docker")
LAUNCHERS = ("cluster/aws/cluster.yaml", "cluster/gcp/cluster.yaml")
KUBERAY = ("cluster/kuberay/raycluster.yaml", "cluster/kuberay/rayjob.yaml")
CLUSTER_CONFIGS = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").glob("cluster-*.yaml"))


def _shipped() -> list[str]:
    files = []
    for d in CLUSTER_DIRS:
        for p in sorted((ROOT / d).rglob("*")):
            # `.env` is the user's own, git-ignored secrets file (see cluster/mlflow/.env.example).
            if p.is_file() and "__pycache__" not in p.parts and p.name != ".env":
                files.append(p.relative_to(ROOT).as_posix())
    return files + CLUSTER_CONFIGS


SHIPPED = _shipped()
YAML_FILES = [f for f in SHIPPED if f.endswith((".yaml", ".yml"))]


def _docs(rel: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((ROOT / rel).read_text()) if d is not None]


# --------------------------------------------------------------------------------------------
# The security scanner
# --------------------------------------------------------------------------------------------

SECRET_WORD = re.compile(r"pass(word|wd)?|secret|token|api[_-]?key|access[_-]?key|private[_-]?key|credential",
                         re.IGNORECASE)
NAMES_A_SECRET = re.compile(r"(name|ref|path|file|id|arn|mode|type|kind|src)$", re.IGNORECASE)
ENV_REF = re.compile(r"""^["']?(\$\{?[A-Za-z_][A-Za-z0-9_]*|\$\()""")
ALL_INTERFACES = re.compile(r"""^["']?(0\.0\.0\.0|::|\[::\])["']?$""")
RAY_BIND = re.compile(r"""(--dashboard-host|--node-ip-address|dashboard-host|node-ip-address)["']?\s*[=:\s]\s*["']?"""
                      r"""(0\.0\.0\.0|::)\b""")
RAY_TOKEN_ON = re.compile(r"""RAY_AUTH_MODE\s*=\s*["']?token\b""")
# KEY=value, key = value (ini), key: value (YAML); not ${KEY:-...} nor psql's `PASSWORD :'var'`.
ASSIGN = re.compile(r"""(?<![A-Za-z0-9_.${-])([A-Za-z0-9_.-]+)["']?(?:\s*=\s*|:\s*)("[^"]*"|'[^']*'|[^\s,}#]*)""")
SQL_PASSWORD = re.compile(r"""\bPASSWORD\s+'[^']*'""", re.IGNORECASE)
URL_PASSWORD = re.compile(r"\b[a-z][a-z0-9+.-]*://[^/\s:@'\"]+:([^@\s/'\"]+)@")
FLAG_SECRET = re.compile(r"--(password|passwd|token|secret|auth-token|api-key)[= ]+(\S+)", re.IGNORECASE)


# Settings whose names contain a secret word but hold none (EC2 MetadataOptions: IMDSv2 on/off).
NOT_SECRETS = {"HttpTokens"}


def _is_secret_name(name: str) -> bool:
    return bool(SECRET_WORD.search(name)) and not NAMES_A_SECRET.search(name) and name not in NOT_SECRETS


def _is_reference(value: str) -> bool:
    v = value.strip()
    # `$VAR`, `${VAR:-...}`, `$(cmd)`, or a call in code (`password=getpass.getpass(...)`).
    return v in ("", '""', "''") or bool(ENV_REF.match(v)) or bool(re.match(r"^[A-Za-z_][\w.]*\(", v))


def _walk(node, path=()):
    yield path, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, (*path, str(k)))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, (*path, str(i)))


def _commands(doc) -> list[str]:
    """Every shell command of a parsed document: strings, and lists of strings joined."""
    out = []
    for _, node in _walk(doc):
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, list) and node and all(isinstance(x, (str, int, float)) for x in node):
            out.append(" ".join(str(x) for x in node))
    return out


def _env_value(env: list | None, name: str):
    for item in env or []:
        if isinstance(item, dict) and item.get("name") == name:
            return item
    return None


def _ray_cluster_specs(doc: dict) -> list[tuple[str, dict]]:
    kind = doc.get("kind")
    spec = doc.get("spec") or {}
    if kind == "RayCluster":
        return [("spec", spec)]
    if kind == "RayJob" and spec.get("rayClusterSpec"):
        return [("spec.rayClusterSpec", spec["rayClusterSpec"])]
    if kind == "RayService" and spec.get("rayClusterConfig"):
        return [("spec.rayClusterConfig", spec["rayClusterConfig"])]
    return []


def _ray_auth_problems(where: str, spec: dict) -> list[str]:
    """Rule 3 for one KubeRay cluster spec."""
    if (spec.get("authOptions") or {}).get("mode") == "token":
        return []
    problems = []
    groups = [("headGroupSpec", spec.get("headGroupSpec") or {})]
    groups += [(f"workerGroupSpecs[{g.get('groupName')}]", g) for g in spec.get("workerGroupSpecs") or []]
    envs = [(f"{name} container {c.get('name')}", c.get("env"))
            for name, g in groups for c in ((g.get("template") or {}).get("spec") or {}).get("containers") or []]
    if spec.get("enableInTreeAutoscaling"):
        envs.append(("autoscalerOptions", (spec.get("autoscalerOptions") or {}).get("env")))
    for what, env in envs:
        mode = _env_value(env, "RAY_AUTH_MODE")
        token = _env_value(env, "RAY_AUTH_TOKEN") or _env_value(env, "RAY_AUTH_TOKEN_PATH")
        if not mode or str(mode.get("value")).lower() != "token":
            problems.append(f"{where}.{what}: RAY_AUTH_MODE=token not set (Ray token auth off)")
        if not token or ("valueFrom" not in token and "RAY_AUTH_TOKEN_PATH" != token.get("name")):
            problems.append(f"{where}.{what}: RAY_AUTH_TOKEN must come from a Secret (valueFrom.secretKeyRef)")
    return problems


def _structured_findings(name: str, docs: list) -> list[str]:
    found = []
    for doc in docs:
        for path, node in _walk(doc):
            where = ".".join(path) or "<root>"
            if isinstance(node, dict):
                for k, v in node.items():
                    if isinstance(v, str) and _is_secret_name(str(k)) and not _is_reference(v):
                        found.append(f"{name}: {where}.{k}: literal secret value (use an env or Secret reference)")
                if isinstance(node.get("name"), str) and "value" in node and "valueFrom" not in node \
                        and _is_secret_name(node["name"]) and not _is_reference(str(node["value"])):
                    found.append(f"{name}: {where}: env {node['name']} has a literal value (use valueFrom)")
                if node.get("hostNetwork") is True:
                    found.append(f"{name}: {where}: hostNetwork exposes the pod's ports on the node")
                if "hostPort" in node:
                    found.append(f"{name}: {where}: hostPort exposes a port on the node")
        if not isinstance(doc, dict):
            continue
        kind = doc.get("kind")
        if kind == "Secret" and (doc.get("data") or doc.get("stringData")):
            found.append(f"{name}: Secret {doc.get('metadata', {}).get('name')}: ships secret data "
                         "(create Secrets with kubectl from files or the environment)")
        if kind == "Service" and (doc.get("spec") or {}).get("type", "ClusterIP") != "ClusterIP":
            found.append(f"{name}: Service {doc['metadata'].get('name')}: type {doc['spec']['type']} "
                         "exposes it outside the cluster (ClusterIP + port-forward only)")
        if kind in ("Ingress", "Gateway", "HTTPRoute", "IngressRoute"):
            found.append(f"{name}: {kind} {doc.get('metadata', {}).get('name')}: exposes a service outside the cluster")
        for where, spec in _ray_cluster_specs(doc):
            head = spec.get("headGroupSpec") or {}
            if head.get("serviceType", "ClusterIP") != "ClusterIP":
                found.append(f"{name}: {where}.headGroupSpec.serviceType {head['serviceType']} exposes the head")
            if head.get("enableIngress"):
                found.append(f"{name}: {where}.headGroupSpec.enableIngress exposes the dashboard")
            found += [f"{name}: {p}" for p in _ray_auth_problems(where, spec)]
        provider = doc.get("provider") or {}
        if provider.get("type") in ("aws", "gcp") or "head_start_ray_commands" in doc:
            for key in ("head_start_ray_commands", "worker_start_ray_commands"):
                for cmd in doc.get(key) or []:
                    if re.search(r"\bray start\b", cmd) and not RAY_TOKEN_ON.search(cmd):
                        found.append(f"{name}: {key}: `ray start` without RAY_AUTH_MODE=token: {cmd.strip()[:80]}")
            setup = " ".join(doc.get("setup_commands") or []) + " ".join(doc.get("head_setup_commands") or [])
            if not re.search(r"auth_token|RAY_AUTH_TOKEN", setup):
                found.append(f"{name}: setup_commands never provide the Ray token (~/.ray/auth_token)")
            for rule in (provider.get("security_group") or {}).get("IpPermissions") or []:
                cidrs = [r.get("CidrIp") for r in rule.get("IpRanges") or []]
                cidrs += [r.get("CidrIpv6") for r in rule.get("Ipv6Ranges") or []]
                if {"0.0.0.0/0", "::/0"} & set(cidrs):
                    found.append(f"{name}: provider.security_group opens ports {rule.get('FromPort')}-"
                                 f"{rule.get('ToPort')} to the internet")
        services = doc.get("services") if isinstance(doc.get("services"), dict) else {}
        for svc, conf in services.items():
            for port in (conf or {}).get("ports") or []:
                if _published_ip(port) in ("", "0.0.0.0", "::", "[::]"):
                    found.append(f"{name}: services.{svc}.ports {port!r}: published on all interfaces "
                                 "(give a host IP, loopback by default)")
    for doc in docs:
        for cmd in _commands(doc):
            found += _mlflow_bind_findings(name, cmd)
    return found


def _published_ip(port) -> str:
    """The host address a docker-compose `ports` entry publishes on ("" = all interfaces)."""
    if isinstance(port, dict):
        return str(port.get("host_ip", ""))
    m = re.match(r"^(\$\{[^}]*\}|\[[^\]]*\]|\d{1,3}(?:\.\d{1,3}){3}):(.+:.+)$", str(port))
    if not m:
        return ""                                   # "5000:5000" or "5000"
    ip = m.group(1)
    if ip.startswith("${"):
        var = re.match(r"^\$\{[A-Za-z_][A-Za-z0-9_]*(:?[-?])?([^}]*)\}$", ip)
        if not var or not var.group(1):
            return ""                               # ${VAR} unset = all interfaces
        return var.group(2) if "-" in var.group(1) else "<required>"
    return ip


def _turns_ray_token_auth_on(path: tuple, node) -> bool:
    if not isinstance(node, dict):
        return False
    if node.get("name") == "RAY_AUTH_MODE" and str(node.get("value")).lower() == "token":
        return True
    return bool(path) and path[-1] == "authOptions" and node.get("mode") == "token"


def _mlflow_bind_findings(name: str, cmd: str) -> list[str]:
    if not re.search(r"\bmlflow\s+server\b", cmd):
        return []
    if re.search(r"(--host|-h)[= ]+[\"']?(0\.0\.0\.0|::)\b", cmd) and not re.search(r"--app-name[= ]+basic-auth", cmd):
        return [f"{name}: `mlflow server --host 0.0.0.0` without --app-name basic-auth (MLflow open to the network)"]
    return []


def _text_findings(name: str, text: str) -> list[str]:
    found = []
    for n, line in enumerate(text.splitlines(), 1):
        for m in ASSIGN.finditer(line):
            key, value = m.group(1), m.group(2)
            if _is_secret_name(key) and not _is_reference(value) and not value.startswith(("{", "[")):
                found.append(f"{name}:{n}: {key} = literal value (use an env or Secret reference)")
        if SQL_PASSWORD.search(line):
            found.append(f"{name}:{n}: SQL password literal (use a psql variable from the environment)")
        for m in URL_PASSWORD.finditer(line):
            if not _is_reference(m.group(1)):
                found.append(f"{name}:{n}: URL with an inline password")
        for m in FLAG_SECRET.finditer(line):
            if not _is_reference(m.group(2)) and not m.group(2).startswith("-"):
                found.append(f"{name}:{n}: --{m.group(1)} with a literal value")
        if re.search(r"(^|\s)-p\s+\d+:\d+", line) or re.search(r"--publish[= ]+\d+:\d+", line):
            found.append(f"{name}:{n}: docker port published on all interfaces")
    return found


def scan(name: str, text: str) -> list[str]:
    """Security findings for one shipped file (`name` decides how it is parsed)."""
    found = []
    docs: list = []
    if name.endswith((".yaml", ".yml")):
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    elif name.endswith(".json"):
        docs = [json.loads(text)]
    if docs:
        found += _structured_findings(name, docs)
    found += _text_findings(name, text)
    if RAY_BIND.search(text):
        token_on = bool(RAY_TOKEN_ON.search(text)) or any(_turns_ray_token_auth_on(p, node)
                                                          for d in docs for p, node in _walk(d))
        if not token_on:
            found.append(f"{name}: Ray dashboard/GCS bound to all interfaces (0.0.0.0) without RAY_AUTH_MODE=token")
    if not docs:
        for cmd in text.splitlines():
            found += _mlflow_bind_findings(name, cmd)
    return sorted(set(found))


# --------------------------------------------------------------------------------------------
# Every shipped file
# --------------------------------------------------------------------------------------------

def test_files_are_shipped():
    for rel in (*LAUNCHERS, *KUBERAY, "cluster/mlflow/kubernetes.yaml", "cluster/mlflow/docker-compose.yaml",
                "cluster/docker/Dockerfile", "cluster/mlflow/Dockerfile", "configs/cluster-cifar10-resnet56.yaml"):
        assert rel in SHIPPED, rel
    # The filled secrets file must stay out of git.
    assert ".env" in (ROOT / "cluster/mlflow/.gitignore").read_text().split()


@pytest.mark.parametrize("rel", YAML_FILES)
def test_yaml_parses(rel):
    docs = _docs(rel)
    assert docs, f"{rel}: no YAML document"
    assert all(isinstance(d, dict) for d in docs), f"{rel}: every document must be a mapping"


@pytest.mark.parametrize("rel", SHIPPED)
def test_security_scan(rel):
    assert scan(rel, (ROOT / rel).read_text()) == []


def test_cluster_guide_has_no_literal_secrets():
    """Rule 1 over the guide's code blocks (the commands people copy)."""
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", (ROOT / "docs/cluster.md").read_text(), re.MULTILINE | re.DOTALL)
    assert blocks
    assert _text_findings("docs/cluster.md", "\n".join(blocks)) == []


BAD = {
    "literal password": ("x.yaml", "db:\n  password: hunter2hunter2\n", "literal secret"),
    "literal env token": ("x.yaml", "env:\n  - {name: RAY_AUTH_TOKEN, value: abc123}\n", "literal value"),
    "secret object": ("x.yaml", "apiVersion: v1\nkind: Secret\nmetadata: {name: s}\nstringData: {auth_token: x}\n",
                      "ships secret data"),
    "url password": ("x.yaml", "uri: postgresql://optuna:hunter2@db:5432/optuna\n", "inline password"),
    "dotenv": (".env.example", "MLFLOW_AUTH_ADMIN_PASSWORD=hunter2hunter2\n", "literal value"),
    "flag": ("run.sh", "mlflow-admin --password hunter2\n", "--password with a literal"),
    "sql": ("init.sh", "psql -c \"CREATE ROLE optuna LOGIN PASSWORD 'hunter2'\"\n", "SQL password literal"),
    "ray dashboard open": ("x.yaml", "head_start_ray_commands:\n  - ray start --head --dashboard-host=0.0.0.0\n",
                           "without RAY_AUTH_MODE=token"),
    "ray start no token": ("x.yaml", "provider: {type: aws}\nsetup_commands: [echo > ~/.ray/auth_token]\n"
                           "head_start_ray_commands: [ray start --head]\n", "`ray start` without RAY_AUTH_MODE"),
    "mlflow open": ("x.yaml", "command: [mlflow, server, --host, 0.0.0.0]\n", "without --app-name basic-auth"),
    "load balancer": ("x.yaml", "apiVersion: v1\nkind: Service\nmetadata: {name: m}\nspec: {type: LoadBalancer}\n",
                      "exposes it outside"),
    "compose port": ("x.yaml", "services:\n  mlflow:\n    ports: ['5000:5000']\n", "published on all interfaces"),
    "compose port default": ("x.yaml", "services:\n  m:\n    ports: ['${IP:-0.0.0.0}:5000:5000']\n", "all interfaces"),
    "security group": ("x.yaml", "provider:\n  type: aws\n  security_group:\n    IpPermissions:\n"
                       "      - {FromPort: 8265, ToPort: 8265, IpRanges: [{CidrIp: 0.0.0.0/0}]}\n"
                       "setup_commands: [cat ~/.ray/auth_token]\n", "to the internet"),
    "raycluster without auth": ("x.yaml", "apiVersion: ray.io/v1\nkind: RayCluster\nmetadata: {name: r}\nspec:\n"
                                "  headGroupSpec:\n    template:\n      spec:\n        containers: [{name: h}]\n",
                                "RAY_AUTH_MODE=token not set"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_scanner_flags(case):
    name, text, expected = BAD[case]
    findings = scan(name, text)
    assert any(expected in f for f in findings), findings


def test_scanner_accepts_references():
    ok = """
env:
  - name: MLFLOW_TRACKING_PASSWORD
    valueFrom: {secretKeyRef: {name: prunetune-mlflow-client, key: password}}
  - {name: RAY_AUTH_MODE, value: token}
  - name: RAY_AUTH_TOKEN
    valueFrom: {secretKeyRef: {name: prunetune-ray-token, key: auth_token}}
compose:
  PGPASSWORD: ${MLFLOW_DB_PASSWORD:?set it}
authOptions: {mode: token, secretName: prunetune-ray-token}
command: [mlflow, server, --app-name, basic-auth, --host, 0.0.0.0]
uri: postgresql+psycopg2://optuna@mlflow-postgres:5432/optuna
"""
    assert scan("ok.yaml", ok) == []
    assert scan(".env.example", "POSTGRES_PASSWORD=\nTOKEN_FILE=/run/secrets/t\n") == []


# --------------------------------------------------------------------------------------------
# Ray cluster launcher configs
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rel", LAUNCHERS)
def test_launcher_config_shape(rel):
    (cfg,) = _docs(rel)
    for key in ("cluster_name", "provider", "auth", "head_node_type", "available_node_types", "docker",
                "setup_commands", "head_start_ray_commands", "worker_start_ray_commands"):
        assert key in cfg, f"{rel}: missing {key}"
    assert cfg["provider"]["type"] == rel.split("/")[1]
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head is a CPU node"
    gpu_workers = [t for name, t in types.items() if name != cfg["head_node_type"] and t["resources"].get("GPU", 0) > 0]
    assert gpu_workers, "a GPU worker type"
    for t in gpu_workers:
        assert t.get("min_workers", 0) == 0 and t["max_workers"] > 0, "GPU workers autoscale from zero"
        assert t["max_workers"] <= cfg["max_workers"]
    assert cfg["docker"]["image"].rsplit("/", 1)[-1].startswith("prunetune:"), "nodes run the prunetune image"
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start, "dashboard on the head's loopback only"


@pytest.mark.parametrize("rel", LAUNCHERS)
def test_launcher_config_passes_rays_schema(rel):
    """Ray's own validation (`ray up` runs the same two steps before touching the cloud)."""
    pytest.importorskip("jsonschema")
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(_docs(rel)[0])))


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("rel", LAUNCHERS)
def test_launcher_commands_are_valid_shell(rel):
    (cfg,) = _docs(rel)
    keys = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands")
    for key in keys:
        for cmd in cfg.get(key) or []:
            r = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True)
            assert r.returncode == 0, f"{rel} {key}: {cmd}\n{r.stderr}"


# --------------------------------------------------------------------------------------------
# KubeRay manifests
# --------------------------------------------------------------------------------------------

# Fields of the ray.io/v1 types (KubeRay's raycluster_types.go / rayjob_types.go); a typo in a
# CRD field is silently dropped by the API server, so catch it here.
RAYCLUSTER_SPEC = {"suspend", "managedBy", "autoscalerOptions", "headServiceAnnotations", "enableInTreeAutoscaling",
                   "gcsFaultToleranceOptions", "headGroupSpec", "rayVersion", "workerGroupSpecs", "authOptions"}
HEAD_GROUP = {"template", "headService", "enableIngress", "rayStartParams", "serviceType"}
WORKER_GROUP = {"suspend", "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds",
                "rayStartParams", "template", "scaleStrategy", "numOfHosts"}
AUTOSCALER = {"resources", "image", "imagePullPolicy", "securityContext", "idleTimeoutSeconds", "upscalingMode",
              "env", "envFrom", "volumeMounts", "version"}
RAYJOB_SPEC = {"activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
               "clusterSelector", "submitterConfig", "managedBy", "deletionPolicy", "entrypoint", "runtimeEnvYAML",
               "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus", "entrypointNumGpus",
               "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend"}


def _gpus(container: dict, which: str) -> float:
    return float(((container.get("resources") or {}).get(which) or {}).get("nvidia.com/gpu", 0))


def test_kuberay_manifests():
    kinds = {}
    for rel in KUBERAY:
        for doc in _docs(rel):
            kinds.setdefault(doc["kind"], []).append(doc)
            if doc["kind"] in ("RayCluster", "RayJob"):
                assert doc["apiVersion"] == "ray.io/v1", rel
                assert doc["metadata"].get("namespace") == "prunetune"
    assert {"RayCluster", "RayJob"} <= set(kinds)
    for job in kinds["RayJob"]:
        assert set(job["spec"]) <= RAYJOB_SPEC, set(job["spec"]) - RAYJOB_SPEC
        assert job["spec"]["entrypoint"].startswith("prunetune search ")
        assert job["spec"]["shutdownAfterJobFinishes"] is True
    specs = [d["spec"] for d in kinds["RayCluster"]] + [j["spec"]["rayClusterSpec"] for j in kinds["RayJob"]]
    for spec in specs:
        assert set(spec) <= RAYCLUSTER_SPEC, set(spec) - RAYCLUSTER_SPEC
        assert set(spec["headGroupSpec"]) <= HEAD_GROUP
        assert set(spec.get("autoscalerOptions") or {}) <= AUTOSCALER
        assert spec["rayVersion"] == _constraint("ray")
        head = spec["headGroupSpec"]["template"]["spec"]["containers"]
        assert all(_gpus(c, "limits") == 0 for c in head), "the head is a CPU pod"
        assert spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0", "no trials on the head"
        gpu_groups = [g for g in spec["workerGroupSpecs"]
                      if any(_gpus(c, "limits") > 0 for c in g["template"]["spec"]["containers"])]
        assert gpu_groups, "a worker group with nvidia.com/gpu limits"
        for g in spec["workerGroupSpecs"]:
            assert set(g) <= WORKER_GROUP, set(g) - WORKER_GROUP
        assert spec.get("enableInTreeAutoscaling") is True
        for g in gpu_groups:
            assert g["minReplicas"] == 0 < g["maxReplicas"], "GPU workers autoscale from zero"
            assert 0 <= g.get("replicas", 0) <= g["maxReplicas"]
        images = {c["image"] for g in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
                  for c in g["template"]["spec"]["containers"]}
        assert all(i.rsplit("/", 1)[-1].startswith("prunetune:") for i in images), images


# --------------------------------------------------------------------------------------------
# MLflow deployment
# --------------------------------------------------------------------------------------------

def _mlflow_command(args: list[str]) -> dict:
    assert args[:2] == ["mlflow", "server"], args
    flags = {}
    for i, a in enumerate(args):
        if a.startswith("--"):
            flags[a] = args[i + 1] if i + 1 < len(args) and not args[i + 1].startswith("--") else True
    return flags


def _check_mlflow_flags(flags: dict, where: str) -> None:
    assert flags.get("--app-name") == "basic-auth", f"{where}: MLflow behind its basic-auth app"
    assert urlparse(flags["--backend-store-uri"]).scheme.startswith("postgresql"), f"{where}: SQL backend"
    assert urlparse(flags["--backend-store-uri"]).password is None
    dest = flags["--artifacts-destination"]
    assert dest.startswith(("s3://", "gs://", "${")), f"{where}: artifact store {dest}"
    assert "--serve-artifacts" in flags
    tracking = urlparse(_docs("configs/cluster-cifar10-resnet56.yaml")[0]["tracking"]["uri"])
    assert tracking.netloc in flags["--allowed-hosts"].split(","), f"{where}: {tracking.netloc} not an allowed Host"


def _secret_env(container: dict, name: str) -> dict:
    item = _env_value(container.get("env"), name)
    assert item and "secretKeyRef" in item.get("valueFrom", {}), f"{name} must come from a Secret"
    return item["valueFrom"]["secretKeyRef"]


def test_mlflow_kubernetes_deployment():
    docs = _docs("cluster/mlflow/kubernetes.yaml")
    by = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    deploy = by[("Deployment", "mlflow")]
    (c,) = deploy["spec"]["template"]["spec"]["containers"]
    _check_mlflow_flags(_mlflow_command(c["args"]), "kubernetes.yaml")
    for name in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY", "PGPASSWORD"):
        assert _secret_env(c, name)["name"] == "mlflow-secrets"
    assert _env_value(c["env"], "MLFLOW_AUTH_CONFIG_PATH")["value"] == "/etc/mlflow/basic_auth.ini"
    for svc in ("mlflow", "mlflow-postgres"):
        assert by[("Service", svc)]["spec"]["type"] == "ClusterIP"
    # The names the experiment config uses are these Services in namespace prunetune.
    cfg = _docs("configs/cluster-cifar10-resnet56.yaml")[0]
    for uri in (cfg["tracking"]["uri"], cfg["sampler"]["storage"]):
        host = urlparse(uri).hostname.split(".")
        assert (host[1], ("Service", host[0])) == ("prunetune", ("Service", host[0])) and ("Service", host[0]) in by
    kust = _docs("cluster/mlflow/kustomization.yaml")[0]
    for f in [*kust["resources"], *(f for g in kust["configMapGenerator"] for f in g["files"])]:
        assert (ROOT / "cluster/mlflow" / f).is_file(), f


def test_mlflow_compose_deployment():
    (compose,) = _docs("cluster/mlflow/docker-compose.yaml")
    mlflow = compose["services"]["mlflow"]
    _check_mlflow_flags(_mlflow_command([str(a) for a in mlflow["command"]]), "docker-compose.yaml")
    for name in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY", "PGPASSWORD"):
        assert re.match(r"^\$\{[A-Z_]+:\?", mlflow["environment"][name]), f"{name} must come from .env"
    assert "mlflow-postgres" in compose["services"], "same host name as the Kubernetes Service"


def test_mlflow_auth_config_and_databases():
    import configparser

    ini = configparser.ConfigParser()
    ini.read(ROOT / "cluster/mlflow/basic_auth.ini")
    assert not ini["mlflow"].get("admin_password"), "the admin password comes from MLFLOW_AUTH_ADMIN_PASSWORD"
    db = urlparse(ini["mlflow"]["database_uri"])
    assert db.scheme.startswith("postgresql") and db.password is None
    init = (ROOT / "cluster/mlflow/initdb/10-databases.sh").read_text()
    storage = urlparse(_docs("configs/cluster-cifar10-resnet56.yaml")[0]["sampler"]["storage"])
    for database, owner in ((db.path.lstrip("/"), db.username), (storage.path.lstrip("/"), storage.username)):
        assert f"CREATE DATABASE {database} OWNER {owner};" in init


@pytest.mark.parametrize("rel", LAUNCHERS)
def test_launcher_nodes_resolve_the_mlflow_names(rel):
    """Launcher clusters reach the MLflow VM under the names the experiment config uses."""
    setup = " ".join(_docs(rel)[0]["setup_commands"])
    cfg = _docs("configs/cluster-cifar10-resnet56.yaml")[0]
    for uri in (cfg["tracking"]["uri"], cfg["sampler"]["storage"]):
        assert f" {urlparse(uri).hostname}" in setup, urlparse(uri).hostname


# --------------------------------------------------------------------------------------------
# Images and experiment configs
# --------------------------------------------------------------------------------------------

def _constraint(package: str) -> str:
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.lower().startswith(package.lower() + "=="):
            return line.split("==", 1)[1].strip()
    raise AssertionError(f"{package} not pinned in constraints.txt")


def test_images_match_the_tested_stack():
    node = (ROOT / "cluster/docker/Dockerfile").read_text()
    base = re.search(r"ARG RAY_IMAGE=rayproject/ray:(\S+)", node).group(1)
    assert base.startswith(_constraint("ray") + "-py311"), base
    assert "-c constraints.txt torch torchvision" in node
    assert "--no-build-isolation -c constraints.txt ." in node
    server = (ROOT / "cluster/mlflow/Dockerfile").read_text()
    assert f'"mlflow[auth]=={_constraint("mlflow")}"' in server


@pytest.mark.parametrize("rel", CLUSTER_CONFIGS)
def test_cluster_config_loads(rel):
    from prunetune.search.config import load_config

    cfg = load_config(ROOT / rel)
    assert cfg.resources.workers > 1 and cfg.resources.deepspeed is not None, "trials fine-tune data-parallel"


@pytest.mark.parametrize("rel", CLUSTER_CONFIGS)
def test_cluster_config_keeps_state_off_the_job_dir(rel):
    """A Ray job's working dir is temporary: checkpoints must live elsewhere for --resume."""
    cfg = yaml.safe_load((ROOT / rel).read_text())
    storage = cfg["ray"]["storage_path"]
    assert "://" in storage or storage.startswith(("/", "~")), storage
    assert cfg["ray"]["max_failures"] >= 1
    for uri in (cfg.get("tracking", {}).get("uri"), cfg.get("sampler", {}).get("storage")):
        assert uri is None or urlparse(uri).password is None
