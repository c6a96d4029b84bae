"""ldm_kernels: hand-written Triton kernels for ldm (import name `ldm_kernels`).

The package lives in kernels/ldm_kernels/ in the repository; pyproject.toml installs it as
`ldm_kernels`. kernels/ itself has no __init__.py on purpose: a regular package named `kernels`
at the repository root would shadow PyPI's `kernels` (the Hugging Face kernel hub, which
transformers imports when it is installed) for anyone who starts Python there
(tests/test_packaging.py checks it).
"""
