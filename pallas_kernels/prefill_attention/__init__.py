"""Prefill attention: a chunk of query tokens per sequence over its cached prefix plus itself."""
