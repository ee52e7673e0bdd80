"""Live controls: budget (slider and text), policy, prefetch, device profile, live map. Each applies at once to
the running model through the Session; failures go to `error` (shown in the window), never raised."""

from __future__ import annotations

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (QCheckBox, QComboBox, QGridLayout, QGroupBox, QLabel, QLineEdit, QSlider)

from edge_moe.errors import EdgeMoeError

from . import profiles_bridge
from .plots import mib
from .session import Session, policy_names

STEPS = 1000  # slider positions between the minimum and the full budget


class Controls(QGroupBox):
    """Signals: error(str) for the message area, info(str) for the status bar, live_changed(bool)."""

    error = Signal(str)
    info = Signal(str)
    live_changed = Signal(bool)

    def __init__(self, parent=None):
        super().__init__("Controls (apply live)", parent)
        self.session: Session | None = None
        grid = QGridLayout(self)
        self.slider = QSlider(Qt.Horizontal)
        self.slider.setRange(0, STEPS)
        self.slider.valueChanged.connect(self._slider_moved)
        self.budget_text = QLineEdit()
        self.budget_text.setPlaceholderText("e.g. 64MB, 2GiB, 40%")
        self.budget_text.setMaximumWidth(160)
        self.budget_text.returnPressed.connect(self._budget_typed)
        self.budget_label = QLabel("—")
        grid.addWidget(QLabel("budget"), 0, 0)
        grid.addWidget(self.slider, 0, 1, 1, 3)
        grid.addWidget(self.budget_text, 0, 4)
        grid.addWidget(self.budget_label, 1, 1, 1, 4)

        self.policy = QComboBox()
        self.policy.addItems(policy_names())
        self.policy.currentTextChanged.connect(self._policy_chosen)
        self.prefetch = QCheckBox("prefetch next layer")
        self.prefetch.setChecked(True)
        self.prefetch.toggled.connect(self._prefetch_toggled)
        self.live = QCheckBox("live map and gauges")
        self.live.setChecked(True)
        self.live.toggled.connect(self.live_changed)
        grid.addWidget(QLabel("policy"), 2, 0)
        grid.addWidget(self.policy, 2, 1)
        grid.addWidget(self.prefetch, 2, 2)
        grid.addWidget(self.live, 2, 3)

        # The device profile control exists only where edge_moe.profiles does (profiles_bridge says why not).
        self.profile = QComboBox()
        self.profile_label = QLabel("device profile")
        names = profiles_bridge.names()
        self.profile.addItems(["(this machine)"] + names)
        self.profile.currentTextChanged.connect(self._profile_chosen)
        grid.addWidget(self.profile_label, 3, 0)
        grid.addWidget(self.profile, 3, 1, 1, 2)
        available = profiles_bridge.available()
        self.profile.setVisible(available)
        self.profile_label.setVisible(available)
        self.profile.setToolTip(profiles_bridge.reason() or "emulate this device's memory and flash speed")
        self.setEnabled(False)

    def attach(self, session: Session | None) -> None:
        """Shows `session`'s current settings; None disables the controls (no model loaded)."""
        self.session = session
        self.setEnabled(session is not None)
        if session is None:
            return
        for widget, value in ((self.policy, session.policy_name), (self.prefetch, session.prefetch)):
            widget.blockSignals(True)
            widget.setCurrentText(value) if isinstance(widget, QComboBox) else widget.setChecked(value)
            widget.blockSignals(False)
        self._sync_slider(session.budget)

    # Budget ----------------------------------------------------------------------------------------------------

    def budget_for(self, position: int) -> int:
        s = self.session
        return s.min_budget + (s.full_budget - s.min_budget) * position // STEPS

    def _sync_slider(self, nbytes: int) -> None:
        s = self.session
        span = max(s.full_budget - s.min_budget, 1)
        self.slider.blockSignals(True)
        self.slider.setValue(round(STEPS * (nbytes - s.min_budget) / span))
        self.slider.blockSignals(False)
        self.budget_label.setText(f"{mib(nbytes)} = {100 * nbytes / s.full_budget:.0f}% of the experts "
                                  f"(minimum {mib(s.min_budget)}, all {mib(s.full_budget)})")

    def _apply_budget(self, value) -> None:
        try:
            nbytes = self.session.set_budget(value)
        except EdgeMoeError as e:
            self.error.emit(str(e))
            return
        self._sync_slider(nbytes)
        self.info.emit(f"budget now {mib(nbytes)}")

    def _slider_moved(self, position: int) -> None:
        if self.session is not None:
            self._apply_budget(self.budget_for(position))

    def _budget_typed(self) -> None:
        if self.session is not None and self.budget_text.text().strip():
            self._apply_budget(self.budget_text.text().strip())

    # Policy, prefetch, profile -----------------------------------------------------------------------------------

    def _policy_chosen(self, name: str) -> None:
        if self.session is None:
            return
        try:
            self.session.set_policy(name)
            self.info.emit(f"policy now {name}")
        except EdgeMoeError as e:
            self.error.emit(str(e))

    def _prefetch_toggled(self, on: bool) -> None:
        if self.session is not None:
            self.session.set_prefetch(on)
            self.info.emit(f"prefetch {'on' if on else 'off'} (from the next token)")

    def _profile_chosen(self, name: str) -> None:
        if self.session is None:
            return
        try:
            message = profiles_bridge.apply(self.session, None if name.startswith("(") else name)
        except Exception as e:  # a profile from disk may be malformed: say so, keep running
            self.error.emit(f"device profile {name!r}: {e}")
            return
        self._sync_slider(self.session.budget)
        self.info.emit(message)
