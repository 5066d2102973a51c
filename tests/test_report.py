"""Snakemake's HTML report of the tiny grid, opened in headless Chromium, and the provenance of figures and tables.

The browser runs with --remote-debugging-pipe and the tests drive it with the Chrome
DevTools Protocol over that pipe, so no port is opened. The tests click the
report's own buttons, the way a reader would.
"""

import base64
import fcntl
import json
import os
import re
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lora_expressivity.figures import FIGURES  # noqa: E402
from lora_expressivity.workflow import grid_hash  # noqa: E402

pytestmark = pytest.mark.slow

# Flags that keep headless Chromium from reaching any network service.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-quic"]
VIEWPORT = (1400, 900)
TABLES = [
    *[f"results/tables/{figure}.csv" for figure in FIGURES],
    *[f"results/tables/{figure}_runs.csv" for figure in FIGURES],
    "results/tables/rank_steps.csv", "results/tables/rank_steps.md", "results/tables/runs.csv",
    "results/tables/skipped.csv", "results/configs/runs.tsv",
]
PNGS = [f"figures/{figure}.png" for figure in FIGURES]
COMMIT = re.compile(r"commit ([0-9a-f]{40})")


def tiny_config() -> dict:
    """The tiny grid, with seeds and pretraining batched together so that fewer jobs start."""
    config = yaml.safe_load((ROOT / "tests" / "data" / "tiny.yaml").read_text())
    config["batching"] = {"batch_over": ["rank", "lr", "weight_decay", "tune_bias", "last_layers", "rank_step",
                                         "seed", "pretrained"]}
    return config


def snakemake(workdir: Path, *arguments: str) -> str:
    command = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--configfile", "config.yaml",
               *arguments]
    completed = subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=900)
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output
    return output


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    """A folder where the tiny grid ran and `snakemake --report report.html` wrote the report."""
    workdir = tmp_path_factory.mktemp("report")
    (workdir / "config.yaml").write_text(yaml.safe_dump(tiny_config()))
    snakemake(workdir, "--cores", "2")
    snakemake(workdir, "--report", "report.html")
    return workdir


def is_commit(commit: str) -> bool:
    completed = subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", f"{commit}^{{commit}}"],
                               capture_output=True)
    return completed.returncode == 0


# ---------------------------------------------------------------- headless Chromium


def chromium_path() -> str:
    """Path of the Chromium executable, installing the Debian package when it is missing."""
    for name in ("chromium", "chromium-browser"):
        if shutil.which(name):
            return shutil.which(name)
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("headless Chromium is not installed and apt-get needs root; install the Debian package chromium")
    environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]
    completed = subprocess.run(install, capture_output=True, text=True, env=environment, timeout=900)
    if completed.returncode != 0:
        subprocess.run(["apt-get", "update"], capture_output=True, text=True, env=environment, timeout=900)
        completed = subprocess.run(install, capture_output=True, text=True, env=environment, timeout=900)
    if completed.returncode != 0 or not shutil.which("chromium"):
        pytest.skip(f"apt-get could not install chromium:\n{completed.stdout[-2000:]}{completed.stderr[-2000:]}")
    return shutil.which("chromium")


