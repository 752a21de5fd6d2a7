"""Per-sender replay protection: a sliding window over sequence numbers.

For each sender the guard remembers the highest sequence number accepted and a bitmap of which
of the ``window`` numbers below it were seen. A number above the highest is new; one inside the
window is new unless its bit is set; one below the window is too old to tell and is rejected.
This accepts reordering within the window (frames of different transfers interleave) while no
frame is ever accepted twice.

`check` never changes state; `commit` records a number after every other check passed, so a
rejected frame leaves the guard exactly as it was.
"""

from __future__ import annotations

from collections import OrderedDict

from p2pfl.wire._errors import WireError


class ReplayGuard:
    def __init__(self, *, window: int = 1024, max_senders: int = 65_536) -> None:
        if window < 1:
            raise ValueError("window must be at least 1")
        self.window = window
        self.max_senders = max_senders
        # sender key -> (highest seq accepted, bitmap: bit i set = seq (highest - i) seen)
        self._state: OrderedDict[bytes, tuple[int, int]] = OrderedDict()

    def check(self, sender: bytes, seq: int) -> None:
        """Raise `WireError` ("replay" or "stale_seq") if ``seq`` must not be accepted."""
        state = self._state.get(sender)
        if state is None:
            return
        highest, seen = state
        if seq > highest:
            return
        offset = highest - seq
        if offset >= self.window:
            raise WireError(
                "stale_seq",
                f"seq {seq} is {offset} behind the newest {highest} (window {self.window})",
            )
        if seen >> offset & 1:
            raise WireError("replay", f"seq {seq} was already accepted from this sender")

    def commit(self, sender: bytes, seq: int) -> None:
        """Record ``seq`` as accepted (call only after `check` passed)."""
        state = self._state.get(sender)
        if state is None:
            highest, seen = seq, 1
            if len(self._state) >= self.max_senders:
                # Forget the least recently active sender; its old frames are still refused by
                # the timestamp skew window.
                self._state.popitem(last=False)
        else:
            highest, seen = state
            if seq - highest >= self.window:
                highest, seen = seq, 1
            elif seq > highest:
                seen = (seen << (seq - highest) | 1) & ((1 << self.window) - 1)
                highest = seq
            else:
                seen |= 1 << (highest - seq)
        self._state[sender] = (highest, seen)
        self._state.move_to_end(sender)

    def snapshot(self) -> dict[bytes, tuple[int, int]]:
        """A copy of the whole state (for tests and status): sender -> (highest, bitmap)."""
        return dict(self._state)
