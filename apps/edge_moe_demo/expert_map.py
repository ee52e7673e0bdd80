"""The expert map: one cell per (layer, expert), coloured by where the expert is, flashing when routed.

Painting goes through one numpy RGB image [L, E, 3] drawn scaled, not one QPainter rectangle per cell: a
48 x 128 map then costs about a millisecond per token, which keeps the UI thread off the GIL the generation
thread needs.
"""

from __future__ import annotations

import numpy as np
from PySide6.QtCore import QRectF
from PySide6.QtGui import QColor, QImage, QPainter, QPen
from PySide6.QtWidgets import QHBoxLayout, QLabel, QSizePolicy, QWidget

from .session import ACCELERATOR, FLASH, PINNED, RAM, READING

# Indexed by the cell states of session.py.
STATE_COLOURS = np.array([
    (48, 52, 58),     # FLASH: only on flash
    (230, 160, 40),   # READING: a read from flash in flight
    (52, 120, 210),   # RAM: resident in host memory
    (60, 200, 220),   # PINNED: resident for good (cyan: a red miss flash over blue RAM blends to purple)
    (40, 170, 100),   # ACCELERATOR: resident on the accelerator
], dtype=np.float32)
STATE_NAMES = {FLASH: "on flash", READING: "being read", RAM: "in RAM", PINNED: "pinned in RAM",
               ACCELERATOR: "on accelerator"}
HIT_FLASH = np.array((255, 255, 255), np.float32)   # routed and already resident
MISS_FLASH = np.array((255, 60, 60), np.float32)    # routed and had to be read: the token waited on flash
DECAY = 0.5  # flash strength kept per frame: a routed cell fades over ~3 tokens


class ExpertMap(QWidget):
    """Layers down, experts across. `show_frame(frame)` updates it; `changed_cells` counts state changes."""

    def __init__(self, layers: int = 1, experts: int = 1, parent=None):
        super().__init__(parent)
        self.setMinimumSize(240, 160)
        self.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Expanding)
        self.setMouseTracking(True)
        self.reset(layers, experts)

    def reset(self, layers: int, experts: int) -> None:
        self.states = np.zeros((layers, experts), np.int8)
        self.heat = np.zeros((layers, experts), np.float32)
        self.miss = np.zeros((layers, experts), bool)
        self.changed_cells = 0  # cells whose state changed, summed over frames (tests and the status line)
        self.frames = 0
        self._render()

    def show_frame(self, frame) -> None:
        if frame.states.shape != self.states.shape:
            self.reset(*frame.states.shape)
        self.changed_cells += int(np.count_nonzero(frame.states != self.states))
        self.states = frame.states
        self.heat *= DECAY
        self.heat[frame.routed] = 1.0
        self.miss = np.where(frame.routed, frame.missed, self.miss)
        self.frames += 1
        self._render()

    def clear_flashes(self) -> None:
        self.heat[:] = 0
        self._render()

    def _render(self) -> None:
        base = STATE_COLOURS[self.states]  # [L, E, 3]
        flash = np.where(self.miss[..., None], MISS_FLASH, HIT_FLASH)
        h = self.heat[..., None] * 0.85
        rgb = (base * (1 - h) + flash * h).astype(np.uint8)
        layers, experts = self.states.shape
        # Written into the image's own memory: a QImage wrapping a numpy buffer has crashed PySide6 at exit.
        image = QImage(experts, layers, QImage.Format_RGB888)
        rows = np.frombuffer(image.bits(), np.uint8).reshape(layers, image.bytesPerLine())
        rows[:, :3 * experts] = rgb.reshape(layers, 3 * experts)
        self._image = image
        self.update()

    def _cells(self) -> QRectF:
        return QRectF(self.rect()).adjusted(2, 2, -2, -2)

    def paintEvent(self, event) -> None:
        painter = QPainter(self)
        painter.fillRect(self.rect(), QColor(24, 26, 30))
        area = self._cells()
        painter.drawImage(area, self._image)  # nearest-neighbour: SmoothPixmapTransform is off
        layers, experts = self.states.shape
        cw, ch = area.width() / experts, area.height() / layers
        if min(cw, ch) >= 5:  # gaps between cells where they are big enough to see
            painter.setPen(QPen(QColor(24, 26, 30), 1))
            for e in range(1, experts):
                x = area.left() + e * cw
                painter.drawLine(int(x), int(area.top()), int(x), int(area.bottom()))
            for l in range(1, layers):
                y = area.top() + l * ch
                painter.drawLine(int(area.left()), int(y), int(area.right()), int(y))
        painter.end()

    def mouseMoveEvent(self, event) -> None:
        area = self._cells()
        layers, experts = self.states.shape
        p = event.position()
        e = int((p.x() - area.left()) / area.width() * experts)
        l = int((p.y() - area.top()) / area.height() * layers)
        if 0 <= l < layers and 0 <= e < experts:
            self.setToolTip(f"layer {l}, expert {e}: {STATE_NAMES[int(self.states[l, e])]}")


def legend() -> QWidget:
    """Colour key for the map."""
    box = QWidget()
    row = QHBoxLayout(box)
    row.setContentsMargins(0, 0, 0, 0)
    entries = [(STATE_COLOURS[s], STATE_NAMES[s]) for s in STATE_NAMES]
    entries += [(HIT_FLASH, "routed (hit)"), (MISS_FLASH, "routed (miss)")]
    for colour, name in entries:
        swatch = QLabel()
        swatch.setFixedSize(12, 12)
        r, g, b = (int(c) for c in colour)
        swatch.setStyleSheet(f"background: rgb({r}, {g}, {b}); border: 1px solid #888;")
        row.addWidget(swatch)
        row.addWidget(QLabel(name))
        row.addSpacing(8)
    row.addStretch(1)
    return box