class Browser:
    """Headless Chromium driven through the DevTools Protocol on --remote-debugging-pipe.

    Chromium reads JSON commands from fd 3 and writes replies and events to fd 4,
    each message ended by a NUL byte.
    """

    def __init__(self, executable: str, profile: Path, log_path: Path):
        to_browser, commands = os.pipe()
        replies, from_browser = os.pipe()
        # Copies above fd 10 cannot collide with fds 3 and 4 while the shell moves them there.
        high_to = fcntl.fcntl(to_browser, fcntl.F_DUPFD, 10)
        high_from = fcntl.fcntl(from_browser, fcntl.F_DUPFD, 10)
        os.close(to_browser)
        os.close(from_browser)
        command = [executable, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-pipe",
                   f"--window-size={VIEWPORT[0]},{VIEWPORT[1]}", "about:blank"]
        shell = f'exec "$@" 3<&{high_to} 4>&{high_from} {high_to}<&- {high_from}>&-'
        self.log = open(log_path, "wb")
        self.process = subprocess.Popen(["bash", "-c", shell, "bash", *command], stdin=subprocess.DEVNULL,
                                        stdout=self.log, stderr=self.log, pass_fds=(high_to, high_from))
        os.close(high_to)
        os.close(high_from)
        self.commands, self.replies = commands, replies
        self.buffer = b""
        self.last_id = 0
        self.events: list[dict] = []

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self.buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("Chromium sent no reply in time")
            ready, _, _ = select.select([self.replies], [], [], remaining)
            if ready:
                chunk = os.read(self.replies, 1 << 20)
                if not chunk:
                    raise EOFError("Chromium closed the debugging pipe")
                self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)

    def call(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60) -> dict:
        """Send one command and return its result; events that arrive meanwhile are kept in self.events."""
        self.last_id += 1
        message = {"id": self.last_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        os.write(self.commands, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") != self.last_id:
                self.events.append(reply)
                continue
            if "error" in reply:
                raise RuntimeError(f"{method} failed: {reply['error']}")
            return reply.get("result", {})

    def wait_for_event(self, method: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events:
                if event.get("method") == method:
                    self.events.remove(event)
                    return event
            self.events.append(self._read_message(deadline))

    def close(self):
        try:
            self.call("Browser.close", timeout=10)
        except (OSError, EOFError, TimeoutError, RuntimeError):
            pass
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self.commands)
        os.close(self.replies)
        self.log.close()


class ReportPage:
    """The report opened in one browser tab."""

    def __init__(self, browser: Browser, url: str):
        self.browser = browser
        target = next(info for info in browser.call("Target.getTargets")["targetInfos"] if info["type"] == "page")
        self.session = browser.call("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True})[
            "sessionId"]
        self.call("Page.enable")
        self.call("Runtime.enable")
        self.call("Emulation.setDeviceMetricsOverride",
                  {"width": VIEWPORT[0], "height": VIEWPORT[1], "deviceScaleFactor": 1, "mobile": False})
        self.call("Page.navigate", {"url": url})
        browser.wait_for_event("Page.loadEventFired", timeout=120)

    def call(self, method: str, params: dict | None = None) -> dict:
        return self.browser.call(method, params, session=self.session)

    def evaluate(self, expression: str):
        """Evaluate JavaScript in the page (awaiting a promise) and return its value."""
        reply = self.call("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                               "returnByValue": True})
        if "exceptionDetails" in reply:
            raise AssertionError(f"JavaScript failed: {reply['exceptionDetails']}\n{expression}")
        return reply["result"].get("value")

    def click(self, selector_script: str):
        """Click the element that selector_script returns, and wait until React has drawn the result."""
        clicked = self.evaluate(f"(() => {{ const element = {selector_script}; if (!element) return false; "
                                f"element.click(); return true; }})()")
        assert clicked, f"nothing to click: {selector_script}"
        self.wait_for_render()

    def show_category(self, name: str):
        """Open a result category from the report's main menu, as a reader does.

        Going through the main menu matters: when app.showCategory switches straight
        from one subcategory to another (as links in captions do), the report of
        Snakemake 9.27 keeps listing the entries of the old one.
        """
        self.evaluate("app.setView({navbarMode: 'menu'})")
        self.wait_for_render()
        self.click(menu_item(name))

    def wait_for_render(self):
        # React draws state changes in a later task, so wait for the next frame and a little more.
        self.evaluate("new Promise(resolve => requestAnimationFrame(() => setTimeout(resolve, 100)))")

    def exceptions(self) -> list[dict]:
        return [event for event in self.browser.events if event.get("method") == "Runtime.exceptionThrown"]

    def screenshot(self, path: Path):
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", {"format": "png"})["data"]))


@pytest.fixture(scope="module")
def page(tiny_report, tmp_path_factory):
    executable = chromium_path()
    folder = tmp_path_factory.mktemp("chromium")
    browser = Browser(executable, folder / "profile", folder / "chromium.log")
    try:
        yield ReportPage(browser, (tiny_report / "report.html").as_uri())
    finally:
        browser.close()


def row_button(label: str, icon: str) -> str:
    """JavaScript that finds the button with the icon in the result list row whose first cell is label."""
    return (f"[...document.querySelectorAll('nav tr')].filter(row => row.cells.length > 1 && "
            f"row.cells[0].innerText.trim() === {json.dumps(label)})"
            f".map(row => row.querySelector('a[iconname={icon}]'))[0]")


def menu_item(text: str) -> str:
    """JavaScript that finds the entry of the category menu (not the breadcrumbs) with this text."""
    return f"[...document.querySelectorAll('nav ul a')].find(link => link.innerText.trim() === {json.dumps(text)})"


# ---------------------------------------------------------------- the page


def test_report_page_loads(page):
    assert page.evaluate("document.title") == "Snakemake Report"
    assert page.evaluate("document.querySelector('#loading-screen').style.display") == "none"
    assert page.evaluate("document.querySelector('#app').children.length") > 0
    assert page.exceptions() == []


def test_report_holds_every_output(page):
    paths = set(page.evaluate("Object.keys(results)"))

    assert paths == set(PNGS) | set(TABLES)


def test_report_categories(page):
    categories = page.evaluate("Object.fromEntries(Object.entries(categories).map("
                               "([name, sub]) => [name, Object.keys(sub).sort()]))")

    assert categories == {"Figures": ["Other"], "Tables": ["Figures", "Rank steps", "Runs"]}


def test_captions_render_without_errors(page):
    captions = page.evaluate("Object.fromEntries(Object.entries(results).map(([path, r]) => [path, r.caption]))")

    for path, caption in captions.items():
        assert len(caption) > 200, path
        assert "System Message" not in caption, f"{path}: docutils could not parse the caption:\n{caption}"
        assert "config.yaml" in caption, path


def test_figure_captions_state_claims(page):
    captions = page.evaluate("Object.fromEntries(Object.entries(results).map(([path, r]) => [path, r.caption]))")

    for figure, spec in FIGURES.items():
        caption = captions[f"figures/{figure}.png"]
        assert f"Figure <strong>{figure}</strong>" in caption
        assert spec.caption.split(":")[0].split(".")[0] in caption
        assert f"figures/{figure}.pdf" in caption
    assert "width * target_depth / frozen_depth" in captions["figures/figure1.png"]
    assert "rank width / 2 on" in captions["figures/tfn_approx.png"]
    assert "plateaus above" in captions["figures/fnn_approx.png"]
    assert "equal numbers of tunable parameters" in captions["figures/flt_approx.png"]
    assert "fixed against updatable biases" in captions["figures/lora_bitfit_approx.png"]


def test_workflow_description_names_grid(page, tiny_report):
    description = page.evaluate("workflow_desc")

    assert grid_hash(tiny_config()) in description
    assert str(tiny_report / "config.yaml") in description
    assert "width * target_depth / frozen_depth" in description


def test_every_figure_displays(page):
    page.show_category("Figures")
    sizes = {}
    for figure in FIGURES:
        page.click(row_button(figure, "eye"))
        sizes[figure] = page.evaluate(
            f"(() => {{ const image = [...document.querySelectorAll('img')].find("
            f"img => img.src === results['figures/{figure}.png'].data_uri); "
            f"return image && image.complete ? [image.naturalWidth, image.naturalHeight] : null; }})()")

    for figure, size in sizes.items():
        assert size is not None, f"{figure}.png is not shown after clicking its view button"
        assert size[0] > 400 and size[1] > 300, (figure, size)


def downloads_listed(page) -> set[str]:
    return set(page.evaluate("[...document.querySelectorAll('nav tr a[download]')]"
                             ".filter(link => link.href.startsWith('data:')).map(link => link.download)"))


def test_every_table_downloadable(page):
    # Snakemake shows a label with two values, each on half of the entries, as a toggle.
    subcategories = {"Figures": ("table", ["curve summary", "selected runs"]),
                     "Rank steps": ("format", ["CSV", "Markdown"]),
                     "Runs": (None, [None])}
    found = {}
    for subcategory, (label, values) in subcategories.items():
        page.show_category("Tables")
        page.click(menu_item(subcategory))
        for value in values:
            if value is not None:
                page.click(f"document.getElementById({json.dumps(f'toggle-{label}-{value}')})")
            found[(subcategory, value)] = downloads_listed(page)

    assert found[("Figures", "curve summary")] == {f"{figure}.csv" for figure in FIGURES}
    assert found[("Figures", "selected runs")] == {f"{figure}_runs.csv" for figure in FIGURES}
    assert found[("Rank steps", "CSV")] == {"rank_steps.csv"}
    assert found[("Rank steps", "Markdown")] == {"rank_steps.md"}
    assert found[("Runs", None)] == {"runs.csv", "skipped.csv", "runs.tsv"}


def test_screenshot_of_figure_and_caption(page, tmp_path_factory):
    page.show_category("Figures")
    page.click(row_button("figure1", "eye"))
    page.click(row_button("figure1", "information-circle"))
    navigation = page.evaluate("document.querySelector('nav').innerText")
    path = tmp_path_factory.mktemp("screenshot") / "report-figure1.png"
    page.screenshot(path)
    print(f"screenshot: {path}")

    assert "The paper's claim" in navigation
    with Image.open(path) as image:
        assert image.size == VIEWPORT
        colors = image.convert("RGB").getcolors(maxcolors=VIEWPORT[0] * VIEWPORT[1])
    assert len(colors) > 100


# ---------------------------------------------------------------- provenance of figures and tables


def pdf_string(data: bytes, key: bytes) -> str:
    """The literal string value of an entry of the PDF's document information, unescaped."""
    match = re.search(rb"/" + key + rb" \(((?:[^()\\]|\\.)*)\)", data)
    assert match, f"no /{key.decode()} in the PDF"
    return re.sub(rb"\\(.)", rb"\1", match.group(1)).decode("latin-1")


def test_png_metadata_names_config_and_commit(tiny_report):
    for figure in FIGURES:
        with Image.open(tiny_report / "figures" / f"{figure}.png") as image:
            description = image.text["Description"]
        commit = COMMIT.search(description)

        assert str(tiny_report / "config.yaml") in description, figure
        assert commit is not None, description
        assert is_commit(commit.group(1)), description


def test_pdf_metadata_names_config_and_commit(tiny_report):
    for figure in FIGURES:
        data = (tiny_report / "figures" / f"{figure}.pdf").read_bytes()
        for key in (b"Subject", b"Keywords"):
            value = pdf_string(data, key)
            commit = COMMIT.search(value)

            assert str(tiny_report / "config.yaml") in value, (figure, key)
            assert commit is not None, value
            assert is_commit(commit.group(1)), value


def test_every_table_has_sidecar(tiny_report):
    tables = sorted([*(tiny_report / "results").rglob("*.csv"), *(tiny_report / "results").rglob("*.tsv")])

    assert {str(path.relative_to(tiny_report)) for path in tables} == {t for t in TABLES if not t.endswith(".md")}
    for table in tables:
        sidecar = json.loads(Path(f"{table}.meta.json").read_text())
        header = table.read_text().splitlines()[0].split("\t" if table.suffix == ".tsv" else ",")
        rows = len(table.read_text().splitlines()) - 1

        assert sidecar["table"] == str(table.relative_to(tiny_report))
        assert sidecar["grid_hash"] == grid_hash(tiny_config())
        assert sidecar["config_files"] == [str(tiny_report / "config.yaml")]
        assert sidecar["columns"] == header, table
        assert sidecar["rows"] == rows, table
        assert is_commit(sidecar["written_by"]["git_commit"]), table
        assert sidecar["skipped"] == [], table


def test_sidecars_name_run_commits(tiny_report):
    records = [json.loads(path.read_text()) for path in (tiny_report / "results" / "runs").glob("*.json")]
    trained_by = sorted({record["environment"]["git_commit"] for record in records})
    sidecar = json.loads((tiny_report / "results" / "tables" / "runs.csv.meta.json").read_text())

    assert sidecar["runs"]["read"] == len(records)
    assert sidecar["runs"]["git_commits"] == trained_by


def test_rank_step_markdown_names_origin(tiny_report):
    last_line = (tiny_report / "results" / "tables" / "rank_steps.md").read_text().strip().splitlines()[-1]

    assert str(tiny_report / "config.yaml") in last_line
    assert f"(grid {grid_hash(tiny_config())})" in last_line
    assert is_commit(COMMIT.search(last_line).group(1))
