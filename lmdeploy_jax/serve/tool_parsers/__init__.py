"""Tool calls in a model's answer, per model family (LMDeploy's ``--tool-call-parser``)."""
from .formats import TOOL_CALL_PARSER_NAMES, ToolCallFormat, tool_call_format
from .parser import ToolCall, ToolCallParser, parse_payload

__all__ = ['TOOL_CALL_PARSER_NAMES', 'ToolCall', 'ToolCallFormat', 'ToolCallParser', 'parse_payload',
           'tool_call_format']
