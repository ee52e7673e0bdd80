"""The `Budget` value both tiers take (one meaning of '25%': a share of what every expert costs resident,
budget.share_total), and the public live controls the demo uses instead of the cache's internals: Model.budget /
set_budget / set_policy / policy / residency."""

import inspect
import sys
from pathlib import Path

import pytest

import edge_moe
from edge_moe.accelerator import parse_gpu_budget
from edge_moe.budget import Budget, full_budget, minimum_budget, parse_budget, share_total
from edge_moe.devices import Device
from edge_moe.errors import EdgeMoeError
from edge_moe.placement import CostModel

STANDIN = Device("standin", ("CPUExecutionProvider",))  # an "accelerator" on the CPU provider (test_placement.py)
PROMPT = [5, 6, 7, 8]


# Parsing ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value, fields, printed", [
    (None, {}, "all"),
    (1234, {"nbytes": 1234}, "1234"),
    (2.0**20, {"nbytes": 2**20}, "1MiB"),
    ("512MB", {"nbytes": 512 * 10**6}, "512MB"),
    (" 2 GiB ", {"nbytes": 2 * 2**30}, "2GiB"),
    ("1.5G", {"nbytes": 3 * 2**29}, "1536MiB"),
    ("0", {"nbytes": 0}, "0"),
    ("25%", {"percent": 25.0}, "25%"),
    ("12.5%", {"percent": 12.5}, "12.5%"),
    ("AUTO", {"auto": True}, "auto"),
])
def test_parse_and_print_back(value, fields, printed):
    budget = Budget.parse(value)
    assert budget == Budget(**fields) and str(budget) == printed
    assert Budget.parse(budget) is budget
    if printed != "all":  # no limit prints as 'all' and is written None
        assert Budget.parse(printed) == budget


def test_resolve():
    assert Budget.parse("25%").resolve(1000) == 250
    assert Budget.parse("100%").resolve(1000) == 1000
    assert Budget.parse("512MB").resolve(1000) == 512 * 10**6  # bytes do not depend on the total
    assert Budget.parse(None).resolve(1000) is None and Budget.parse(None).unlimited
    with pytest.raises(EdgeMoeError, match="sized from this process's memory"):
        Budget.parse("auto").resolve(1000)


@pytest.mark.parametrize("value, what, allow_auto, needle", [
    ("lots", "budget", True, "budget 'lots' is not understood; write bytes like 512MB or 2GiB, or a share of the "
                             "expert bytes like 25%, or auto"),
    ("12XB", "budget", True, "budget '12XB' is not understood"),
    ("-5%", "budget", True, "budget '-5%' is not understood"),
    (-5, "gpu budget", False, "gpu budget -5 is negative; give bytes like 512MB, a share like 25%, or 0"),
    (True, "budget", True, "budget True is not understood"),
    ("auto", "gpu budget", False, "gpu budget 'auto' is not understood; write bytes like 512MB or 2GiB, or a "
                                  "share of the expert bytes like 25%"),
])
def test_bad_values_fail_in_one_line(value, what, allow_auto, needle):
    with pytest.raises(EdgeMoeError) as error:
        Budget.parse(value, what, allow_auto=allow_auto)
    message = str(error.value)
    assert needle in message and "\n" not in message
    if not allow_auto:
        assert "auto" not in message.split(";")[1]  # the fix does not offer what this budget refuses


# One meaning in both tiers ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("share", ["10%", "25%", "60%"])
def test_ram_and_gpu_shares_are_the_same_bytes(tiny_package, share):
    manifest = edge_moe.load(tiny_package[0], budget="50%").manifest
    expected = int(float(share[:-1]) / 100 * share_total(manifest))
    assert parse_gpu_budget(share, manifest) == expected
    if expected >= minimum_budget(manifest):
        assert parse_budget(share, manifest) == expected
    else:  # the RAM tier alone has a minimum: a layer's top-k experts with their read buffers
        with pytest.raises(EdgeMoeError, match="below the minimum"):
            parse_budget(share, manifest)


