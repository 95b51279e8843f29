"""``x @ W`` with ``W`` 4-bit weights (W4A16): AWQ/GPTQ codes kept packed on the device, with a
scale and zero point per group of input rows, dequantized inside the matmul (``api.w4a16_matmul``)."""
