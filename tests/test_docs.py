"""The README as a new user reads it: the Quick start's script runs under the launch commands
shown, after the activation line shown; the docs give one rule for ranks x threads per core."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from launchers import mpich_family

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _quick_start():
    section = README[README.index("## Quick start"):]
    python = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    bash = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return python, [line.split("#")[0].strip() for line in bash.splitlines() if line.split("#")[0].strip()]


@pytest.mark.parametrize("launcher", ["mpiexec", "torchrun"])
def test_quick_start_runs_as_written(tmp_path, launcher):
    """The README's script and commands, with 2 ranks (CI's 2 cores) and a shell that starts
    from nothing: without the activation line `python`, `mpiexec` and `torchrun` are not the
    set-up's (or not found at all)."""
    venv = Path(sys.prefix)
    if not (venv / "bin" / "activate").exists() or venv != ROOT / ".venv":
        pytest.skip("the tests do not run in the set-up's .venv (TORCH_HPC_PYTHON)")
    if launcher == "mpiexec" and not mpich_family():
        pytest.skip("the README's mpiexec line is MPICH's (Open MPI adds flags)")
    script, commands = _quick_start()
    (tmp_path / "train.py").write_text(script)
    activate = [c for c in commands if c.startswith("source ")]
    launch = [c for c in commands if launcher in c]
    assert len(activate) == 1 and len(launch) == 1, commands
    command = launch[0].replace("-n 4", "-n 2").replace("--nproc_per_node=4", "--nproc_per_node=2 --standalone")
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = "/usr/bin:/bin"  # a fresh login shell's, without the venv
    shell = f"cd {ROOT} && {activate[0]} && cd {tmp_path} && {command}"
    proc = subprocess.run(["bash", "-c", shell], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    losses = [float(m) for m in re.findall(r"rank \d: loss ([0-9.]+)", proc.stdout)]
    assert len(losses) == 2 and all(loss < 0.5 for loss in losses), proc.stdout[-2000:]


def test_the_docs_give_one_rule_for_ranks_times_threads():
    rule = "`ranks × OMP_NUM_THREADS` at most the core count, and below it for the asynchronous"
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = " ".join(doc.read_text().split())
        for m in re.finditer(r"OMP_NUM_THREADS` (at|below|above|under)", text):
            assert text[m.start() - len("`ranks × "):].startswith(" ".join(rule.split())), (doc.name, text[m.start() - 40:m.end() + 60])


def test_readme_says_what_the_mode_does_with_cpu_tensors():
    assert "CPU tensors keep torch's own kernels unless `fp32_emulation(cpu=True)`" in " ".join(README.split())
