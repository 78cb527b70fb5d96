"""When a writable mount saves its upper's state: a moment after changes stop.

Both engines poll a :class:`SaveClock` every :data:`SAVE_DELAY` seconds with
whether there are unsaved changes and the upper's change counter; it says
save when the counter stood still for one period, or when changes kept
coming for :data:`SAVE_MAX_DELAY` seconds since the first unsaved one.
"""

from __future__ import annotations

SAVE_DELAY = 1.0  # seconds of quiet before the upper's state is saved
SAVE_MAX_DELAY = 5.0  # ...but never later than this after the first unsaved change


class SaveClock:
    delay = SAVE_DELAY

    def __init__(self) -> None:
        self.first_unsaved = 0.0
        self.seen = -1

    def due(self, dirty: bool, generation: int, now: float) -> bool:
        if not dirty:
            self.first_unsaved = 0.0
            self.seen = generation
            return False
        self.first_unsaved = self.first_unsaved or now
        quiet = generation == self.seen
        self.seen = generation
        if quiet or now - self.first_unsaved >= SAVE_MAX_DELAY:
            self.first_unsaved = 0.0
            return True
        return False
