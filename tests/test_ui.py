"""The MLflow UI, as a person sees it: `pipeline ui` serves the embedded store; headless Chromium opens it.

Chromium is Debian's (/usr/bin/chromium, installed by .ci/run), driven by playwright; the screenshots are
kept in test-artifacts/ for a person to look at.
"""

from __future__ import annotations

import shutil

import pytest
from mlflow import MlflowClient

from pipeline.config import load_config
from pipeline.tracking import training_runs_link
from pipeline.train import run_training
from tests.helpers import CONF_DIR, REPO, free_port, start_cli, stop_group, wait_for_http

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SCREENSHOTS = REPO / "test-artifacts"
# Without these, Chromium keeps trying to reach Google's services, which this closed network refuses.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
pytestmark = pytest.mark.mlflow_server  # `pipeline ui` serves the store with `mlflow server`


@pytest.fixture(scope="module")
def served_store(tmp_path_factory: pytest.TempPathFactory):
    """One trained and registered run in the embedded default store, served by `pipeline ui`: once for the
    module's tests (a training and a server, ~20 s on 2 cores)."""
    folder = tmp_path_factory.mktemp("ui")
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI")
        patch.chdir(folder)
        cfg = load_config(
            CONF_DIR / "linear_regression.yaml",
            [
                "name=ui_linear",
                "scaling.num_workers=0",
                "train.epochs=2",
                "data.num_samples=20000",
                "tracking.system_metrics_interval_s=0.2",
            ],
        )  # a few seconds of training: system metrics sampled meanwhile
        result = run_training(cfg)
        assert result.mlflow_run_id is not None  # tracked
        experiment_id = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}").get_run(result.mlflow_run_id).info.experiment_id
        port = free_port()
        ui = start_cli("ui", "--port", str(port), cwd=folder, new_group=True)
        try:
            wait_for_http(f"http://127.0.0.1:{port}/health", ui)
            yield f"http://127.0.0.1:{port}", ui, experiment_id, result.mlflow_run_id
        finally:
            ui.terminate()  # pipeline ui stops its server's process group on SIGTERM
            ui.wait(timeout=30)
            stop_group(ui)


@pytest.mark.browser
def test_the_ui_shows_the_run_and_the_champion(served_store) -> None:
    from playwright.sync_api import expect, sync_playwright

    url, ui, experiment_id, run_id = served_store
    SCREENSHOTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        # The link `pipeline ui` prints: the experiments, with the UI's switch on "Model training", not GenAI.
        page.goto(training_runs_link(url))
        expect(page.get_by_role("link", name="ui_linear", exact=True)).to_be_visible(timeout=60_000)
        assert "workflowType=machine_learning" in page.url
        page.goto(f"{url}/#/experiments/{experiment_id}/runs")
        run_link = page.locator(f'a[href*="{run_id}"]', has_text="ui_linear")  # the run's row in the table
        expect(run_link.first).to_be_visible(timeout=60_000)
        expect(page.get_by_text("1 matching run")).to_be_visible()
        expect(page.get_by_text("linear-train").first).to_be_visible()  # the data set it trained on (lineage.log_datasets)
        page.screenshot(path=SCREENSHOTS / "mlflow_ui_runs.png")

        page.goto(f"{url}/#/experiments/{experiment_id}/runs/{run_id}/system-metrics")  # the run page's System metrics tab
        # Charts titled by metric (the first screenful of them; the page draws the rest as one scrolls).
        expect(page.get_by_role("heading", name="cpu_utilization_percentage")).to_be_visible(timeout=60_000)
        expect(page.get_by_role("heading", name="network_receive_megabytes")).to_be_visible()
        expect(page.locator(".js-plotly-plot").first).to_be_visible(timeout=60_000)  # a chart drawn, not its spinner
        page.screenshot(path=SCREENSHOTS / "mlflow_ui_system_metrics.png")

        page.goto(f"{url}/#/models/ui_linear")
        expect(page.get_by_text("Version 1", exact=True)).to_be_visible(timeout=60_000)
        expect(page.get_by_text("@ champion")).to_be_visible()
        expect(page.get_by_text("val_mse").first).to_be_visible()  # the version's metric tag
        expect(page.get_by_text("linear_regression trained on linear by").first).to_be_visible()  # the model's description
        page.screenshot(path=SCREENSHOTS / "mlflow_ui_registered_model.png")

        page.goto(f"{url}/#/models/ui_linear/versions/1")  # the version's description: its run, metric and decision
        expect(page.get_by_text("Registered as champion").first).to_be_visible(timeout=60_000)
        expect(page.get_by_text("val_mse on the val split").first).to_be_visible()
        page.screenshot(path=SCREENSHOTS / "mlflow_ui_model_version.png")
        browser.close()
    assert ui.poll() is None, "pipeline ui kept serving"


def test_pipeline_ui_prints_the_local_url_and_the_training_runs_link(served_store) -> None:
    url, ui, *_ = served_store
    assert ui.stdout.readline().strip().endswith(f"at {url}  (Ctrl-C stops it)")
    assert ui.stdout.readline().strip() == f"the training runs: {url}/#/experiments?workflowType=machine_learning"
