"""The wasi:http handler the tests serve; the request's path picks what it does.

- ``/read``: reads the whole request body, then answers "read N bytes". A request
  whose body has not all come holds its instance meanwhile.
- any other path: the example's handler (``examples/wasm-http/app.py``, built in
  beside this module), which answers "hello from wasm".

One component for every test that needs "a wasi:http handler": componentize-py
takes 20-60 s per build and wasmtime compiles each distinct component again.
The bindings (``wit_world``, ``componentize_py_types``) are generated at build time.
"""

import app as example  # type: ignore[import-not-found]
from componentize_py_types import Err, Ok  # type: ignore[import-not-found]
from wit_world import exports  # type: ignore[import-not-found]
from wit_world.imports.streams import StreamError_Closed  # type: ignore[import-not-found]
from wit_world.imports.types import (  # type: ignore[import-not-found]
    Fields,
    IncomingBody,
    IncomingRequest,
    OutgoingBody,
    OutgoingResponse,
    ResponseOutparam,
)


class IncomingHandler(exports.IncomingHandler):  # type: ignore[misc]
    def handle(self, request: IncomingRequest, response_out: ResponseOutparam) -> None:
        path = (request.path_with_query() or "/").split("?", 1)[0]
        if path == "/read":
            read_body(request, response_out)
        else:
            example.IncomingHandler().handle(request, response_out)


def read_body(request: IncomingRequest, response_out: ResponseOutparam) -> None:
    size = 0
    body = request.consume()
    with body.stream() as stream:
        try:
            while True:
                size += len(stream.blocking_read(65536))
        except Err as error:
            if not isinstance(error.value, StreamError_Closed):
                raise
    IncomingBody.finish(body)
    response = OutgoingResponse(Fields.from_list([("content-type", b"text/plain")]))
    out = response.body()
    ResponseOutparam.set(response_out, Ok(response))
    with out.write() as stream:
        stream.blocking_write_and_flush(f"read {size} bytes".encode())
    OutgoingBody.finish(out, None)
