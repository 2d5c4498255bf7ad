"""A no-op proxy-wasm module with the same exports as a given module, written byte by byte.

The benchmark's variant "noop" loads it: Envoy then makes exactly the calls into the VM it makes
for matrix-sync-router (context create, request/response headers, log, done, delete, ...), and
every call returns at once. That is the floor any proxy-wasm filter pays in Envoy; what
matrix-sync-router costs above it is its own work (host calls and Rust code).

No toolchain and no crate: the module is a few hundred bytes encoded here. Each exported function
keeps the signature it has in the real module and returns a constant: 1 ("ok") for
proxy_on_vm_start, proxy_on_configure and proxy_on_done, 0 (Continue) for everything else.
proxy_on_memory_allocate returns a fixed address in the module's memory (the no-op module never
asks the host for data, so the host never needs to hand any over).
"""

from __future__ import annotations

from pathlib import Path

WASM_MAGIC = b"\0asm\1\0\0\0"
I32, I64, F32, F64 = 0x7F, 0x7E, 0x7D, 0x7C
RETURNS_ONE = {"proxy_on_vm_start", "proxy_on_configure", "proxy_on_done"}
ALLOC_ADDRESS = 1024


def _leb(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_leb(b: bytes, i: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = b[i]
        i += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return result, i


def _read_name(b: bytes, i: int) -> tuple[str, int]:
    n, i = _read_leb(b, i)
    return b[i : i + n].decode(), i + n


def _vec(items: list[bytes]) -> bytes:
    return _leb(len(items)) + b"".join(items)


def _section(section_id: int, body: bytes) -> bytes:
    return bytes([section_id]) + _leb(len(body)) + body


def exported_functions(module: bytes) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """Name → (params, results) of every function a wasm module exports."""
    if module[:8] != WASM_MAGIC:
        raise ValueError("not a wasm module")
    types: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    func_types: list[int] = []  # imported functions first, then defined ones
    exports: list[tuple[str, int]] = []
    i = 8
    while i < len(module):
        section_id = module[i]
        size, i = _read_leb(module, i + 1)
        end, j = i + size, i
        if section_id == 1:  # types
            count, j = _read_leb(module, j)
            for _ in range(count):
                if module[j] != 0x60:
                    raise ValueError("unexpected type form")
                n, j = _read_leb(module, j + 1)
                params = tuple(module[j : j + n])
                j += n
                n, j = _read_leb(module, j)
                results = tuple(module[j : j + n])
                j += n
                types.append((params, results))
        elif section_id == 2:  # imports
            count, j = _read_leb(module, j)
            for _ in range(count):
                _, j = _read_name(module, j)
                _, j = _read_name(module, j)
                kind = module[j]
                j += 1
                if kind != 0:
                    raise ValueError("only function imports are supported")
                t, j = _read_leb(module, j)
                func_types.append(t)
        elif section_id == 3:  # functions
            count, j = _read_leb(module, j)
            for _ in range(count):
                t, j = _read_leb(module, j)
                func_types.append(t)
        elif section_id == 7:  # exports
            count, j = _read_leb(module, j)
            for _ in range(count):
                name, j = _read_name(module, j)
                kind = module[j]
                index, j = _read_leb(module, j + 1)
                if kind == 0:
                    exports.append((name, index))
        i = end
    return {name: types[func_types[index]] for name, index in exports}


def _constant(value_type: int, value: int) -> bytes:
    opcode = {I32: 0x41, I64: 0x42}.get(value_type)
    if opcode is None:
        raise ValueError(f"unsupported result type {value_type:#x}")
    return bytes([opcode]) + _leb(value)  # value is 0, 1 or 1024: no sign issue


def noop_module(signatures: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]) -> bytes:
    """A module exporting one memory and one constant-returning function per signature."""
    if not any(name.startswith("proxy_abi_version_") for name in signatures):
        raise ValueError("no proxy_abi_version_* export: not a proxy-wasm module")
    names = sorted(signatures)
    distinct = sorted(set(signatures.values()))
    type_index = {sig: n for n, sig in enumerate(distinct)}
    types = [b"\x60" + _leb(len(p)) + bytes(p) + _leb(len(r)) + bytes(r) for p, r in distinct]
    bodies = []
    for name in names:
        _, results = signatures[name]
        code = b""
        if results:
            if name == "proxy_on_memory_allocate":
                value = ALLOC_ADDRESS
            else:
                value = 1 if name in RETURNS_ONE else 0
            code = _constant(results[0], value)
        body = b"\x00" + code + b"\x0b"  # no locals, code, end
        bodies.append(_leb(len(body)) + body)
    exports = [b"\x06memory\x02\x00"] + [
        _leb(len(name)) + name.encode() + b"\x00" + _leb(n) for n, name in enumerate(names)
    ]
    return (
        WASM_MAGIC
        + _section(1, _vec(types))
        + _section(3, _vec([_leb(type_index[signatures[n]]) for n in names]))
        + _section(5, _vec([b"\x00\x02"]))  # memory: min 2 pages, no max
        + _section(7, _vec(exports))
        + _section(10, _vec(bodies))
    )


def write_noop_like(real_module: Path, out: Path) -> Path:
    """Writes the no-op twin of `real_module` (without `_initialize`: nothing to initialise)."""
    signatures = exported_functions(real_module.read_bytes())
    signatures.pop("_initialize", None)
    signatures.pop("_start", None)
    out.write_bytes(noop_module(signatures))
    return out


# Callbacks ngx_wasm_module calls unchecked (so the filter exports them as no-ops) but Envoy skips
# when a module does not export them (proxy-wasm-cpp-host checks each function pointer).
ENVOY_SKIPPABLE = (
    "proxy_on_request_body",
    "proxy_on_request_trailers",
    "proxy_on_response_headers",
    "proxy_on_response_body",
    "proxy_on_response_trailers",
    "proxy_on_done",
    "proxy_on_log",
    "proxy_on_delete",
)


def without_exports(module: bytes, names: tuple[str, ...]) -> bytes:
    """`module` with the export section rewritten without `names` (the code stays)."""
    if module[:8] != WASM_MAGIC:
        raise ValueError("not a wasm module")
    out, i = bytearray(module[:8]), 8
    while i < len(module):
        section_id = module[i]
        size, j = _read_leb(module, i + 1)
        end = j + size
        if section_id == 7:
            count, k = _read_leb(module, j)
            kept = []
            for _ in range(count):
                start = k
                name, k = _read_name(module, k)
                _, k = _read_leb(module, k + 1)
                if name not in names:
                    kept.append(module[start:k])
            out += _section(7, _vec(kept))
        else:
            out += module[i:end]
        i = end
    return bytes(out)


if __name__ == "__main__":
    import sys

    path = write_noop_like(Path(sys.argv[1]), Path(sys.argv[2]))
    print(f"wrote {path} ({path.stat().st_size} bytes)")
