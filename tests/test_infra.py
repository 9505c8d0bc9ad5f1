"""Structure of the deployment files under infra/ (no cluster, no docker, no network).

What is checked is what the files rely on: every manifest parses and names itself, images are
pinned to the one image the Dockerfile builds, every container has resources, entrypoints name
job modules of `jobs.registry.JOBS` (whose files exist), credentials only come
from Secrets, the Ray dashboard is never exposed outside the cluster, and the Dockerfile's
versions equal pyproject's pins.

Closed by default: every container runs as the image's non-root user without privileges
(securityContext), a NetworkPolicy in the same file guards the pods of every Ray cluster
(only the same cluster, plus submitters and the operator on 8265), and the VM cluster names an
explicit AMI and its own security group (Ray ports within the group, SSH from an admin CIDR).
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from jobs.registry import JOBS

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
K8S = INFRA / "k8s"
CLUSTER_YAML = INFRA / "vm" / "cluster.yaml"
SECURITY_GROUP_YAML = INFRA / "vm" / "security-group.yaml"
CRONTAB = INFRA / "vm" / "crontab"

# The job modules an entrypoint may name (`python -m jobs.<name>`): those of the one job
# registry that the CLI and `gpthf submit` read (read here, never edited).
JOB_MODULES = {job.module for job in JOBS.values()}

SECRET_WORDS = ("SECRET", "KEY", "TOKEN", "PASSWORD", "CREDENTIAL")
DASHBOARD_PORT = 8265
GCS_PORT = 6379
RAY_CLIENT_PORT = 10001
RAY_IMAGE_UID = 1000  # user `ray` of rayproject/ray, which infra/docker/Dockerfile keeps
POD_KINDS = ("RayCluster", "RayJob", "RayCronJob", "CronJob")
CLUSTER_LABEL = "gpthf/ray-cluster"  # on the head and worker pods of one Ray cluster
SUBMITTER_LABEL = "gpthf/ray-submitter-for"  # on pods that submit jobs to that cluster
OPERATOR_PEER = {
    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kuberay-system"}},
    "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}},
}
LITERAL_SECRET = re.compile(
    r"(?i)(auth_token|secret_access_key|access_key_id|password)[\"']?\s*[=:]\s*[\"']?"
    r"(?![$<{])[A-Za-z0-9+/=_\-]{16,}"
)
PY_MODULE = re.compile(r"python3?\s+-m\s+([\w.]+)")
PIN = re.compile(
    r"""(?<![\w.\-])([A-Za-z0-9][A-Za-z0-9_.\-]*(?:\[[^\]\s]*\])?)==([0-9][^\s"'\\]*)"""
)


# --------------------------------------------------------------------------- helpers


def _pyproject() -> dict[str, Any]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)


def _norm(name: str) -> str:
    """PEP 503 name without extras: `ray[data,train]` -> `ray`."""
    return re.sub(r"[-_.]+", "-", name.split("[", 1)[0]).lower()


def _pyproject_pins() -> dict[str, str]:
    """Normalised name -> the exact requirement string (`ray[data,train,default]==2.60.0`)."""
    pins = {}
    for req in _pyproject()["project"]["dependencies"]:
        m = re.fullmatch(r"\s*([A-Za-z0-9][A-Za-z0-9_.\-]*(?:\[[^\]]*\])?)==(\S+)\s*", req)
        assert m, f"pyproject dependency {req!r} is not an exact pin"
        pins[_norm(m.group(1))] = f"{m.group(1)}=={m.group(2)}"
    return pins


def _ray_version() -> str:
    return _pyproject_pins()["ray"].split("==", 1)[1]


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        if buf.strip():
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def _our_image() -> str:
    """The image the Dockerfile builds, from its `gpthf.image` label."""
    labels = " ".join(a for i, a in _dockerfile_instructions() if i == "LABEL")
    m = re.search(r'gpthf\.image="?([^"\s]+)"?', labels)
    assert m, "infra/docker/Dockerfile has no LABEL gpthf.image=<our image tag>"
    return m.group(1)


def _from_image() -> str:
    froms = [a for i, a in _dockerfile_instructions() if i == "FROM"]
    assert len(froms) == 1, f"expected one FROM, got {froms}"
    return froms[0].split()[0]


