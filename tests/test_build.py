"""build_info() and the errors of a missing or mismatched compiled module."""
import json
import subprocess
import sys

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
