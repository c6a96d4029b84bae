"""The docs site: it builds with --strict, shows every notebook with its outputs, and reads right offline.

One `mkdocs build --strict` per test run (module fixture). Its hook (tools/mkdocs_hooks.py) executes
every notebooks/NN_*.ipynb once and writes the executed copies to a folder named by
LDM_DOCS_NOTEBOOKS_OUT, so this file is also the test that every notebook runs top to bottom.
Then the built site is served on 127.0.0.1 and loaded in headless Chromium with every other host
unresolvable: the math must be typeset by the MathJax copy in the site, the notebook pages must show
their pictures, and every chapter its figures, with alt text that says what they show. The browser
tests skip when no Chromium is installed (`.ci/run` installs it).

Without the build: each chapter's code blocks run as shown (or say what they need), chapters and
notebooks share their numbers and titles, and the figures the chapters show are drawn large enough
to read at the page's width.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from functools import partial
from html.parser import HTMLParser
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import unquote, urljoin, urlparse

import pytest

pytestmark = pytest.mark.docs  # a tier: the build executes every notebook once (see conftest.py)

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
CHAPTERS = sorted((ROOT / "docs").glob("[0-9][0-9]-*.md"))
MATH_CHAPTER = "02-noise-and-samplers"
MKDOCS = shutil.which("mkdocs") or (str(Path(sys.executable).parent / "mkdocs")
                                     if (Path(sys.executable).parent / "mkdocs").exists() else None)
CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(name)), None)
needs_browser = pytest.mark.skipif(
    CHROMIUM is None, reason="no headless browser on PATH (chromium): apt-get install -y chromium; .ci/run installs it")


# ---------------------------------------------------------------------------------------------
# The build (once) and the executed notebooks
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def built(tmp_path_factory):
    if MKDOCS is None:
        pytest.skip("mkdocs is not installed (pip install -e '.[docs]')")
    out = tmp_path_factory.mktemp("docs")
    env = {**os.environ, "LDM_DOCS_NOTEBOOKS_OUT": str(out / "executed"), "NO_MKDOCS_2_WARNING": "1"}
    run = subprocess.run([MKDOCS, "build", "--strict", "-d", str(out / "site")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=3600)
    return SimpleNamespace(run=run, site=out / "site", executed=out / "executed",
                           log=(run.stdout + run.stderr)[-6000:])


@pytest.fixture(scope="module")
def site(built):
    if built.run.returncode != 0:
        pytest.fail(f"the site did not build (see test_docs_build_strict):\n{built.log}")
    return built.site


def test_docs_build_strict(built):
    assert built.run.returncode == 0, built.log
    assert (built.site / "index.html").is_file()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path, built):
    nbformat = pytest.importorskip("nbformat")
    executed = built.executed / path.name
    assert executed.is_file(), f"{path.name} was not executed; the build stops at the first notebook " \
                               f"that raises and names it:\n{built.log}"
    nb = nbformat.read(executed, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code" and c.source.strip()]
    assert code and all(c.execution_count is not None for c in code), f"{path.name}: a code cell did not run"
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, f"{path.name}: {errors[0].ename}: {errors[0].evalue}"


def test_every_chapter_has_a_notebook_with_its_number():
    chapters = {p.name[:2] for p in CHAPTERS}
    notebooks = {p.name[:2] for p in NOTEBOOKS}
    assert chapters == notebooks, f"chapters {sorted(chapters)} vs notebooks {sorted(notebooks)}"


def test_chapters_and_notebook_pages_link_each_other(site):
    for nb in NOTEBOOKS:
        chapter = next(p for p in CHAPTERS if p.name[:2] == nb.name[:2])
        chapter_html = (site / chapter.stem / "index.html").read_text(encoding="utf-8")
        assert f'href="../notebooks/{nb.stem}/"' in chapter_html, f"{chapter.name} does not link {nb.name}'s page"
        page = (site / "notebooks" / nb.stem / "index.html").read_text(encoding="utf-8")
        assert f'href="../../{chapter.stem}/"' in page, f"{nb.name}'s page does not link back to {chapter.name}"
        assert (site / "notebooks" / nb.name).is_file(), f"{nb.name} is not in the site to download"
    index = (site / "index.html").read_text(encoding="utf-8")
    for nb in NOTEBOOKS:
        assert f"notebooks/{nb.stem}/" in index, f"the nav does not list {nb.name}"


# ---------------------------------------------------------------------------------------------
# Nothing comes from the network
# ---------------------------------------------------------------------------------------------

class _Loads(HTMLParser):
    """Every URL an HTML page makes the browser fetch by itself (scripts, styles, icons, images, frames)."""

    def __init__(self):
        super().__init__()
        self.urls = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag in ("script", "img", "iframe", "source", "audio", "video", "embed") and a.get("src"):
            self.urls.append(a["src"])
        if tag == "link" and a.get("href") and a.get("rel") not in ("canonical", "prev", "next"):
            self.urls.append(a["href"])


def test_no_math_is_left_half_parsed(site):
    """`$$...$$` inside a paragraph is read as $ + inline math + $: a stray dollar beside the math."""
    for page in site.rglob("*.html"):
        html = page.read_text(encoding="utf-8")
        stray = re.findall(r".{0,40}(?:\$<span class=\"arithmatex\">|</span>\$).{0,40}", html)
        assert not stray, f"{page.relative_to(site)}: a dollar sign beside typeset math: {stray[:2]}"


def test_site_loads_nothing_from_the_network(site):
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    remote = [line for line in config.splitlines() if re.search(r"https?://|//cdn", line)
              and not re.match(r"\s*(site_url|repo_url)\s*:", line)]
    assert not remote, f"mkdocs.yml names remote resources: {remote}"
    for page in site.rglob("*.html"):
        parser = _Loads()
        parser.feed(page.read_text(encoding="utf-8"))
        far = [u for u in parser.urls if re.match(r"^(https?:)?//", u)]
        assert not far, f"{page.relative_to(site)} loads {far}"
        assert parser.urls, f"{page.relative_to(site)}: found no scripts or styles at all"
    assert (site / "javascripts" / "mathjax" / "tex-mml-chtml.js").is_file()
    assert (site / "javascripts" / "mathjax" / "LICENSE").is_file()


# ---------------------------------------------------------------------------------------------
# In a real browser
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(site):
    """The built site on http://127.0.0.1:<free port>/; .served holds (path, status) of every request."""
    served = []

    class Handler(SimpleHTTPRequestHandler):
        def log_request(self, code="-", size="-"):
            served.append((unquote(urlparse(self.path).path), int(code) if str(code).isdigit() else 0))

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(site)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield SimpleNamespace(url=f"http://127.0.0.1:{httpd.server_address[1]}/", served=served, site=site)
    httpd.shutdown()
    httpd.server_close()


