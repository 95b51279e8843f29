"""Tools and tool messages in chat prompts: OpenAI tool calls as templates print them, and the
Hermes rendering (Qwen2.5's own template's) of tools, calls and results into plain turns."""
from __future__ import annotations

import json


def tool_calls_with_objects(calls, i: int) -> list[dict]:
    """An assistant message's OpenAI ``tool_calls`` with each call's ``arguments`` as a dict (what
    chat templates print); arguments given as a JSON string are decoded, and must be an object."""
    if not isinstance(calls, list):
        raise ValueError(f'message {i}: tool_calls must be a list, got {type(calls).__name__}')
    out = []
    for j, call in enumerate(calls):
        function = call.get('function') if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get('name'), str):
            raise ValueError(f'message {i}: tool_calls[{j}] must have a function with a name, got {call!r}')
        arguments = function.get('arguments', {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments or '{}')
            except json.JSONDecodeError as e:
                raise ValueError(f'message {i}: tool_calls[{j}].function.arguments is not JSON: {e}') from None
        if not isinstance(arguments, dict):
            raise ValueError(f'message {i}: tool_calls[{j}].function.arguments must be a JSON object')
        out.append({**call, 'type': 'function', 'function': {'name': function['name'], 'arguments': arguments}})
    return out


def uses_tools(messages) -> bool:
    return not isinstance(messages, str) and any(
        isinstance(m, dict) and (m.get('role') == 'tool' or m.get('tool_calls')) for m in messages)


_HERMES_TOOLS = ('\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n'
                 'You are provided with function signatures within <tools></tools> XML tags:\n<tools>{tools}\n'
                 '</tools>\n\nFor each function call, return a json object with function name and arguments '
                 'within <tool_call></tool_call> XML tags:\n<tool_call>\n{{"name": <function-name>, "arguments": '
                 '<args-json-object>}}\n</tool_call>')


def hermes_messages(messages: list[dict], tools: list[dict] | None, default_system: str) -> list[dict]:
    """``messages`` (normalized, tool roles and calls included) as plain system/user/assistant turns
    of a ChatML template: the tool signatures appended to the system turn (``default_system`` when
    there is none), calls as ``<tool_call>{json}</tool_call>`` in the assistant's turn, consecutive
    tool results as ``<tool_response>`` blocks of one user turn."""
    out: list[dict] = []
    if tools:
        signatures = ''.join('\n' + json.dumps(t, ensure_ascii=False) for t in tools)
        system = messages[0]['content'] if messages[0]['role'] == 'system' else default_system
        out.append({'role': 'system', 'content': system + _HERMES_TOOLS.format(tools=signatures)})
        messages = messages[1:] if messages[0]['role'] == 'system' else messages
    for m in messages:
        if m['role'] == 'tool':
            block = f'<tool_response>\n{m["content"]}\n</tool_response>'
            if out and out[-1].get('tool_results'):
                out[-1]['content'] += '\n' + block
            else:
                out.append({'role': 'user', 'content': block, 'tool_results': True})
        elif m.get('tool_calls'):
            calls = '\n'.join('<tool_call>\n' + json.dumps({'name': c['function']['name'],
                                                          'arguments': c['function']['arguments']},
                                                         ensure_ascii=False) + '\n</tool_call>'
                              for c in m['tool_calls'])
            out.append({'role': 'assistant', 'content': (m['content'] + '\n' if m['content'] else '') + calls})
        else:
            out.append(m)
    return [{'role': m['role'], 'content': m['content']} for m in out]
