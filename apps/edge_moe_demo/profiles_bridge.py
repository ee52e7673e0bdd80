"""The one place the app touches device profiles (edge_moe/profiles.py, profiles/*.json), so that module can
land later without the app changing elsewhere.

What the app needs from edge_moe.profiles:
    list_profiles() -> list[str]                  names to offer (files under profiles/)
    apply_profile(model, name | None) -> str|None emulate that device on a loaded model, live (None: this
                                                  machine); may return a one-line summary for the status bar
Where the module or either function is missing, the control is hidden and `reason()` says why.
"""

from __future__ import annotations


def _module():
    try:
        import edge_moe.profiles as profiles
    except ImportError as e:
        return None, f"device profiles are not available: edge_moe.profiles cannot be imported ({e})"
    missing = [f for f in ("list_profiles", "apply_profile") if not hasattr(profiles, f)]
    if missing:
        return None, f"device profiles are not available: edge_moe.profiles has no {', '.join(missing)}"
    return profiles, None


def available() -> bool:
    return _module()[0] is not None


def reason() -> str | None:
    """Why the profile control is hidden, or None when it is shown."""
    return _module()[1]


def names() -> list[str]:
    profiles, _ = _module()
    return list(profiles.list_profiles()) if profiles else []


def apply(session, name: str | None) -> str:
    """Emulates `name` on the session's model from the next token; returns a status line."""
    profiles, why = _module()
    if profiles is None:
        raise RuntimeError(why)
    result = []
    session.run_between_tokens(lambda: result.append(profiles.apply_profile(session.model, name)))
    summary = result[0] if result and result[0] else None
    return summary or (f"emulating {name}" if name else "emulation off: this machine")
