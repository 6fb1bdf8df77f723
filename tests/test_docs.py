"""The README as a new user reads it: the Quick start's script runs under the launch commands
shown, after the activation line shown; the docs give one rule for ranks x threads per core."""
import json
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


def test_main_jobs_summary_prints_small_rates_with_their_digits(tmp_path):
    """The main job's summary on a CPU machine (emulation ~0.0035 TFLOP/s) shows the rate, not
    0.00: its Python runs here on reports shaped as the job writes them."""
    script = (ROOT / "examples" / "main.sh").read_text()
    summary = script[script.index("<<'PYEOF'\n") + len("<<'PYEOF'\n"):script.index("\nPYEOF")]
    (tmp_path / "train_digits.json").write_text(json.dumps({
        "time_to_target": 1.5, "target": 0.95, "ranks": [{"steps_per_second": 120.0}], "world_size": 2,
        "launcher": "mpich", "mode": "async", "device": "cpu", "final_accuracy": 0.97}))
    row = {"m": 1024, "n": 1024, "k": 1024, "fp32": {"tflops": 0.0412, "error": 2.1e-7},
           "torch_hpc": {"tflops": 0.0035, "error": 1.9e-7}}
    (tmp_path / "gemm-cpu.json").write_text(json.dumps({"rows": [row], "meta": {"card": "x86_64", "device": "cpu"}}))
    out = subprocess.run([sys.executable, "-c", summary, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "torch_hpc 0.0035 TFLOP/s" in out.stdout and "fp32 0.0412 TFLOP/s" in out.stdout, out.stdout
