"""The module boundaries docs/ARCHITECTURE.md draws, checked: what a served model imports, how large a module grows."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import REPO

MAX_MODULE_LINES = 450  # ../shared/STYLE.md: modules of a few hundred lines, 450 at most


def test_a_served_model_imports_neither_the_data_readers_nor_ray() -> None:
    # What `load_model("name@alias")` and the pyfunc model load: no download code, no torchvision data sets, no Ray.
    code = (
        "import sys, pipeline.serving, pipeline.predict, pipeline.mlflow_model, pipeline.registry\n"
        "print(sorted(m for m in sys.modules if m in {'pipeline.data.sources', 'torchvision.datasets', 'ray'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert out.strip() == "[]"


def test_no_module_of_the_package_is_over_450_lines() -> None:
    sizes = {path.relative_to(REPO).as_posix(): len(path.read_text().splitlines()) for path in (REPO / "pipeline").rglob("*.py")}
    assert len(sizes) > 20, "the package's modules were found"
    assert {name: lines for name, lines in sizes.items() if lines > MAX_MODULE_LINES} == {}
