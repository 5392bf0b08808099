"""Static checks of the Dockerfile and docker-compose.yml: there is no Docker engine here, so everything an
engine would trip over is checked by reading the files (hadolint, a YAML parse, and the settings class)."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from models import __version__
from service.settings import Settings

from ..live import ROOT

DOCKERFILE = (ROOT / "Dockerfile").read_text()
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def stages() -> dict[str, list[str]]:
    """stage name -> its instructions (continuation lines joined)."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE)
    out, current = {}, None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line, re.I)
        if m:
            current = m.group(2) or m.group(1)
            out[current] = [line]
        elif current:
            out[current].append(line)
    return out


def substitute(value: str) -> str:
    """Compose's ${VAR:-default} with nothing set in the environment."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(value))


def test_hadolint_passes():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    done = subprocess.run([hadolint, "--config", str(ROOT / ".hadolint.yaml"), str(ROOT / "Dockerfile")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_base_image_is_a_cuda_runtime_pinned_by_tag():
    default = re.search(r"ARG BASE_IMAGE=(\S+)", DOCKERFILE).group(1)
    repo, tag = default.split(":")
    assert repo == "nvidia/cuda" and re.fullmatch(r"\d+\.\d+\.\d+-(cudnn-)?runtime-ubuntu\d+\.\d+", tag)
    assert "latest" not in DOCKERFILE


def test_stages_serve_by_default_and_train_separately():
    s = stages()
    assert list(s)[-1] == "serve"  # `docker build .` builds the service
    assert {"base", "deps", "train", "serve"} <= set(s)
    # dependencies in their own layer, from pyproject.toml alone, before any source is copied
    deps = " ".join(s["deps"])
    assert "COPY pyproject.toml" in deps and "pip install -r" in deps and "COPY models" not in deps
    serve = s["serve"]
    copies = [line.split()[1] for line in serve if line.startswith("COPY")]
    assert copies == ["models/", "service/"]
    assert any(re.fullmatch(r"USER \d+:\d+", line) and not line.startswith("USER 0") for line in serve)
    health = next(line for line in serve if line.startswith("HEALTHCHECK"))
    assert '"service.healthcheck"' in health
    assert serve[-1] == 'CMD ["python", "-m", "service"]'
    assert "SEGMENT_HOST=0.0.0.0" in " ".join(serve) and "EXPOSE 8000" in serve
    train = s["train"]
    assert 'ENTRYPOINT ["python", "-m", "training"]' in train and any(x.startswith("USER 1") for x in train)


def test_the_deps_layer_installs_exactly_the_project_dependencies():
    import tomllib

    code = re.search(r'python -c "(.+?)"\s+>', re.sub(r"\\\n\s*", " ", DOCKERFILE)).group(1)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    pinned = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert done.stdout.split() == [d.replace(" ", "") for d in pinned]
    assert "torch==2.14.1" in done.stdout.split()


def test_dockerignore_keeps_the_copied_sources_and_drops_the_rest():
    lines = [x.strip() for x in (ROOT / ".dockerignore").read_text().splitlines() if x.strip() and x[0] != "#"]
    assert lines[0] == "*"
    kept = {x[1:].rstrip("/") for x in lines if x.startswith("!")}
    for line in DOCKERFILE.splitlines():
        if line.startswith("COPY"):
            assert line.split()[1].rstrip("/") in kept, line
    assert not kept & {".venv", "runs", "tests", ".git", "docs"}


def test_compose_gpu_service():
    assert set(COMPOSE["services"]) == {"segment", "segment-cpu"}
    svc = COMPOSE["services"]["segment"]
    assert (svc["build"]["context"], svc["build"]["target"]) == (".", "serve") and "serve" in stages()
    assert set(svc["build"]["args"]) == set(re.findall(r"^ARG (\w+)=", DOCKERFILE, re.M))  # every flavour argument
    device = svc["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    host, container = substitute(svc["ports"][0]).split(":")
    assert host == "8000" and int(container) == 8000 == int(re.search(r"SEGMENT_PORT=(\d+)", DOCKERFILE).group(1))
    assert svc["restart"] in ("unless-stopped", "always", "on-failure")
    assert svc["healthcheck"]["test"] == ["CMD", "python", "-m", "service.healthcheck"]
    assert (ROOT / "service" / "healthcheck.py").is_file()
    # compose must give SIGTERM time to finish accepted requests (uvicorn waits request timeout + 5 s)
    grace = int(svc["stop_grace_period"].rstrip("s"))
    assert grace > float(substitute(svc["environment"]["SEGMENT_REQUEST_TIMEOUT_S"])) + 5


def test_compose_environment_names_and_defaults_are_real_settings(monkeypatch):
    fields = {f"SEGMENT_{name.upper()}" for name in Settings.model_fields}
    for name, svc in COMPOSE["services"].items():
        env = {k: substitute(v) for k, v in svc["environment"].items()}
        assert set(env) <= fields, (name, set(env) - fields)
        # the defaults parse as the service would parse them
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        settings = Settings()
        monkeypatch.undo()
        # the default checkpoint path inside the image is the shipped model in this repo
        assert settings.checkpoint.parts[:2] == ("/", "app")
        assert (ROOT / settings.checkpoint.relative_to("/app")).is_file()
    assert COMPOSE["services"]["segment-cpu"]["environment"]["SEGMENT_DEVICE"] == "cpu"
    assert "deploy" not in COMPOSE["services"]["segment-cpu"]
    assert COMPOSE["services"]["segment-cpu"]["profiles"] == ["cpu"]


def test_compose_volume_for_custom_checkpoints_exists():
    for svc in COMPOSE["services"].values():
        source, target, mode = svc["volumes"][0].split(":")
        assert (ROOT / source).is_dir() and target == "/checkpoints" and mode == "ro"


def test_healthcheck_fails_cleanly_when_nothing_listens():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: nothing listens there
    done = subprocess.run([sys.executable, "-m", "service.healthcheck"], capture_output=True, text=True, cwd=ROOT,
                          env={"SEGMENT_PORT": str(port), "PATH": "/usr/bin:/bin"}, timeout=30)
    assert done.returncode == 1 and done.stderr.startswith("unhealthy:")


FLAVOURS = {p.stem: dict(line.split("=", 1) for line in p.read_text().splitlines() if line and line[0] != "#")
            for p in (ROOT / "deploy" / "flavours").glob("*.env")}
PYPI_TORCH = "cu130"  # PyPI's torch wheel for Linux x86_64 is this CUDA build; the others come from PyTorch's indexes


def test_image_flavours_pair_a_base_image_with_the_torch_build_for_it():
    assert set(FLAVOURS) >= {"cu130", "cu126", "cpu"}
    for name, f in FLAVOURS.items():
        assert f["SEGMENT_FLAVOUR"] == name
        base, index = f["SEGMENT_BASE_IMAGE"], f["SEGMENT_TORCH_INDEX"]
        if name.startswith("cu"):  # the CUDA runtime of the base is the CUDA the torch build was made for
            m = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d)\.\d+-(cudnn-)?runtime-ubuntu\d+\.\d+", base)
            assert m and f"cu{m[1]}{m[2]}" == name, (name, base)
        else:
            assert name == "cpu" and not base.startswith("nvidia/") and f["SEGMENT_DEVICE"] == "cpu"
        expected = "https://pypi.org/simple" if name == PYPI_TORCH else f"https://download.pytorch.org/whl/{name}"
        assert index == expected, name


def test_dockerfile_and_compose_default_to_the_pypi_flavour_and_pass_every_flavour_setting():
    default = FLAVOURS[PYPI_TORCH]
    assert re.search(r"^ARG BASE_IMAGE=(\S+)", DOCKERFILE, re.M)[1] == default["SEGMENT_BASE_IMAGE"]
    assert re.search(r"^ARG TORCH_INDEX=(\S+)", DOCKERFILE, re.M)[1] == default["SEGMENT_TORCH_INDEX"]
    text = (ROOT / "docker-compose.yml").read_text()
    read = set(re.findall(r"\$\{(SEGMENT_\w+)", text))
    for name, f in FLAVOURS.items():
        assert set(f) <= read, (name, set(f) - read)  # every variable a flavour file sets reaches compose
    for svc in COMPOSE["services"].values():
        args = {k: substitute(v) for k, v in svc["build"]["args"].items()}
        assert args == {"BASE_IMAGE": default["SEGMENT_BASE_IMAGE"], "TORCH_INDEX": default["SEGMENT_TORCH_INDEX"]}
        assert substitute(svc["image"]) == f"camvid-segment:{__version__}-{PYPI_TORCH}"
    # the deps stage installs torch from the flavour's index, at the pinned versions
    deps = " ".join(stages()["deps"])
    assert "ARG TORCH_INDEX" in deps and '--index-url "${TORCH_INDEX}"' in deps
