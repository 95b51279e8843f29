"""Engine session ids of the server's generations: who may name which session.

Clients never name an engine session directly. A ``/generate`` request that names its own
``session_id`` (an int in ``[0, CLIENT_SESSION_IDS)``, checked by the request model) gets the
engine session ``owned_session_id(owner, session_id)``, where ``owner`` is the index of the
request's API key (0 without keys): two keys naming the same id get two sessions, and ``cancel``
or the end of an interactive session reaches only the sessions of the key that opened them.
Every other generation (the OpenAI routes, ``/generate`` without an id) runs in a session of
``anonymous_session_id()``: a random id from a range no client id maps to, so no request can
abort, end or occupy it.
"""
from __future__ import annotations

import secrets

CLIENT_SESSION_IDS = 1 << 31          # /generate's session_id: 0 <= id < 2**31 (LMDeploy's int)
_OWNED_BASE = 1 << 32                 # above the Python API's own counter (1, 2, ...)
_ANONYMOUS_BASE = 1 << 62             # anonymous ids: [2**62, 2**63), above every owned id


def owned_session_id(owner: int, session_id: int) -> int:
    """The engine session of ``session_id`` as named by the client of key index ``owner`` (injective)."""
    if not 0 <= session_id < CLIENT_SESSION_IDS:
        raise ValueError(f'session_id must be in [0, {CLIENT_SESSION_IDS}), got {session_id}')
    return _OWNED_BASE + owner * CLIENT_SESSION_IDS + session_id


def anonymous_session_id() -> int:
    """A fresh engine session id no client can name or guess (62 random bits)."""
    return _ANONYMOUS_BASE + secrets.randbelow(_ANONYMOUS_BASE)
