"""Build hello.wasm from hello.wat and import it as the image localhost/wasm-hello:1.

python3 examples/wasm-job/build.py
zlayerctl up -d examples/wasm-job.zlayer.yml
zlayerctl job trigger hello -d wasm-hello --wait
zlayerctl logs hello -d wasm-hello
"""

import subprocess
import tempfile
from pathlib import Path

import wasmtime

HERE = Path(__file__).resolve().parent
IMAGE = "localhost/wasm-hello:1"

with tempfile.TemporaryDirectory() as work:
    module = Path(work) / "hello.wasm"
    module.write_bytes(wasmtime.wat2wasm((HERE / "hello.wat").read_text()))
    layout = Path(work) / "hello.oci"
    subprocess.run(
        ["zlayerctl", "wasm", "export", str(module), "--name", IMAGE, "--output", str(layout)],
        check=True,
    )
    subprocess.run(["zlayerctl", "image", "import", str(layout), "--name", IMAGE], check=True)
print(f"{IMAGE} is ready")
