"""Test setup: Triton runs in its interpreter on CPU, and must be told before kernels import."""
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(__file__))  # tests/harness.py

# Import megatron in the parent once so forked ranks start in ~0.1 s.
from atesd_mc import distributed  # noqa: E402

if not torch.cuda.is_available():
    distributed.apply_cpu_compat()
