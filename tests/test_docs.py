"""The docs site builds in strict mode, and the README's links lead somewhere.

CI runs only ``make test``, so the strict build that ``make docs`` does runs here too: a link
to a page or an anchor that is not there fails it. The build goes through the venv's own
``mkdocs`` (beside ``sys.executable``) into a temporary folder, never into the checkout.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
MKDOCS = Path(sys.executable).parent / "mkdocs"
README = ROOT / "README.md"

# [text](target) and ![alt](target), with an optional "title" after the target
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)
CODE_SPAN = re.compile(r"`[^`\n]*`")

needs_mkdocs = pytest.mark.skipif(not MKDOCS.exists(), reason=f"mkdocs is not installed beside {sys.executable} "
                                  "(pip install -e '.[docs]')")


def build(config: Path, site: Path) -> subprocess.CompletedProcess:
    """``mkdocs build --strict`` of ``config`` into ``site`` (not --quiet: it hides the warnings strict counts)."""
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run([str(MKDOCS), "build", "--strict", "--config-file", str(config), "--site-dir", str(site)],
                          cwd=config.parent, env=env, capture_output=True, text=True, timeout=120, check=False)


def nav_pages(config: Path) -> list[str]:
    """Every page file named in the config's nav, in order."""
    def walk(entries):
        for entry in entries:
            for value in entry.values() if isinstance(entry, dict) else [entry]:
                yield from walk(value) if isinstance(value, list) else [value]
    return list(walk(yaml.safe_load(config.read_text())["nav"]))


def relative_links(markdown: str) -> list[str]:
    """The link targets of a markdown text outside code, less web addresses and same-page anchors."""
    prose = CODE_SPAN.sub("", FENCE.sub("", markdown))
    return [target for target in LINK.findall(prose) if not re.match(r"^([a-z][a-z0-9+.-]*:|#)", target)]


@needs_mkdocs
def test_the_docs_site_builds_in_strict_mode_with_every_page_and_image(tmp_path):
    done = build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert done.returncode == 0, done.stdout + done.stderr
    pages = nav_pages(ROOT / "mkdocs.yml")
    assert sorted(pages) == sorted(p.name for p in (ROOT / "docs").glob("*.md")), "a page is missing from the nav"
    for page in pages:
        html = tmp_path / "site" / ("index.html" if page == "index.md" else f"{page[:-3]}/index.html")
        assert html.exists(), page
    # the moved content arrived: a measured number with its RESULT line, and the page's screenshots
    assert "RESULT ingest_overhead=1.116" in (tmp_path / "site" / "benchmarks" / "index.html").read_text()
    assert (tmp_path / "site" / "page.png").exists() and (tmp_path / "site" / "page-phone.png").exists()


@needs_mkdocs
@pytest.mark.parametrize(("broken", "complaint"), [
    ("[gone](no-such-page.md)", "no-such-page.md"),
    ("[gone](design.md#no-such-heading)", "no-such-heading"),
    ("[gone](../examples/live_session.py)", "live_session.py"),
], ids=["page", "anchor", "outside-docs"])
def test_a_broken_link_fails_the_strict_build(tmp_path, broken, complaint):
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    with (tmp_path / "docs" / "cli.md").open("a") as page:
        page.write(f"\nSee {broken}.\n")
    done = build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert done.returncode != 0
    assert complaint in done.stdout + done.stderr


def test_every_relative_link_in_the_readme_resolves_to_a_file():
    targets = relative_links(README.read_text())
    missing = [t for t in targets if not (ROOT / t.split("#")[0]).exists()]
    assert not missing, f"README.md links to files that are not there: {missing}"
    # the README is the way in: it links every page of the site
    linked = {Path(t.split("#")[0]) for t in targets}
    unlinked = [p for p in nav_pages(ROOT / "mkdocs.yml") if Path("docs", p) not in linked]
    assert not unlinked, f"README.md does not link these docs pages: {unlinked}"


def test_the_readme_shows_the_command_ci_runs():
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    command = [line for line in ci if line and not line.startswith(("#", "set ", "cd "))]
    assert command == ["make test"]
    shown = [line.split("#")[0].strip() for block in FENCE.findall(README.read_text()) for line in block.splitlines()]
    assert command[0] in shown
