"""The gRPC floor of a fan-out on this machine: a bare grpc.aio server (Meshline's server
options, no xDS logic) writes one message to each of N streams and reads each stream's
small reply, the way one endpoint change reaches N delta proxies and comes back as N ACKs.
Its CPU per round is what any per-stream Python gRPC server pays before doing any work; the
suite reports Meshline's change cost against it (P2). Does network I/O on loopback only.

    python bench/floor.py --clients 1000 --rounds 20 --payload 600
prints one JSON line: {"cpu": [s per round], "lat": [s per round], ...}. It runs the server
in this process and the clients in a child process, like bench/run.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # (before grpc is imported)
import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import die_with_parent

from controlplane.xds.server import start_grpc  # the same server options as Meshline

METHOD = "/meshline.bench.Floor/Stream"


def _ident(b: bytes) -> bytes:
    return b


async def server(args: argparse.Namespace) -> dict[str, Any]:
    wakes: list[asyncio.Event] = []
    acks = 0
    round_done = asyncio.Event()
    payload = b"x" * args.payload

    async def stream(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
        # The same shape as Meshline's streams: a reader task takes the replies, this
        # coroutine sleeps until woken and then writes.
        wake = asyncio.Event()
        wakes.append(wake)
        closed = False

        async def read() -> None:
            nonlocal acks, closed
            try:
                async for _ in requests:
                    acks += 1
                    if acks == len(wakes):
                        round_done.set()
            except grpc.aio.AioRpcError:
                pass
            closed = True  # the client went away: end this RPC normally
            wake.set()

        reader = asyncio.create_task(read())
        try:
            while True:
                await wake.wait()
                wake.clear()
                if closed:
                    return
                await context.write(payload)
        finally:
            reader.cancel()

    handler = grpc.method_handlers_generic_handler("meshline.bench.Floor", {
        "Stream": grpc.stream_stream_rpc_method_handler(stream, request_deserializer=_ident,
                                                        response_serializer=_ident)})
    srv, port = await start_grpc("127.0.0.1:0", [handler])
    child = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--client", "--target", f"127.0.0.1:{port}", "--clients", str(args.clients),
        "--reply", str(args.reply),
        stdout=asyncio.subprocess.DEVNULL, preexec_fn=die_with_parent)
    try:
        deadline = time.monotonic() + 120
        while len(wakes) < args.clients:
            if time.monotonic() > deadline or child.returncode is not None:
                raise RuntimeError(f"only {len(wakes)} of {args.clients} client streams connected")
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        cpu: list[float] = []
        lat: list[float] = []
        for _ in range(args.rounds):
            acks = 0
            round_done.clear()
            c0, t0 = time.process_time(), time.perf_counter()
            for w in wakes:
                w.set()
            await asyncio.wait_for(round_done.wait(), 60)
            lat.append(time.perf_counter() - t0)
            await asyncio.sleep(0.05)  # let the last writes' completions land in this round
            cpu.append(time.process_time() - c0)
            await asyncio.sleep(0.2)
        return {"clients": args.clients, "payload": args.payload, "reply": args.reply, "cpu": cpu, "lat": lat}
    finally:
        child.kill()
        await child.wait()
        await srv.stop(2.0)  # the streams end as their clients go


async def clients(args: argparse.Namespace) -> None:
    options = [("grpc.use_local_subchannel_pool", 1), ("grpc.http2.bdp_probe", 0)]
    reply = b"a" * args.reply  # 80: about a delta ACK (type URL + nonce); a SotW EDS ACK repeats every name

    async def one() -> None:
        channel = grpc.aio.insecure_channel(args.target, options=options)
        call = channel.stream_stream(METHOD, request_serializer=_ident, response_deserializer=_ident)()
        while (await call.read()) is not grpc.aio.EOF:
            await call.write(reply)

    await asyncio.gather(*(one() for _ in range(args.clients)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--payload", type=int, default=600, help="bytes per message to each stream")
    p.add_argument("--reply", type=int, default=80,
                   help="bytes of each stream's reply (80: a delta ACK; a SotW EDS ACK of 1,000 names is ~48,000)")
    p.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--target", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.client:
        try:
            asyncio.run(clients(args))
        except (KeyboardInterrupt, grpc.aio.AioRpcError):
            pass
        return
    print(json.dumps(asyncio.run(server(args))), flush=True)


if __name__ == "__main__":
    main()