def chromium(url, tmp_path, *flags):
    """Run headless Chromium on url; only 127.0.0.1 resolves, so a page that needs a CDN shows it."""
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", f"--user-data-dir={profile}",
           "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
           "--virtual-time-budget=10000", *flags, url]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, f"chromium failed on {url}: {run.stderr[-2000:]}"
    return run.stdout


class _Page(HTMLParser):
    """From a dumped DOM: the text outside code, the MathJax containers, and the article's <img> sources."""

    SKIP = {"code", "pre", "script", "style", "mjx-assistive-mml"}

    def __init__(self):
        super().__init__()
        self.text, self.images, self.math, self._skip, self._article = [], [], 0, 0, 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self._skip += tag in self.SKIP
        self.math += tag == "mjx-container"
        self._article += tag == "article"
        if tag == "img" and self._article:
            self.images.append(a.get("src", ""))

    def handle_endtag(self, tag):
        self._skip -= tag in self.SKIP and self._skip > 0
        self._article -= tag == "article" and self._article > 0

    def handle_data(self, data):
        if not self._skip:
            self.text.append(data)


def load(server, path, tmp_path):
    page = _Page()
    page.feed(chromium(server.url + path, tmp_path, "--dump-dom"))
    page.text = "".join(page.text)
    return page


@needs_browser
def test_math_is_typeset_offline(server, tmp_path):
    static = (server.site / MATH_CHAPTER / "index.html").read_text(encoding="utf-8")
    expressions = static.count('class="arithmatex"')
    assert expressions > 10, f"{MATH_CHAPTER} should hold math; found {expressions} expressions"
    page = load(server, f"{MATH_CHAPTER}/", tmp_path)
    assert page.math >= expressions, f"MathJax typeset {page.math} of {expressions} expressions in {MATH_CHAPTER}"
    raw = re.findall(r".{0,30}(?:\\\(|\\\[|\$\$).{0,30}", page.text)
    assert not raw, f"raw TeX left in {MATH_CHAPTER}: {raw[:3]}"
    fonts = [p for p, status in server.served if p.endswith(".woff") and status == 200]
    assert fonts, "MathJax loaded none of its fonts from the site"


