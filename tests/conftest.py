import os

# Tests exercise the emulation kernels for every shape; the SGEMM fallback for shapes too small
# to fill the GPU has its own test (subprocess with the default setting).
os.environ.setdefault("TORCH_HPC_SGEMM_FALLBACK", "0")