def _manifest_files() -> list[Path]:
    return sorted([*K8S.glob("*.yaml"), *K8S.glob("*.yml")])


def _manifests() -> list[tuple[Path, dict[str, Any]]]:
    docs = []
    for path in _manifest_files():
        with path.open() as f:
            for doc in yaml.safe_load_all(f):
                if doc is not None:
                    docs.append((path, doc))
    return docs


def _walk(node: Any) -> Iterator[Any]:
    yield node
    if isinstance(node, dict):
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def _containers(doc: Any) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for node in _walk(doc):
        if isinstance(node, dict):
            for key in ("containers", "initContainers"):
                if isinstance(node.get(key), list):
                    found.extend(node[key])
    return found


def _ray_cluster_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Every RayCluster spec in a manifest: RayCluster, RayJob's and RayCronJob's clusters."""
    spec = doc.get("spec") or {}
    kind = doc["kind"]
    if kind == "RayCluster":
        return [spec]
    if kind == "RayJob":
        return [spec["rayClusterSpec"]] if "rayClusterSpec" in spec else []
    if kind == "RayCronJob":
        tpl = spec.get("jobTemplate") or {}
        tpl = tpl.get("spec", tpl)  # tolerate a metadata+spec style template
        return [tpl["rayClusterSpec"]] if "rayClusterSpec" in tpl else []
    return []


def _cluster_pod_templates(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [spec["headGroupSpec"]["template"], *(g["template"] for g in spec["workerGroupSpecs"])]


def _submitter_templates(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc.get("spec") or {}
    if doc["kind"] == "RayJob":
        return [spec["submitterPodTemplate"]]
    if doc["kind"] == "RayCronJob":
        return [spec["jobTemplate"]["submitterPodTemplate"]]
    if doc["kind"] == "CronJob":
        return [spec["jobTemplate"]["spec"]["template"]]
    return []


def _labels(template: dict[str, Any]) -> dict[str, str]:
    return dict((template.get("metadata") or {}).get("labels") or {})


def _strings(doc: Any) -> list[str]:
    return [n for n in _walk(doc) if isinstance(n, str)]


def _crontab_jobs() -> list[str]:
    lines = []
    for line in CRONTAB.read_text().splitlines():
        s = line.strip()
        if not s or s.startswith("#") or re.match(r"^[A-Za-z_][A-Za-z0-9_]*\s*=", s):
            continue
        lines.append(s)
    return lines


def _entrypoint_texts() -> list[tuple[str, str]]:
    texts = [(f"{p.name}", s) for p, d in _manifests() for s in _strings(d)]
    texts += [("crontab", s) for s in _crontab_jobs()]
    with CLUSTER_YAML.open() as f:
        texts += [("cluster.yaml", s) for s in _strings(yaml.safe_load(f))]
    return [(where, s) for where, s in texts if PY_MODULE.search(s)]


def _is_secret_name(name: str) -> bool:
    up = name.upper()
    if up.endswith(("_PATH", "_FILE")):  # where a secret lives, not the secret
        return False
    return any(w in up for w in SECRET_WORDS)


# --------------------------------------------------------------------------- layout


def test_every_folder_has_a_readme() -> None:
    for folder in ("", "docker", "k8s", "vm", "local"):
        readme = INFRA / folder / "README.md"
        assert readme.is_file(), f"missing {readme.relative_to(ROOT)}"
        assert readme.read_text().strip()


def test_expected_files_exist() -> None:
    for rel in (
        "docker/Dockerfile",
        "k8s/raycluster.yaml",
        "k8s/rayjob-train.yaml",
        "k8s/rayjob-evaluate.yaml",
        "k8s/raycronjob-nightly.yaml",
        "k8s/cronjob-nightly-submit.yaml",
        "vm/cluster.yaml",
        "vm/security-group.yaml",
        "vm/crontab",
    ):
        assert (INFRA / rel).is_file(), f"missing infra/{rel}"


# --------------------------------------------------------------------------- Dockerfile


def test_dockerfile_base_image_matches_pyproject_ray() -> None:
    image = _from_image()
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-cu(\d+)", image)
    assert m, f"FROM {image}: want a pinned rayproject/ray:<version>-py311-cu12x tag"
    assert m.group(1) == _ray_version(), f"FROM {image} but pyproject pins ray=={_ray_version()}"
    assert (m.group(2), m.group(3)) == ("3", "11"), "the image's Python must be 3.11"
    assert m.group(4).startswith("12"), f"FROM {image}: want a CUDA 12.x image"
    assert "ray-ml" not in image


def test_dockerfile_pins_equal_pyproject() -> None:
    runs = " ".join(a for i, a in _dockerfile_instructions() if i == "RUN")
    pinned: dict[str, set[str]] = {}
    for m in PIN.finditer(runs):
        pinned.setdefault(_norm(m.group(1)), set()).add(f"{m.group(1)}=={m.group(2)}")
    want = _pyproject_pins()
    assert want["torch"] == "torch==2.13.0"
    for name, req in want.items():
        assert name in pinned, f"Dockerfile does not install {req}"
        assert pinned[name] == {req}, f"Dockerfile pins {sorted(pinned[name])}, pyproject {req}"
    extra = sorted(set(pinned) - set(want))
    assert not extra, f"Dockerfile pins packages pyproject does not: {extra}"


def test_dockerfile_installs_cuda_torch_matching_the_base_image() -> None:
    cuda = re.search(r"-cu(\d+)$", _from_image())
    assert cuda
    runs = [a for i, a in _dockerfile_instructions() if i == "RUN"]
    torch_runs = [r for r in runs if "torch==2.13.0" in r]
    assert torch_runs, "no RUN installs torch==2.13.0"
    for r in torch_runs:
        idx = re.findall(r"--(?:extra-)?index-url[ =](\S+)", r)
        assert f"https://download.pytorch.org/whl/cu{cuda.group(1)}" in idx, (
            f"torch must come from the PyTorch cu{cuda.group(1)} index: {r}"
        )


def test_dockerfile_copies_and_installs_our_packages() -> None:
    ins = _dockerfile_instructions()
    copied = " ".join(a for i, a in ins if i == "COPY")
    for pkg in ("pipeline/", "training/", "jobs/", "pyproject.toml"):
        assert pkg in copied, f"Dockerfile does not COPY {pkg}"
    runs = " ".join(a for i, a in ins if i == "RUN")
    assert re.search(r"pip install --no-deps \.(\s|$)", runs), "missing `pip install --no-deps .`"


def test_our_image_tag_is_pinned_and_versioned() -> None:
    image = _our_image()
    _repo, sep, tag = image.rpartition(":")
    assert sep and "/" not in tag and tag and tag != "latest", f"{image} is not pinned by tag"
    version = _pyproject()["project"]["version"]
    assert tag.startswith(f"{version}-ray{_ray_version()}-"), (
        f"{image}: the tag should start with {version}-ray{_ray_version()}- (pyproject)"
    )
    assert tag.endswith(_from_image().rpartition("-")[2]), "tag's CUDA suffix != base image's"


# --------------------------------------------------------------------------- Kubernetes


def test_manifests_parse_and_name_themselves() -> None:
    files = _manifest_files()
    assert files
    docs = _manifests()
    assert {p for p, _ in docs} == set(files), "a manifest file holds no document"
    for path, doc in docs:
        assert isinstance(doc, dict), path
        assert doc.get("apiVersion"), f"{path.name}: no apiVersion"
        assert doc.get("kind"), f"{path.name}: no kind"
        assert (doc.get("metadata") or {}).get("name"), f"{path.name}: no metadata.name"


def test_manifest_kinds_present() -> None:
    kinds = [(d["apiVersion"], d["kind"]) for _, d in _manifests()]
    for want in (
        ("ray.io/v1", "RayCluster"),
        ("ray.io/v1", "RayJob"),
        ("ray.io/v1", "RayCronJob"),
        ("batch/v1", "CronJob"),
    ):
        assert want in kinds, f"no {want[1]} ({want[0]}) manifest"


def test_raycluster_has_head_and_gpu_workers() -> None:
    clusters = [d for _, d in _manifests() if d["kind"] == "RayCluster"]
    assert clusters
    for doc in clusters:
        spec = doc["spec"]
        assert spec.get("headGroupSpec", {}).get("template"), "RayCluster without headGroupSpec"
        groups = spec.get("workerGroupSpecs") or []
        assert groups, "RayCluster without workerGroupSpecs"
        gpus = [
            c
            for g in groups
            for c in g["template"]["spec"]["containers"]
            if int(str(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))) >= 1
        ]
        assert gpus, "no worker group requests nvidia.com/gpu in its limits"
        for g in groups:
            assert g.get("groupName")
            assert g.get("minReplicas", 0) <= g.get("replicas", 0) <= g.get("maxReplicas", 0)


def test_every_ray_cluster_spec_is_consistent() -> None:
    specs = [s for _, d in _manifests() for s in _ray_cluster_specs(d)]
    assert len(specs) >= 4  # RayCluster, two RayJobs, RayCronJob
    for spec in specs:
        assert str(spec.get("rayVersion")) == _ray_version()
        assert spec.get("headGroupSpec", {}).get("template")
        assert spec.get("workerGroupSpecs")
        assert (spec.get("authOptions") or {}).get("mode") == "token", "token auth must be on"


def test_every_container_image_is_our_pinned_image() -> None:
    ours = _our_image()
    for path, doc in _manifests():
        for c in _containers(doc):
            image = c.get("image", "")
            assert ":" in image.rpartition("/")[2], f"{path.name}/{c.get('name')}: {image} unpinned"
            assert not image.endswith(":latest"), f"{path.name}: {image}"
            assert image == ours, f"{path.name}/{c.get('name')}: {image}, Dockerfile builds {ours}"


def test_every_container_has_resource_requests_and_limits() -> None:
    for path, doc in _manifests():
        if doc["kind"] not in POD_KINDS:
            continue
        containers = _containers(doc)
        assert containers, f"{path.name}: no containers"
        for c in containers:
            res = c.get("resources") or {}
            for part in ("requests", "limits"):
                got = res.get(part) or {}
                assert "cpu" in got and "memory" in got, f"{path.name}/{c['name']}: {part} {got}"


def test_entrypoints_name_job_modules() -> None:
    texts = _entrypoint_texts()
    assert texts
    seen = set()
    for where, text in texts:
        for module in PY_MODULE.findall(text):
            assert module in JOB_MODULES, (
                f"{where}: python -m {module} is not a job of jobs.registry.JOBS "
                f"({sorted(JOB_MODULES)})"
            )
            seen.add(module)
    assert {"jobs.train", "jobs.evaluate", "jobs.nightly"} <= seen


def test_registry_job_modules_exist() -> None:
    assert JOB_MODULES
    for module in JOB_MODULES:
        pkg, _, name = module.partition(".")
        assert pkg == "jobs" and name and "." not in name, f"registry names {module}"
        assert (ROOT / "jobs" / f"{name}.py").is_file(), f"{module}: jobs/{name}.py missing"


def test_rayjobs_for_training_and_evaluation() -> None:
    entry = {
        m
        for _, d in _manifests()
        if d["kind"] == "RayJob"
        for m in PY_MODULE.findall(d["spec"]["entrypoint"])
    }
    assert {"jobs.train", "jobs.evaluate"} <= entry


def test_raycronjob_runs_nightly_preprocessing() -> None:
    crons = [d for _, d in _manifests() if d["kind"] == "RayCronJob"]
    assert crons
    for doc in crons:
        spec = doc["spec"]
        assert len(str(spec["schedule"]).split()) == 5
        entry = spec["jobTemplate"]["entrypoint"]
        assert PY_MODULE.findall(entry) == ["jobs.nightly"]
        for flag in ("--input", "--output", "--tokenizer"):
            assert re.search(rf"{flag}\s+s3://\S+", entry), f"RayCronJob entrypoint lacks {flag}"


def test_cronjob_fallback_submits_to_the_raycluster_with_token_auth() -> None:
    cluster = next(d for _, d in _manifests() if d["kind"] == "RayCluster")
    svc = f"http://{cluster['metadata']['name']}-head-svc:{DASHBOARD_PORT}"
    crons = [d for _, d in _manifests() if d["kind"] == "CronJob"]
    assert crons
    for doc in crons:
        pod = doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        assert pod["restartPolicy"] in ("Never", "OnFailure")
        (c,) = pod["containers"]
        cmd = " ".join([*c.get("command", []), *c.get("args", [])])
        assert "ray job submit" in cmd
        assert f"--address {svc}" in cmd
        assert "--submission-id nightly-$(date +%F)" in cmd
        assert re.search(r"--\s+python -m jobs\.nightly\b", cmd)
        env = {e["name"]: e for e in c.get("env", [])}
        assert env["RAY_AUTH_MODE"].get("value") == "token"
        assert "secretKeyRef" in env["RAY_AUTH_TOKEN"].get("valueFrom", {})


def test_no_inline_secrets() -> None:
    for path, doc in _manifests():
        assert doc["kind"] != "Secret", f"{path.name}: Secrets are created out of band, not here"
        for node in _walk(doc):
            if not isinstance(node, dict):
                continue
            for e in node.get("env") or []:
                if _is_secret_name(e["name"]):
                    assert "value" not in e, f"{path.name}: {e['name']} has an inline value"
                    ref = e.get("valueFrom") or {}
                    assert "secretKeyRef" in ref, f"{path.name}: {e['name']} not from a Secret"
            for src in node.get("envFrom") or []:
                assert "secretRef" in src or "configMapRef" in src, f"{path.name}: {src}"


def test_credentials_come_from_secrets() -> None:
    for path, doc in _manifests():
        for spec in _ray_cluster_specs(doc):
            pods = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
            for group in pods:
                for c in group["template"]["spec"]["containers"]:
                    env = {e["name"]: e for e in c.get("env", [])}
                    from_secret = any("secretRef" in s for s in c.get("envFrom", []))
                    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
                        assert from_secret or "secretKeyRef" in env.get(var, {}).get(
                            "valueFrom", {}
                        ), f"{path.name}/{c['name']}: {var} not from a Secret"


def test_no_secret_looking_literals_anywhere_in_infra() -> None:
    for path in INFRA.rglob("*"):
        if not path.is_file():
            continue
        text = path.read_text(errors="replace")
        assert not re.search(r"AKIA[0-9A-Z]{16}", text), f"{path}: AWS access key id"
        # NAME=value / NAME: value with a literal (not "$VAR", "$(cmd)", "<placeholder>")
        m = LITERAL_SECRET.search(text)
        assert not m, f"{path}: literal secret {m.group(0)[:30]}..."


def test_dashboard_never_exposed_outside_the_cluster() -> None:
    for path, doc in _manifests():
        if doc["kind"] == "Service":
            assert doc.get("spec", {}).get("type", "ClusterIP") == "ClusterIP", path.name
        if doc["kind"] == "Ingress":
            pytest.fail(f"{path.name}: an Ingress exposes the cluster")
        for spec in _ray_cluster_specs(doc):
            head = spec["headGroupSpec"]
            assert head.get("serviceType", "ClusterIP") == "ClusterIP", path.name
            assert not head.get("enableIngress", False), path.name
            for c in head["template"]["spec"]["containers"]:
                for p in c.get("ports", []):
                    assert "hostPort" not in p, f"{path.name}: hostPort {p}"
        for node in _walk(doc):
            if isinstance(node, dict) and node.get("type") in ("LoadBalancer", "NodePort"):
                pytest.fail(f"{path.name}: a {node['type']} service")


def test_every_container_runs_unprivileged_as_the_image_user() -> None:
    """Every container (Ray head, workers, submitters, the autoscaler sidecar KubeRay adds)."""
    checked = 0
    for path, doc in _manifests():
        contexts = [(c["name"], c.get("securityContext")) for c in _containers(doc)]
        for spec in _ray_cluster_specs(doc):
            if spec.get("enableInTreeAutoscaling"):
                opts = spec.get("autoscalerOptions") or {}
                contexts.append(("autoscaler", opts.get("securityContext")))
        for name, sc in contexts:
            where = f"{path.name}/{name}"
            assert isinstance(sc, dict), f"{where}: no securityContext"
            assert sc.get("runAsNonRoot") is True, f"{where}: runAsNonRoot"
            assert sc.get("runAsUser") == RAY_IMAGE_UID, f"{where}: runAsUser {sc.get('runAsUser')}"
            assert sc.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation"
            caps = sc.get("capabilities") or {}
            assert caps.get("drop") == ["ALL"] and not caps.get("add"), f"{where}: {caps}"
            assert (sc.get("seccompProfile") or {}).get("type") == "RuntimeDefault", where
            assert not sc.get("privileged"), f"{where}: privileged"
            checked += 1
        for node in _walk(doc):  # a pod-level context must not undo the containers' one
            if isinstance(node, dict) and isinstance(node.get("containers"), list):
                pod_sc = node.get("securityContext") or {}
                assert pod_sc.get("runAsUser", RAY_IMAGE_UID) != 0, f"{path.name}: pod as root"
                assert pod_sc.get("runAsNonRoot", True) is True, f"{path.name}: pod runAsNonRoot"
    assert checked >= 13  # 5 submitters/CronJob + 4 heads + 4 worker groups (+ autoscaler)


def test_the_ray_image_user_is_the_one_the_manifests_run_as() -> None:
    users = [a for i, a in _dockerfile_instructions() if i == "USER"]
    assert users in ([], ["ray"], [str(RAY_IMAGE_UID)]), f"Dockerfile USER {users}"


def _network_policies(path: Path) -> list[dict[str, Any]]:
    return [d for p, d in _manifests() if p == path and d["kind"] == "NetworkPolicy"]


def test_every_ray_cluster_has_a_network_policy_in_its_file() -> None:
    """Only pods of the same cluster reach its pods (GCS, dashboard, every Ray port); job
    submitters and the KubeRay operator reach the dashboard/jobs API and nothing else."""
    guarded = set()
    for path, doc in _manifests():
        for spec in _ray_cluster_specs(doc):
            templates = _cluster_pod_templates(spec)
            names = {_labels(t).get(CLUSTER_LABEL) for t in templates}
            assert len(names) == 1 and None not in names, (
                f"{path.name}: every head/worker pod template needs the same {CLUSTER_LABEL} "
                f"label, got {names}"
            )
            (cluster,) = names
            assert cluster not in guarded, f"{path.name}: {CLUSTER_LABEL}={cluster} reused"
            for t in _submitter_templates(doc):
                assert _labels(t).get(SUBMITTER_LABEL) == cluster, f"{path.name}: submitter"
            same_cluster = {"podSelector": {"matchLabels": {CLUSTER_LABEL: cluster}}}
            submitters = {"podSelector": {"matchLabels": {SUBMITTER_LABEL: cluster}}}
            policies = [
                np
                for np in _network_policies(path)
                if np["spec"]["podSelector"] == {"matchLabels": {CLUSTER_LABEL: cluster}}
            ]
            assert len(policies) == 1, f"{path.name}: no NetworkPolicy selects {cluster}'s pods"
            np_spec = policies[0]["spec"]
            assert "Ingress" in np_spec["policyTypes"]
            rules = np_spec.get("ingress") or []
            assert rules, f"{path.name}: a policy without ingress rules blocks the cluster itself"
            dashboard_only = [{"protocol": "TCP", "port": DASHBOARD_PORT}]
            seen_same, seen_submitters = False, False
            for rule in rules:
                peers = rule.get("from")
                assert peers, f"{path.name}: an ingress rule without `from` admits everyone"
                for peer in peers:
                    assert "ipBlock" not in peer, f"{path.name}: ipBlock {peer}"
                    if peer == same_cluster:
                        seen_same = True
                        continue
                    assert peer in (submitters, OPERATOR_PEER), f"{path.name}: peer {peer}"
                    seen_submitters |= peer == submitters
                    # Anyone not in the cluster: the dashboard/jobs API only (not GCS, not 10001).
                    assert rule.get("ports") == dashboard_only, f"{path.name}: {rule}"
            assert seen_same and seen_submitters, f"{path.name}: {rules}"
            guarded.add(cluster)
    assert len(guarded) >= 4


def test_cronjob_fallback_may_reach_the_raycluster_it_submits_to() -> None:
    (cluster,) = [d for _, d in _manifests() if d["kind"] == "RayCluster"]
    name = _labels(cluster["spec"]["headGroupSpec"]["template"])[CLUSTER_LABEL]
    for _, doc in _manifests():
        if doc["kind"] == "CronJob":
            for t in _submitter_templates(doc):
                assert _labels(t).get(SUBMITTER_LABEL) == name


# --------------------------------------------------------------------------- VM launcher


def _cluster_yaml() -> dict[str, Any]:
    with CLUSTER_YAML.open() as f:
        docs = [d for d in yaml.safe_load_all(f) if d is not None]
    assert len(docs) == 1
    doc = docs[0]
    assert isinstance(doc, dict)
    return doc


def test_cluster_yaml_head_and_gpu_workers() -> None:
    cfg = _cluster_yaml()
    assert cfg.get("cluster_name")
    assert cfg.get("provider", {}).get("type")
    types = cfg["available_node_types"]
    head = cfg["head_node_type"]
    assert head in types
    gpu = [
        n
        for n, t in types.items()
        if n != head and float((t.get("resources") or {}).get("GPU", 0)) >= 1
    ]
    assert gpu, "no GPU worker node type"
    for n in gpu:
        assert types[n].get("max_workers", 0) >= 1, n
        assert types[n].get("node_config"), n


def test_cluster_yaml_runs_our_pinned_image() -> None:
    docker = _cluster_yaml()["docker"]
    image = docker["image"]
    assert image == _our_image()
    assert ":" in image.rpartition("/")[2] and not image.endswith(":latest")
    for key in ("head_image", "worker_image"):
        assert docker.get(key, image) == image


def test_cluster_yaml_token_auth_and_no_inline_secrets() -> None:
    cfg = _cluster_yaml()
    opts = " ".join(cfg["docker"].get("run_options", []))
    assert "RAY_AUTH_MODE=token" in opts
    for name, _value in re.findall(r"--env\s+([A-Za-z_][A-Za-z0-9_]*)=(\S*)", opts):
        assert not _is_secret_name(name), f"cluster.yaml: --env {name}=... inline"
    head_cmds = " ".join(cfg.get("head_start_ray_commands", []))
    assert "--dashboard-host=0.0.0.0" not in head_cmds, "dashboard bound to all interfaces"


def test_cluster_yaml_is_valid_for_rays_launcher() -> None:
    """Ray's own schema check, as `ray up` runs it (after filling in the provider defaults)."""
    util = pytest.importorskip("ray.autoscaler._private.util")
    util.validate_config(util.prepare_config(_cluster_yaml()))


