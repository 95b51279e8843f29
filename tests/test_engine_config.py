"""``TurbomindEngineConfig``'s multi-host fields (LMDeploy's ``nnodes``, ``node_rank``,
``dist_init_addr``, ``devices``) and ``communicator``, which replaced the ``LMDEPLOY_JAX_COORDINATOR``,
``_NUM_PROCESSES``, ``_PROCESS_ID``, ``_LOCAL_DEVICES`` and ``_P2P_ALL_REDUCE`` variables, and ``ep``: bad values
refused naming the field, the CLI flags reaching the config, the pytorch backend refusing them, and
the variables no longer read. (Two processes joining through them:
``test_tensor_parallel.test_two_processes_equal_one``.)"""
from __future__ import annotations

import dataclasses

import pytest

from lmdeploy_jax import settings
from lmdeploy_jax.cli.engine_args import engine_config
from lmdeploy_jax.cli.main import build_parser
from lmdeploy_jax.messages import TurbomindEngineConfig
from lmdeploy_jax.parallel import init_distributed

MOVED = ('LMDEPLOY_JAX_COORDINATOR', 'LMDEPLOY_JAX_NUM_PROCESSES', 'LMDEPLOY_JAX_PROCESS_ID',
         'LMDEPLOY_JAX_LOCAL_DEVICES', 'LMDEPLOY_JAX_TP_SMALL_BATCH_OPTIONS', 'LMDEPLOY_JAX_DUMP_EXECUTABLES',
         'LMDEPLOY_JAX_P2P_ALL_REDUCE', 'LMDEPLOY_JAX_LAYER_UNROLL')


def test_defaults_are_one_process():
    config = TurbomindEngineConfig()
    assert (config.nnodes, config.node_rank, config.dist_init_addr, config.devices) == (1, 0, None, None)


def test_good_values_are_kept():
    config = TurbomindEngineConfig(nnodes=2, node_rank=1, dist_init_addr='10.0.0.1:12345', devices=[0, 3])
    assert (config.nnodes, config.node_rank, config.dist_init_addr, config.devices) == (2, 1, '10.0.0.1:12345',
                                                                                        [0, 3])


@pytest.mark.parametrize('fields, message', [
    ({'nnodes': 0}, 'nnodes must be an integer in [1, 2147483647], got 0'),
    ({'nnodes': 2.0, 'dist_init_addr': 'h:1'}, 'nnodes must be an integer in [1, 2147483647], got 2.0'),
    ({'nnodes': True}, 'nnodes must be an integer in [1, 2147483647], got True'),
    ({'node_rank': 1}, 'node_rank must be an integer in [0, 0], got 1'),
    ({'nnodes': 2, 'node_rank': -1, 'dist_init_addr': 'h:1'}, 'node_rank must be an integer in [0, 1], got -1'),
    ({'nnodes': 2}, "dist_init_addr must be 'host:port' of node 0 when nnodes > 1 (nnodes=2), got None"),
    ({'dist_init_addr': 'localhost'}, "dist_init_addr must be None or 'host:port' (a port in [1, 65535]), "
                                      "got 'localhost'"),
    ({'dist_init_addr': 'h:0'}, "dist_init_addr must be None or 'host:port' (a port in [1, 65535]), got 'h:0'"),
    ({'dist_init_addr': ':80'}, "dist_init_addr must be None or 'host:port' (a port in [1, 65535]), got ':80'"),
    ({'dist_init_addr': ('h', 1)}, "dist_init_addr must be None or 'host:port' (a port in [1, 65535]), "
                                   "got ('h', 1)"),
    ({'devices': [0]}, 'devices must be None in a one-node run (set CUDA_VISIBLE_DEVICES instead) or a list of '
                       'device ids with nnodes > 1, got [0]'),
    ({'nnodes': 2, 'dist_init_addr': 'h:1', 'devices': []},
     'devices must be a non-empty list of distinct device ids >= 0, got []'),
    ({'nnodes': 2, 'dist_init_addr': 'h:1', 'devices': [0, 0]},
     'devices must be a non-empty list of distinct device ids >= 0, got [0, 0]'),
    ({'nnodes': 2, 'dist_init_addr': 'h:1', 'devices': '0,1'},
     "devices must be a non-empty list of distinct device ids >= 0, got '0,1'"),
    ({'nnodes': 2, 'dist_init_addr': 'h:1', 'devices': [-1]},
     'devices must be a non-empty list of distinct device ids >= 0, got [-1]'),
    ({'communicator': 'native'}, "communicator must be one of ('cuda-ipc', 'nccl'), got 'native'"),
    ({'ep': 2}, 'ep must be 1 or tp=1 (1: each expert split over the tp devices; tp: each device holding '
                'num_experts / tp whole experts), got 2'),
    ({'tp': 4, 'ep': 2}, 'ep must be 1 or tp=4 (1: each expert split over the tp devices; tp: each device holding '
                         'num_experts / tp whole experts), got 2'),
    ({'tp': 2, 'ep': 0}, 'ep must be 1 or tp=2 (1: each expert split over the tp devices; tp: each device holding '
                         'num_experts / tp whole experts), got 0'),
    ({'tp': 1, 'ep': True}, 'ep must be 1 or tp=1 (1: each expert split over the tp devices; tp: each device '
                            'holding num_experts / tp whole experts), got True'),
])
def test_bad_values_are_refused_naming_the_field(fields, message):
    with pytest.raises(ValueError) as caught:
        TurbomindEngineConfig(**fields)
    assert str(caught.value) == message


