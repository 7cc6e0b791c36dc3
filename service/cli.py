"""``vit-rerank serve``: run the HTTP service with uvicorn (one worker)."""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path
from typing import Any

from indexer.search_params import SEARCH_PARAMS, add_search_arguments
from reranker.defaults import DEFAULT_MODEL, DEFAULT_RUNTIME, RUNTIMES, RUNTIMES_HELP
from reranker.device import add_device_argument

TIMEOUT_KEEP_ALIVE_S = 5  # idle connections, and request heads that take longer, are closed after this
MAX_CONNECTIONS = 1024  # open connections; a new one past this closes the longest-idle one to make room


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``serve``."""
    sub = commands
    serve = sub.add_parser(
        "serve", help="run the HTTP service",
        description="Serve an index over HTTP. Every flag overrides its VIT_RERANK_* environment variable.",
    )
    src = serve.add_mutually_exclusive_group()
    src.add_argument("--demo", action="store_true", help="serve the built-in demo gallery (indexed on first start)")
    src.add_argument("--index", nargs="+", metavar="DIR",
                     help="index directory to serve (VIT_RERANK_INDEX); with --ray, shard directories or a "
                          "sharded index's directory")
    serve.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                       help="serve the shards from actors on this Ray cluster (no ADDRESS: RAY_ADDRESS, else the "
                            "local `ray start` cluster, else a new local one); adds and removes answer 501")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 8000)")
    serve.add_argument("--model", help=f"backbone of the demo index (default {DEFAULT_MODEL})")
    serve.add_argument("--model-kwargs", default=None, help="JSON of extra model arguments (demo index only)")
    serve.add_argument("--weights", help="pretrained | random | PATH (default: the index's own)")
    serve.add_argument("--runtime", choices=RUNTIMES,
                       help=f"how the model runs: {RUNTIMES_HELP} (VIT_RERANK_RUNTIME; default: the index's)")
    add_device_argument(serve, default=None, help="where the model and the OT run (default: auto)")
    serve.add_argument("--api-key", help="require this key in X-API-Key for index changes (VIT_RERANK_API_KEY)")
    add_search_arguments(serve)  # --top-k, --rerank-k, --scorer, --threshold, --s, --lambda, --marginals, --eps
    serve.add_argument("--max-upload-bytes", type=int)
    serve.add_argument("--queue-size", type=int)
    serve.add_argument("--max-batch", type=int)
    serve.add_argument("--batch-wait-ms", type=float)
    serve.add_argument("--torch-threads", type=int,
                       help="CPU threads of torch (default: one per core; 1 when the cores are shared)")
    serve.add_argument("--timeout-keep-alive", type=int, default=TIMEOUT_KEEP_ALIVE_S,
                       help="seconds a connection may stay idle, or take to send a request head "
                            f"(default {TIMEOUT_KEEP_ALIVE_S})")
    serve.add_argument("--max-in-flight", type=int,
                       help="requests answered at once before the service answers 503 with Retry-After "
                            "(default 128; idle connections do not count)")
    serve.add_argument("--max-connections", type=int, default=MAX_CONNECTIONS,
                       help=f"open connections; past this a new one closes the longest-idle one, never a "
                            f"running request's (default {MAX_CONNECTIONS})")
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    serve.add_argument("--no-progress", action="store_true", help="no progress bar while indexing the demo")
    serve.set_defaults(handler=run_serve)


_FLAGS = ("index", "host", "port", "model", "weights", "runtime", "device", "api_key", *SEARCH_PARAMS,
          "max_upload_bytes", "queue_size", "max_in_flight", "max_batch", "batch_wait_ms", "torch_threads")


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def run_serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from reranker.backbones import WeightsUnavailableError
    from reranker.defaults import default_model_kwargs
    from reranker.device import resolve_device
    from reranker.threads import run_on_own_thread

    from .settings import ServiceSettings

    dirs = args.index or []
    if len(dirs) > 1 and args.ray is None:
        return _fail("several --index directories are shards: serve them with --ray [ADDRESS]")
    args.index = dirs[0] if dirs else None
    overrides = {k: getattr(args, k) for k in _FLAGS if getattr(args, k) is not None}
    if args.ray is not None:
        overrides.update(ray=args.ray, shards=dirs)
    try:
        settings = ServiceSettings(**overrides)
        model_kwargs = json.loads(args.model_kwargs) if args.model_kwargs else default_model_kwargs(settings.model)
    except ValidationError as err:
        return _fail(f"invalid setting:\n{err}")
    except json.JSONDecodeError as err:
        return _fail(f"--model-kwargs is not valid JSON: {err}")
    device = resolve_device(settings.device)
    if args.demo:
        from .demo import ensure_demo_index

        weights = settings.weights or "pretrained"
        try:
            # on a thread of its own, whose OpenMP pool ends with it (reranker.threads)
            index = run_on_own_thread(lambda: ensure_demo_index(settings.model, weights, device, model_kwargs,
                                                                progress=not args.no_progress))
        except WeightsUnavailableError as err:
            return _fail(f"{err}\nFor the demo: vit-rerank serve --demo --weights /path/to/checkpoint, "
                         "or --weights random (testing only: the page and every answer say so).")
        except (ValueError, FileNotFoundError) as err:
            return _fail(str(err))
        settings = settings.model_copy(update={"index": index})  # weights: the index's own
    if settings.index is None:
        return _fail("nothing to serve: give --index DIR (or VIT_RERANK_INDEX), or --demo")
    if args.ray is None and not args.demo:
        try:
            run_on_own_thread(lambda: ensure_index(Path(settings.index), settings.model,
                                                   settings.weights or "pretrained", model_kwargs,
                                                   settings.runtime or DEFAULT_RUNTIME))
        except WeightsUnavailableError as err:
            return _fail(f"{err}\nTo start an empty index, give --weights /path/to/checkpoint (or build one with "
                         "`vit-rerank index build`).")
        except (ValueError, OSError) as err:
            return _fail(f"cannot start an empty index in {settings.index}: {err}")
    if args.timeout_keep_alive < 1 or args.max_connections < 1:
        return _fail("--timeout-keep-alive and --max-connections must be >= 1")
    options = uvicorn_options(args.timeout_keep_alive, args.max_connections)
    return _serve(settings, args.log_level, options)


def ensure_index(folder: Path, model: str, weights: str, model_kwargs: dict[str, Any],
                 runtime: str = DEFAULT_RUNTIME) -> bool:
    """Make ``folder`` an empty index of ``model`` when it is missing or empty (a new volume), so that the
    service starts and takes adds instead of exiting (a container restarting in a loop); True if it did.
    A folder that holds anything else is left alone (``serve`` then says it is not an index)."""
    from indexer.build import create_index
    from reranker.backbones import create_index_backbone, set_runtime

    if (folder / "manifest.json").exists() or (folder.exists() and any(folder.iterdir())):
        return False
    backbone = set_runtime(create_index_backbone(model, weights, model_kwargs=model_kwargs), runtime)
    create_index(folder, backbone, model_kwargs=model_kwargs).close()
    print(f"note: {folder} held no index: serving a new, empty one ({model}, weights {backbone.weights_id}); add "
          "images with POST /index/images, or build it with `vit-rerank index build DIR --from PHOTOS`",
          file=sys.stderr)
    return True


def uvicorn_options(timeout_keep_alive: int = TIMEOUT_KEEP_ALIVE_S,
                    max_connections: int = MAX_CONNECTIONS) -> dict[str, Any]:
    """The connection limits ``serve`` gives uvicorn (keyword arguments of ``uvicorn.Config``).

    uvicorn's own keep-alive timeout only starts after a response, and any byte received stops it: a
    connection that never sends a request, or sends its head a byte at a time, was never closed. The
    protocol here also runs it from the moment of connecting until a whole request head has arrived.
    uvicorn's ``limit_concurrency`` is not used: it counts idle connections, so silent sockets could
    take every place (and its 503 is plain text). Running requests are bounded by the app
    (``ServiceSettings.max_in_flight``, a JSON 503); open connections by the protocol, which makes room
    for a new one by closing the longest-idle one. A request body that stops arriving is the app's to
    time out (``app.BODY_READ_TIMEOUT_S``); a head over ``app.MAX_HEADER_BYTES`` is refused here while
    incomplete and by the app once complete.
    """
    from .app import MAX_HEADER_BYTES

    return {"http": _head_timeout_protocol(max_connections), "timeout_keep_alive": timeout_keep_alive,
            "h11_max_incomplete_event_size": MAX_HEADER_BYTES, "limit_concurrency": None}


@functools.cache
def _head_timeout_protocol(max_connections: int = MAX_CONNECTIONS) -> type:
    """uvicorn's h11 protocol, with its keep-alive timer also covering the wait for a request head, and
    at most ``max_connections`` connections open (the longest-idle one is closed to make room)."""
    import time

    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeadTimeoutH11Protocol(H11Protocol):
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self.idle_since = time.monotonic()
            self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive,
                                                                self.timeout_keep_alive_handler)
            if len(self.connections) > max_connections:
                idle = [c for c in self.connections if c is not self and c.is_idle()]
                victim = min(idle, key=lambda c: c.idle_since, default=self)
                victim.transport.close()  # no place left and none idle: the new one goes

        def is_idle(self) -> bool:
            """No request running on this connection."""
            return self.cycle is None or self.cycle.response_complete

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self.idle_since = time.monotonic()

        def data_received(self, data: bytes) -> None:
            # As H11Protocol's, but a byte does not stop the timer: a whole request head does.
            self.conn.receive_data(data)
            self.handle_events()
            if self.cycle is not None and not self.cycle.response_complete and self.timeout_keep_alive_task:
                self.timeout_keep_alive_task.cancel()  # a request is running (newer uvicorn cancels it too)
                self.timeout_keep_alive_task = None

    return HeadTimeoutH11Protocol


def _serve(settings, log_level: str = "info", options: dict[str, Any] | None = None) -> int:
    import uvicorn

    from indexer.manifest import IndexMismatchError
    from reranker.backbones import WeightsUnavailableError

    from .app import create_app
    from .engine import Engine
    from .metrics import ServiceMetrics

    try:
        engine = Engine.open(settings, ServiceMetrics())
    except (FileNotFoundError, IndexMismatchError, WeightsUnavailableError, ValueError) as err:
        return _fail(f"cannot serve {settings.index}: {err}")
    info = engine.info()
    print(f"serving {info['images']} images of {settings.index} ({info['model']}, weights {info['weights']}) "
          f"at http://{settings.host}:{settings.port}/", file=sys.stderr)
    if engine.random_weights:
        print("note: random weights: results are meaningless except for testing", file=sys.stderr)
    uvicorn.run(create_app(settings, engine), host=settings.host, port=settings.port, workers=1,
                log_level=log_level, **(options if options is not None else uvicorn_options()))
    return 0