@needs_browser
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_page_shows_its_pictures(path, server, tmp_path):
    page_path = f"notebooks/{path.stem}/"
    page = load(server, page_path, tmp_path)
    assert page.images, f"{path.name}'s page shows no pictures"
    for src in page.images:
        if src.startswith("data:image/"):
            continue
        url = urlparse(urljoin(server.url + page_path, src))
        assert url.netloc == urlparse(server.url).netloc, f"{path.name}: picture from elsewhere: {src}"
        assert (unquote(url.path), 200) in server.served, f"{path.name}: picture {src} was not served"
    nbformat = pytest.importorskip("nbformat")
    md = "".join(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "markdown")
    if re.search(r"\$[^$\s][^$]*\$", md):
        assert page.math > 0, f"{path.name} has math in its text and none was typeset"
    assert not re.findall(r"\\\(|\\\[", page.text), f"raw TeX left on {path.name}'s page"


@needs_browser
def test_screenshot_of_a_chapter_is_a_page_of_text_and_math(server, tmp_path):
    from PIL import Image, ImageStat

    shot = tmp_path / "chapter.png"
    chromium(server.url + f"{MATH_CHAPTER}/", tmp_path, f"--screenshot={shot}", "--window-size=1200,1600")
    image = Image.open(shot).convert("L")
    assert image.size == (1200, 1600)
    inked = sum(image.histogram()[:128]) / (image.size[0] * image.size[1])   # dark pixels: text, math, header
    assert 0.02 < inked < 0.5, f"the screenshot is {inked:.1%} dark: blank or unstyled"
    assert ImageStat.Stat(image).stddev[0] > 20


# ---------------------------------------------------------------------------------------------
# The chapters: figures, titles, code
# ---------------------------------------------------------------------------------------------

# What each page must show: the file names of its figures (exported from the notebooks into figures/,
# or drawn for the docs in images/). The issue behind them: every chapter shows what it teaches.
PAGE_FIGURES = {
    "": ["pipeline.svg"],
    "01-text": ["tokens.svg", "01-rows.png", "01-similarity.png"],
    "02-noise-and-samplers": ["02-forward.png", "02-forward-latent.png", "02-trajectory.png", "02-samplers.png"],
    "03-unet": ["unet.svg", "03-cross-attention.png", "03-cross-attention-two.png"],
    "04-vae": ["04-round-trip.png"],
    "05-pipeline": ["05-previews.png", "05-guidance.png", "05-negative.png"],
    "06-flash-attention": ["06-tiles.png", "06-online-softmax.png"],
    "07-training": ["loss-curves.png", "vae-002800.png", "unet-004400.png"],
    "08-adapting": ["08-lora.png"],
    "09-families": ["09-heads.png", "09-prediction.png"],
}
GENERIC_ALT = {"", "png", "image", "figure", "picture", "plot", "output", "notebook output"}
COLUMN_PX = 680          # the article's width at a 1280-px window (Material, both sidebars shown), measured
MIN_LABEL_PX = 10
FIGURE_DPI = 100         # matplotlib's default, which the notebooks keep: a point is 100/72 pixels


def _title(text: str) -> str:
    return next(line[2:].strip() for line in text.splitlines() if line.startswith("# "))


def test_chapters_and_notebooks_share_numbers_and_titles():
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    for chapter in CHAPTERS:
        title = _title(chapter.read_text(encoding="utf-8"))
        assert re.match(rf"^{int(chapter.name[:2])}\. \S", title), f"{chapter.name}: title {title!r} is not 'N. Title'"
        nb = next(p for p in NOTEBOOKS if p.name[:2] == chapter.name[:2])
        cells = json.loads(nb.read_text(encoding="utf-8"))["cells"]
        nb_title = _title("".join(cells[0]["source"]))
        assert nb_title == title, f"{nb.name} is titled {nb_title!r}, its chapter {title!r}"
        assert f"- {chapter.name}\n" in nav, f"mkdocs.yml should list {chapter.name} untitled (its title is its heading)"


def _fences(path: Path):
    """(language, code) of every fenced block of a markdown file."""
    return re.findall(r"^```(\w*)\n(.*?)^```$", path.read_text(encoding="utf-8"), flags=re.S | re.M)


