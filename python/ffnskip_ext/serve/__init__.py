"""``ffnskip serve``: an OpenAI-compatible HTTP server (``create_app`` for embedding).

Modules: ``app`` (routes, streaming), ``validation`` (request bodies), ``workers`` (the pool
of decoders), ``policy_cache`` (request skip policies), ``responses`` (OpenAI shapes),
``metrics`` (Prometheus), ``errors``. Imports only the layers below (config, loaders,
runtime).
"""

from .app import create_app

__all__ = ["create_app"]
