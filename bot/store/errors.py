"""The store's errors: every message is written to be shown to the member as is."""

from __future__ import annotations


class StoreError(Exception):
    """A problem with a member's request; the message will be displayed to the user."""


class QueueFull(StoreError):
    pass


class JobNotFound(StoreError):
    pass


class NotYours(StoreError):
    pass


class DuplicateName(StoreError):
    pass


class InvalidName(StoreError):
    pass


class LoraNotFound(StoreError):
    pass
