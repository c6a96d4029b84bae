"""ldm_kernels: hand-written Triton kernels for ldm (imported as `ldm_kernels`).

The folder is kernels/ in the repository; pyproject.toml maps it to the import name
`ldm_kernels`, so it never clashes with the unrelated PyPI package named `kernels`.
"""
