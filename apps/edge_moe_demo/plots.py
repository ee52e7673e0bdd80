"""Gauges and a strip plot of the per-token metrics over time.

Drawn with QPainter (QtCharts is in PySide6-Addons, which the demo extra does not pull in). Each metric gets its
own row and scale, since bytes, rates and milliseconds share no axis.
"""

from __future__ import annotations

from collections import deque

from PySide6.QtCore import QPointF, Qt
from PySide6.QtGui import QColor, QPainter, QPainterPath, QPen
from PySide6.QtWidgets import QFormLayout, QLabel, QProgressBar, QWidget

# (metric key, title, formatter, colour); a row may add a second line drawn against the same scale.
ROWS = [
    ("resident_bytes", "resident / budget", lambda v: f"{v / 2**20:.1f} MiB", (52, 120, 210), "budget_bytes"),
    ("tokens_per_second", "tokens/s", lambda v: f"{v:.1f}", (40, 170, 100), None),
    ("hit_rate", "hit rate", lambda v: f"{100 * v:.0f}%", (230, 200, 60), None),
    ("bytes_read_per_token", "flash read / token", lambda v: f"{v / 2**20:.2f} MiB", (230, 120, 40), None),
    ("stall_ms_per_token", "stall / token", lambda v: f"{v:.2f} ms", (220, 70, 70), None),
]
POINTS = 300  # frames kept on screen


def mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:,.1f} MiB"


class Gauges(QWidget):
    """Current values: a bar for resident bytes against the budget, and one label per other metric."""

    def __init__(self, parent=None):
        super().__init__(parent)
        form = QFormLayout(self)
        form.setContentsMargins(0, 0, 0, 0)
        self.memory = QProgressBar()
        self.memory.setRange(0, 1000)
        self.memory.setFormat("—")
        form.addRow("memory", self.memory)
        self.labels = {}
        for key, title, *_ in ROWS[1:]:
            self.labels[key] = QLabel("—")
            form.addRow(title, self.labels[key])

    def show_metrics(self, m: dict) -> None:
        budget = max(m["budget_bytes"] or 1, 1)
        self.memory.setValue(min(1000, int(1000 * m["resident_bytes"] / budget)))
        self.memory.setFormat(f"{mib(m['resident_bytes'])} of {mib(budget)}")
        for key, _, fmt, *_ in ROWS[1:]:
            self.labels[key].setText(fmt(m[key]))


class StripPlot(QWidget):
    """One row per metric over the last POINTS frames, each scaled to its own maximum."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setMinimumHeight(60 * len(ROWS))
        self.series = {key: deque(maxlen=POINTS) for key, *_ in ROWS}
        self.series["budget_bytes"] = deque(maxlen=POINTS)

    def add(self, m: dict, repaint: bool = True) -> None:
        """Appends a frame's metrics; `repaint=False` only records them (the window repaints a few times a
        second: each repaint is Python holding the GIL that the generation thread needs)."""
        for key, values in self.series.items():
            values.append(float(m.get(key) or 0.0))
        if repaint:
            self.update()

    def clear(self) -> None:
        for values in self.series.values():
            values.clear()
        self.update()

    def paintEvent(self, event) -> None:
        painter = QPainter(self)
        painter.setRenderHint(QPainter.Antialiasing)
        painter.fillRect(self.rect(), QColor(24, 26, 30))
        row_h = self.height() / len(ROWS)
        for i, (key, title, fmt, colour, extra) in enumerate(ROWS):
            top = i * row_h
            lines = [self.series[key]] + ([self.series[extra]] if extra else [])
            top_value = max([max(v) for v in lines if v] + [1e-12])
            painter.setPen(QColor(150, 150, 150))
            last = fmt(self.series[key][-1]) if self.series[key] else "—"
            painter.drawText(6, int(top + 14), f"{title}: {last}   (max {fmt(top_value)})")
            painter.setPen(QPen(QColor(60, 60, 66), 1))
            painter.drawLine(0, int(top + row_h - 1), self.width(), int(top + row_h - 1))
            for values, pen in zip(lines, [QPen(QColor(*colour), 1.5), QPen(QColor(200, 200, 200), 1, Qt.DashLine)]):
                self._line(painter, values, top + 18, row_h - 22, top_value, pen)
        painter.end()

    def _line(self, painter, values, top, height, top_value, pen) -> None:
        if len(values) < 2:
            return
        dx = self.width() / (POINTS - 1)
        path = QPainterPath()
        for j, v in enumerate(values):
            point = QPointF(j * dx, top + height * (1 - v / top_value))
            path.lineTo(point) if j else path.moveTo(point)
        painter.setPen(pen)
        painter.drawPath(path)
