"""The main window: model picker, prompt, streaming output, expert map, gauges and plot, live controls.

Everything that can fail (opening a package, a budget, a prompt, generation itself) ends in `show_error`, a
red message line at the top of the window; the app keeps running with whatever model it had.
"""

from __future__ import annotations

import time
from pathlib import Path

from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtWidgets import (QFileDialog, QHBoxLayout, QLabel, QMainWindow, QPlainTextEdit, QPushButton,
                               QSpinBox, QSplitter, QVBoxLayout, QWidget)

from edge_moe.errors import EdgeMoeError

from .controls import Controls
from .expert_map import ExpertMap, legend
from .plots import Gauges, StripPlot
from .session import DEFAULT_BUDGET, Session, default_model_path
from .worker import GenerationWorker

DEFAULT_PROMPT = "def fibonacci(n):"
SLOW_UPDATE_S = 0.25  # gauges and plot repaint at most this often; the map every token


class DemoWindow(QMainWindow):
    """Signals: run_finished(dict) after each generation (tokens, reason, seconds, decode_tps, prefill_seconds)."""

    run_finished = Signal(dict)

    def __init__(self, model_path=None, budget=DEFAULT_BUDGET, max_new_tokens: int = 64):
        super().__init__()
        self.setWindowTitle("edge_moe demo: an MoE model under a memory budget")
        self.session: Session | None = None
        self.worker: GenerationWorker | None = None
        self.initial_budget = budget
        self.last_run: dict = {}
        self._last_slow_update = 0.0

        self.message = QLabel()
        self.message.setWordWrap(True)
        self.message.setStyleSheet("background: #5a1d1d; color: #ffdede; padding: 6px;")
        self.message.hide()
        self.model_label = QLabel("no model")
        self.open_button = QPushButton("Open model…")
        self.open_button.clicked.connect(self._pick_model)
        top = QHBoxLayout()
        top.addWidget(QLabel("model:"))
        top.addWidget(self.model_label, 1)
        top.addWidget(self.open_button)

        self.prompt = QPlainTextEdit(DEFAULT_PROMPT)
        self.prompt.setMaximumHeight(80)
        self.tokens = QSpinBox()
        self.tokens.setRange(1, 4096)
        self.tokens.setValue(max_new_tokens)
        self.generate_button = QPushButton("Generate")
        self.generate_button.clicked.connect(self.generate)
        self.stop_button = QPushButton("Stop")
        self.stop_button.setEnabled(False)
        self.stop_button.clicked.connect(self.stop)
        buttons = QHBoxLayout()
        buttons.addWidget(QLabel("new tokens"))
        buttons.addWidget(self.tokens)
        buttons.addStretch(1)
        buttons.addWidget(self.generate_button)
        buttons.addWidget(self.stop_button)
        self.output = QPlainTextEdit()
        self.output.setReadOnly(True)
        left = QVBoxLayout()
        for widget in (QLabel("prompt"), self.prompt):
            left.addWidget(widget)
        left.addLayout(buttons)
        left.addWidget(QLabel("output"))
        left.addWidget(self.output, 1)
        self.gauges = Gauges()
        left.addWidget(self.gauges)

        self.map = ExpertMap()
        self.plot = StripPlot()
        self.controls = Controls()
        self.controls.error.connect(self.show_error)
        self.controls.info.connect(self.show_info)
        self.controls.live_changed.connect(self._live_changed)
        right = QVBoxLayout()
        right.addWidget(QLabel("expert map: layers down, experts across"))
        right.addWidget(self.map, 3)
        right.addWidget(legend())
        right.addWidget(self.plot, 2)
        right.addWidget(self.controls)

        splitter = QSplitter(Qt.Horizontal)
        for layout, stretch in ((left, 2), (right, 3)):
            pane = QWidget()
            pane.setLayout(layout)
            splitter.addWidget(pane)
            splitter.setStretchFactor(splitter.count() - 1, stretch)
        central = QWidget()
        outer = QVBoxLayout(central)
        outer.addWidget(self.message)
        outer.addLayout(top)
        outer.addWidget(splitter, 1)
        self.setCentralWidget(central)
        self.resize(1280, 820)

        try:
            path = model_path or default_model_path()
        except EdgeMoeError as e:  # e.g. this install carries no default model
            path = None
            self.show_error(f"no default model: {e}. Open a package with 'Open model…'")
        if path is not None:
            self.open_model(path)
        elif self.message.isHidden():
            self.show_error("no default model in this edge_moe (edge_moe.default_model is missing): open a "
                            "package with 'Open model…'")

    # Messages ----------------------------------------------------------------------------------------------------

    def show_error(self, text: str) -> None:
        self.message.setText(text)
        self.message.show()
        self.statusBar().showMessage("error: " + text.splitlines()[0][:160])

    def show_info(self, text: str) -> None:
        self.statusBar().showMessage(text, 5000)

    def clear_error(self) -> None:
        self.message.hide()

    # Model -----------------------------------------------------------------------------------------------------

    def _pick_model(self) -> None:
        start = str(self.session.path.parent) if self.session else str(Path.home())
        path = QFileDialog.getExistingDirectory(self, "Open an edge_moe package (a folder with manifest.json)",
                                                start)
        if path:
            self.open_model(path)

    def open_model(self, path) -> bool:
        """Loads a package; on failure keeps the current model and shows why. Returns success."""
        if self.worker is not None:
            self.show_error("stop the generation before opening another model")
            return False
        try:
            session = Session(path, budget=self.initial_budget, policy=self.controls.policy.currentText(),
                              prefetch=self.controls.prefetch.isChecked())
        except (EdgeMoeError, OSError, ValueError) as e:
            self.show_error(f"cannot open model {path}: {e}")
            return False
        self.session = session
        self.clear_error()
        c = session.model.config
        self.model_label.setText(f"{session.path}  ({session.model.manifest.family}, {session.layers} layers x "
                                 f"{session.experts} experts, top-{c['top_k']})")
        self.map.reset(session.layers, session.experts)
        self.map.show_frame(session.idle_frame())
        self.plot.clear()
        self.controls.attach(session)
        if session.model.tokenizer is None:
            self.prompt.setPlainText("1 17 42 7")
            self.show_info("this package has no tokenizer: the prompt is token ids, the output shows ids")
        return True

    # Generation --------------------------------------------------------------------------------------------------

    def generate(self) -> None:
        if self.session is None or self.worker is not None:
            return
        try:
            prompt = self.session.prompt(self.prompt.toPlainText())
        except EdgeMoeError as e:
            self.show_error(str(e))
            return
        self.clear_error()
        self.output.clear()
        self.worker = GenerationWorker(self.session, prompt, self.tokens.value(), self.controls.live.isChecked())
        self.worker.piece.connect(self._piece)
        self.worker.frame.connect(self._frame)
        self.worker.failed.connect(self.show_error)
        self.worker.done.connect(self._done)
        self.generate_button.setEnabled(False)
        self.open_button.setEnabled(False)
        self.stop_button.setEnabled(True)
        self.worker.start()

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.stop()
            self.show_info("stopping after this token…")

    def _piece(self, text: str) -> None:
        if text:
            self.output.moveCursor(self.output.textCursor().MoveOperation.End)
            self.output.insertPlainText(text)

    def _frame(self, frame) -> None:
        self.map.show_frame(frame)  # every token: the map is the point of the app
        now = time.perf_counter()
        slow = now - self._last_slow_update >= SLOW_UPDATE_S
        self.plot.add(frame.metrics, repaint=slow)
        if slow:  # gauges and plot: a few times a second is all an eye can follow
            self.gauges.show_metrics(frame.metrics)
            self._last_slow_update = now
        if self.worker is not None:
            self.worker.frame_taken.set()

    def _live_changed(self, on: bool) -> None:
        if self.worker is not None:
            self.worker.live = on
            self.worker.frame_taken.set()

    def _done(self, result: dict) -> None:
        self.last_run = result
        worker, self.worker = self.worker, None
        if worker is not None:
            worker.wait(1000)  # it has emitted its last signal, so this returns at once
            worker.deleteLater()
        self.generate_button.setEnabled(True)
        self.open_button.setEnabled(True)
        self.stop_button.setEnabled(False)
        self.map.show_frame(self.session.idle_frame())
        if self.plot.series["tokens_per_second"]:  # the last frame's gauges may have been skipped by the throttle
            self.gauges.show_metrics({key: values[-1] for key, values in self.plot.series.items()})
            self.plot.update()
        QTimer.singleShot(400, self.map.clear_flashes)
        self.show_info(f"{result['tokens']} tokens ({result['reason']}), decode {result['decode_tps']:.1f} "
                       f"tokens/s, prefill {1e3 * result['prefill_seconds']:.0f} ms")
        self.run_finished.emit(result)

    def closeEvent(self, event) -> None:
        if self.worker is not None:
            self.worker.stop()
            self.worker.wait(10_000)  # closing may wait for one token: the window is going away anyway
        super().closeEvent(event)

