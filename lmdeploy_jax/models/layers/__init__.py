"""The layers the model families compose, as ``flax.nnx`` modules whose parameters are stacked over
the decoder's layers (``decoder.py`` says why)."""
