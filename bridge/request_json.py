"""The JSON form of ``ExecuteDeliberationRequest`` as producers publish it on NATS.

``parse_request`` reads proto3 JSON (original or camelCase names) and refuses unknown fields,
so a typo is reported rather than dropped. A document with original field names and values
of exactly their fields' Python types is built with the message constructor, 20 times faster
than ``json_format.ParseDict``; anything else (camelCase, null, numbers as strings, 64-bit
integers, enums, values out of range) takes ``ParseDict``, which also words the error. A
hypothesis test (``tests/bridge/test_fuzz.py``) checks both read every document alike.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
from typing import Any, Dict, Tuple

from google.protobuf import descriptor_pb2, json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from bridge.validation import InvalidRequest
from ray_executor.v1 import ray_executor_pb2 as pb

_FIELD_RE = re.compile(r'Failed to parse (\S+) field|no field named "([^"]+)"')


def parse_request(data: bytes, limit: int) -> pb.ExecuteDeliberationRequest:
    """The request in ``data`` (at most ``limit`` bytes), or ``InvalidRequest`` naming the
    field at fault (``payload`` when the document as a whole is)."""
    if len(data) > limit:
        raise InvalidRequest("request", f"{len(data)} bytes, more than {limit}")
    try:
        document = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise InvalidRequest("payload", "not UTF-8 text") from None
    except (ValueError, RecursionError) as exc:
        raise InvalidRequest("payload", f"not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise InvalidRequest("payload", "must be a JSON object")
    if _plain(document, pb.ExecuteDeliberationRequest.DESCRIPTOR):
        with contextlib.suppress(ValueError, TypeError):
            return pb.ExecuteDeliberationRequest(**document)
    try:
        return json_format.ParseDict(document, pb.ExecuteDeliberationRequest(),
                                     ignore_unknown_fields=False)
    except (json_format.Error, ValueError, TypeError, RecursionError) as exc:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        field = ".".join(a or b for a, b in _FIELD_RE.findall(text)) or "payload"
        raise InvalidRequest(field, text) from None


_PYTHON_TYPES = {
    FieldDescriptor.CPPTYPE_STRING: str, FieldDescriptor.CPPTYPE_BOOL: bool,
    FieldDescriptor.CPPTYPE_INT32: int, FieldDescriptor.CPPTYPE_UINT32: int,
    FieldDescriptor.CPPTYPE_DOUBLE: float, FieldDescriptor.CPPTYPE_FLOAT: float,
}  # 64-bit integers and enums have JSON forms of their own: they always take ParseDict


def _plain(document: Dict[str, Any], descriptor: Descriptor) -> bool:
    """Whether ``document`` uses only fields of ``descriptor`` that ``_shapes`` lists, each
    value in exactly that shape."""
    shapes = _shapes(descriptor)
    for name, value in document.items():
        shape = shapes.get(name)
        if shape is None:
            return False
        kind, inner = shape
        if kind is _SCALAR:
            if type(value) is not inner:
                return False
        elif kind is _MESSAGE:
            if type(value) is not dict or not _plain(value, inner):
                return False
        elif kind is _MESSAGES:
            if type(value) is not list or not all(
                    type(v) is dict and _plain(v, inner) for v in value):
                return False
        elif type(value) is not dict or not all(type(v) is str for v in value.values()):
            return False  # _MAP
    return True


_SCALAR, _MESSAGE, _MESSAGES, _MAP = "scalar", "message", "repeated message", "map"


@functools.cache
def _shapes(descriptor: Descriptor) -> Dict[str, Tuple[str, Any]]:
    """The fields of ``descriptor`` plain JSON can hand to the constructor, by original name,
    each as ``(kind, detail)``: a scalar and its Python type, a message or repeated message
    and its descriptor, a ``map<string, string>``. Left out, so they always take ParseDict:
    64-bit integers, enums, repeated scalars, other maps, well-known types. Worked out once
    per message type (the descriptor's own ``label`` is deprecated: repeated-ness comes from
    its proto form)."""
    proto = descriptor_pb2.DescriptorProto()
    descriptor.CopyToProto(proto)
    repeated = {field.name for field in proto.field
                if field.label == descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED}
    shapes: Dict[str, Tuple[str, Any]] = {}
    for name, field in descriptor.fields_by_name.items():
        message = field.message_type
        if message is None:
            if name not in repeated and field.cpp_type in _PYTHON_TYPES:
                shapes[name] = (_SCALAR, _PYTHON_TYPES[field.cpp_type])
        elif message.GetOptions().map_entry:
            if all(message.fields_by_name[part].cpp_type == FieldDescriptor.CPPTYPE_STRING
                   for part in ("key", "value")):
                shapes[name] = (_MAP, None)
        elif not message.full_name.startswith("google.protobuf."):
            shapes[name] = (_MESSAGES if name in repeated else _MESSAGE, message)
    return shapes
