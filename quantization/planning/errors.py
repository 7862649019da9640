"""The error every planning step raises."""

from __future__ import annotations


class PlanError(RuntimeError):
    """No plan can be made (nothing fits, unreadable model, bad input); the message says why."""