def test_cluster_yaml_names_an_explicit_deep_learning_ami() -> None:
    types = _cluster_yaml()["available_node_types"]
    amis = {n: t["node_config"].get("ImageId", "") for n, t in types.items()}
    for n, ami in amis.items():
        # latest_dlami (or no ImageId) makes Ray 2.60 pick an Ubuntu 18.04 / CUDA 11.2 DLAMI.
        assert re.fullmatch(r"ami-[0-9a-f]{8}(?:[0-9a-f]{9})?", ami), f"{n}: ImageId {ami!r}"
    assert len(set(amis.values())) == 1, amis
    text = CLUSTER_YAML.read_text()
    (ami,) = set(amis.values())
    # The file says which AMI that is and how to look up the id in another region.
    comment = " ".join(line for line in text.splitlines() if line.lstrip().startswith("#"))
    assert ami in comment and re.search(r"Deep Learning .*\(Ubuntu 2[24]\.04\)", comment)
    assert "--region REGION" in comment and "describe-images" in comment


def _cluster_yaml_ports() -> dict[str, set[int]]:
    """Ports each start command fixes: {"head": {...}, "worker": {...}} (worker range expanded)."""
    cfg = _cluster_yaml()
    out = {}
    for role in ("head", "worker"):
        cmds = " ".join(cfg[f"{role}_start_ray_commands"])
        flags = dict(re.findall(r"--((?:[a-z]+-)*port)=(\d+)", cmds))
        ports = {int(v) for k, v in flags.items() if not k.endswith("worker-port")}
        lo, hi = int(flags["min-worker-port"]), int(flags["max-worker-port"])
        out[role] = ports | set(range(lo, hi + 1))
        for must in (
            "object-manager-port",
            "node-manager-port",
            "runtime-env-agent-port",
            "dashboard-agent-grpc-port",
            "metrics-export-port",
            "dashboard-agent-listen-port",
        ):
            assert must in flags, f"{role}_start_ray_commands: --{must} not fixed"
    assert GCS_PORT in out["head"]
    return out


