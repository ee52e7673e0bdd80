"""The one place the app touches device profiles (edge_moe.profiles, edge_moe.emulate), so those modules can
change without the app changing elsewhere.

Applying a profile to a running model, live:
    expert budget  the profile's usable RAM less backbone and runtime (emulate.profile_budget), via set_budget
    flash          the store's read throttle (emulate.TokenBucket at the profile's bandwidth and latency)
    threads        not live: the onnxruntime pool is fixed when the first model loads
Where either module is missing, the control is hidden and `reason()` says why.
"""

from __future__ import annotations


def _modules():
    try:
        from edge_moe import emulate, profiles
    except ImportError as e:
        return None, f"device profiles are not available: {e}"
    missing = [f"{m.__name__}.{f}" for m, f in ((profiles, "list_profiles"), (profiles, "load_profile"),
                                                (emulate, "profile_budget"), (emulate, "TokenBucket"))
               if not hasattr(m, f)]
    if missing:
        return None, f"device profiles are not available: no {', '.join(missing)}"
    return (profiles, emulate), None


def available() -> bool:
    return _modules()[0] is not None


def reason() -> str | None:
    """Why the profile control is hidden, or None when it is shown."""
    return _modules()[1]


def names() -> list[str]:
    found, _ = _modules()
    return list(found[0].list_profiles()) if found else []


def apply(session, name: str | None) -> str:
    """Emulates profile `name` (None: this machine) on the session's model; returns a status line.

    Raises:
        EdgeMoeError: unknown or invalid profile, or the model does not fit the device.
    """
    found, why = _modules()
    if found is None:
        raise RuntimeError(why)
    profiles, emulate = found
    model = session.model
    if name is None:
        session.run_between_tokens(lambda: model.set_throttle(None))
        return "emulation off: this machine's flash; the budget stays where it is"
    profile = profiles.load_profile(name)
    budget = emulate.profile_budget(profile, model.manifest)
    bucket = emulate.TokenBucket(profile.flash_seq_read, profile.read_latency)
    session.set_budget(budget)
    session.run_between_tokens(lambda: model.set_throttle(bucket))
    return (f"emulating {profile.name}: budget {budget / 2**20:,.1f} MiB, flash {profile.flash_seq_read / 1e6:.0f} "
            f"MB/s + {profile.read_latency * 1e3:.2f} ms per read (threads and CPU speed stay this machine's)")
