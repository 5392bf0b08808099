"""deploy/k8s, checked statically (no cluster here): every overlay renders with `kubectl kustomize`, every
rendered object validates against the Kubernetes schemas (kubernetes-validate) and passes checkov (a skipped
check carries its reason), and the manifests agree with the service (probe paths, port, settings names and
values, grace periods, user, metric names) and with the image flavours. The training Job's torchrun
rendezvous is run for real: 2 nodes x 1 process on loopback."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import yaml

from models import __version__
from service.app import create_app
from service.metrics import QUEUE_DEPTH
from service.settings import Settings

from ..conftest import CAMVID
from ..live import ROOT, free_port

K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("gpu", "gpu-cuda12", "cpu")
KUBERNETES = "1.32.0"  # the schema version checked (kubernetes-validate knows 1.x up to its own version)
KUBECTL = shutil.which("kubectl")
CHECKOV = next((str(p) for p in (ROOT / ".tools" / "bin" / "checkov", shutil.which("checkov")) if p and
                Path(p).exists()), None)
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl (for `kubectl kustomize`) is not installed")
FLAVOURS = {p.stem: dict(line.split("=", 1) for line in p.read_text().splitlines() if line and line[0] != "#")
            for p in (ROOT / "deploy" / "flavours").glob("*.env")}


@cache
def rendered(path: str | Path) -> tuple[dict, ...]:
    done = subprocess.run([KUBECTL, "kustomize", str(K8S / path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return tuple(d for d in yaml.safe_load_all(done.stdout) if d)


def with_component(folder: Path, overlay: str, component: str) -> tuple[dict, ...]:
    """An overlay with a component added, as an operator adds one: a kustomization naming both, in `folder`."""
    up = os.path.relpath(K8S, folder)
    (folder / "kustomization.yaml").write_text(yaml.safe_dump({
        "namespace": "camvid-segment", "resources": [f"{up}/overlays/{overlay}"],
        "components": [f"{up}/components/{component}"]}))
    return rendered(folder)


def one(objects, kind: str) -> dict:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, (kind, len(found))
    return found[0]


def container(objects) -> dict:
    return one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def config(objects) -> dict[str, str]:
    return one(objects, "ConfigMap")["data"]


@needs_kubectl
@pytest.mark.parametrize("path", [f"overlays/{o}" for o in OVERLAYS] + ["train"])
def test_rendered_manifests_validate_against_the_kubernetes_schemas(path):
    import kubernetes_validate
    from kubernetes_validate.utils import SchemaNotFoundError

    kinds = sorted(o["kind"] for o in rendered(path))
    serving = ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "Namespace", "NetworkPolicy",
               "PodDisruptionBudget", "Service"]
    assert kinds == {"train": ["Job", "PersistentVolumeClaim", "PersistentVolumeClaim", "Service"],
                     "overlays/cpu": serving}.get(path, sorted([*serving, "ServiceMonitor"])), kinds
    for obj in rendered(path):
        try:
            kubernetes_validate.validate(obj, KUBERNETES, strict=True)
        except SchemaNotFoundError:
            # Custom resources have no schema in Kubernetes itself: only the Prometheus Operator's is expected
            assert obj["apiVersion"] == "monitoring.coreos.com/v1" and obj["kind"] == "ServiceMonitor", obj["kind"]


@needs_kubectl
@pytest.mark.skipif(CHECKOV is None, reason="checkov is not installed (`make test` installs it into .tools/)")
@pytest.mark.parametrize("path", [f"overlays/{o}" for o in OVERLAYS] + ["train", "cpu + components/models"])
def test_checkov_finds_nothing_unjustified(path, tmp_path):
    manifest = tmp_path / "rendered.yaml"
    objects = with_component(tmp_path, "cpu", "models") if "components" in path else rendered(path)
    manifest.write_text(yaml.safe_dump_all(objects))
    done = subprocess.run([CHECKOV, "-f", str(manifest), "--framework", "kubernetes", "--output", "json",
                           "--skip-download"], capture_output=True, text=True, env={**os.environ, "LOG_LEVEL": "ERROR"})
    report = json.loads(done.stdout)
    report = report[0] if isinstance(report, list) else report
    assert report["summary"]["passed"] > 50 and report["summary"]["parsing_errors"] == 0  # it did check them
    results = report["results"]
    failed = [(c["check_id"], c["resource"]) for c in results["failed_checks"]]
    assert not failed, failed
    for c in results.get("skipped_checks", []):  # skipped only through a checkov.io/skipN annotation with its reason
        assert c["check_result"]["suppress_comment"].strip(), c["check_id"]


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_port_settings_and_grace_agree_with_the_service(overlay, monkeypatch):
    objects = rendered(f"overlays/{overlay}")
    c, pod = container(objects), one(objects, "Deployment")["spec"]["template"]["spec"]
    settings_env = config(objects)
    fields = {f"SEGMENT_{name.upper()}" for name in Settings.model_fields}
    assert set(settings_env) <= fields, set(settings_env) - fields
    assert {e["name"] for e in c["env"]} <= fields
    for k, v in settings_env.items():
        monkeypatch.setenv(k, v)
    settings = Settings()
    # the port: Settings, the container, the Dockerfile, the Service
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert settings.port == c["ports"][0]["containerPort"] == int(re.search(r"EXPOSE (\d+)", dockerfile)[1])
    assert one(objects, "Service")["spec"]["ports"][0]["targetPort"] == c["ports"][0]["name"] == "http"
    # probes on routes the app has: readiness and start-up on /ready, liveness on /health
    paths = set(create_app(settings).openapi()["paths"])
    probes = {k: c[k]["httpGet"] for k in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert {k: p["path"] for k, p in probes.items()} == {"startupProbe": "/ready", "readinessProbe": "/ready",
                                                          "livenessProbe": "/health"}
    assert {p["path"] for p in probes.values()} <= paths and all(p["port"] == "http" for p in probes.values())
    # shutdown: the pause, then the request timeout plus uvicorn's 5 s, all inside the grace period
    pause = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pause >= 5 and pod["terminationGracePeriodSeconds"] > pause + settings.shutdown_delay_s + \
        settings.request_timeout_s + 5
    # non-root as the image's user, read-only root, a writable cache where the service writes
    uid = int(re.search(r"--uid (\d+)", dockerfile)[1])
    assert pod["securityContext"]["runAsUser"] == c["securityContext"]["runAsUser"] == uid
    assert c["securityContext"]["readOnlyRootFilesystem"] and c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert pod["automountServiceAccountToken"] is False
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts[str(settings.cache_dir)]] and "emptyDir" in volumes[mounts["/tmp"]]
    # the model is in the image at the checkpoint path the settings name
    assert (ROOT / settings.checkpoint.relative_to("/app")).is_file()
    # selectors: the Service, the PDB and the Deployment pick the same pods
    labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    selectors = {"Service": one(objects, "Service")["spec"]["selector"],
                 "PodDisruptionBudget": one(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
                 "Deployment": one(objects, "Deployment")["spec"]["selector"]["matchLabels"]}
    for kind, selector in selectors.items():
        assert selector.items() <= labels.items(), kind


@needs_kubectl
def test_the_models_component_gives_every_replica_one_watched_models_folder(tmp_path, monkeypatch):
    import kubernetes_validate

    objects = with_component(tmp_path, "cpu", "models")
    for obj in objects:
        kubernetes_validate.validate(obj, KUBERNETES, strict=True)
    # the overlay's objects, plus the claim
    assert sorted(o["kind"] for o in objects) == sorted([o["kind"] for o in rendered("overlays/cpu")] +
                                                        ["PersistentVolumeClaim"])
    c, pod = container(objects), one(objects, "Deployment")["spec"]["template"]["spec"]
    for k, v in config(objects).items():
        monkeypatch.setenv(k, v)
    settings = Settings()
    assert settings.models_dir is not None and settings.models_watch_s > 0  # every replica sees a change
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    claim = {v["name"]: v for v in pod["volumes"]}[mounts[str(settings.models_dir)]]["persistentVolumeClaim"]
    pvc = one(objects, "PersistentVolumeClaim")
    assert pvc["metadata"]["name"] == claim["claimName"] and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["metadata"]["namespace"] == one(objects, "Deployment")["metadata"]["namespace"]
    # admin keys from their own optional Secret, under the name Settings reads
    admin = next(e for e in c["env"] if e["name"] == "SEGMENT_ADMIN_KEYS")["valueFrom"]["secretKeyRef"]
    assert admin["optional"] and admin["name"] != "camvid-segment-keys" and "admin_keys" in Settings.model_fields


@needs_kubectl
def test_gpu_overlay_asks_for_a_gpu_and_scales_on_the_services_queue_depth():
    objects = rendered("overlays/gpu")
    c = container(objects)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1 and config(objects)["SEGMENT_DEVICE"] == "cuda"
    metric = one(objects, "HorizontalPodAutoscaler")["spec"]["metrics"][0]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == QUEUE_DEPTH._name
    # the Prometheus Adapter rule serves exactly that metric, from the series the service exports
    rule = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())["rules"]["custom"][0]
    assert rule["name"]["as"] == QUEUE_DEPTH._name and rule["seriesQuery"].startswith(QUEUE_DEPTH._name + "{")
    monitor = one(objects, "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0] == {"port": "http", "path": "/metrics", "interval": "15s"}
    assert monitor["metadata"]["namespace"] == one(objects, "Service")["metadata"]["namespace"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= one(objects, "Service")["metadata"]["labels"].items()


@needs_kubectl
def test_cpu_overlay_has_no_gpu_and_scales_on_cpu():
    objects = rendered("overlays/cpu")
    c = container(objects)
    assert "nvidia.com/gpu" not in json.dumps(c) and config(objects)["SEGMENT_DEVICE"] == "cpu"
    metric = one(objects, "HorizontalPodAutoscaler")["spec"]["metrics"][0]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    assert c["resources"]["requests"]["cpu"]  # utilisation is measured against the request


@needs_kubectl
@pytest.mark.parametrize(("overlay", "flavour"), [("gpu", "cu130"), ("gpu-cuda12", "cu126"), ("cpu", "cpu")])
def test_overlays_run_the_image_flavour_their_nodes_need(overlay, flavour):
    image = container(rendered(f"overlays/{overlay}"))["image"]
    assert image == f"camvid-segment:{__version__}-{flavour}" and flavour in FLAVOURS
    job = one(rendered("train"), "Job")["spec"]["template"]["spec"]["containers"][0]["image"]
    assert job.startswith("camvid-train:") and job.rsplit("-", 1)[1] in FLAVOURS


def job_parts() -> tuple[dict, dict[str, str], list[str], list[str]]:
    """The training Job, its container's environment, torchrun's own arguments and the training CLI's."""
    job = one(rendered("train"), "Job")
    c = job["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in c["env"]}
    args = [re.sub(r"\$\((\w+)\)", lambda m: env[m[1]], a) for a in c["args"]]
    cut = args.index("-m")
    return job, env, args[:cut], args[cut:]


@needs_kubectl
def test_training_job_is_one_pod_per_node_meeting_at_pod_0():
    job, env, launcher, cli = job_parts()
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    nodes = int(env["NNODES"])
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == nodes
    assert f"--nnodes={nodes}" in launcher and "--rdzv-backend=c10d" in launcher
    assert pod["containers"][0]["command"] == ["torchrun"]
    # the rendezvous endpoint is pod 0 through the headless Service named as the pods' subdomain
    endpoint = next(a.split("=", 1)[1] for a in launcher if a.startswith("--rdzv-endpoint="))
    host, port = endpoint.split(":")
    service = one(rendered("train"), "Service")
    assert host == f"{job['metadata']['name']}-0.{pod['subdomain']}" and service["metadata"]["name"] == pod["subdomain"]
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["ports"][0]["port"] == int(port)
    gpus = pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    assert f"--nproc-per-node={gpus}" in launcher
    assert cli[:3] == ["-m", "training", "train"] and "--resume-if-any" in cli


@needs_kubectl
def test_the_jobs_torchrun_rendezvous_trains_on_two_nodes_over_loopback(tmp_path):
    _, _, launcher, _ = job_parts()
    port = free_port()
    launcher = [f"--rdzv-endpoint=127.0.0.1:{port}" if a.startswith("--rdzv-endpoint=") else a for a in launcher]
    out, run_dir = tmp_path / "two-nodes.safetensors", tmp_path / "run"
    cli = ["-m", "training", "train", "--data", str(CAMVID), "--out", str(out), "--run-dir", str(run_dir),
           "--resume-if-any", "--device", "cpu", "--encoder", "resnet18", "--encoder-weights", "none", "--epochs", "1",
           "--bs", "2", "--workers", "0", "--quiet"]
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *launcher, *cli], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    logs = [n.communicate(timeout=300)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], "\n".join(x[-3000:] for x in logs)
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == [out.name]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1]  # rank 0 alone wrote its log
