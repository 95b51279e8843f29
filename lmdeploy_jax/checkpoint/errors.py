"""The one error a model's files raise when they cannot be loaded as they are."""
from __future__ import annotations

import json
import os


class CheckpointError(ValueError):
    """A model file (or directory) ``path`` is broken in the way ``fault`` says: truncated, corrupt,
    missing a field or a tensor, or disagreeing with its config. The message is ``"{path}: {fault}"``."""

    def __init__(self, path: str, fault: str):
        self.path, self.fault = os.fspath(path), fault
        super().__init__(f'{self.path}: {fault}')


def read_json_object(path: str) -> dict:
    """The JSON object in the file ``path``; CheckpointError when it is not valid JSON or not an object."""
    try:
        with open(path, encoding='utf-8') as f:
            value = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(path, f'is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})') from None
    except UnicodeDecodeError as e:
        raise CheckpointError(path, f'is not UTF-8 text ({e.reason} at byte {e.start})') from None
    if not isinstance(value, dict):
        raise CheckpointError(path, f'must hold a JSON object, not a {type(value).__name__}')
    return value
