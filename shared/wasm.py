"""Reading WebAssembly binaries: module or component, imports, exports, WASI version.

A small parser of the binary format's preamble and sections answers what a
person asks of a ``.wasm`` file without compiling it: is it a core module or
a component (the 8-byte preamble: modules are version 1 / layer 0,
components carry layer 1), what it imports and exports, and which WASI it
targets (``wasi_snapshot_preview1`` imports mean preview 1, ``wasi:``
interface imports mean preview 2). Full validation (types, code) is
wasmtime's job: :func:`validate` runs the parser, then wasmtime.

Every failure is a :class:`WasmError` whose message is one sentence naming
the file, fit to show a person as it is.
"""

from __future__ import annotations

import atexit
import hashlib
from pathlib import Path

from shared.wire import Wire
from shared.wire.registry import WasiVersion, WasmKind

MAGIC = b"\0asm"
MODULE_VERSION = 1  # bytes 4..8 of a core module: version 1, layer 0
COMPONENT_LAYER = 1  # bytes 6..8 of a component: layer 1 (bytes 4..6 its version)
WASI_PREVIEW1_MODULES = {"wasi_snapshot_preview1": "preview1", "wasi_unstable": "unstable"}


MODULE_SECTIONS = {
    0: "custom",
    1: "type",
    2: "import",
    3: "function",
    4: "table",
    5: "memory",
    6: "global",
    7: "export",
    8: "start",
    9: "element",
    10: "code",
    11: "data",
    12: "data count",
    13: "tag",
}
COMPONENT_SECTIONS = {
    0: "custom",
    1: "core module",
    2: "core instance",
    3: "core type",
    4: "component",
    5: "instance",
    6: "alias",
    7: "type",
    8: "canon",
    9: "start",
    10: "import",
    11: "export",
    12: "value",
}
EXTERNAL_KINDS = {0: "func", 1: "table", 2: "memory", 3: "global", 4: "tag"}
COMPONENT_SORTS = {1: "func", 2: "value", 3: "type", 4: "component", 5: "instance"}
CORE_SORTS = {0: "func", 1: "table", 2: "memory", 3: "global", 4: "tag"}
CORE_SORTS.update({0x10: "type", 0x11: "module", 0x12: "instance"})
VALUE_TYPES = {
    0x7F: "i32",
    0x7E: "i64",
    0x7D: "f32",
    0x7C: "f64",
    0x7B: "v128",
    0x70: "funcref",
    0x6F: "externref",
    0x74: "nullexnref",
    0x73: "nullfuncref",
    0x72: "nullexternref",
    0x71: "nullref",
    0x6E: "anyref",
    0x6D: "eqref",
    0x6C: "i31ref",
    0x6B: "structref",
    0x6A: "arrayref",
    0x69: "exnref",
}
REF_PREFIXES = {0x63: "ref null", 0x64: "ref"}


class WasmError(ValueError):
    """A file that is not usable WebAssembly; the message is one sentence."""


class _Unsupported(Exception):
    """An encoding this reader does not decode (a newer proposal); not an error in the file."""


class WasmImport(Wire, frozen=True, kw_only=True):
    module: str = ""  # core modules import "module" "name"; components only a name
    name: str
    kind: str  # func, memory, table, global, tag; instance, type, ... for components
    type: str = ""  # "func(i32, i32) -> i32", "memory 1..2", ... where known


class WasmExport(Wire, frozen=True, kw_only=True):
    name: str
    kind: str
    type: str = ""


class WasmInfo(Wire, frozen=True, kw_only=True):
    """What ``wasm info`` shows of one binary."""

    kind: WasmKind
    binary_version: int  # 1 for modules; the pre-standard encoding version for components
    size: int
    digest: str  # "sha256:..." of the whole file
    wasi: WasiVersion
    wasi_interfaces: list[str] = []  # what it imports from WASI
    imports: list[WasmImport] = []
    exports: list[WasmExport] = []
    custom_sections: list[str] = []
    functions: int = 0  # functions a module defines (not imports)
    core_modules: int = 0  # core modules a component embeds at its top level

    @property
    def os(self) -> str:
        """The OCI ``os`` of an artifact holding this binary (the CNCF Wasm layout)."""
        return "wasip2" if self.kind == "component" else "wasip1"

    def summary(self) -> str:
        wasi = "no WASI" if self.wasi == "none" else f"WASI {self.wasi}"
        return (
            f"{self.kind}, {len(self.imports)} import{'s' if len(self.imports) != 1 else ''}, "
            f"{len(self.exports)} export{'s' if len(self.exports) != 1 else ''}, {wasi}"
        )


