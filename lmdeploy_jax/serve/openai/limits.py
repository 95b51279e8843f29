"""The server's default bounds on requests and on its shutdown (its README section lists them)."""
MAX_BODY_BYTES = 8 << 20          # a larger body is refused with 413
BODY_TIMEOUT_S = 30.0             # a body slower to arrive is refused with 408
SHUTDOWN_TIMEOUT_S = 0.0          # on SIGTERM, running generations are aborted at once (vLLM's default)
ABORTED_REQUESTS_END_S = 2.0      # requests still running this long after the abort (a stalled body) are cancelled
MAX_COMPLETION_CHOICES = 256      # prompts x n of one /v1/completions request
