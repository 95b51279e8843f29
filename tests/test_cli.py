"""The ``lmdeploy_jax`` command: help texts, ``list``, ``check_env``, and the real model through ``run``
and ``chat``."""
from __future__ import annotations

import re
import subprocess
import sys

import pexpect
import pytest

from lmdeploy_jax.cli.chat import PROMPT
from lmdeploy_jax.cli.engine_args import engine_config
from lmdeploy_jax.cli.main import SUBCOMMANDS, build_parser, main
from lmdeploy_jax.messages import TurbomindEngineConfig
from test_server import BACKEND, CHILD_ENV

COMMAND = [sys.executable, '-m', 'lmdeploy_jax.cli.main']
SUBCOMMAND_ARGS = [['run'], ['chat'], ['serve'], ['serve', 'api_server'], ['convert'], ['lite'], ['lite', 'auto_awq'],
                   ['list'], ['check_env']]


@pytest.mark.parametrize('args', [[]] + SUBCOMMAND_ARGS, ids=lambda a: ' '.join(a) or 'top')
def test_help(args, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*args, '--help'])
    assert exit_.value.code == 0 and 'usage: lmdeploy_jax' in capsys.readouterr().out


def test_every_subcommand_has_help_tested():
    assert len(SUBCOMMANDS) == len({args[0] for args in SUBCOMMAND_ARGS})


def test_engine_flags_are_shared(capsys):
    for args in (['run'], ['chat'], ['serve', 'api_server']):
        with pytest.raises(SystemExit):
            main([*args, '--help'])
        out = capsys.readouterr().out
        assert all(flag in out for flag in ('--backend', '--tp', '--session-len', '--max-batch-size',
                                            '--cache-max-entry-count', '--enable-prefix-caching',
                                            '--chat-template', '--model-name', '--log-level',
                                            '--rope-scaling-factor')), args


def test_rope_scaling_factor_reaches_the_turbomind_config_and_is_refused_for_pytorch():
    parser = build_parser()
    args = parser.parse_args(['run', 'hi', '--rope-scaling-factor', '2.5'])
    assert engine_config(args).rope_scaling_factor == 2.5
    args = parser.parse_args(['run', 'hi', '--backend', 'pytorch', '--rope-scaling-factor', '2.5'])
    with pytest.raises(ValueError, match='--rope-scaling-factor'):
        engine_config(args)


@pytest.mark.parametrize('flags, field, value', [(['--enable-mixed-chunk'], 'enable_mixed_chunk', True),
                                                 (['--ep', '2', '--tp', '2'], 'ep', 2)])
def test_turbomind_flags_reach_its_config_and_are_refused_for_pytorch(flags, field, value):
    parser = build_parser()
    assert getattr(engine_config(parser.parse_args(['run', 'hi', *flags])), field) == value
    assert getattr(engine_config(parser.parse_args(['run', 'hi'])), field) == getattr(TurbomindEngineConfig(), field)
    args = parser.parse_args(['run', 'hi', '--backend', 'pytorch', *flags])
    with pytest.raises(ValueError, match=f'^{flags[0]} is applied by the turbomind backend only'):
        engine_config(args)


def test_list_prints_the_chat_templates(capsys):
    from lmdeploy_jax.chat_template import list_templates
    assert main(['list']) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1:] == list_templates() and 'chatml' in lines


def test_check_env_reports_versions_and_devices():
    from importlib.metadata import version
    # a subprocess: importing jax here would start threads, and the chat test forks a terminal
    out = subprocess.run([*COMMAND, 'check_env'], capture_output=True, text=True, timeout=120).stdout
    assert f'jax: {version("jax")}' in out and f'torch: {version("torch")}' in out and 'python: ' in out
    assert re.search(r'^devices: \d+ x \w+$', out, re.M) and 'host memory: ' in out


def test_run_answers():
    # the reference backend starts fastest; the chat test below runs the default one
    out = subprocess.run([*COMMAND, 'run', 'What is the capital of France?', '--backend', 'pytorch',
                          '--max-new-tokens', '16'], capture_output=True, text=True, timeout=300, env=CHILD_ENV)
    assert out.returncode == 0, out.stderr[-2000:]
    assert 'Paris' in out.stdout


def _ask(child: pexpect.spawn, message: str) -> str:
    """Send a message with a double Enter; the reply is what is printed before the next prompt."""
    child.sendline(message)
    child.sendline('')
    child.expect_exact(PROMPT.strip())
    return child.before


def test_chat_remembers_the_previous_turn_until_end():
    child = pexpect.spawn(COMMAND[0], [*COMMAND[1:], 'chat', '--backend', BACKEND, '--max-new-tokens', '12'],
                          env=CHILD_ENV, encoding='utf-8', timeout=300)
    try:
        child.expect_exact(PROMPT.strip())
        assert 'Paris' in _ask(child, 'What is the capital of France?')
        assert 'Berlin' in _ask(child, 'And of Germany?')        # needs the previous turn
        assert 'history is cleared' in _ask(child, 'end')
        assert 'Berlin' not in _ask(child, 'And of Germany?')    # forgotten
        child.sendline('exit')
        child.sendline('')
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
