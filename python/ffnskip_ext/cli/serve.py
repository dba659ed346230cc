"""``ffnskip serve``: the OpenAI-compatible HTTP server (``ffnskip_ext.serve``) on uvicorn."""

from __future__ import annotations

import argparse
import os
import signal
from typing import Any

from .options import add_model_options, model_path

API_KEY_ENV = "FFNSKIP_API_KEY"


def add_parser(subparsers: Any) -> None:
    serve = subparsers.add_parser("serve", help="serve the model over an OpenAI-compatible API")
    add_model_options(serve)  # --threads: per worker
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--workers", type=int, default=1,
                       help="decoders, each with its own KV cache and thread (default 1)")
    serve.add_argument("--policy", help="default skip policy: a JSON file, 'ffn-skip', 'dense' "
                                        "or 'first' (FiRST routers next to the model)")
    serve.add_argument("--speculative", choices=("ngram", "self", "auto"),
                       help="lossless speculative decoding for every request that does not ask "
                            "otherwise (ffnskip.speculative: a mode or 'none'); needs a policy "
                            "that verifies (dense, static, layer drop, FiRST)")
    serve.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                       help=f"require 'Authorization: Bearer KEY' on /v1 (default: "
                            f"${API_KEY_ENV})")
    serve.add_argument("--queue-size", type=int, default=32,
                       help="requests that may wait for a worker before 429 (default 32)")
    serve.add_argument("--shutdown-timeout", type=float, default=30.0,
                       help="on SIGTERM, seconds in-flight requests get to finish before "
                            "they are cancelled (default 30)")
    serve.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from ..serve import create_app

    app = create_app(
        model_path(args), workers=args.workers, device=args.device, dtype=args.dtype,
        max_seq_len=args.max_seq_len, num_threads=args.threads,
        kv_cache_dtype=args.kv_cache_dtype, policy=args.policy,
        api_key=args.api_key, queue_size=args.queue_size, speculative=args.speculative,
    )
    server = uvicorn.Server(uvicorn.Config(
        app, host=args.host, port=args.port, timeout_graceful_shutdown=args.shutdown_timeout,
        log_level="info",
    ))
    # uvicorn shuts down gracefully on SIGTERM and then raises the signal again for the
    # handler found before it; with the default one the process would end as killed.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    server.run()
    return 0
