"""build_info() and the errors of a missing or mismatched compiled module."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import torch_hpc
from torch_hpc import _build


def test_build_info_reports_the_build():
    info = torch_hpc.build_info()
    assert info["torch_version"] == torch.__version__
    assert isinstance(info["cuda"], bool) and isinstance(info["cuda_archs"], list)
    assert info["cpu_kernels"] is True
    assert info["cuda_kernels"] == info["cuda"]
    assert info["mpi"] in (True, False)


@pytest.mark.parametrize("content,message", [
    (None, "was never built"),
    ({"torch_version": "0.0.1", "cuda": False, "cuda_archs": [], "mpi": False},
     "built for torch 0.0.1"),
])
def test_mismatched_or_missing_build_is_a_clear_error(tmp_path, monkeypatch, content, message):
    path = tmp_path / "_build_info.json"
    if content is not None:
        path.write_text(json.dumps(content))
    monkeypatch.setattr(_build, "_INFO_PATH", str(path))
    with pytest.raises(ImportError, match=message):
        _build.load_ops()


def test_import_does_not_initialise_mpi():
    code = ("import sys, torch_hpc; "
            "print(any(m.startswith('mpi4py') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


ROOT = Path(__file__).resolve().parents[1]


def test_a_clone_named_torch_hpc_in_the_working_directory_does_not_shadow_the_package(tmp_path):
    """Scripts run from the folder that holds a clone called torch_hpc (no __init__.py at its
    top) import the installed package, not the clone as an empty namespace package: the set-up
    installs in editable compat mode (a .pth path entry, which a regular package wins from)."""
    clone = tmp_path / "torch_hpc"
    (clone / "csrc").mkdir(parents=True)
    (clone / "README.md").write_text("a clone\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", "import torch_hpc; print(torch_hpc.__file__); torch_hpc.mm"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert Path(out.stdout.strip()) == Path(torch_hpc.__file__), out.stdout


def test_editable_install_works_offline(tmp_path):
    """The README's `pip install --no-build-isolation -e .` on a machine without network (an HPC
    compute node): no step may try to download build requirements. Builds a copy of the
    checkout into a fresh venv that sees this one's packages (torch, setuptools, wheel, pip).
    Without pyproject.toml, pip (setuptools and wheel present) takes setuptools' legacy develop
    step, which re-runs pip with build isolation and fails for want of the network."""
    assert importlib.util.find_spec("wheel") and importlib.util.find_spec("setuptools"), \
        "the set-up installs wheel and setuptools: without them pip takes another route"
    src = tmp_path / "src"
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    for name in tracked:
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site_dir = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                              capture_output=True, text=True, check=True).stdout.strip()
    Path(site_dir, "parent_venv.pth").write_text("\n".join(p for p in sys.path if p.endswith("site-packages")))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # else the checkout shadows the copy
    env.update(PIP_NO_INDEX="1", PIP_FIND_LINKS="", TORCH_HPC_NO_MPI="1", MAX_JOBS="2",
               PIP_DISABLE_PIP_VERSION_CHECK="1")
    where = subprocess.run([str(python), "-c", "import importlib.util as u; s = u.find_spec('torch_hpc'); "
                            "print(s.origin if s else '')"], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=120).stdout.strip()
    if where:
        pytest.skip(f"the parent environment already provides torch_hpc ({where}): the copy could not be told apart")
    proc = subprocess.run([str(python), "-m", "pip", "install", "--no-build-isolation", "--no-deps",
                           "-e", str(src)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = subprocess.run([str(python), "-c", "import torch_hpc; print(torch_hpc.__file__)"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().startswith(str(src)), out.stderr[-2000:]
