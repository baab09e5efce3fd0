"""Screenshots of the student search as the MLflow UI shows it, taken with headless Chromium.

    make screenshot                                   # or: .venv/bin/python scripts/ui_screenshot.py
    .venv/bin/python scripts/ui_screenshot.py --config configs/smoke.yaml --out docs/smoke_pareto.png

Starts `kdlab ui` for the config's tracking store on a free port of 127.0.0.1, opens the search's parent
run (run name `search`, tag kdlab.stage=search, see search/study_tracking.py) at its artefact pareto.png,
waits until the browser has decoded the image, and saves the window to --out (default
docs/mlflow_pareto.png). With --chart-out it also saves the experiment's chart view showing one scatter
chart of the trained trials, quality against p95_ms. The server's process group is stopped however the
script ends.

Needs the Debian packages chromium and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver;
Selenium is given that driver, so Selenium Manager downloads nothing) and the `ui` extra
(`pip install -e '.[ui]'`). Run it from the repository root, like `kdlab`: a relative tracking URI is
relative to the current folder. Exit 2 with one line when the browser, Selenium or the search's parent
run is missing; 1 when the server or a page does not come up in --timeout seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from mlflow.tracking import MlflowClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kdlab.distill.config import ConfigError, load_config  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WINDOW = (1440, 1000)
X_METRIC, Y_METRIC = "p95_ms", "quality"

# MLflow 3.17's UI keeps its preferences in localStorage. The assistant panel would cover a third of the
# page; the experiment page state (filter, expanded rows, charts) is what its chart view draws from.
ASSISTANT_CLOSED = {"mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": "true", "mlflow.assistant.panelOpen_v1": "false"}
EXPERIMENT_STATE_KEY = 'MLflowLocalStorage-1.1-ExperimentPage-["{}"]-ReactComponentState'

# The element's box, once the page shows it ready (an artefact <img> the browser has fetched and decoded;
# a chart with all its points drawn), else null.
IMAGE_BOX_JS = """
const img = Array.from(document.images).find(i => i.complete && i.naturalWidth > 0
    && (i.alt === arguments[0] || decodeURIComponent(i.src).includes(arguments[0])));
return img ? JSON.stringify(img.getBoundingClientRect()) : null;
"""
SCATTER_BOX_JS = """
const plot = Array.from(document.querySelectorAll('.js-plotly-plot'))
    .find(p => p.querySelectorAll('path.point').length >= arguments[0]);
