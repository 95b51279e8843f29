"""The kernel ops the models call, one folder per op: ``api.py`` validates the inputs and picks the
implementation (``_dispatch``: the Pallas GPU kernel on a GPU, the XLA ``reference.py`` elsewhere).

Ops: ``decode_step_attention`` (a decode step's rope, KV write and attention), ``prefill_attention``,
``kv_write``, ``rms_norm`` (with ``add_rms_norm``), ``reduce_add_rms_norm`` (the tensor-parallel sum
before it; CUDA). ``paged_attention`` is the plain decode attention op and the parts library its
Pallas kernel shares with ``decode_step_attention``. ``rope.py`` and ``_dense.py`` are XLA helpers
of the references."""
