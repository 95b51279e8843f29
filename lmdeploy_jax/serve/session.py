"""A multi-turn chat session (LMDeploy's ``Session``): what ``pipeline.chat`` returns."""
from __future__ import annotations

from ..messages import Response


class Session:
    def __init__(self, session_id: int, engine):
        self.session_id = session_id
        self._engine = engine
        self.step = 0                                # tokens the session holds
        self.history: list[tuple[str, str]] = []     # (prompt, reply) per turn
        self.response: Response | None = None

    def record_turn(self, prompt: str, response: Response, step: int) -> None:
        self.history.append((prompt, response.text))
        self.response = response
        self.step = step

    def __call__(self, prompt: str, gen_config=None, stream_response: bool = False, **kwargs):
        return self._engine.chat(prompt, self, gen_config, stream_response, **kwargs)

    def abort(self) -> None:
        """Stop the request running in this session; it finishes with 'abort' (LMDeploy's)."""
        self._engine.stop_session(self.session_id)

    def close(self) -> None:
        """End the session: the engine forgets its history and frees its KV."""
        self._engine.end_session(self.session_id)
        self.step, self.history, self.response = 0, [], None

    def __repr__(self):
        return f'Session(session_id={self.session_id}, step={self.step}, turns={len(self.history)})'
