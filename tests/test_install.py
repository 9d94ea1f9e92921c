"""servescope installs exactly one import name, and lives beside transformers and Hugging Face's `kernels`.

A real `pip install` of this checkout (non-editable into a target folder, and
editable into a fresh venv), then real imports in subprocesses: from a
neutral folder (the installed copy) and from the repository root, where
`python -c` puts the root's folders on sys.path.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"


def _pip(*args: str, python: str = sys.executable) -> None:
    proc = subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _python(code: str, *, cwd: Path, python: str = sys.executable, path: Path | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if path is not None:
        env["PYTHONPATH"] = str(path)
    proc = subprocess.run([python, "-c", textwrap.dedent(code)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def _clean_copy(dest: Path) -> Path:
    """The checkout's files as a clean clone has them (tracked and new, not ignored): no stale build/ folder."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                            check=True, timeout=60).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`pip install --target DIR .` of a clean copy: a built wheel, unpacked, as a user's site-packages holds it."""
    source = _clean_copy(tmp_path_factory.mktemp("clone"))
    target = tmp_path_factory.mktemp("site")
    _pip("--target", str(target), str(source))
    return target


def _record_top_level(target: Path) -> set[str]:
    (record,) = target.glob("servescope-*.dist-info/RECORD")
    names = {line.split(",")[0].split("/")[0] for line in record.read_text().splitlines() if line}
    return {n for n in names if not n.endswith(".dist-info") and n not in ("bin", "..")}


def test_the_wheel_installs_only_servescope(installed: Path) -> None:
    assert _record_top_level(installed) == {"servescope"}
    for name in ("harness", "workloads", "reference_engine", "kernels", "analyzers", "report_templates"):
        assert (installed / "servescope" / name).is_dir(), f"servescope.{name} missing from the wheel"
        assert not (installed / name).exists()
    data = ("workloads/presets/chat.yaml", "workloads/corpus/prose.txt", "reference_engine/tokenizer/tokenizer.json",
            "report_templates/report.html.j2", "report_templates/report.css", "kernels/gemv_tuned.json")
    missing = [f for f in data if not (installed / "servescope" / f).is_file()]
    assert not missing, f"package data missing from the wheel: {missing}"


def test_every_package_folder_is_in_the_wheel() -> None:
    """pyproject lists packages by hand (the folders have no __init__.py); a new folder must be listed."""
    import tomllib

    listed = set(tomllib.loads(PYPROJECT.read_text())["tool"]["setuptools"]["packages"])
    mapping = tomllib.loads(PYPROJECT.read_text())["tool"]["setuptools"]["package-dir"]
    on_disk = set()
    for package, folder in mapping.items():
        on_disk.add(package)
        for sub in (ROOT / folder).rglob("*"):
            if sub.is_dir() and "__pycache__" not in sub.parts:
                on_disk.add(".".join((package, *sub.relative_to(ROOT / folder).parts)))
    assert on_disk - listed == set(), "folders missing from [tool.setuptools] packages"
    assert listed - on_disk == set(), "packages listed that have no folder"


def test_installed_copy_beside_transformers_and_kernels(installed: Path, tmp_path: Path) -> None:
    """From a neutral folder: servescope comes from the install, `kernels`/`harness` are not servescope's."""
    out = _python("""
        import importlib.util, servescope, servescope.harness.api, servescope.analyzers.report, servescope.workloads.spec
        print(servescope.__file__)
        for name in ("kernels", "harness", "analyzers", "workloads", "reference_engine", "report_templates"):
            spec = importlib.util.find_spec(name)
            print(name, None if spec is None else (spec.origin or list(spec.submodule_search_locations)))
    """, cwd=tmp_path, path=installed)
    lines = out.splitlines()
    assert Path(lines[0]).is_relative_to(installed), lines[0]
    for line in lines[1:]:
        name, _, where = line.partition(" ")
        paths = [] if where == "None" else [Path(p) for p in re.findall(r"(/[^',\]]+)", where)]
        assert not any(p.is_relative_to(ROOT) or "servescope" in p.parts for p in paths), line


def test_transformers_loads_a_local_checkpoint_from_the_repository_root(installed: Path, tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("torch")
    checkpoint = tmp_path / "llama"
    out = _python(f"""
        import shutil, torch
        import kernels  # Hugging Face's package, which transformers imports
        from pathlib import Path
        assert not Path(getattr(kernels, "__file__", None) or "/").resolve().is_relative_to({str(ROOT)!r}), kernels
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
        from servescope.reference_engine.tokenizer import TOKENIZER_DIR
        config = LlamaConfig(vocab_size=8192, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=128)
        LlamaForCausalLM(config).save_pretrained({str(checkpoint)!r})
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(TOKENIZER_DIR / name, {str(checkpoint)!r})
        tok = AutoTokenizer.from_pretrained({str(checkpoint)!r})
        model = AutoModelForCausalLM.from_pretrained({str(checkpoint)!r})
        ids = tok("a load test of the serving stack", return_tensors="pt").input_ids
        print(tuple(model(ids).logits.shape))
    """, cwd=ROOT, path=installed)
    assert out.strip().endswith("8192)"), out


def test_editable_install_in_a_fresh_venv(tmp_path: Path) -> None:
    """`pip install -e .` into a new venv (the system's packages visible for the dependencies)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    _pip("-e", ".", python=python)
    out = _python("""
        import servescope, servescope.harness.api, servescope.kernels, servescope.rundir.schema as s
        import servescope.harness.api as api
        print(api.__file__); print(s.FORMAT_VERSION)
    """, cwd=tmp_path, python=python)
    assert out.splitlines()[0] == str(ROOT / "harness" / "api.py"), out
    cli = subprocess.run([str(venv / "bin" / "servescope"), "--version"], capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0 and "servescope" in cli.stdout, cli.stderr