def test_every_expert_is_100_percent_in_each_tier(tiny_package):
    manifest = edge_moe.load(tiny_package[0], budget="50%").manifest
    # the total is what every expert costs in RAM (read buffers page-rounded), more than the weights alone
    assert share_total(manifest) == full_budget(manifest) > manifest.expert_bytes
    assert parse_budget("100%", manifest) == parse_gpu_budget("100%", manifest) == share_total(manifest)
    assert parse_gpu_budget(None, manifest) == share_total(manifest)  # no gpu budget: every expert


def test_loaded_tiers_take_the_same_bytes(tiny_package):
    model = edge_moe.load(tiny_package[0], budget="25%", device=STANDIN, gpu_budget="25%", cost_model=CostModel({}))
    assert model.budget == model.accelerator.budget == share_total(model.manifest) // 4
    assert model.set_budget(Budget.parse("30%")) == int(0.3 * share_total(model.manifest))
    model.close()


# Public live controls ---------------------------------------------------------------------------------------------

def test_set_policy_changes_the_running_policy(tiny_package):
    reference_tokens = edge_moe.load(tiny_package[0]).generate(PROMPT, max_new_tokens=8).token_ids
    model = edge_moe.load(tiny_package[0], budget="50%", policy="adaptive", prefetch=1)
    assert model.policy == "adaptive"
    model.generate(PROMPT, max_new_tokens=4)
    model.set_policy("lru")
    assert model.policy == "lru" and model.experts.policy.name == "lru"
    evictions = model.expert_stats()["evictions"]
    assert model.generate(PROMPT, max_new_tokens=8).token_ids == reference_tokens
    assert model.expert_stats()["evictions"] > evictions  # the cache goes on evicting, under the new policy
    with pytest.raises(EdgeMoeError, match="unknown residency policy 'mru'"):
        model.set_policy("mru")
    assert model.policy == "lru"
    with pytest.raises(EdgeMoeError, match="'lfu' needs a budget"):
        edge_moe.load(tiny_package[0]).set_policy("lfu")
    assert edge_moe.load(tiny_package[0]).policy is None


def test_residency_reports_states(tiny_package):
    model = edge_moe.load(tiny_package[0], budget="50%", prefetch=0)
    assert model.residency() == {}
    model.generate(PROMPT, max_new_tokens=4)
    states = model.residency()
    assert states and set(states.values()) <= {"resident", "pinned", "reading"}
    assert set(states) <= set(model.manifest.experts)
    model.pin([(0, 0)])
    assert model.residency()[(0, 0)] == "pinned"
    states[(0, 0)] = "changed"  # a copy: the caller cannot change the model's
    assert model.residency()[(0, 0)] == "pinned"

    everything = edge_moe.load(tiny_package[0])
    assert everything.residency() == {key: "resident" for key in everything.manifest.experts}


def test_residency_reports_the_accelerator(tiny_package):
    model = edge_moe.load(tiny_package[0], budget="50%", device=STANDIN, gpu_budget="100%", cost_model=CostModel({}))
    assert set(model.residency().values()) == {"gpu"}  # every expert fits: uploaded at load
    model.close()


# The demo app's session -------------------------------------------------------------------------------------

@pytest.fixture
def session_module():
    try:
        import edge_moe_demo.session as module
    except ImportError:  # a checkout without `pip install -e .`: the package lives in apps/
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "apps"))
        import edge_moe_demo.session as module
    return module


def test_demo_session_uses_the_public_controls(tiny_package, session_module):
    assert "model.experts" not in inspect.getsource(session_module)  # no internals
    session = session_module.Session(tiny_package[0], budget="50%", policy="adaptive")
    model = session.model
    assert session.budget == model.budget == share_total(model.manifest) // 2
    assert session.set_budget("25%") == model.budget == parse_gpu_budget("25%", model.manifest)
    session.set_policy("lfu")
    assert model.policy == "lfu" and session.policy_name == "lfu"
    model.generate(PROMPT, max_new_tokens=4)
    states, residency = session.states(), model.residency()
    for (layer, index), state in residency.items():
        assert states[layer, index] == {"resident": session_module.RAM, "pinned": session_module.PINNED,
                                        "reading": session_module.READING}[state]
    assert (states != session_module.FLASH).sum() == len(residency)
    model.close()
