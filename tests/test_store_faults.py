"""Read faults injected under the expert store (EIO, short reads) while a budgeted model generates: each failing
generate is one EdgeMoeError naming the expert, the cache stays consistent, and the next generate, with the disk
healthy again, gives the reference model's tokens."""

import errno
import os

import pytest

import edge_moe
from edge_moe.errors import EdgeMoeError

from conftest import reference_greedy, transformers

PROMPT = [3, 5, 7, 11]


@pytest.fixture(scope="module")
def reference_tokens(tiny_package):
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_package[1]).eval()
    return reference_greedy(hf, PROMPT, 6)


def faulty_preadv(real, fault: str, after: int):
    """preadv that fails its `after`-th call and every later one: EIO, or a read that stops short of the data."""
    calls = {"n": 0}

    def preadv(fd, buffers, offset):
        calls["n"] += 1
        if calls["n"] < after:
            return real(fd, buffers, offset)
        if fault == "eio":
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return 0  # end of file before the expert's bytes: a short read

    return preadv


@pytest.mark.parametrize("fault,after", [("eio", 1), ("eio", 5), ("short", 1), ("short", 3)])
def test_read_fault_is_one_error_and_the_model_recovers(tiny_package, reference_tokens, monkeypatch, fault, after):
    model = edge_moe.load(tiny_package[0], budget="40%", prefetch=1, io_threads=2)
    real = os.preadv
    monkeypatch.setattr(os, "preadv", faulty_preadv(real, fault, after))
    with pytest.raises(EdgeMoeError) as info:
        model.generate(PROMPT, max_new_tokens=6)
    message = str(info.value)
    assert "\n" not in message and "expert (layer" in message
    assert ("Input/output error" in message) if fault == "eio" else ("short read" in message)
    monkeypatch.setattr(os, "preadv", real)
    assert model.experts.resident_bytes() <= model.budget
    assert model.generate(PROMPT, max_new_tokens=6).token_ids == reference_tokens