CODE_PAGES = CHAPTERS + [ROOT / "docs" / "checkpoints.md", ROOT / "docs" / "index.md"]

# Runs in one fresh interpreter: each page's python blocks in order, in a namespace of its own, from the
# repository root; writes {page: traceback or ""} as JSON to the path in argv[1].
_RUN_PAGES = r"""
import json, sys, traceback
import torch
torch.set_num_threads(1)
results = {}
for name, code in json.loads(open(sys.argv[2], encoding="utf-8").read()).items():
    try:
        exec(compile(code, name, "exec"), {"__name__": "__main__"})
        results[name] = ""
    except BaseException:
        results[name] = traceback.format_exc()
open(sys.argv[1], "w", encoding="utf-8").write(json.dumps(results))
"""


def _runnable_blocks(path: Path) -> list[str]:
    """The page's python blocks that claim to run as shown (not starting with `# needs:`), checking that
    every block is python, bash or text and that every shell block starts with `# needs:`."""
    runnable = []
    for lang, code in _fences(path):
        assert lang in ("python", "bash", "text"), f"{path.name}: a ```{lang} block; say python, bash or text"
        if lang == "bash":
            assert code.startswith("# needs:"), f"{path.name}: a shell block must say what it needs:\n{code[:200]}"
        elif lang == "python" and not code.startswith("# needs:"):
            runnable.append(code)
    return runnable


