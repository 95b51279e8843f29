"""Paged decode attention: one query token per sequence over its paged KV cache.

``pallas_gpu`` holds the decode kernel's parts (tiles, splits, launch configs, the splits'
combine) that ``decode_step_attention``, the op the models call, builds on; ``reference`` is their
XLA reference. ``api.paged_decode_attention`` is the op alone (q already roped, its K/V already
written), by which the kernel is checked against the reference and benchmarked."""
