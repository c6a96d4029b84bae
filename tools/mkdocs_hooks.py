"""MkDocs hooks: the site reads right offline, and every notebook appears in it with its outputs.

mkdocs.yml loads this file (`hooks:`). At each build it does three things.

1. Math without a network. MathJax 3 comes from the PyPI package django-static-mathjax (part of
   the docs and test extras, no dependencies); its browser build (es5/: tex-mml-chtml.js, its
   fonts and the extensions it loads on demand) is copied into the site as javascripts/mathjax/,
   next to MathJax's licence. Nothing large is committed and no CDN is needed.
2. Notebooks with their outputs. Each notebooks/NN_*.ipynb (stored without outputs) is executed
   top to bottom with nbclient, in notebooks/ as its working directory and with the kernel's
   inline matplotlib backend (MPLBACKEND is removed, so figures become outputs), then converted
   with nbconvert into the page notebooks/NN_*.md, its pictures as files in notebooks/NN_*_files/.
   A cell that raises fails the build with the notebook's name and nbclient's account of the cell.
   The source .ipynb is in the site too, to download. The pages are added to the nav under
   "Notebooks", titled by each notebook's first heading.
3. Chapter links. Chapter NN (docs/NN-*.md) gets one line under its title linking notebook NN,
   and each notebook page links back to its chapter. A new notebook or chapter needs no edit here.

Executed notebooks are cached in build/notebooks/, keyed by the notebook and the library sources
(ldm/, kernels/), so `mkdocs serve` does not re-run them on every edit of a chapter. When the
environment variable LDM_DOCS_NOTEBOOKS_OUT names a folder, the cache is bypassed: every notebook
is executed afresh and the executed copy is written there (tests/test_docs.py does this, and checks
the copies, so the test suite executes each notebook exactly once).
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import re
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

log = logging.getLogger("mkdocs.hooks.ldm")

NOTEBOOK_GLOB = "[0-9][0-9]_*.ipynb"
CHAPTER = re.compile(r"^(\d\d)-[^/]*\.md$")
MATHJAX_PACKAGE = "django-static-mathjax"
MATHJAX_DEST = "javascripts/mathjax"
CELL_TIMEOUT_S = 600

# Set by on_config for the rest of the build (mkdocs loads the hook module once per build).
_state: dict = {}


# ---------------------------------------------------------------------------------------------
# 1. MathJax from the installed package
# ---------------------------------------------------------------------------------------------

def mathjax_files() -> dict[str, Path]:
    """Site path -> installed file for MathJax's browser build: tex-mml-chtml.js and what it loads.

    The other combined builds (tex-svg.js, mml-chtml.js, ...) and the SVG output are left out.
    """
    try:
        dist = importlib.metadata.distribution(MATHJAX_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise PluginError(f"MathJax is bundled from the PyPI package {MATHJAX_PACKAGE}, which is not "
                          f"installed: pip install -e '.[docs]'") from None
    root = Path(dist.locate_file("mathjax/static/mathjax"))
    es5 = root / "es5"
    if not (es5 / "tex-mml-chtml.js").is_file():
        raise PluginError(f"{MATHJAX_PACKAGE} {dist.version} has no es5/tex-mml-chtml.js under {root}; "
                          f"a MathJax 3 build is needed ({MATHJAX_PACKAGE}>=3.2,<4)")
    files = {f"{MATHJAX_DEST}/LICENSE": root / "LICENSE"}
    for path in sorted(es5.rglob("*")):
        rel = path.relative_to(es5)
        top_level_bundle = len(rel.parts) == 1 and rel.name != "tex-mml-chtml.js"
        if path.is_file() and not top_level_bundle and rel.parts[:2] != ("output", "svg") \
                and rel.as_posix() != "output/svg.js":
            files[f"{MATHJAX_DEST}/{rel.as_posix()}"] = path
    return files


# ---------------------------------------------------------------------------------------------
# 2. Notebooks: execute (or take from the cache), convert to a page
# ---------------------------------------------------------------------------------------------

def notebook_title(path: Path) -> str:
    """The notebook's first level-1 heading, else its file name."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                if line.startswith("# "):
                    return line[2:].strip()
    return path.stem


def execute_notebook(path: Path):
    """Run the notebook top to bottom in its own folder; returns the executed NotebookNode."""
    import nbclient
    import nbformat

    nb = nbformat.read(path, as_version=4)
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}   # inline figures become outputs
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    log.info("executing %s", path.name)
    try:
        client.execute(env=env)
    except nbclient.exceptions.CellExecutionError as err:
        raise PluginError(f"notebook {path.name} failed: {err}") from None
    return nb


