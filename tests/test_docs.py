"""The documentation site: it builds with warnings as errors, every public name has
a page, no internal link is broken, and a real browser renders it.

The site is built once per test session (``docs/_build/html``, what ``make docs``
builds) under a file lock, so the pytest-xdist workers share one build. The
browser is Debian's headless Chromium (``make test`` installs it with apt when it
is missing); its DOM after the scripts ran (``--dump-dom``) is checked by text,
and its screenshots are kept under ``docs/_build/screenshots/``.
"""

import fcntl
import html.parser
import importlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
BUILD = DOCS / "_build"
HTML = BUILD / "html"
MODULES = ("jaxnorm", "jaxnorm.linen", "jaxnorm.nnx", "jaxnorm.interop")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="session")
def site(testrun_uid) -> Path:
    """Builds the site once per session (``sphinx-build -W``), whichever worker gets here first."""
    BUILD.mkdir(parents=True, exist_ok=True)
    with open(BUILD / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        stamp = BUILD / f".built-{testrun_uid}"
        if not stamp.exists():
            for old in BUILD.glob(".built-*"):
                old.unlink()
            env = {**os.environ, "JAX_PLATFORMS": "cpu"}
            run = subprocess.run(
                [sys.executable, "-m", "sphinx", "-E", "-W", "--keep-going", "-q", "-b", "html", str(DOCS), str(HTML)],
                capture_output=True, text=True, env=env, timeout=600,
            )
            assert run.returncode == 0, f"sphinx-build -W failed:\n{run.stdout}\n{run.stderr}"
            stamp.touch()
    return HTML


def _public(module_name):
    return importlib.import_module(module_name).__all__


@pytest.mark.parametrize("module_name", MODULES)
def test_every_public_name_has_a_page(site, module_name):
    index = (site / "api" / f"{module_name}.html").read_text()
    missing = []
    for name in _public(module_name):
        page = site / "api" / f"{module_name}.{name}.html"
        # The autodoc anchor proves the entry was rendered from the docstring, not an empty page.
        if not page.exists() or f'id="{module_name}.{name}"' not in page.read_text():
            missing.append(name)
        elif f"{module_name}.{name}.html" not in index:
            missing.append(f"{name} (not listed on the module's page)")
    assert not missing, f"{module_name}: no API page for {missing}"


def test_every_guide_is_in_the_site(site):
    front = (site / "index.html").read_text()
    for guide in sorted((DOCS / "guides").glob("*.md")):
        assert (site / "guides" / f"{guide.stem}.html").exists(), guide
        assert f"guides/{guide.stem}.html" in front, f"{guide.name} is not in the guides list"


def test_every_example_is_in_the_gallery(site):
    for data in (DOCS / "_data" / "examples").glob("*.json"):
        page = (site / "gallery" / f"{data.stem}.html").read_text()
        assert f"{data.stem}.png" in page or not data.with_suffix(".png").exists()


class _Links(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.links, self.ids = [], set()

    def handle_starttag(self, tag, attrs):
        for key, value in attrs:
            if key == "id" and value:
                self.ids.add(value)
            if key in ("href", "src") and value and tag in ("a", "link", "img", "script"):
                self.links.append(value)


def _parse(path: Path) -> _Links:
    parser = _Links()
    parser.feed(path.read_text(errors="replace"))
    return parser


def test_no_internal_link_is_broken(site):
    pages = {p: _parse(p) for p in site.rglob("*.html")}
    broken = []
    for page, parsed in pages.items():
        for link in parsed.links:
            parts = urlsplit(link)
            if parts.scheme or parts.netloc or link.startswith(("mailto:", "data:", "javascript:")):
                continue
            target = page if not parts.path else (page.parent / unquote(parts.path)).resolve()
            if target.is_dir():
                target = target / "index.html"
            if not target.exists():
                broken.append(f"{page.relative_to(site)} -> {link}")
            elif parts.fragment and target.suffix == ".html":
                ids = pages[target].ids if target in pages else _parse(target).ids
                if unquote(parts.fragment) not in ids:
                    broken.append(f"{page.relative_to(site)} -> {link} (no such anchor)")
    assert not broken, "broken links:\n" + "\n".join(broken[:50])


def test_readme_links_exist():
    text = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    assert targets
    broken = [t for t in targets if not urlsplit(t).scheme and not (ROOT / unquote(t.split("#")[0])).exists()]
    assert not broken, broken


def _chromium() -> str:
    found = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing; `make test` installs it with apt-get")
        pytest.skip("chromium is not installed (make test installs it)")
    return found


def _browse(page: Path, screenshot: Path) -> str:
    """The DOM of `page` after its scripts ran, and a screenshot of it."""
    chromium = _chromium()
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        flags = [*CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--window-size=1280,1000"]
        dom = subprocess.run([chromium, *flags, "--dump-dom", page.as_uri()],
                             capture_output=True, text=True, timeout=120)
        assert dom.returncode == 0, dom.stderr[-2000:]
        shot = subprocess.run([chromium, *flags, f"--screenshot={screenshot}", page.as_uri()],
                              capture_output=True, text=True, timeout=120)
        assert shot.returncode == 0 and screenshot.stat().st_size > 10_000, shot.stderr[-2000:]
    return dom.stdout


def _text(dom: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", re.sub(r"(?s)<(script|style)\b.*?</\1>", " ", dom)))


def test_browser_renders_the_front_page(site):
    text = _text(_browse(site / "index.html", BUILD / "screenshots" / "index.png"))
    assert "pure functions over explicit state" in text
    assert "Getting started" in text and "API reference" in text
    assert "jn.batch_norm(x,stats,training=True)" in "".join(text.split())  # highlighted code, spans removed


def test_browser_renders_an_api_page(site):
    page = site / "api" / "jaxnorm.batch_norm.html"
    text = _text(_browse(page, BUILD / "screenshots" / "jaxnorm.batch_norm.png"))
    assert "jaxnorm.batch_norm" in text
    assert "training" in text and "momentum" in text  # the Args section, rendered by napoleon
    assert "Ioffe" in text  # the paper the docstring cites