return plot ? JSON.stringify(plot.getBoundingClientRect()) : null;
"""
# Plotly's toolbar floats over the top right of the chart, where the best trials sit.
HIDE_PLOTLY_TOOLBAR_JS = "const s = document.createElement('style'); s.textContent = '.modebar-container " \
                         "{ display: none !important; }'; document.head.appendChild(s);"


class UsageError(Exception):
    """Something the user can fix (missing browser, no search yet): one line, exit 2."""


def find_search_parent(tracking_uri: str, experiment: str) -> tuple[str, str] | None:
    """(experiment id, run id) of the newest active search parent run in `experiment`, or None."""
    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri[len("sqlite:///"):]).is_file():
        return None  # MlflowClient would create an empty store there
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`kdlab.stage` = 'search'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return (exp.experiment_id, runs[0].info.run_id) if runs else None


def trials_filter(parent_run_id: str) -> str:
    """MLflow search filter for the trained trials of one search (screened-out ones log quality 0)."""
    return f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.screened_out = 'false'"


def artifact_url(base_url: str, experiment_id: str, run_id: str, path: str) -> str:
    """The run page's artefact tab opened at `path`, in the UI's model-training layout (MLflow 3)."""
    return f"{base_url}/#/experiments/{experiment_id}/runs/{run_id}/artifacts/{path}?workflowType=machine_learning"


def chart_view_url(base_url: str, experiment_id: str) -> str:
    return f"{base_url}/#/experiments/{experiment_id}/runs?compareRunsMode=CHART&workflowType=machine_learning"


def chart_view_state(parent_run_id: str, metric_keys: list[str], x_metric: str, y_metric: str) -> dict:
    """The experiment page state showing the search's trained trials and one wide scatter chart.

    The page adds a chart for every metric key that no chart names yet, so each key gets a deleted
    placeholder; what is left to draw is the scatter chart.
    """
    section = {"uuid": "kdlab-search", "name": "search", "display": True, "isReordered": False, "deleted": False,
               "isGenerated": False, "columns": 1, "cardHeight": 480}
    scatter = {"uuid": "kdlab-scatter", "type": "SCATTER", "metricSectionId": section["uuid"], "deleted": False,
               "isGenerated": False, "runsCountToCompare": 100, "displayName": f"{y_metric} vs {x_metric}",
               "xaxis": {"key": x_metric, "type": "METRIC"}, "yaxis": {"key": y_metric, "type": "METRIC"}}
    placeholders = [{"uuid": f"kdlab-placeholder-{i}", "type": "BAR", "metricKey": key, "metricSectionId": section["uuid"],
                     "deleted": True, "isGenerated": True, "runsCountToCompare": 10}
                    for i, key in enumerate(sorted(metric_keys))]
    return {"searchFilter": trials_filter(parent_run_id), "runsHiddenMode": "SHOW_ALL",
            "runsExpanded": {parent_run_id: True}, "compareRunCharts": [scatter, *placeholders],
            "compareRunSections": [section], "isAccordionReordered": False, "hideEmptyCharts": True,
            "autoRefreshEnabled": False}


def chart_inputs(tracking_uri: str, experiment_id: str, parent_run_id: str) -> tuple[list[str], int]:
    """Every metric key in the experiment, and how many trained trials have both chart metrics."""
    client = MlflowClient(tracking_uri)
    keys = {key for run in client.search_runs([experiment_id], max_results=5000) for key in run.data.metrics}
    trials = client.search_runs([experiment_id], filter_string=trials_filter(parent_run_id), max_results=5000)
    return sorted(keys), sum(X_METRIC in r.data.metrics and Y_METRIC in r.data.metrics for r in trials)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_ui(config: str, port: int, log) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    # Its own session, so that stop_ui reaches `kdlab ui`, `mlflow server` and the server's job workers.
    return subprocess.Popen([sys.executable, "-m", "kdlab", "ui", "--config", config, "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def stop_ui(proc: subprocess.Popen, grace_s: float = 15) -> None:
    """SIGTERM the whole group, SIGKILL what is left after grace_s; return when every member is gone."""
    # `kdlab ui` dies on SIGTERM at once; `mlflow server` takes seconds to stop its workers, so wait on the
    # group, not on the process we started.
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait_s
        while _group_alive(proc.pid) and time.monotonic() < deadline:
            proc.poll()  # reap our child, so it does not keep the group alive as a zombie
            time.sleep(0.2)
        if not _group_alive(proc.pid):
            break
    proc.wait()


def _last_line(path: str) -> str:
    lines = [ln.strip() for ln in Path(path).read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1] if lines else "(no output)"


def wait_for_server(proc: subprocess.Popen, base_url: str, log_path: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"kdlab ui exited with code {proc.returncode}: {_last_line(log_path)}")
        try:
            with urllib.request.urlopen(f"{base_url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the MLflow UI did not answer at {base_url} within {timeout_s:.0f} s "
                       f"(last server line: {_last_line(log_path)})")


def check_browser() -> None:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        raise UsageError(f"{' and '.join(missing)} not found: apt-get install chromium chromium-driver")
    try:  # selenium is the optional `ui` extra: imported only here, so its absence is one line, not a traceback
        import selenium  # noqa: F401
    except ImportError:
        raise UsageError("selenium is not installed: .venv/bin/pip install -e '.[ui]' (or make screenshot)") from None


def open_browser():
    # After check_browser (selenium is optional: the `ui` extra).
    from selenium import webdriver
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
                "--force-device-scale-factor=1", f"--window-size={WINDOW[0]},{WINDOW[1]}"):
        options.add_argument(arg)
    if os.geteuid() == 0:
        options.add_argument("--no-sandbox")  # Chromium refuses to start as root with its sandbox on
    try:
        # An explicit driver path keeps Selenium Manager from looking for (and downloading) a driver.
        return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    except WebDriverException as exc:
        raise RuntimeError(f"Chromium did not start: {exc.msg or exc}".splitlines()[0]) from None


def set_local_storage(driver, base_url: str, items: dict) -> None:
    driver.get(f"{base_url}/health")  # any page of the UI's origin, before the app reads its storage
    for key, value in items.items():
        driver.execute_script("localStorage.setItem(arguments[0], arguments[1]);", key, value)


def wait_until_still(driver, box_js: str, arg, timeout_s: float, what: str, debug_png: Path) -> None:
    """Wait until box_js finds the element and its box is the same on two polls 0.25 s apart."""
    from selenium.common.exceptions import TimeoutException  # optional `ui` extra, as in open_browser
    from selenium.webdriver.support.ui import WebDriverWait
    last = [None]

    def settled(d) -> bool:
        box, last[0] = last[0], d.execute_script(box_js, arg)
        return box is not None and box == last[0]
    try:
        WebDriverWait(driver, timeout_s, poll_frequency=0.25).until(settled)
    except TimeoutException:
        driver.save_screenshot(str(debug_png))
        raise RuntimeError(f"{what} did not render within {timeout_s:.0f} s at {driver.current_url} "
                           f"(what the page showed: {debug_png})") from None


def shoot_pareto(driver, url: str, out: Path, timeout_s: float) -> None:
    driver.get(url)
    wait_until_still(driver, IMAGE_BOX_JS, "pareto.png", timeout_s, "pareto.png", out.with_suffix(".debug.png"))
    driver.save_screenshot(str(out))


def shoot_chart(driver, url: str, n_points: int, out: Path, timeout_s: float) -> None:
    driver.get(url)
    wait_until_still(driver, SCATTER_BOX_JS, max(n_points, 1), timeout_s, f"the scatter chart ({n_points} trials)",
                     out.with_suffix(".debug.png"))
    driver.execute_script(HIDE_PLOTLY_TOOLBAR_JS)
    driver.save_screenshot(str(out))


def take_screenshots(args, tracking_uri: str, experiment_id: str, run_id: str) -> list[Path]:
    """Serve the store, drive Chromium through the pages, and stop both whatever happens."""
    outs = [Path(args.out)] + ([Path(args.chart_out)] if args.chart_out else [])
    for out in outs:
        out.parent.mkdir(parents=True, exist_ok=True)
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="kdlab-ui-") as tmp, open(Path(tmp) / "server.log", "w") as log:
        proc = start_ui(args.config, port, log)
        driver = None
        try:
            driver = open_browser()
            wait_for_server(proc, base_url, log.name, args.timeout)
            storage = dict(ASSISTANT_CLOSED)
            if args.chart_out:
                metric_keys, n_points = chart_inputs(tracking_uri, experiment_id, run_id)
                state = chart_view_state(run_id, metric_keys, X_METRIC, Y_METRIC)
                storage[EXPERIMENT_STATE_KEY.format(experiment_id)] = json.dumps(state)
            set_local_storage(driver, base_url, storage)
            shoot_pareto(driver, artifact_url(base_url, experiment_id, run_id, "pareto.png"), outs[0], args.timeout)
            if args.chart_out:
                shoot_chart(driver, chart_view_url(base_url, experiment_id), n_points, outs[1], args.timeout)
        finally:
            if driver is not None:
                driver.quit()
            stop_ui(proc)
    return outs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/sst2_minilm.yaml", help="YAML config whose search to show")
    parser.add_argument("--out", default="docs/mlflow_pareto.png", help="screenshot of pareto.png in the run page")
    parser.add_argument("--chart-out", default=None,
                        help="also save the experiment's chart view, quality against p95_ms (e.g. docs/mlflow_chart.png)")
    parser.add_argument("--timeout", type=float, default=90, help="seconds to wait for the server and for each page")
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        cfg = load_config(args.config)
        experiment = cfg.tracking.experiment or cfg.name
        parent = find_search_parent(cfg.tracking.uri, experiment)
        if parent is None:
            raise UsageError(f"{cfg.tracking.uri} has no search run in experiment {experiment!r}: "
                             f"run `kdlab search --config {args.config}` first")
        experiment_id, run_id = parent
        if "pareto.png" not in {a.path for a in MlflowClient(cfg.tracking.uri).list_artifacts(run_id)}:
            raise UsageError(f"search run {run_id} has no pareto.png yet (it is logged after the first trial): "
                             f"run `kdlab search --config {args.config}` first")
        check_browser()
    except (ConfigError, UsageError) as exc:
        print(f"ui_screenshot: error: {exc}", file=sys.stderr)
        return 2

    # SIGTERM (a CI timeout, kill) unwinds through the finally block of take_screenshots like Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        outs = take_screenshots(args, cfg.tracking.uri, experiment_id, run_id)
    except RuntimeError as exc:
        print(f"ui_screenshot: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    print(f"wrote {', '.join(map(str, outs))} from search run {run_id} of experiment {experiment!r} "
          f"in {time.monotonic() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