@pytest.fixture(scope="module")
def page_code_runs(tmp_path_factory):
    """Every page's runnable blocks, run in one interpreter (one import of torch and ldm for all), except
    a page that switches Triton's interpreter on, which needs an interpreter of its own."""
    tmp = tmp_path_factory.mktemp("page-code")
    pages = {p.name: "\n".join(_runnable_blocks(p)) for p in CODE_PAGES}
    pages = {name: code for name, code in pages.items() if code}
    groups = [{k: v for k, v in pages.items() if "TRITON_INTERPRET" not in v}]
    groups += [{k: v} for k, v in pages.items() if "TRITON_INTERPRET" in v]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    results = {}
    for n, group in enumerate(groups):
        (tmp / f"pages-{n}.json").write_text(json.dumps(group), encoding="utf-8")
        run = subprocess.run([sys.executable, "-c", _RUN_PAGES, str(tmp / f"results-{n}.json"), str(tmp / f"pages-{n}.json")],
                             cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
        assert run.returncode == 0, f"the page runner failed:\n{run.stderr[-3000:]}"
        results.update(json.loads((tmp / f"results-{n}.json").read_text(encoding="utf-8")))
    return results


@pytest.mark.parametrize("path", CODE_PAGES, ids=[p.stem for p in CODE_PAGES])
def test_chapter_code_runs_as_shown_or_says_what_it_needs(path, page_code_runs):
    """Python blocks run, in order, in a fresh namespace per page (from the repository root, on whatever
    model ldm.load() finds); a block that cannot, and every shell block, starts with `# needs: ...`.
    Text blocks (data flows, printed output) are neither."""
    if not _runnable_blocks(path):
        pytest.skip(f"{path.name} has no block that runs as shown")
    failure = page_code_runs[path.name]
    assert not failure, f"{path.name}'s code blocks do not run as shown:\n{failure[-3000:]}"


def _figure_cells():
    """(notebook, cell source, [figure entries]) of every code cell that exports figures."""
    for nb in NOTEBOOKS:
        for cell in json.loads(nb.read_text(encoding="utf-8"))["cells"]:
            entries = cell.get("metadata", {}).get("ldm", {}).get("figures")
            if entries:
                yield nb, "".join(cell["source"]), entries


def test_figure_labels_are_readable_at_the_page_width(site):
    """A chapter figure's smallest font, at the size the page shows the picture, is at least 10 px:
    the PNG is scaled to the article's width when wider, and its labels with it."""
    from PIL import Image

    checked = 0
    for nb, source, entries in _figure_cells():
        sizes = [float(v) for v in re.findall(r"fontsize=(\d+(?:\.\d+)?)", source)]
        smallest_pt = min([10.0] + sizes)   # matplotlib's default size is 10 pt
        for entry in filter(None, entries):
            png = site / "figures" / f"{nb.name[:2]}-{entry['name']}.png"
            assert png.is_file(), f"{nb.name}: figure {entry['name']} was not exported"
            width = Image.open(png).size[0]
            px = smallest_pt * FIGURE_DPI / 72 * min(1.0, COLUMN_PX / width)
            assert px >= MIN_LABEL_PX, (f"{png.name}: {width} px wide, smallest label {smallest_pt:g} pt -> "
                                        f"{px:.1f} px at the page's width (goal {MIN_LABEL_PX})")
            checked += 1
    assert checked >= sum(1 for names in PAGE_FIGURES.values() for n in names if re.match(r"\d\d-", n))


def test_every_exported_figure_is_shown_and_every_shown_figure_exists(site):
    exported = {p.name for p in (site / "figures").glob("*.png")}
    shown = set()
    for page in site.rglob("*.html"):
        shown |= set(re.findall(r'src="[^"]*figures/([^"/]+\.png)"', page.read_text(encoding="utf-8")))
    assert shown <= exported, f"shown but not exported: {sorted(shown - exported)}"
    assert exported <= shown, f"exported but no page shows them: {sorted(exported - shown)}"


def test_published_notebooks_hold_no_warnings_or_progress_bars(built):
    nbformat = pytest.importorskip("nbformat")
    for path in NOTEBOOKS:
        executed = built.executed / path.name
        if not executed.is_file():
            pytest.fail(f"{path.name} was not executed:\n{built.log}")
        for i, cell in enumerate(nbformat.read(executed, as_version=4).cells):
            for out in cell.get("outputs", []):
                text = out.get("text", "") if out.get("output_type") == "stream" else ""
                assert out.get("name") != "stderr", f"{path.name} cell {i} wrote to stderr: {text[:300]!r}"
                assert "Warning" not in text and "%|" not in text, f"{path.name} cell {i}: {text[:300]!r}"


def test_exercise_cells_ran_their_graders(built):
    """Each exercise cell shows its grader's verdict on the first attempt, which is not yet right."""
    nbformat = pytest.importorskip("nbformat")
    found = 0
    for path in NOTEBOOKS:
        executed = built.executed / path.name
        for cell in nbformat.read(executed, as_version=4).cells:
            number = cell.get("metadata", {}).get("ldm", {}).get("exercise")
            if not number:
                continue
            found += 1
            shown = "".join(o.get("data", {}).get("text/plain", "") for o in cell.outputs)
            assert shown.startswith(f"Exercise {number}: not yet."), f"{path.name}, exercise {number}: {shown[:300]!r}"
    assert found >= 2 * len(NOTEBOOKS)


class _Figures(HTMLParser):
    """The article's pictures: (src, alt, inside a <figure> with a <figcaption>)."""

    def __init__(self):
        super().__init__()
        self.images, self._article, self._figure = [], 0, None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self._article += tag == "article"
        if tag == "figure" and self._article:
            self._figure = []
        if tag == "img" and self._article:
            self.images.append([a.get("src", ""), a.get("alt", ""), False])
            if self._figure is not None:
                self._figure.append(self.images[-1])
        if tag == "figcaption" and self._figure is not None:
            for image in self._figure:
                image[2] = True

    def handle_endtag(self, tag):
        self._article -= tag == "article" and self._article > 0
        if tag == "figure":
            self._figure = None


@needs_browser
@pytest.mark.parametrize("page", sorted(PAGE_FIGURES), ids=[p or "index" for p in sorted(PAGE_FIGURES)])
def test_chapter_shows_its_figures_with_real_alt_text(page, server, tmp_path):
    path = f"{page}/" if page else ""
    parser = _Figures()
    parser.feed(chromium(server.url + path, tmp_path, "--dump-dom"))
    by_name = {unquote(urlparse(src).path).rsplit("/", 1)[-1]: (src, alt, captioned)
               for src, alt, captioned in parser.images}
    for name in PAGE_FIGURES[page]:
        assert name in by_name, f"{page or 'index'} does not show {name}; it shows {sorted(by_name)}"
        src, alt, captioned = by_name[name]
        assert alt.strip().lower() not in GENERIC_ALT and len(alt) >= 40, f"{name}: alt text {alt!r} says too little"
        url = urlparse(urljoin(server.url + path, src))
        assert (unquote(url.path), 200) in server.served, f"{name} was not served"
        if name.endswith(".svg") or re.match(r"\d\d-", name):
            assert captioned, f"{name} on {page or 'index'} has no <figcaption>"
    alts = [alt for _, alt, _ in parser.images]
    assert len(alts) == len(set(alts)), f"{page or 'index'}: two pictures share an alt text"
