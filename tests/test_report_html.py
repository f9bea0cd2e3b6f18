"""report.html: self-contained (no network assets), and it shows its tables and figures when rendered by
headless Chromium (Debian package ``chromium``; the rendering test skips when it is absent)."""

from __future__ import annotations

import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from test_report import fake_run

from fedgma.report import write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (apt install chromium)")


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two Dirichlet α × {mean, gma} × 3 seeds, written by hand, plus one failed run; its report.html."""
    root = tmp_path_factory.mktemp("html") / "runs"
    for seed in (0, 1, 2):
        for alpha, bump in ((0.1, 0.05), (1.0, 0.0)):
            mean = fake_run(root / f"alpha={alpha}_aggregator=mean_seed{seed}", seed=seed, shape="parts",
                            curve=[0.4, 0.6 + seed / 100])
            gma = fake_run(root / f"alpha={alpha}_aggregator=gma_seed{seed}", aggregator="gma", seed=seed,
                           shape="parts", curve=[0.45, 0.6 + bump + seed / 90])
            for folder in (mean, gma):
                text = (folder / "config.toml").read_text()
                (folder / "config.toml").write_text(text.replace("alpha = 0.1", f"alpha = {alpha}"))
    (root / "crashed").mkdir()
    (root / "crashed" / "config.toml").write_text((root / "alpha=0.1_aggregator=gma_seed0" / "config.toml").read_text())
    (root / "crashed" / "error.txt").write_text("Traceback\nMemoryError: <too big>\n")
    write_report(root)
    return root / "report" / "report.html"


def test_report_html_is_self_contained(report: Path) -> None:
    text = report.read_text()
    parser = _Collect()
    parser.feed(text)
    images = [attrs for tag, attrs in parser.tags if tag == "img"]
    assert len(images) == len(list((report.parent / "plots").glob("*.png"))) >= 3
    assert all((a["src"] or "").startswith("data:image/png;base64,") for a in images)
    # nothing is fetched: no external src/href, no stylesheet links, no scripts
    assert not [a for _, a in parser.tags for k in ("src", "href") if (a.get(k) or "").startswith(("http", "//"))]
    assert not [t for t, _ in parser.tags if t in ("script", "link", "iframe")]
    assert "MemoryError: &lt;too big&gt;" in text  # escaped
    assert "12 finished runs in 4 configurations, 0 diverged, 1 failed, 0 unfinished." in text
    assert "Configurations differ in: Dirichlet α (data.partition.alpha), aggregator (server.aggregator.name)." in text
    # the protocol's tables and the map figure
    assert "<th>p (Holm)</th>" in text and "<th>test acc % (last 20%)</th>" in text
    assert "The map: GMA − plain averaging by setting" in text and 'alt="The map: GMA' in text


@needs_chromium
def test_report_html_renders_its_tables_and_figures_in_chromium(report: Path, tmp_path: Path) -> None:
    # a copy with a probe script that records, once loaded, each image's decoded size and each table's rows
    probe = tmp_path / "probe.html"
    probe.write_text(report.read_text().replace("</body>", (
        "<script>window.addEventListener('load', () => { document.body.dataset.images = "
        "[...document.images].map(i => i.naturalWidth + 'x' + i.naturalHeight).join(' '); "
        "document.body.dataset.rows = [...document.querySelectorAll('table')].map(t => t.className + ':' + "
        "t.querySelectorAll('tbody tr').length + ':' + t.getBoundingClientRect().height).join(' '); });</script>"
        "</body>")))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,1600"]
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", probe.as_uri()], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    images = re.search(r'data-images="([^"]*)"', dom).group(1).split()
    assert len(images) == len(list((report.parent / "plots").glob("*.png")))
    for size in images:  # every figure decoded, at a readable size
        width, height = map(int, size.split("x"))
        assert width >= 500 and height >= 200, size
    tables = {name: (int(rows), float(height)) for name, rows, height in
              (entry.split(":") for entry in re.search(r'data-rows="([^"]*)"', dom).group(1).split())}
    assert tables["summary"][0] == 4 and tables["gains"][0] == 2 and tables["incomplete"][0] == 1
    assert all(height > 20 for _, height in tables.values())  # laid out, not hidden
    # and a screenshot of the page itself is not blank
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, *flags, f"--screenshot={shot}", report.as_uri()], capture_output=True, timeout=120,
                   check=True)
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (1600, 1200)
    assert (pixels[..., :3] < 0.5).mean() > 0.005  # text and table lines drawn on the white page
