"""The documentation says what the code does: the configuration page is generated from it, and README's examples
run against a live server."""

import ast
import json
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from .conftest import IMAGE
from .live import ROOT, start_service

README = (ROOT / "README.md").read_text()


def test_the_configuration_page_is_what_the_code_defines():
    done = subprocess.run([sys.executable, str(ROOT / "docs" / "make_configuration.py"), "--check"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr  # stale: `make docs`
    page = (ROOT / "docs" / "configuration.md").read_text()
    assert "| `SEGMENT_MAX_PIXELS` | `40000000` |" in page and "| `--holdout-drive` | none |" in page


def test_the_readme_is_short_starts_with_the_two_commands_and_its_links_resolve():
    lines = README.splitlines()
    assert len(lines) <= 220
    first_section = README.index("\n## ")
    assert README.index("make serve", first_section) < README.index("\n## ", first_section + 1)
    assert README.index("make test", first_section) < README.index("\n## ", first_section + 1)
    for target in re.findall(r"\]\(((?:docs|models)/[^)#]+|BENCHMARKS\.md)(?:#[^)]*)?\)", README):
        assert (ROOT / target).is_file(), target


@pytest.fixture(scope="module")
def server(checkpoint):
    proc, base, _ = start_service({"SEGMENT_CHECKPOINT": str(checkpoint), "SEGMENT_DEVICE": "cpu",
                                   "SEGMENT_WARMUP_PASSES": "1"})
    yield base
    proc.terminate()
    proc.wait(30)


def on(base: str, text: str) -> str:
    return text.replace("http://127.0.0.1:8000", base)


@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl")
def test_the_readme_curl_example_answers_as_shown(server, tmp_path):
    shutil.copy(IMAGE, tmp_path / "street.png")
    command = next(line[2:] for line in README.splitlines() if line.startswith("$ curl"))
    done = subprocess.run(shlex.split(on(server, command)), cwd=tmp_path, capture_output=True, timeout=60)
    body = json.loads(done.stdout)
    shown = README[README.index("$ curl"):]
    shown_keys = re.findall(r'^  "(\w+)":', shown[:shown.index("```")], re.M)
    assert list(body) == shown_keys  # the fields, in the order shown
    assert (body["width"], body["height"]) == (96, 72) and sum(c["pixels"] for c in body["classes"]) == 96 * 72


def test_the_readme_python_example_runs(server, tmp_path):
    shutil.copy(IMAGE, tmp_path / "street.png")
    code = re.search(r"```python\n(.*?)```", README, re.S)[1]
    done = subprocess.run([sys.executable, "-c", on(server, code)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    fractions = ast.literal_eval(done.stdout)  # the printed {class: fraction} of the classes present
    assert fractions and all(0 < f <= 1 for f in fractions.values())
    assert (tmp_path / "overlay.jpg").stat().st_size > 1000
