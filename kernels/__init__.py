"""Triton kernels of lorasc-fast, one fused op per module; installed as ``lorasc_fast.kernels``.

Importing this package does nothing: each module is imported by ``lorasc_fast.ops`` when
its op runs on the Triton backend.
"""
