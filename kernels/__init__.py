"""Attention kernels (installed as ``srt.kernels``): Triton kernels and their torch references.

Kept free of imports: transformers probes for a package named ``kernels``, and in a
source checkout this directory can be found under that name.
"""
