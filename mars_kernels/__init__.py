"""Triton kernels of mars, one file per op (kernels + launcher). Importing this package
needs `triton`; on a machine without a GPU, run them with TRITON_INTERPRET=1."""
