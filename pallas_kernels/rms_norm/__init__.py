"""RMS normalisation of each row of ``x [..., hidden]``, scaled by a weight (Llama's RMSNorm), alone
or with the residual add before it (``add_rms_norm``)."""
