"""The repository as a fresh machine sees it: nothing at its root shadows a package a dependency imports.

`python -m pytest`, a notebook or a REPL started in the repository root put the root on sys.path
first. A regular package there named like an installed one wins the import: on 2026-12-05
transformers 5.25 began importing PyPI's `kernels` (the Hugging Face kernel hub), the project's own
kernels/__init__.py answered instead, and 227 of the suite's tests failed with "cannot import name
'CUDAProperties' from 'kernels'". The Triton kernel now lives in kernels/ldm_kernels/ (imported as
ldm_kernels) and kernels/ has no __init__.py.
"""
from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# what the repository root may offer for import: the library itself (a regular package)
OURS = {"ldm"}


def _root_importables() -> dict[str, Path]:
    """Names importable from the root as a regular package or a module (namespace folders lose to
    any installed package of the same name, so they cannot shadow one)."""
    found = {}
    for p in ROOT.iterdir():
        if p.name.startswith("."):
            continue
        if p.is_dir() and (p / "__init__.py").exists():
            found[p.name] = p
        elif p.suffix == ".py":
            found[p.stem] = p
    return found


def _installed_top_level_names() -> set[str]:
    """Every import name the installed distributions provide (their top_level.txt or their files)."""
    names = set()
    for dist in importlib.metadata.distributions():
        top = dist.read_text("top_level.txt")
        if top:
            names.update(line.strip() for line in top.splitlines() if line.strip())
        for f in dist.files or ():
            parts = Path(str(f)).parts
            if len(parts) > 1 and parts[1] == "__init__.py" and not parts[0].endswith((".dist-info", ".data")):
                names.add(parts[0])
    return names


def test_nothing_at_the_root_is_a_package_but_ldm():
    extra = {name: str(p.relative_to(ROOT)) for name, p in _root_importables().items() if name not in OURS}
    assert not extra, (f"the repository root offers {extra} for import; a dependency importing the same name "
                       f"gets ours instead (keep importable code inside ldm/ or kernels/ldm_kernels/)")


def test_no_root_name_shadows_an_installed_package():
    clash = sorted(set(_root_importables()) & _installed_top_level_names() - OURS)
    assert not clash, f"{clash} at the repository root shadow installed packages of the same name"


def test_the_reference_libraries_import_from_the_repository_root():
    """The clash as a user meets it: Python started in the root (cwd first on sys.path) imports
    transformers' CLIP and diffusers' UNet, the Triton kernel's package and the library."""
    code = ("import transformers, diffusers, ldm, ldm_kernels; "
            "from transformers import CLIPTextModel, CLIPTokenizer; "
            "from diffusers import UNet2DConditionModel, AutoencoderKL; print('ok')")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    last = (run.stderr.strip().splitlines() or [""])[-1]
    assert run.returncode == 0 and run.stdout.strip() == "ok", f"import from the repository root failed: {last}"


def _readme_test_command() -> str:
    text = (ROOT / "README.md").read_text()
    commands = [line for line in text.splitlines() if line.startswith("python3 -m venv") and "pytest" in line]
    assert len(commands) == 1, f"README: expected one test command, found {commands}"
    return commands[0]


def test_the_readme_test_command_installs_proven_versions_and_ci_runs_it():
    command = _readme_test_command()
    assert '-e ".[test]" -c constraints.txt' in command
    assert command in (ROOT / ".ci" / "run").read_text(), ".ci/run must run the README's test command word for word"
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            requirement = line.split(";")[0].strip()
            name, _, version = requirement.partition("==")
            pins[name.lower().replace("_", "-")] = version
    for name in ("torch", "diffusers", "transformers", "peft", "accelerate", "mkdocs", "mkdocs-material",
                 "nbclient", "nbconvert", "ipykernel", "pytest", "triton"):
        assert pins.get(name), f"constraints.txt pins no version of {name}"
    assert pins["torch"] == "2.13.0", "the CPU build on disk; a newer pin pulls several GB of CUDA packages"


def _ldm_imports() -> dict[str, set[str]]:
    """module -> the ldm modules it imports, at module level or inside functions (import x, from x import y,
    from ldm import y: each resolved to the module, or the package, that defines the name)."""
    import ast

    files = {}
    for p in sorted((ROOT / "ldm").rglob("*.py")):
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p

    def resolve(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from . import x
                    base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
                names = [f"{base}.{a.name}" if resolve(f"{base}.{a.name}") == f"{base}.{a.name}" else base
                         for a in node.names]
            else:
                continue
            found |= {r for n in names if n.startswith("ldm") and (r := resolve(n)) and r != module}
        graph[module] = found
    return graph


def test_no_module_of_ldm_imports_one_that_imports_it_back():
    """One floor per module: an import circle (cli <-> train, checkpoint <-> weights once) means two
    concepts share a home. Every elementary path back to its start is reported."""
    graph = _ldm_imports()
    circles = set()

    def walk(start, node, path):
        for nxt in graph.get(node, ()):
            if nxt == start:
                circles.add(" -> ".join(path + [start]))
            elif nxt not in path and len(path) < 12:
                walk(start, nxt, path + [nxt])

    for module in graph:
        walk(module, module, [module])
    assert not circles, f"import circles: {sorted(circles)[:5]}"


def test_every_module_of_ldm_reads_in_a_sitting():
    """The layout's rule: one stage per file, readable in one sitting, no module past 500 lines."""
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / "ldm").rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 500}
    assert not long, f"modules past 500 lines: {long}"
