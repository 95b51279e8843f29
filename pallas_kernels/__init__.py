"""The kernel ops the models call, one folder per op: ``api.py`` validates the inputs and picks the
implementation (``_dispatch``: the Pallas GPU kernel on a GPU, the XLA ``reference.py`` elsewhere).

Ops: ``decode_step_attention`` (a decode step's rope, KV write and attention), ``prefill_attention``,
``kv_write``, ``rms_norm`` (with ``add_rms_norm``), ``reduce_add_rms_norm`` (the tensor-parallel sum
before it; CUDA), ``grouped_matmul`` (the experts' GEMMs over tokens grouped by expert),
``w4a16`` (bf16 activations times packed 4-bit weights). Shared pieces: ``_pallas_tiles`` (the
attention kernels' tiles and online softmax), ``_flash_decoding`` (the decode kernels' split over
the sequence and its combine), ``_checks`` (input checks), ``_dispatch`` (the implementation
choice); ``rope.py`` and ``_dense.py`` are XLA helpers of the references."""
