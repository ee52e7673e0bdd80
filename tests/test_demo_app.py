"""The desktop demo app, headless (QT_QPA_PLATFORM=offscreen): start it, generate 20 tokens, check the text, the
expert map, a live budget change, error display, and save a screenshot (to $EDGE_MOE_ARTIFACTS, else tmp)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")  # before Qt loads: CI has no screen
QtCore = pytest.importorskip("PySide6.QtCore", reason="PySide6 is not installed: pip install '.[demo]'")
QtWidgets = pytest.importorskip("PySide6.QtWidgets", reason="PySide6 is not installed: pip install '.[demo]'")

try:
    import edge_moe_demo  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`: the package lives in apps/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "apps"))

from edge_moe.cli import main as edge_moe_cli  # noqa: E402
from edge_moe.errors import EdgeMoeError  # noqa: E402
from edge_moe_demo.main import qt_problem  # noqa: E402
from edge_moe_demo.window import DemoWindow  # noqa: E402

if qt_problem():
    pytest.skip(qt_problem(), allow_module_level=True)

TOKENS = 20


@pytest.fixture(scope="module")
def app():
    return QtWidgets.QApplication.instance() or QtWidgets.QApplication([])


@pytest.fixture(scope="module", params=["default", "synthetic"])
def package(request, tmp_path_factory):
    """The packaged default model (what the app opens with), and a synthetic one without a tokenizer."""
    if request.param == "default":
        try:
            from edge_moe.default_model import default_model_path
            return default_model_path(progress=False)
        except (ImportError, EdgeMoeError) as e:
            pytest.skip(f"the default model is not available yet: {e}")
    root = tmp_path_factory.mktemp("demo")
    assert edge_moe_cli(["synth", str(root / "hf"), "--preset", "tiny", "--layers", "4", "--quiet"]) == 0
    assert edge_moe_cli(["export", str(root / "hf"), str(root / "pkg")]) == 0
    return root / "pkg"


def run_until_done(app, window, timeout_s: float = 120.0) -> dict:
    """Spins the event loop until the window's generation finishes."""
    result = {}
    loop = QtCore.QEventLoop()
    window.run_finished.connect(lambda r: (result.update(r), loop.quit()))
    QtCore.QTimer.singleShot(int(timeout_s * 1000), loop.quit)
    window.generate()
    loop.exec()
    assert result, f"generation did not finish within {timeout_s} s"
    return result


def screenshot(window, name: str, tmp_path) -> Path:
    folder = Path(os.environ.get("EDGE_MOE_ARTIFACTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    assert window.grab().save(str(path)), f"could not write {path}"
    return path


def test_generate_map_budget_screenshot(app, package, tmp_path):
    window = DemoWindow(package, budget="50%", max_new_tokens=TOKENS)
    window.show()
    session = window.session
    assert session is not None, window.message.text()
    assert window.message.isHidden()
    before = window.map.states.copy()

    result = run_until_done(app, window)
    assert result["tokens"] == TOKENS and result["reason"] == "length"
    # The map followed the cache: frames arrived, cells changed state and match the cache now.
    assert window.map.frames > 1 and window.map.changed_cells > 0
    assert (window.map.states != before).any()
    assert (window.map.states == session.states()).all()
    assert window.plot.series["tokens_per_second"]
    # The pane shows what the runtime generates (greedy, so a second run gives the same tokens).
    expected = session.model.generate(session.prompt(window.prompt.toPlainText()), TOKENS)
    if session.model.tokenizer is not None:
        assert window.output.toPlainText() == expected.text and expected.text.strip()
    else:
        assert window.output.toPlainText() == "".join(f"[{t}]" for t in expected.token_ids)

    # The budget slider changes the running model's budget at once.
    slider, model = window.controls.slider, session.model  # the public Model API, as the demo itself uses
    slider.setValue(0)
    assert model.budget == session.min_budget
    slider.setValue(slider.maximum())
    assert model.budget == session.full_budget
    slider.setValue(slider.maximum() // 4)
    assert model.budget == window.controls.budget_for(slider.maximum() // 4)
    assert model.expert_stats()["resident_bytes"] <= model.budget

    # A budget below the minimum is shown in the window, and the budget stays.
    budget = model.budget
    window.controls.budget_text.setText("1")
    window.controls.budget_text.returnPressed.emit()
    assert not window.message.isHidden() and "minimum" in window.message.text()
    assert model.budget == budget

    # Live controls during a run: policy, prefetch off, stop.
    window.controls.policy.setCurrentText("lru")
    window.controls.prefetch.setChecked(False)
    window.clear_error()
    result = run_until_done(app, window)
    assert model.policy == "lru" and model.forward.predictor is None
    path = screenshot(window, f"demo_app_{package.name}.png", tmp_path)
    assert path.stat().st_size > 10_000
    print(f"screenshot: {path}")
    window.close()


def test_stop_and_bad_model(app, package, tmp_path):
    window = DemoWindow(package)
    longest = int(window.session.model.config["max_position_embeddings"]) - 64
    window.tokens.setValue(min(4000, longest))
    loop = QtCore.QEventLoop()
    result = {}
    window.run_finished.connect(lambda r: (result.update(r), loop.quit()))
    window.generate()
    QtCore.QTimer.singleShot(300, window.stop)  # the UI thread stays free to press Stop
    QtCore.QTimer.singleShot(60_000, loop.quit)
    loop.exec()
    assert result["reason"] == "stopped" and result["tokens"] < window.tokens.value(), window.message.text()

    # A package that fails to load is reported in the window; the loaded model stays.
    session = window.session
    assert not window.open_model(tmp_path / "no-such-package")
    assert not window.message.isHidden() and "no-such-package" in window.message.text()
    assert window.session is session
    window.close()
