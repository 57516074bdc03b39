"""The bare baseline of the gRPC benchmark: a ``grpc.aio`` server of the same service whose
ExecuteDeliberation answers at once (no validation, no Redis), in its own process:
``python -m benchmarks.echo_server --port N``."""

from __future__ import annotations

import argparse
import asyncio
import uuid

import grpc

from ray_executor.v1 import ray_executor_pb2 as pb
from ray_executor.v1 import ray_executor_pb2_grpc as rpc


class Echo(rpc.RayExecutorServiceServicer):
    async def ExecuteDeliberation(self, request: pb.ExecuteDeliberationRequest,
                                  context: grpc.aio.ServicerContext
                                  ) -> pb.ExecuteDeliberationResponse:
        return pb.ExecuteDeliberationResponse(deliberation_id=f"delib-{uuid.uuid4().hex}",
                                              status="submitted", message=request.task_id)


async def serve(port: int) -> None:
    server = grpc.aio.server()
    rpc.add_RayExecutorServiceServicer_to_server(Echo(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    asyncio.run(serve(parser.parse_args().port))


if __name__ == "__main__":
    main()
