"""Routed experts as the generation loop sees them: `ExpertSource.get((layer, index))` is the single place where
the loop obtains an expert, and `ExpertKernels.run` computes it.

A resident expert is its weight arrays (views into one buffer holding the expert's blob bytes); the kernel for
its shape is one shared onnxruntime session that takes the weights as inputs. The all-resident source reads
every expert at load; the budgeted cache (edge_moe.cache) implements the same `get`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import EdgeMoeError
from .expert_graph import INPUT, OUTPUT, ExpertShape, build_expert_graph
from .manifest import ExpertRecord, Manifest
from .sessions import OrtClock, TimedSession, open_session


@dataclass
class ResidentExpert:
    """An expert's weights in memory, ready to feed its kernel."""

    record: ExpertRecord
    weights: dict[str, np.ndarray]
    nbytes: int

    @classmethod
    def from_bytes(cls, record: ExpertRecord, buffer: np.ndarray) -> "ResidentExpert":
        """Views the tensors inside `buffer` (uint8, the expert's `length` bytes) without copying."""
        weights = {}
        for t in record.tensors:
            weights[t.name] = buffer[t.offset:t.offset + t.nbytes].view(t.dtype).reshape(t.shape)
        return cls(record, weights, int(buffer.nbytes))


def expert_shape(record: ExpertRecord) -> ExpertShape:
    return ExpertShape(record.kind, record.hidden_size, record.intermediate_size, record.dtype)


class ExpertKernels:
    """One session per expert shape, built from the same graph the exporter writes, with weights as inputs."""

    def __init__(self, clock: OrtClock, providers=("CPUExecutionProvider",)):
        self.clock, self.providers = clock, providers
        self._sessions: dict[ExpertShape, TimedSession] = {}

    def run(self, expert: ResidentExpert, x: np.ndarray) -> np.ndarray:
        """x [T, H] float32 -> [T, H] float32."""
        shape = expert_shape(expert.record)
        session = self._sessions.get(shape)
        if session is None:
            model = build_expert_graph(shape).SerializeToString()
            session = self._sessions[shape] = TimedSession(open_session(model, providers=self.providers),
                                                           self.clock)
        return session.run({INPUT: x, **expert.weights})[0]


def read_expert_bytes(record: ExpertRecord) -> np.ndarray:
    """A plain buffered read of one expert (the all-resident source; the streaming store lives in store.py)."""
    buffer = np.empty(record.length, dtype=np.uint8)
    try:
        with open(record.blob, "rb", buffering=0) as f:
            f.seek(record.offset)
            got = f.readinto(memoryview(buffer))
    except OSError as exc:
        raise EdgeMoeError(f"{record.blob}: cannot read expert {record.key} ({exc.strerror}); "
                           "check the disk or re-export the model") from None
    if got != record.length:
        raise EdgeMoeError(f"{record.blob}: short read of expert {record.key} ({got} of {record.length} bytes); "
                           "the blob is truncated, re-export the model")
    return buffer


def verify_checksum(record: ExpertRecord, buffer: np.ndarray) -> None:
    import xxhash

    algorithm, _, expected = record.checksum.partition(":")
    if algorithm != "xxh3_64":
        raise EdgeMoeError(f"{record.blob}: checksum algorithm {algorithm!r} of expert {record.key} is unknown; "
                           "re-export the model")
    if xxhash.xxh3_64_hexdigest(memoryview(buffer)) != expected:
        raise EdgeMoeError(f"{record.blob}: checksum mismatch for expert {record.key} (layer, index); the blob is "
                           "corrupt, re-export the model")


class AllResidentExperts:
    """Every expert read once at load (checksum verified) and kept: the reference the budgeted cache must match."""

    def __init__(self, manifest: Manifest, progress=None):
        self.experts: dict[tuple[int, int], ResidentExpert] = {}
        for record in manifest.experts.values():
            buffer = read_expert_bytes(record)
            verify_checksum(record, buffer)
            self.experts[record.key] = ResidentExpert.from_bytes(record, buffer)
            if progress is not None:
                progress.update()

    def get(self, key: tuple[int, int]) -> ResidentExpert:
        return self.experts[key]

    def resident_bytes(self) -> int:
        return sum(e.nbytes for e in self.experts.values())
