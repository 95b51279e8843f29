"""The sum of a row-parallel projection's partial results over the tensor-parallel devices, the
residual add after it and the RMSNorm after that (``reduce_add_rms_norm``): one kernel on GPUs of
one process (``p2p_cuda``), XLA's all-reduce and ``add_rms_norm`` elsewhere."""
