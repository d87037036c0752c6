"""Triton backend (CUDA GPUs; the CPU with ``TRITON_INTERPRET=1``). Importing this imports triton."""

from .launch import prefix_attn_bwd, prefix_attn_fwd

__all__ = ["prefix_attn_fwd", "prefix_attn_bwd"]
