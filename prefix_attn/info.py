"""``python -m prefix_attn.info``: which backends are usable here, and why not."""

from __future__ import annotations

import platform

import torch

from . import __version__
from .ops import available_backends


def main() -> None:
    print(f"prefix_attn {__version__}")
    print(f"python {platform.python_version()}  torch {torch.__version__}", end="")
    try:
        import triton

        print(f"  triton {triton.__version__}")
    except Exception:  # noqa: BLE001 - report, do not fail
        print("  triton: not importable")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(f"CUDA GPU: {gpu}")
    for name, reason in available_backends().items():
        if name == "cpu" and reason == "ok":
            from . import cpu

            ext = cpu._load()[0]
            products = ", ".join(f"{dt} {ext.tile_products(dt)}" for dt in ("bfloat16", "float16"))
            reason = f"ok ({cpu.source()}; 16-bit tile products: {products})"
        print(f"  backend {name:7s} {reason}")


if __name__ == "__main__":
    main()
