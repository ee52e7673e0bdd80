"""The residency core: which keys hold bytes under one capacity, and which to evict. One piece of bookkeeping shared
by the RAM tier (cache.ExpertCache), the accelerator tier (accelerator.AcceleratorTier) and the trace simulator the
planner replays (opt.simulate, opt.belady), so a policy is written once and OPT replays what the runtime does.

    capacity >= resident bytes (admitted keys) + reserved bytes (in-flight admissions) + spare bytes (held for no key)

The set holds keys and sizes only: each tier keeps its own payloads (experts, device handles, buffers, futures) and
asks the set what fits and what to evict. Pinned keys and the keys a caller passes as `keep` are never victims.
Two ways, both checked here, keep the sum under the capacity: `reserve` and `admit` raise instead of overdrawing,
and `keep_spare` declines. Only `set_capacity` may leave it over until the tier makes room.
Not thread-safe: a tier calls it under its own lock.
"""

from __future__ import annotations

from typing import Hashable, Iterable

from .errors import EdgeMoeError
from .policies import Policy

Key = Hashable  # (layer, index) in the runtime; any hashable in the simulators' tests


class ResidencySet:
    """Resident keys with their sizes, in-flight reservations, spare bytes and pins under `capacity` bytes;
    `policy` names eviction victims.

    Args:
        capacity: bytes the tier may hold (>= 0).
        policy: a policies.Policy; the set tells it of admissions, evictions and accesses.

    Raises:
        EdgeMoeError: a negative capacity.
    """

    def __init__(self, capacity: int, policy: Policy):
        self.capacity = _checked_capacity(capacity)
        self.policy = policy
        self.resident: dict[Key, int] = {}  # admission order: policies break ties by the order of their candidates
        self.reserved: dict[Key, int] = {}
        self.pinned: set[Key] = set()
        self.spare_bytes = 0
        self.resident_bytes = 0
        self.reserved_bytes = 0

    # Accounting -------------------------------------------------------------------------------------------------

    def used_bytes(self) -> int:
        """Everything that counts against the capacity: resident, reserved and spare bytes."""
        return self.resident_bytes + self.reserved_bytes + self.spare_bytes

    def fits(self, nbytes: int) -> bool:
        return self.used_bytes() + nbytes <= self.capacity

    def __contains__(self, key) -> bool:
        return key in self.resident

    def __len__(self) -> int:
        return len(self.resident)

    def set_capacity(self, nbytes: int) -> None:
        """A new capacity. Shrinking evicts nothing by itself: the tier calls make_room(0, ...) and drops the
        payloads of what it returns (a tier may have in-flight reads or spares to give back first)."""
        self.capacity = _checked_capacity(nbytes)

    def set_policy(self, policy: Policy, now: int = 0) -> None:
        """Swaps the policy; it learns of every resident key as admitted now."""
        self.policy = policy
        for key, nbytes in self.resident.items():
            policy.on_admit(key, nbytes, now)

    # Admission and eviction -------------------------------------------------------------------------------------

    def reserve(self, key, nbytes: int, from_spare: bool = False) -> None:
        """Counts the bytes of an admission that has not landed yet (an in-flight read), so that no other admission
        can take its room meanwhile. `from_spare`: the bytes move from the spare count (the read lands in a spare
        buffer). Raises EdgeMoeError if it does not fit: make_room first."""
        if key in self.reserved or key in self.resident:
            raise EdgeMoeError(f"residency: {key!r} is already {'reserved' if key in self.reserved else 'resident'}")
        if from_spare:
            if nbytes > self.spare_bytes:
                raise EdgeMoeError(f"residency: reserving {nbytes} spare bytes for {key!r}, "
                                   f"only {self.spare_bytes} held")
            self.spare_bytes -= nbytes
        elif not self.fits(nbytes):
            raise EdgeMoeError(self._overdraw(key, nbytes))
        self.reserved[key] = nbytes
        self.reserved_bytes += nbytes

    def release(self, key) -> int:
        """Drops a reservation (a read that failed or was cancelled); returns its bytes."""
        nbytes = self.reserved.pop(key)
        self.reserved_bytes -= nbytes
        return nbytes

    def admit(self, key, nbytes: int | None = None, now: int = 0) -> int:
        """Makes `key` resident: its reservation if it has one, else `nbytes` of free room. Returns its bytes.

        Raises:
            EdgeMoeError: already resident, or no reservation and `nbytes` does not fit (make_room first).
        """
        if key in self.resident:
            raise EdgeMoeError(f"residency: {key!r} is already resident")
        if key in self.reserved:  # its bytes move from reserved to resident: the total stays the same
            nbytes = self.reserved.pop(key)
            self.reserved_bytes -= nbytes
        elif nbytes is None or not self.fits(nbytes):
            raise EdgeMoeError(self._overdraw(key, nbytes or 0))
        self.resident[key] = nbytes
        self.resident_bytes += nbytes
        self.policy.on_admit(key, nbytes, now)
        return nbytes

    def evict(self, key) -> int:
        """Removes a resident key (pinned or not: the caller decides); returns its bytes."""
        nbytes = self.resident.pop(key)
        self.resident_bytes -= nbytes
        self.policy.on_evict(key)
        return nbytes

    def access(self, key, now: int) -> None:
        self.policy.on_access(key, now)

    def evictable(self, keep=frozenset()) -> list:
        """Resident keys that are neither pinned nor in `keep`, in admission order."""
        pinned = self.pinned
        return [k for k in self.resident if k not in keep and k not in pinned]

    def victim(self, keep=frozenset()):
        """The key make_room would evict first, or None if nothing is evictable. Evicts nothing."""
        candidates = self.evictable(keep)
        return self._choose(candidates, keep, ()) if candidates else None

    def make_room(self, nbytes: int, keep=frozenset(), incoming=None) -> list | None:
        """Evicts, in the policy's order, until `nbytes` more fit or nothing evictable is left; returns the evicted
        keys (the caller drops their payloads, and checks fits() when it may have run out of candidates).

        Args:
            keep: keys that must stay (a running layer's experts), besides the pinned ones.
            incoming: the key a speculative admission is for: if the policy would rather keep any of the victims
                (Policy.should_replace), nothing is evicted and None is returned.

        Raises:
            EdgeMoeError: the policy named a key that is not an evictable candidate.
        """
        candidates = self.evictable(keep)
        free = self.capacity - self.used_bytes()
        victims: list = []
        # victims are chosen before any is evicted, so a refused speculative admission evicts nothing
        while free < nbytes and candidates:
            key = self._choose(candidates, keep, victims)
            if incoming is not None and not self.policy.should_replace(key, incoming):
                return None
            candidates.remove(key)
            victims.append(key)
            free += self.resident[key]
        for key in victims:
            self.evict(key)
        return victims

    # Spare bytes: what a tier still holds for no key (the RAM tier's recycled read buffers) ---------------------

    def keep_spare(self, nbytes: int) -> bool:
        """Counts `nbytes` the tier keeps holding (a buffer it will reuse) if they fit; False (nothing counted)
        otherwise, and the tier frees them."""
        if not self.fits(nbytes):
            return False
        self.spare_bytes += nbytes
        return True

    def drop_spare(self, nbytes: int) -> None:
        self.spare_bytes -= nbytes

    # Pinning ------------------------------------------------------------------------------------------------------

    def pin(self, keys: Iterable) -> None:
        """Never evicts these keys (resident or not yet); the tier checks what it can afford to pin."""
        self.pinned.update(keys)

    def unpin(self, keys: Iterable) -> None:
        self.pinned.difference_update(keys)

    # ------------------------------------------------------------------------------------------------------------

    def _choose(self, candidates: list, keep, chosen) -> Key:
        key = self.policy.victim(candidates)
        if key not in self.resident or key in keep or key in self.pinned or key in chosen:
            raise EdgeMoeError(f"policy {self.policy.name!r} chose {key!r}, which is not among the "
                               f"{len(candidates)} evictable candidates; fix the policy's victim()")
        return key

    def _overdraw(self, key, nbytes: int) -> str:
        return (f"residency: {key!r} needs {nbytes:,} bytes but {self.used_bytes():,} of {self.capacity:,} are "
                "held; make room first")


def _checked_capacity(nbytes) -> int:
    nbytes = int(nbytes)
    if nbytes < 0:
        raise EdgeMoeError(f"capacity {nbytes} is negative; give bytes, '1GiB' or a share like '25%'")
    return nbytes


class ResidencyView:
    """What a tier built on a ResidencySet (its `residency`) reports of it: the budget, the bytes in use, the
    policy. Shared by the RAM tier (cache.ExpertCache) and the accelerator tier."""

    residency: ResidencySet

    @property
    def budget(self) -> int:
        return self.residency.capacity

    @property
    def used(self) -> int:
        """Bytes of resident experts, in-flight reads and spare buffers."""
        return self.residency.used_bytes()

    @property
    def policy(self):
        return self.residency.policy