# ---------------------------------------------------------------- the reader


class _Reader:
    """A cursor over bytes; every read past ``end`` is a truncation."""

    def __init__(self, data: bytes, label: str, start: int = 0, end: int | None = None) -> None:
        self.data = data
        self.label = label
        self.pos = start
        self.end = len(data) if end is None else end
        self.where = "the header"

    def truncated(self) -> WasmError:
        if self.end < len(self.data):
            return WasmError(f"{self.label} is not valid WebAssembly: {self.where} is malformed")
        return WasmError(
            f"{self.label} is truncated WebAssembly: {self.where} runs past the end of the file "
            f"({len(self.data)} bytes)"
        )

    def byte(self) -> int:
        if self.pos >= self.end:
            raise self.truncated()
        value = self.data[self.pos]
        self.pos += 1
        return value

    def bytes(self, count: int) -> bytes:
        if self.pos + count > self.end:
            raise self.truncated()
        value = self.data[self.pos : self.pos + count]
        self.pos += count
        return value

    def unsigned(self, bits: int = 32) -> int:
        pos = self.pos
        if pos < self.end and self.data[pos] < 0x80:  # most numbers fit in one byte
            self.pos = pos + 1
            return self.data[pos]
        result = shift = 0
        for _ in range((bits + 6) // 7):
            value = self.byte()
            result |= (value & 0x7F) << shift
            if not value & 0x80:
                if result >> bits:
                    break
                return result
            shift += 7
        raise WasmError(
            f"{self.label} is not valid WebAssembly: {self.where} has an integer too large "
            f"for {bits} bits at byte {self.pos}"
        )

    def signed33(self) -> int:
        result = shift = 0
        while True:
            value = self.byte()
            result |= (value & 0x7F) << shift
            shift += 7
            if not value & 0x80:
                break
            if shift >= 35:
                raise WasmError(
                    f"{self.label} is not valid WebAssembly: {self.where} has a malformed "
                    f"type index at byte {self.pos}"
                )
        if value & 0x40:
            result -= 1 << shift
        return result

    def name(self) -> str:
        raw = self.bytes(self.unsigned())
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise WasmError(
                f"{self.label} is not valid WebAssembly: {self.where} has a name that is "
                f"not UTF-8 at byte {self.pos - len(raw)}"
            ) from None

    def done(self) -> bool:
        return self.pos >= self.end


def _value_type(reader: _Reader) -> str:
    code = reader.byte()
    if code in VALUE_TYPES:
        return VALUE_TYPES[code]
    if code in REF_PREFIXES:
        heap = reader.signed33()
        heap_name = VALUE_TYPES.get(heap & 0x7F, str(heap)) if heap < 0 else str(heap)
        return f"({REF_PREFIXES[code]} {heap_name.removesuffix('ref')})"
    raise _Unsupported(f"value type 0x{code:02x}")


def _limits(reader: _Reader) -> str:
    flags = reader.byte()
    if flags & ~0x0F:
        raise _Unsupported(f"limits flags 0x{flags:02x}")
    bits = 64 if flags & 0x04 else 32
    minimum = reader.unsigned(bits)
    maximum = reader.unsigned(bits) if flags & 0x01 else None
    if flags & 0x08:
        reader.unsigned()  # custom page size (log2)
    text = f"{minimum}..{maximum}" if maximum is not None else f"{minimum}.."
    if flags & 0x02:
        text += " shared"
    if flags & 0x04:
        text += " i64"
    return text


def _func_signature(params: list[str], results: list[str]) -> str:
    text = f"func({', '.join(params)})"
    if len(results) == 1:
        return f"{text} -> {results[0]}"
    if results:
        return f"{text} -> ({', '.join(results)})"
    return text


def _type_section(reader: _Reader) -> list[str]:
    """Signatures of the MVP function types; empty once a GC type form appears."""
    signatures: list[str] = []
    for _ in range(reader.unsigned()):
        form = reader.byte()
        if form != 0x60:
            return []  # rec groups and sub types shift indices: signatures stay unknown
        params = [_value_type(reader) for _ in range(reader.unsigned())]
        results = [_value_type(reader) for _ in range(reader.unsigned())]
        signatures.append(_func_signature(params, results))
    return signatures


def _import_desc(reader: _Reader, signatures: list[str]) -> tuple[str, str, int | None]:
    """(kind, type text, type index of a function)."""
    kind = reader.byte()
    if kind == 0x00:
        index = reader.unsigned()
        return "func", signatures[index] if index < len(signatures) else "", index
    if kind == 0x01:
        element = _value_type(reader)
        return "table", f"table {element} {_limits(reader)}", None
    if kind == 0x02:
        return "memory", f"memory {_limits(reader)}", None
    if kind == 0x03:
        value = _value_type(reader)
        mutable = reader.byte()
        return "global", f"global {'mut ' if mutable & 1 else ''}{value}", None
    if kind == 0x04:
        reader.byte()  # attribute: exception
        index = reader.unsigned()
        return "tag", f"tag {signatures[index]}" if index < len(signatures) else "tag", None
    raise _Unsupported(f"import kind 0x{kind:02x}")


def _sections(reader: _Reader, names: dict[int, str]) -> list[tuple[int, int, int]]:
    """(id, start, end) of each top-level section, checking each fits in the file."""
    found: list[tuple[int, int, int]] = []
    while not reader.done():
        reader.where = f"section {len(found) + 1}"
        section_id = reader.byte()
        reader.where = f"the {names.get(section_id, f'unknown section {section_id}')} section"
        size = reader.unsigned()
        start = reader.pos
        if start + size > reader.end:
            raise reader.truncated()
        reader.pos = start + size
        found.append((section_id, start, start + size))
    return found


def _read_header(data: bytes, label: str) -> tuple[WasmKind, int]:
    if not data:
        raise WasmError(f"{label} is not WebAssembly: the file is empty")
    if not MAGIC.startswith(data[:4]):
        raise WasmError(f"{label} is not WebAssembly: it does not start with the \\0asm magic")
    if len(data) < 8:
        raise WasmError(
            f"{label} is truncated WebAssembly: it ends inside the 8-byte header "
            f"({len(data)} bytes)"
        )
    version = int.from_bytes(data[4:6], "little")
    layer = int.from_bytes(data[6:8], "little")
    if layer == 0 and version == MODULE_VERSION:
        return "module", version
    if layer == COMPONENT_LAYER:
        return "component", version
    raise WasmError(
        f"{label} is WebAssembly of an unknown kind (version {version}, layer {layer}); "
        "only core modules (version 1) and components (layer 1) are understood"
    )


def _module_info(
    data: bytes, label: str
) -> tuple[list[WasmImport], list[WasmExport], int, list[str]]:
    reader = _Reader(data, label, 8)
    sections = _sections(reader, MODULE_SECTIONS)
    signatures: list[str] = []
    imports: list[WasmImport] = []
    exports: list[WasmExport] = []
    custom: list[str] = []
    func_types: list[int] = []
    imported_funcs: list[int] = []
    for section_id, start, end in sections:
        body = _Reader(data, label, start, end)
        body.where = f"the {MODULE_SECTIONS.get(section_id, 'unknown')} section"
        if section_id == 0:
            custom.append(body.name())
        elif section_id == 1:
            signatures = _type_section(body)
        elif section_id == 2:
            for _ in range(body.unsigned()):
                module, name = body.name(), body.name()
                kind, type_text, type_index = _import_desc(body, signatures)
                if type_index is not None:
                    imported_funcs.append(type_index)
                imports.append(WasmImport(module=module, name=name, kind=kind, type=type_text))
        elif section_id == 3:
            func_types = [body.unsigned() for _ in range(body.unsigned())]
        elif section_id == 7:
            every_func = imported_funcs + func_types  # the function index space
            for _ in range(body.unsigned()):
                name = body.name()
                kind_code = body.byte()
                index = body.unsigned()
                export_kind = EXTERNAL_KINDS.get(kind_code)
                if export_kind is None:
                    raise _Unsupported(f"export kind 0x{kind_code:02x}")
                type_text = ""
                if export_kind == "func" and index < len(every_func):
                    type_index = every_func[index]
                    type_text = signatures[type_index] if type_index < len(signatures) else ""
                exports.append(WasmExport(name=name, kind=export_kind, type=type_text))
    return imports, exports, len(func_types), custom


def _component_desc(reader: _Reader) -> str:
    kind = reader.byte()
    if kind == 0x00:
        reader.byte()  # 0x11: core module
        reader.unsigned()
        return "core module"
    if kind in (0x01, 0x04, 0x05):
        reader.unsigned()
        return COMPONENT_SORTS[kind]
    if kind == 0x03:
        if reader.byte() == 0x00:
            reader.unsigned()
        return "type"
    raise _Unsupported(f"extern kind 0x{kind:02x}")


def _extern_name(reader: _Reader) -> str:
    prefix = reader.byte()
    if prefix not in (0x00, 0x01):
        raise _Unsupported(f"name prefix 0x{prefix:02x}")
    return reader.name()


def _component_info(
    data: bytes, label: str
) -> tuple[list[WasmImport], list[WasmExport], int, list[str]]:
    reader = _Reader(data, label, 8)
    sections = _sections(reader, COMPONENT_SECTIONS)
    imports: list[WasmImport] = []
    exports: list[WasmExport] = []
    custom: list[str] = []
    core_modules = 0
    for section_id, start, end in sections:
        body = _Reader(data, label, start, end)
        body.where = f"the {COMPONENT_SECTIONS.get(section_id, 'unknown')} section"
        if section_id == 0:
            custom.append(body.name())
        elif section_id == 1:
            core_modules += 1
        elif section_id == 10:
            for _ in range(body.unsigned()):
                name = _extern_name(body)
                imports.append(WasmImport(name=name, kind=_component_desc(body)))
        elif section_id == 11:
            for _ in range(body.unsigned()):
                name = _extern_name(body)
                sort = body.byte()
                if sort == 0x00:
                    kind = "core " + CORE_SORTS.get(body.byte(), "item")
                elif sort in COMPONENT_SORTS:
                    kind = COMPONENT_SORTS[sort]
                else:
                    raise _Unsupported(f"sort 0x{sort:02x}")
                body.unsigned()
                if body.byte() == 0x01:
                    _component_desc(body)
                exports.append(WasmExport(name=name, kind=kind))
    return imports, exports, core_modules, custom


def _wasi(kind: WasmKind, imports: list[WasmImport]) -> tuple[WasiVersion, list[str]]:
    if kind == "module":
        found = sorted({i.module for i in imports if i.module in WASI_PREVIEW1_MODULES})
        if "wasi_snapshot_preview1" in found:
            return "preview1", found
        if found:
            return "unstable", found
        interfaces = sorted({i.module for i in imports if i.module.startswith("wasi:")})
        return ("preview2", interfaces) if interfaces else ("none", [])
    interfaces = sorted({i.name for i in imports if i.name.startswith("wasi:")})
    if not interfaces:
        return "none", []
    if all("@0.3" in name for name in interfaces):
        return "preview3", interfaces
    return "preview2", interfaces


def inspect(data: bytes, label: str = "the file") -> WasmInfo:
    """What a binary is, imports and exports; ``label`` names it in error sentences."""
    kind, version = _read_header(data, label)
    functions = core_modules = 0
    try:
        if kind == "module":
            imports, exports, functions, custom = _module_info(data, label)
        else:
            imports, exports, core_modules, custom = _component_info(data, label)
    except _Unsupported:
        # A proposal this reader does not decode: wasmtime knows it (slower: it compiles).
        imports, exports, custom = _with_wasmtime(data, kind, label)
    wasi, interfaces = _wasi(kind, imports)
    return WasmInfo(
        kind=kind,
        binary_version=version,
        size=len(data),
        digest="sha256:" + hashlib.sha256(data).hexdigest(),
        wasi=wasi,
        wasi_interfaces=interfaces,
        imports=imports,
        exports=exports,
        custom_sections=custom,
        functions=functions,
        core_modules=core_modules,
    )


def read_file(path: Path) -> bytes:
    """A file's bytes; a missing or unreadable file is a WasmError."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise WasmError(f"{path} does not exist") from None
    except IsADirectoryError:
        raise WasmError(f"{path} is a directory, not a WebAssembly file") from None
    except OSError as exc:
        raise WasmError(f"{path} cannot be read: {exc.strerror or exc}") from None


def inspect_file(path: Path) -> WasmInfo:
    return inspect(read_file(path), str(path))


# ---------------------------------------------------------------- wasmtime

_engine: object | None = None


def _wasmtime_engine() -> object:
    """One engine per process: creating one costs more than validating a small module."""
    global _engine
    if _engine is None:
        import wasmtime

        engine = wasmtime.Engine()
        # Closed before interpreter shutdown tears down the bindings its finaliser needs.
        atexit.register(engine.close)
        _engine = engine
    return _engine


def _wasmtime_reason(exc: Exception) -> str:
    """The innermost cause of a wasmtime error, as one line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    last = lines[-1]
    if last[:3].rstrip(":").isdigit():
        last = last.split(":", 1)[1].strip()
    return last.rstrip(".")


def _with_wasmtime(
    data: bytes, kind: WasmKind, label: str
) -> tuple[list[WasmImport], list[WasmExport], list[str]]:
    import wasmtime
    import wasmtime.component

    engine = _wasmtime_engine()
    assert isinstance(engine, wasmtime.Engine)
    try:
        if kind == "module":
            module = wasmtime.Module(engine, data)
            imports = [
                WasmImport(module=i.module, name=i.name or "", kind=_kind_of(i.type))
                for i in module.imports
            ]
            exports = [WasmExport(name=e.name, kind=_kind_of(e.type)) for e in module.exports]
        else:
            component_type = wasmtime.component.Component(engine, data).type
            imports = [WasmImport(name=n, kind="") for n in component_type.imports(engine)]
            exports = [WasmExport(name=n, kind="") for n in component_type.exports(engine)]
    except wasmtime.WasmtimeError as exc:
        raise WasmError(f"{label} is not valid WebAssembly: {_wasmtime_reason(exc)}") from None
    return imports, exports, []


def _kind_of(item_type: object) -> str:
    name = type(item_type).__name__.removesuffix("Type").lower()
    return name if name in EXTERNAL_KINDS.values() else ""


def validate(data: bytes, label: str = "the file", expect: WasmKind | None = None) -> WasmInfo:
    """Inspect, then have wasmtime validate the whole binary (module) or compile it (component).

    ``expect`` refuses the other kind with a sentence saying which it is.
    """
    info = inspect(data, label)
    if expect is not None and info.kind != expect:
        wanted = "a core module" if expect == "module" else "a component"
        found = "a component" if info.kind == "component" else "a core module"
        raise WasmError(f"{label} is {found}, but {wanted} is expected here")
    import wasmtime
    import wasmtime.component

    engine = _wasmtime_engine()
    assert isinstance(engine, wasmtime.Engine)
    try:
        if info.kind == "module":
            wasmtime.Module.validate(engine, data)
        else:
            # The component API has no validate-only call: compiling validates.
            wasmtime.component.Component(engine, data)
    except wasmtime.WasmtimeError as exc:
        raise WasmError(f"{label} is not valid WebAssembly: {_wasmtime_reason(exc)}") from None
    return info