def _security_group() -> tuple[dict[str, Any], str, list[dict[str, Any]]]:
    """(the template, the group's logical id, every ingress rule of that group)."""
    with SECURITY_GROUP_YAML.open() as f:
        tpl = yaml.safe_load(f)
    res = tpl["Resources"]
    groups = [k for k, r in res.items() if r["Type"] == "AWS::EC2::SecurityGroup"]
    assert len(groups) == 1, groups
    (group,) = groups
    rules = list(res[group]["Properties"].get("SecurityGroupIngress") or [])
    for k, r in res.items():
        if r["Type"] == "AWS::EC2::SecurityGroupIngress":
            props = r["Properties"]
            assert props["GroupId"] == {"Fn::GetAtt": [group, "GroupId"]}, k
            rules.append(props)
    assert not [r for r in res.values() if r["Type"] == "AWS::EC2::SecurityGroupEgress"]
    return tpl, group, rules


def test_cluster_yaml_runs_every_node_in_our_security_group() -> None:
    cfg = _cluster_yaml()
    # With SecurityGroupIds on every node type Ray uses them as they are; without, it makes
    # its own group with SSH open to 0.0.0.0/0 (and provider.security_group only adds rules).
    assert "security_group" not in cfg["provider"]
    groups = [
        t["node_config"].get("SecurityGroupIds") for t in cfg["available_node_types"].values()
    ]
    assert all(groups) and all(g == groups[0] for g in groups), groups
    (sg,) = groups[0]
    assert sg.startswith("sg-")
    assert "security-group.yaml" in CLUSTER_YAML.read_text()


