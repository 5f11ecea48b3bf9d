"""Distillation kernels (installed as atesd_mc.kernels; never import the top-level `kernels`).

Ops (each: Triton kernels on CUDA, a chunked pure-torch path on CPU, an oracle in `reference`):

* `divergence_loss`               forward KL / reverse KL / JSD over logits, optionally vocab-parallel
* `fused_linear_divergence_loss`  the same fused with the output projection (no [N, V] logits)
* `pack_masked_reference`         padding-free packing of teacher / student sequences
* `reveal_lengths`                reference tokens revealed per sample for an exposure alpha

Every op takes backend="auto" | "triton" | "torch"; ATESD_KERNEL_BACKEND replaces "auto" (so it
moves every kernel call of a training run, see _dispatch.py). Set TRITON_INTERPRET=1 before
importing to run the Triton kernels on CPU (tests only).
"""
from .divergence import KINDS, REDUCTIONS, divergence_loss
from .fused_linear_divergence import fused_linear_divergence_loss
from .masked_reference import PackedPair, PackedSequences, Ragged, pack_masked_reference, reveal_lengths

__all__ = [
    "KINDS", "REDUCTIONS", "divergence_loss", "fused_linear_divergence_loss",
    "Ragged", "PackedSequences", "PackedPair", "pack_masked_reference", "reveal_lengths",
]
