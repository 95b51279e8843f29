"""``lmdeploy_jax serve api_server [MODEL]``: the OpenAI-compatible server, with LMDeploy's flags."""
from __future__ import annotations

import argparse

from ..serve.openai import limits
from ..serve.reasoning_parsers.formats import REASONING_PARSER_NAMES
from ..serve.tool_parsers.formats import TOOL_CALL_PARSER_NAMES
from .engine_args import add_engine_args, add_model_arg, pipeline_kwargs


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser('serve', help='serve a model over HTTP')
    servers = parser.add_subparsers(dest='server', required=True)
    api = servers.add_parser('api_server', help="an OpenAI-compatible server (and LMDeploy's /generate)",
                             formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_arg(api)
    api.add_argument('--server-name', default='0.0.0.0', help='host to bind')
    api.add_argument('--server-port', type=int, default=23333, help='port to bind')
    api.add_argument('--api-keys', nargs='+', default=None,
                     help='accepted keys; clients send "Authorization: Bearer KEY" (all but /health)')
    api.add_argument('--allow-origins', nargs='+', default=None, help='CORS origins allowed')
    api.add_argument('--max-concurrent-requests', type=int, default=None,
                     help='most requests served at once (their bodies read first); more wait their turn')
    api.add_argument('--body-timeout', type=float, default=limits.BODY_TIMEOUT_S,
                     help="seconds a request's body may take to arrive; slower ones get 408")
    api.add_argument('--shutdown-timeout', type=float, default=limits.SHUTDOWN_TIMEOUT_S,
                     help="seconds running generations get to finish on SIGTERM (vLLM's flag); then they "
                          "are aborted (finish_reason 'abort') and the server exits")
    api.add_argument('--tool-call-parser', default=None, choices=TOOL_CALL_PARSER_NAMES,
                     help="how the model writes tool calls (LMDeploy's names); without it, requests with tools "
                          'are refused')
    api.add_argument('--reasoning-parser', default=None, choices=REASONING_PARSER_NAMES,
                     help="how the model marks its reasoning (LMDeploy's names); chat answers then carry it "
                          'apart, as reasoning_content')
    add_engine_args(api)
    api.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from ..serve.openai import serve
    serve(args.model_path, server_name=args.server_name, server_port=args.server_port, api_keys=args.api_keys,
          allow_origins=args.allow_origins, max_concurrent_requests=args.max_concurrent_requests,
          body_timeout=args.body_timeout, shutdown_timeout=args.shutdown_timeout,
          tool_call_parser=args.tool_call_parser, reasoning_parser=args.reasoning_parser, **pipeline_kwargs(args))
    return 0