def test_security_group_opens_ray_ports_only_within_itself_and_ssh_only_from_admins() -> None:
    tpl, group, rules = _security_group()
    self_ref = {"Fn::GetAtt": [group, "GroupId"]}
    admin = {"Ref": "AdminCidr"}
    within: set[int] = set()
    for r in rules:
        where = r.get("Description", r)
        assert r["IpProtocol"] == "tcp", f"{where}: protocol {r['IpProtocol']} (all traffic?)"
        sources = [
            k
            for k in ("CidrIp", "CidrIpv6", "SourceSecurityGroupId", "SourcePrefixListId")
            if k in r
        ]
        assert len(sources) == 1, f"{where}: sources {sources}"
        ports = set(range(int(r["FromPort"]), int(r["ToPort"]) + 1))
        assert DASHBOARD_PORT not in ports and RAY_CLIENT_PORT not in ports, f"{where}: {ports}"
        if "CidrIp" in r:
            # No literal CIDR (0.0.0.0/0 above all): only the admin network, and only SSH.
            assert r["CidrIp"] == admin and ports == {22}, f"{where}: {r}"
        else:
            assert r.get("SourceSecurityGroupId") == self_ref, f"{where}: {r}"
            within |= ports
        desc = str(r.get("Description", ""))
        assert re.fullmatch(r"[a-zA-Z0-9 ._\-:/()#,@\[\]+=;{}!$*]*", desc), f"EC2 refuses {desc!r}"
    assert any(r.get("CidrIp") == admin for r in rules), "no SSH from the admin CIDR"
    assert 22 in within, "the head's autoscaler reaches the workers over SSH"
    ports = _cluster_yaml_ports()
    missing = (ports["head"] | ports["worker"]) - within
    assert not missing, f"Ray listens on ports the group does not open: {sorted(missing)[:10]}"
    # The admin CIDR is a required parameter that can never be the whole internet.
    param = tpl["Parameters"]["AdminCidr"]
    assert "Default" not in param
    allowed = re.compile(param["AllowedPattern"])
    assert allowed.fullmatch("203.0.113.7/32") and allowed.fullmatch("10.20.0.0/16")
    for wide in ("0.0.0.0/0", "0.0.0.0/1", "10.0.0.0/8"):
        assert not allowed.fullmatch(wide), wide


def test_crontab_nightly_line() -> None:
    jobs = _crontab_jobs()
    assert len(jobs) == 1, jobs
    line = jobs[0]
    fields = line.split(None, 5)
    assert len(fields) == 6, "want: m h dom mon dow command"
    command = fields[5]
    assert "ray job submit" in command
    assert re.search(r"python -m jobs\.nightly\b", command)
    assert "--submission-id nightly-$(date +\\%F)" in command
    # cron turns an unescaped % into a newline: every % in the command must be \%
    assert not re.search(r"(?<!\\)%", command), "unescaped % in the crontab command"