def test_ep_is_one_or_tp():
    """LMDeploy's ``tp=N, ep=N`` spelling of expert parallelism is taken, as is ep=1 at any tp (the
    refusals: ``test_bad_values_are_refused_naming_the_field``; a model that cannot take it:
    ``test_family_moe.py``)."""
    assert TurbomindEngineConfig(tp=2, ep=2).ep == 2
    assert TurbomindEngineConfig(tp=4, ep=1).ep == 1


def test_the_cli_flags_reach_the_config():
    args = build_parser().parse_args(['serve', 'api_server', 'm', '--nnodes', '2', '--node-rank', '1',
                                      '--dist-init-addr', 'node0:29500', '--devices', '2', '3'])
    config = engine_config(args)
    assert (config.nnodes, config.node_rank, config.dist_init_addr, config.devices) == (2, 1, 'node0:29500', [2, 3])
    with pytest.raises(ValueError, match="dist_init_addr must be 'host:port' of node 0 when nnodes > 1"):
        engine_config(build_parser().parse_args(['run', 'm', '--nnodes', '2']))
    assert TurbomindEngineConfig().communicator == 'cuda-ipc'
    assert engine_config(build_parser().parse_args(['run', 'm', '--communicator', 'nccl'])).communicator == 'nccl'
    assert engine_config(build_parser().parse_args(['run', 'm', '--model-format', 'awq'])).model_format == 'awq'
    assert engine_config(build_parser().parse_args(['run', 'm'])).model_format is None
    with pytest.raises(ValueError, match='^--model-format is applied by the turbomind backend only; the pytorch '
                                         'backend runs float checkpoints only$'):
        engine_config(build_parser().parse_args(['run', 'm', '--backend', 'pytorch', '--model-format', 'gptq']))


@pytest.mark.parametrize('flags, named', [(['--nnodes', '2', '--dist-init-addr', 'h:1'], '--nnodes'),
                                           (['--dist-init-addr', 'h:1'], '--dist-init-addr'),
                                          (['--communicator', 'nccl'], '--communicator')])
def test_the_pytorch_backend_refuses_them(flags, named):
    args = build_parser().parse_args(['run', 'm', '--backend', 'pytorch', *flags])
    with pytest.raises(ValueError, match=f'^{named} is applied by the turbomind backend only; the pytorch backend '
                                         'runs in one process$'):
        engine_config(args)


def test_the_pytorch_backend_refuses_a_multi_host_config():
    """Also where the turbomind backend falls back to it: several hosts would each run alone."""
    from lmdeploy_jax.backends import create_backend
    from lmdeploy_jax.checkpoint.source import resolve_model
    config = TurbomindEngineConfig(nnodes=2, dist_init_addr='node0:29500')
    with pytest.raises(ValueError, match=r"^nnodes=2, dist_init_addr='node0:29500': the pytorch backend runs in one "
                                         r'process$'):
        create_backend(resolve_model(None), 'pytorch', config)


def test_init_distributed_without_an_address_is_one_process_or_an_error():
    assert init_distributed() is False
    with pytest.raises(ValueError, match="nnodes=2 needs dist_init_addr, the 'host:port' of node 0"):
        init_distributed(None, nnodes=2)


def test_the_moved_variables_are_not_settings_any_more(monkeypatch):
    """Set, they change nothing: the config is the one channel."""
    declared = {f.metadata['env'] for f in dataclasses.fields(settings.Settings)}
    assert not declared & set(MOVED)
    for name in MOVED:
        monkeypatch.setenv(name, 'localhost:1' if name.endswith('COORDINATOR') else '2')
    assert settings.current() == settings.current({})
    assert init_distributed() is False
