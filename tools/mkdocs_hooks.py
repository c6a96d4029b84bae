"""MkDocs hooks: the site reads right offline, every notebook appears in it with its outputs, and the
chapters show the notebooks' figures.

mkdocs.yml loads this file (`hooks:`). At each build it does four things.

1. Math without a network. MathJax 3 comes from the PyPI package django-static-mathjax (part of
   the docs and test extras, no dependencies); its browser build (es5/: tex-mml-chtml.js, its
   fonts and the extensions it loads on demand) is copied into the site as javascripts/mathjax/,
   next to MathJax's licence. Nothing large is committed and no CDN is needed.
2. Notebooks with their outputs. Each notebooks/NN_*.ipynb (stored without outputs) is executed
   top to bottom with nbclient, in notebooks/ as its working directory and with the kernel's
   inline matplotlib backend (MPLBACKEND is removed, so figures become outputs), without progress bars
   (TQDM_DISABLE; a bar the code forces on is removed from the outputs afterwards) and without tqdm's
   warning that ipywidgets is missing, then converted with
   nbconvert into the page notebooks/NN_*.md, its pictures as files in notebooks/NN_*_files/.
   Every picture gets alt text: a figure's own (below), else the notebook's section it is in.
   A cell that raises fails the build with the notebook's name and nbclient's account of the cell.
   The source .ipynb is in the site too, to download. The pages are added to the nav under
   "Notebooks", titled by each notebook's first heading.
3. Chapter links. Chapter NN (docs/NN-*.md) gets one line under its title linking notebook NN,
   and each notebook page links back to its chapter. A new notebook or chapter needs no edit here.
4. Figures. A code cell whose metadata holds `"ldm": {"figures": [{"name": ..., "alt": ...}, ...]}`
   (one entry per picture it draws, in order; null skips one) exports each picture as
   figures/NN-name.png, NN the notebook's number. A chapter shows it with an image whose alt text is
   empty, `![](figures/NN-name.png)`, usually inside `<figure markdown="span">` with a
   `<figcaption>`: the hook fills in the alt text from the cell and makes the image a link to itself
   (the full-size picture, for small screens). A chapter that names a figure no notebook exports, a
   figure entry without a name or real alt text, or a cell that draws fewer pictures than it names,
   fails the build.

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
FIGURES_DIR = "figures"
FIGURE_NAME = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
FIGURE_REF = re.compile(r"!\[\]\((" + FIGURES_DIR + r"/\d\d-[a-z0-9-]+\.png)\)")
GENERIC_ALT = {"", "png", "image", "figure", "picture", "plot", "output", "notebook output"}
MIN_ALT_CHARS = 30

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


PROGRESS_BAR = re.compile(r"^[^\n|]*\d+%\|[^|]*\|[^\n]*$")   # tqdm: "unet:  57%|█████▋    | 34/60 [...]"


def strip_progress_bars(nb):
    """Drop tqdm's progress bars from stderr outputs (a bar the notebook could not switch off, such as the
    training loop's); everything else a cell printed to stderr stays, and an output left empty goes."""
    for cell in nb.cells:
        kept = []
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream" and out.get("name") == "stderr":
                lines = re.split(r"[\r\n]", out.get("text", ""))
                text = "\n".join(line for line in lines if line.strip() and not PROGRESS_BAR.match(line))
                if not text:
                    continue
                out["text"] = text + "\n"
            kept.append(out)
        if cell.cell_type == "code":
            cell.outputs = kept
    return nb


def execute_notebook(path: Path):
    """Run the notebook top to bottom in its own folder; returns the executed NotebookNode."""
    import nbclient
    import nbformat

    nb = nbformat.read(path, as_version=4)
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}   # inline figures become outputs
    env["TQDM_DISABLE"] = "1"                                            # no progress bars in the pages
    # tqdm.auto warns, with this machine's path, that ipywidgets is missing: not the reader's concern
    env["PYTHONWARNINGS"] = ",".join(filter(None, [env.get("PYTHONWARNINGS"), "ignore:IProgress not found"]))
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    log.info("executing %s", path.name)
    try:
        client.execute(env=env)
    except nbclient.exceptions.CellExecutionError as err:
        raise PluginError(f"notebook {path.name} failed: {err}") from None
    return strip_progress_bars(nb)


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


def figure_entries(cell) -> list:
    """The figure entries of a code cell's metadata (`"ldm": {"figures": [...]}`), [] when it has none."""
    entries = cell.get("metadata", {}).get("ldm", {}).get("figures", [])
    return list(entries) if isinstance(entries, list) else [entries]


def _png_outputs(cell) -> list[bytes]:
    import base64

    return [base64.b64decode(o["data"]["image/png"]) for o in cell.get("outputs", [])
            if o.get("output_type") in ("display_data", "execute_result") and "image/png" in o.get("data", {})]