def source_key(path: Path, root: Path) -> str:
    """Hash of the notebook and of every library source it can import (the cache key)."""
    h = hashlib.sha256(path.read_bytes())
    for folder in ("ldm", "kernels"):
        for src in sorted((root / folder).rglob("*")):
            if src.is_file() and src.suffix in {".py", ".json", ".txt", ".gz", ".safetensors"}:
                h.update(src.relative_to(root).as_posix().encode())
                h.update(src.read_bytes())
    return h.hexdigest()[:16]


def executed_notebook(path: Path, root: Path):
    """Executed notebook: fresh into $LDM_DOCS_NOTEBOOKS_OUT when set, else through the cache."""
    import nbformat

    out = os.environ.get("LDM_DOCS_NOTEBOOKS_OUT")
    if out:
        nb = execute_notebook(path)
        Path(out).mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, Path(out) / path.name)
        return nb
    cache = root / "build" / "notebooks"
    cached = cache / f"{path.stem}-{source_key(path, root)}.ipynb"
    if cached.is_file():
        log.info("%s: executed copy from %s", path.name, cached.relative_to(root))
        return nbformat.read(cached, as_version=4)
    nb = execute_notebook(path)
    cache.mkdir(parents=True, exist_ok=True)
    for old in cache.glob(f"{path.stem}-*.ipynb"):
        old.unlink()
    nbformat.write(nb, cached)
    return nb


def notebook_page(nb, stem: str, chapter: str | None) -> tuple[str, dict[str, bytes]]:
    """Markdown for the notebook's page and its output files (pictures), keyed by path in notebooks/."""
    import nbconvert

    body, resources = nbconvert.MarkdownExporter().from_notebook_node(
        nb, resources={"output_files_dir": f"{stem}_files"})
    # A link from notebooks/ to ../docs/X.md points, in the site, from notebooks/ to ../X.md.
    body = re.sub(r"\]\(\.\./docs/", "](../", body)
    body = body.replace("![png](", "![notebook output](")
    back = f" Its chapter: [{chapter[:2].lstrip('0')}. {_state['chapter_titles'][chapter]}](../{chapter})." \
        if chapter else ""
    header = (f"*The notebook `notebooks/{stem}.ipynb`, executed when this site was built, with all its "
              f"outputs ([download the notebook]({stem}.ipynb)).{back}*\n\n")
    lines = body.splitlines(keepends=True)
    for i, line in enumerate(lines):            # the header goes under the title
        if line.startswith("# "):
            return "".join(lines[:i + 1]) + "\n" + header + "".join(lines[i + 1:]), resources["outputs"]
    return header + body, resources["outputs"]


# ---------------------------------------------------------------------------------------------
# MkDocs events
# ---------------------------------------------------------------------------------------------

def on_config(config):
    root = Path(config.config_file_path).resolve().parent
    docs = Path(config.docs_dir)
    notebooks = sorted((root / "notebooks").glob(NOTEBOOK_GLOB))
    chapters = {p.name[:2]: p.name for p in sorted(docs.glob("[0-9][0-9]-*.md"))}
    _state.update(root=root, notebooks=notebooks, chapters=chapters,
                  chapter_titles={name: _first_heading(docs / name) for name in chapters.values()})
    if config.nav is not None and notebooks:
        entries = [{notebook_title(p): f"notebooks/{p.stem}.md"} for p in notebooks]
        config.nav = [e for e in config.nav if not (isinstance(e, dict) and "Notebooks" in e)]
        config.nav.append({"Notebooks": entries})
    return config


def on_files(files, config):
    for uri, path in mathjax_files().items():
        files.append(File.generated(config, uri, abs_src_path=str(path)))
    for path in _state["notebooks"]:
        nb = executed_notebook(path, _state["root"])
        page, outputs = notebook_page(nb, path.stem, _state["chapters"].get(path.name[:2]))
        files.append(File.generated(config, f"notebooks/{path.stem}.md", content=page))
        files.append(File.generated(config, f"notebooks/{path.name}", abs_src_path=str(path)))
        for name, data in outputs.items():
            files.append(File.generated(config, f"notebooks/{name}", content=data))
    return files


def on_page_markdown(markdown, page, config, files):
    """Chapter NN gets one line under its title linking notebook NN's page."""
    match = CHAPTER.match(page.file.src_uri)
    nb = next((p for p in _state["notebooks"] if match and p.name[:2] == match.group(1)), None)
    if nb is None:
        return markdown
    line = (f"**Notebook:** [{nb.name}](notebooks/{nb.stem}.md), run top to bottom with all its "
            f"outputs ([download]({'notebooks/' + nb.name})).\n")
    lines = markdown.splitlines(keepends=True)
    for i, text in enumerate(lines):
        if text.startswith("# "):
            return "".join(lines[:i + 1]) + "\n" + line + "".join(lines[i + 1:])
    return line + "\n" + markdown


def _first_heading(path: Path) -> str:
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# "):
            return re.sub(r"^\d+\.\s*", "", line[2:].strip())
    return path.stem
