"""Paged-attention operations: one folder per op, each with an XLA ``reference.py`` and the ``api.py``
the models call (which validates inputs and picks the implementation)."""
