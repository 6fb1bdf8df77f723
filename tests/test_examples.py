"""Short versions of the examples (the distributed ones run under launchers in test_optim.py)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))


def test_tf32_vs_emulated_shows_tf32_failing(tmp_path):
    import tf32_vs_emulated
    errors = tf32_vs_emulated.main(["--n", "64", "--steps", "60", "--device", "cpu", "--out", str(tmp_path)])
    end = {k: v[-1] for k, v in errors.items()}
    assert end["torch_hpc"] <= 2 * end["fp32"] + 1e-7, end
    assert end["tf32"] > 100 * end["torch_hpc"] and end["bf16"] > end["tf32"], end
    assert (tmp_path / "tf32_vs_emulated-cpu.png").exists()
