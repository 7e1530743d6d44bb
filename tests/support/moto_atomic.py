"""``moto_server``, one write at a time: what real AWS guarantees about a single item and a single key.

moto's server handles requests in threads with no lock around its backends, so two concurrent conditional writes
(a DynamoDB ``UpdateItem`` whose condition is the item's current value, an S3 put-if-absent) can both succeed: on a
loaded 2-core machine 4 of 600 contended compare-and-set updates each won twice (``/tmp`` reproduction in the issue
22 note). Real DynamoDB and S3 apply a conditional write atomically, and the limiter and the commit protocol rely on
that, so the tests' AWS applies each write under one lock. Reads stay concurrent: with every request serialised, CI
ran 4 minutes longer than the run before.

    python tests/support/moto_atomic.py -H 127.0.0.1 -p PORT
"""

from __future__ import annotations

import argparse
import threading
from typing import Any, Callable, Iterable


def serialised(app: Callable[..., Iterable[bytes]]) -> Callable[..., Iterable[bytes]]:
    """Writes one at a time (every DynamoDB call is a POST, so all of them); S3 reads (GET, HEAD) run concurrently,
    as they did: a write either happened before a read or after it, and the suite's jobs read a lot."""
    lock = threading.Lock()

    def one_at_a_time(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("REQUEST_METHOD") in ("GET", "HEAD"):
            return app(environ, start_response)
        with lock:
            body = app(environ, start_response)
            try:
                return list(body)  # the whole response inside the lock: a lazy body would run outside it
            finally:
                close = getattr(body, "close", None)
                if close is not None:
                    close()

    return one_at_a_time


def main() -> None:
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from moto.server import MotoRequestHandler
    from werkzeug.serving import run_simple

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-H", "--host", default="127.0.0.1")
    p.add_argument("-p", "--port", type=int, default=5000)
    args = p.parse_args()
    import os

    os.environ.setdefault("MOTO_PORT", str(args.port))
    run_simple(args.host, args.port, serialised(DomainDispatcherApplication(create_backend_app)), threaded=True,
               request_handler=MotoRequestHandler)


if __name__ == "__main__":
    main()
