"""RMS normalisation of each row of ``x [..., hidden]``, scaled by a weight (Llama's RMSNorm)."""
