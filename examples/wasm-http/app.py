"""A wasi:http handler in Python: answers every request with "hello from wasm".

Built into a component with componentize-py (``pip install componentize-py``)
against the WASI HTTP interfaces in ``wit/`` (the wasi:http 0.2 WIT files):

    componentize-py -d examples/wasm-http/wit -w proxy componentize app \\
        -p examples/wasm-http -o http.wasm
    zlayerctl wasm export http.wasm --name localhost/wasm-http:1 --output http.oci
    zlayerctl image import http.oci --name localhost/wasm-http:1
    zlayerctl up -d examples/wasm-http.zlayer.yml

The bindings (``wit_world``, ``componentize_py_types``) are generated at build time.
"""

from componentize_py_types import Ok  # type: ignore[import-not-found]
from wit_world import exports  # type: ignore[import-not-found]
from wit_world.imports.types import (  # type: ignore[import-not-found]
    Fields,
    IncomingRequest,
    OutgoingBody,
    OutgoingResponse,
    ResponseOutparam,
)


class IncomingHandler(exports.IncomingHandler):  # type: ignore[misc]
    def handle(self, request: IncomingRequest, response_out: ResponseOutparam) -> None:
        response = OutgoingResponse(Fields.from_list([("content-type", b"text/plain")]))
        body = response.body()
        ResponseOutparam.set(response_out, Ok(response))
        with body.write() as stream:
            stream.blocking_write_and_flush(b"hello from wasm\n")
        OutgoingBody.finish(body, None)
