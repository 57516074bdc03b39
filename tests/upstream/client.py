"""An upstream client of one proto generation, in a process of its own.

Run as ``python client.py GENERATED_DIR TARGET``, where GENERATED_DIR holds the
``ray_executor_pb2``/``ray_executor_pb2_grpc`` modules protoc wrote from one generation's
``ray_executor.proto`` (upstream's clients import them under those names). Each generation gets
its own process because both define messages with the same full names (``ray_executor.v1`` is
also ours), which one protobuf descriptor pool cannot hold twice.

Reads a JSON list of steps on stdin and writes a JSON list of results on stdout:

- ``{"rpc": NAME, "request": {...}}`` calls NAME through the generation's stub with the
  request given in protobuf's JSON form; the result is the reply as a dict (field names as in
  the .proto, defaults included), or ``{"error": CODE, "details": ...}``;
- ``{"decode": MESSAGE, "base64": ...}`` decodes bytes as that message type of this generation.
"""

import base64
import json
import sys

import grpc
from google.protobuf import json_format


def main() -> int:
    generated, target = sys.argv[1], sys.argv[2]
    sys.path.insert(0, generated)
    import ray_executor_pb2 as pb  # found once the path is known
    import ray_executor_pb2_grpc as pb_grpc

    def as_dict(message: object) -> dict:
        return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                         always_print_fields_with_no_presence=True)

    results = []
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.RayExecutorServiceStub(channel)
        service = pb.DESCRIPTOR.services_by_name["RayExecutorService"]
        for step in json.load(sys.stdin):
            if "decode" in step:
                message = getattr(pb, step["decode"]).FromString(base64.b64decode(step["base64"]))
                results.append(as_dict(message))
                continue
            rpc = service.methods_by_name[step["rpc"]]
            request = json_format.ParseDict(step["request"], getattr(pb, rpc.input_type.name)())
            try:
                results.append(as_dict(getattr(stub, rpc.name)(request, timeout=30)))
            except grpc.RpcError as exc:
                results.append({"error": exc.code().name, "details": exc.details()})
    json.dump(results, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
