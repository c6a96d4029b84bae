"""The docs site: it builds with --strict, shows every notebook with its outputs, and reads right offline.

One `mkdocs build --strict` per test run (module fixture). Its hook (tools/mkdocs_hooks.py) executes
every notebooks/NN_*.ipynb once and writes the executed copies to a folder named by
LDM_DOCS_NOTEBOOKS_OUT, so this file is also the test that every notebook runs top to bottom.
Then the built site is served on 127.0.0.1 and loaded in headless Chromium with every other host
unresolvable: the math must be typeset by the MathJax copy in the site, the notebook pages must show
their pictures. The browser tests skip when no Chromium is installed (`.ci/run` installs it).
"""
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
