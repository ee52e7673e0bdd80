"""The app's handle on one loaded model: loading, live controls and per-token telemetry. No Qt here, so the
logic can be tested and reused without a screen.

Thread rules: the generation (worker) thread runs `stream_generate` and calls `frame()` between tokens; the UI
thread calls the setters. Budget and policy go straight to the model (Model.set_budget / set_policy: the cache
takes its lock).
Prefetch on/off (Model.set_prefetch) swaps the predictor, which the forward pass reads more than once per layer,
so that swap is queued and applied by the worker between tokens (`drain()`), or at once when nothing is generating.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import edge_moe
from edge_moe.budget import full_budget, minimum_budget
from edge_moe.errors import EdgeMoeError
from edge_moe.policies import POLICIES

# Cell states of the expert map, in the order of their colours in expert_map.py.
FLASH, READING, RAM, PINNED, ACCELERATOR = range(5)
_STATE_CODES = {"reading": READING, "resident": RAM, "pinned": PINNED, "gpu": ACCELERATOR}  # Model.residency()

DEFAULT_BUDGET = "50%"  # half the experts fit: the map shows streaming from the first token


def default_model_path() -> Path | None:
    """The packaged default model (exported on first use by edge_moe.default_model), or None where that hook
    does not exist yet."""
    try:
        from edge_moe.default_model import default_model_path as hook
    except ImportError:
        return None
    return Path(hook())


@dataclass
class Frame:
    """What the UI shows after a token. states [L, E] int8 (cell states above); routed/missed [L, E] bool: the
    experts this token (and any tokens whose frames were dropped) routed to, and which of them missed."""

    states: np.ndarray
    routed: np.ndarray
    missed: np.ndarray
    metrics: dict = field(default_factory=dict)


class Session:
    """A model loaded under a budget with the app's live controls.

    Args:
        path: a package directory (edge-moe export).
        budget: bytes or text ('512MB', '25%'); policy: a name in edge_moe.policies.POLICIES; prefetch: on/off.
    Raises:
        EdgeMoeError: the package cannot be opened, or a bad budget/policy.
    """

    def __init__(self, path, budget=DEFAULT_BUDGET, policy: str = "adaptive", prefetch: bool = True):
        self.path = Path(path)
        self.model = edge_moe.load(self.path, budget=budget, policy=policy, prefetch=1, trace=True)
        manifest = self.model.manifest
        c = self.model.config
        self.layers, self.experts = int(c["num_layers"]), int(c["num_experts"])
        self.min_budget, self.full_budget = minimum_budget(manifest), full_budget(manifest)
        self.policy_name = policy
        self.prefetch = True
        self._pending: deque = deque()
        self._pending_lock = threading.Lock()
        self.generating = False
        self._last_stats = self.model.expert_stats()
        self._last_time = time.perf_counter()
        self.history: deque = deque(maxlen=600)  # (elapsed, metrics) for the plots
        self.set_prefetch(prefetch)

    # Live controls (UI thread) -------------------------------------------------------------------------------

    @property
    def budget(self) -> int:
        return self.model.budget

    def set_budget(self, value) -> int:
        """Applies a budget now (bytes or text); returns the bytes. Raises EdgeMoeError below the minimum."""
        return self.model.set_budget(value)

    def set_policy(self, name: str) -> None:
        self.model.set_policy(name)
        self.policy_name = name

    def set_prefetch(self, on: bool) -> None:
        self.prefetch = bool(on)
        # Model keeps the depth-1 predictor while prefetch is off, so switching back keeps what it learnt
        self.run_between_tokens(lambda: self.model.set_prefetch(1 if on else 0))

    def run_between_tokens(self, action) -> None:
        """Runs `action` in the worker between tokens, or now when nothing is generating."""
        with self._pending_lock:
            if self.generating:
                self._pending.append(action)
                return
        action()

    def drain(self) -> None:
        """Worker side: applies queued controls."""
        with self._pending_lock:
            actions, self._pending = list(self._pending), deque()
        for action in actions:
            action()

    # Prompts --------------------------------------------------------------------------------------------------

    def prompt(self, text: str):
        """Text through the tokenizer, or, for a package without one, token ids written as '1 2 3'."""
        if self.model.tokenizer is not None:
            return text
        try:
            return [int(t) for t in text.replace(",", " ").split()]
        except ValueError:
            raise EdgeMoeError(f"{self.path} has no tokenizer.json: write the prompt as token ids, e.g. "
                               "'1 17 42'") from None

    def piece(self, response) -> str:
        """The text a response adds to the output pane (its id in brackets when there is no tokenizer)."""
        return response.text if self.model.tokenizer is not None else f"[{response.token}]"

    def idle_frame(self) -> Frame:
        """The map's state with nothing routed: after loading and after a generation."""
        none = np.zeros((self.layers, self.experts), bool)
        return Frame(self.states(), none, none.copy(), {})

    # Telemetry (worker thread) --------------------------------------------------------------------------------

    def take_routes(self, routed: np.ndarray, missed: np.ndarray) -> None:
        """Moves the trace so far into routed/missed [L, E] and empties it, so a long chat does not grow it."""
        trace = self.model.trace
        entries = trace[:]
        del trace[:len(entries)]
        for entry in entries:
            experts = np.asarray(entry["experts"], dtype=np.int64)
            routed[entry["layer"], experts] = True
            missed[entry["layer"], experts[~np.asarray(entry["hit"], dtype=bool)]] = True

    def states(self) -> np.ndarray:
        states = np.zeros((self.layers, self.experts), np.int8)
        for (layer, index), state in self.model.residency().items():
            states[layer, index] = _STATE_CODES.get(state, RAM)
        return states

    def metrics(self, tokens: int, elapsed: float, decode_tps: float) -> dict:
        """Counters since the last call, per token: bytes read, stall, hit rate; plus the budget gauges."""
        stats, last = self.model.expert_stats(), self._last_stats
        now = time.perf_counter()
        lookups = (stats["hits"] - last["hits"]) + (stats["misses"] - last["misses"])
        per = max(tokens, 1)
        m = {"elapsed": elapsed, "tokens_per_second": decode_tps,
             "hit_rate": (stats["hits"] - last["hits"]) / lookups if lookups else 1.0,
             "bytes_read_per_token": (stats["bytes_read"] - last["bytes_read"]) / per,
             "stall_ms_per_token": 1e3 * (stats["stall_seconds"] - last["stall_seconds"]) / per,
             "resident_bytes": stats["resident_bytes"], "budget_bytes": self.budget,
             "total_hit_rate": stats["hits"] / max(stats["hits"] + stats["misses"], 1),
             "bytes_read": stats["bytes_read"], "stall_seconds": stats["stall_seconds"],
             "wall_seconds": now - self._last_time}
        self._last_stats, self._last_time = stats, now
        self.history.append(m)
        return m


def policy_names() -> list[str]:
    return sorted(POLICIES)
