"""Decode attention: one query token per sequence over its paged KV cache."""