def notebook_figures(nb, stem: str) -> dict[str, tuple[bytes, str]]:
    """figures/NN-name.png -> (PNG bytes, alt text) for every figure entry of the executed notebook."""
    out = {}
    for index, cell in enumerate(nb.cells):
        entries = figure_entries(cell)
        if not entries:
            continue
        pictures = _png_outputs(cell)
        where = f"{stem}.ipynb, cell {index}"
        if len(pictures) < len(entries):
            raise PluginError(f"{where} names {len(entries)} figures in its metadata but drew {len(pictures)}")
        for entry, png in zip(entries, pictures):
            if entry is None:
                continue
            name, alt = entry.get("name", ""), " ".join(str(entry.get("alt", "")).split())
            if not FIGURE_NAME.match(name):
                raise PluginError(f"{where}: figure name {name!r} must be lower-case words joined by '-'")
            if alt.lower() in GENERIC_ALT or len(alt) < MIN_ALT_CHARS:
                raise PluginError(f"{where}: figure {name!r} needs alt text that says what it shows "
                                  f"(at least {MIN_ALT_CHARS} characters), not {alt!r}")
            path = f"{FIGURES_DIR}/{stem[:2]}-{name}.png"
            if path in out:
                raise PluginError(f"{where}: figure {name!r} is named twice in {stem}.ipynb")
            out[path] = (png, alt)
    return out


def _section_alts(nb, stem: str) -> dict[str, str]:
    """Alt text for every picture nbconvert writes (output_<cell>_<output>.png): the figure entry's, else
    "A figure of notebook N, section '...'" from the last heading above the cell."""
    number, heading, alts = stem[:2].lstrip("0"), "", {}
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                if line.startswith("#"):
                    heading = line.lstrip("#").strip()
            continue
        entries = figure_entries(cell)
        k = 0
        for j, o in enumerate(cell.get("outputs", [])):
            if "image/png" not in o.get("data", {}):
                continue
            entry = entries[k] if k < len(entries) else None
            alts[f"output_{index}_{j}.png"] = " ".join(str(entry["alt"]).split()) if entry else \
                f"A figure of notebook {number}, section '{heading}', drawn by the code above it"
            k += 1
    return alts


def notebook_page(nb, stem: str, chapter: str | None) -> tuple[str, dict[str, bytes]]:
    """Markdown for the notebook's page and its output files (pictures), keyed by path in notebooks/."""
    import nbconvert

    body, resources = nbconvert.MarkdownExporter().from_notebook_node(
        nb, resources={"output_files_dir": f"{stem}_files"})
    # A link from notebooks/ to ../docs/X.md points, in the site, from notebooks/ to ../X.md.
    body = re.sub(r"\]\(\.\./docs/", "](../", body)
    alts = _section_alts(nb, stem)

    def alt_for(match: re.Match) -> str:
        text = alts.get(match.group(1).rsplit("/", 1)[-1], f"A figure of notebook {stem[:2].lstrip('0')}")
        return "![" + text.replace("[", "(").replace("]", ")") + "](" + match.group(1) + ")"

    body = re.sub(r"!\[png\]\(([^)]+)\)", alt_for, body)
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
    _state["figures"] = {}
    for path in _state["notebooks"]:
        nb = executed_notebook(path, _state["root"])
        page, outputs = notebook_page(nb, path.stem, _state["chapters"].get(path.name[:2]))
        files.append(File.generated(config, f"notebooks/{path.stem}.md", content=page))
        files.append(File.generated(config, f"notebooks/{path.name}", abs_src_path=str(path)))
        for name, data in outputs.items():
            files.append(File.generated(config, f"notebooks/{name}", content=data))
        for uri, (png, alt) in notebook_figures(nb, path.stem).items():
            files.append(File.generated(config, uri, content=png))
            _state["figures"][uri] = alt
    return files


def fill_figures(markdown: str, page_uri: str) -> str:
    """`![](figures/NN-name.png)` -> the figure's alt text from its notebook cell, linked to the picture."""
    def fill(match: re.Match) -> str:
        uri = match.group(1)
        if uri not in _state["figures"]:
            known = ", ".join(sorted(_state["figures"])) or "none"
            raise PluginError(f"{page_uri} shows {uri}, which no notebook exports (exported: {known})")
        alt = _state["figures"][uri].replace("[", "(").replace("]", ")")
        return f"[![{alt}]({uri})]({uri})"

    return FIGURE_REF.sub(fill, markdown)


def on_page_markdown(markdown, page, config, files):
    """Figures get their alt text; chapter NN gets one line under its title linking notebook NN's page."""
    markdown = fill_figures(markdown, page.file.src_uri)
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
