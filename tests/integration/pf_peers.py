#!/usr/bin/python3
"""Test peers for test_portforward.py, run inside a container's network
namespace with `nsenter --net=/proc/PID/ns/net` (only the network namespace
matters for a forward; files stay the host's, so results land in host paths).

Modes (each prints "ready" on stdout once bound):
  echo PORT             TCP echo, many concurrent connections; half-close aware
  sink PORT OUT         per connection: hash everything until EOF, append "<bytes> <sha256>" to OUT
  source PORT BYTES     per connection: send BYTES of stream_block() data, then close
  halfclose PORT OUT    send 1 MiB, shut down writing, then hash what arrives until EOF into OUT
  udp PORT              datagrams: "Q<id>:<payload>" -> "R<id>:<sha256(payload)>";
                        "BULK <n> <seed>" -> n datagrams "<seq>:<pattern>" of varying sizes
"""
import asyncio
import hashlib
import socket
import sys
import threading


def stream_block(i):
    """Deterministic pseudo-random 1 MiB block number i (the same on both sides)."""
    seed = hashlib.sha256(b"pfc-block-%d" % (i % 64)).digest()
    base = (seed * (1 << 15))[: 1 << 20]
    return i.to_bytes(8, "big") + base[8:]


def bulk_payload(seq, seed):
    size = 1 + (seq * 7919 + seed) % 1400
    pat = hashlib.sha256(b"%d-%d" % (seed, seq)).digest()
    return (b"%d:" % seq) + (pat * (size // 32 + 1))[:size]


async def echo_conn(reader, writer):
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            writer.write(data)
            await writer.drain()
        writer.write_eof()
        await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def sink_conn(reader, writer, out):
    h = hashlib.sha256()
    n = 0
    try:
        while True:
            data = await reader.read(1 << 20)
            if not data:
                break
            h.update(data)
            n += len(data)
    except (ConnectionError, OSError) as e:
        with open(out, "a") as f:
            f.write(f"{n} error {e!r}\n")
        writer.close()
        return
    with open(out, "a") as f:
        f.write(f"{n} {h.hexdigest()}\n")
    writer.close()


async def source_conn(reader, writer, total):
    try:
        i = sent = 0
        while sent < total:
            b = stream_block(i)[: total - sent]
            writer.write(b)
            await writer.drain()
            sent += len(b)
            i += 1
        writer.write_eof()
        await writer.drain()
        await reader.read()  # until the client closes
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def halfclose_conn(reader, writer, out):
    try:
        writer.write(stream_block(0))
        await writer.drain()
        writer.write_eof()  # our side is done; keep reading
        h = hashlib.sha256()
        n = 0
        while True:
            data = await reader.read(65536)
            if not data:
                break
            h.update(data)
            n += len(data)
        with open(out, "a") as f:
            f.write(f"{n} {h.hexdigest()}\n")
    except (ConnectionError, OSError) as e:
        with open(out, "a") as f:
            f.write(f"error {e!r}\n")
    finally:
        writer.close()


async def tcp_main(mode, port, arg):
    handlers = {
        "echo": echo_conn,
        "sink": lambda r, w: sink_conn(r, w, arg),
        "source": lambda r, w: source_conn(r, w, int(arg)),
        "halfclose": lambda r, w: halfclose_conn(r, w, arg),
    }
    server = await asyncio.start_server(handlers[mode], "127.0.0.1", port, backlog=2048, limit=1 << 20)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


def udp_main(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.bind(("127.0.0.1", port))
    print("ready", flush=True)
    while True:
        data, peer = s.recvfrom(65536)
        if data.startswith(b"Q"):
            qid, _, payload = data[1:].partition(b":")
            s.sendto(b"R" + qid + b":" + hashlib.sha256(payload).hexdigest().encode(), peer)
        elif data.startswith(b"BULK "):
            _, n, seed = data.split()
            n, seed = int(n), int(seed)

            def bulk(peer=peer, n=n, seed=seed):
                import time
                for seq in range(n):
                    s.sendto(bulk_payload(seq, seed), peer)
                    if seq % 16 == 15:
                        time.sleep(0.002)  # paced: the test checks integrity, not loss under overload
                for _ in range(3):
                    s.sendto(b"END", peer)

            threading.Thread(target=bulk, daemon=True).start()
        elif data.startswith(b"BIG "):
            size = int(data.split()[1])
            s.sendto(hashlib.sha256(b"big").digest() * (size // 32), peer)


if __name__ == "__main__":
    mode, port = sys.argv[1], int(sys.argv[2])
    arg = sys.argv[3] if len(sys.argv) > 3 else None
    if mode == "udp":
        udp_main(port)
    else:
        asyncio.run(tcp_main(mode, port, arg))
