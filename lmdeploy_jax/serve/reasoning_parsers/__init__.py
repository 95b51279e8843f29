"""Reasoning split from a model's answer, per model family (LMDeploy's ``--reasoning-parser``)."""
from .formats import REASONING_PARSER_NAMES, ReasoningFormat, reasoning_format
from .parser import ReasoningParser

__all__ = ['REASONING_PARSER_NAMES', 'ReasoningFormat', 'ReasoningParser', 'reasoning_format']
