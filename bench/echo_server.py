"""A TCP echo server on 127.0.0.1:PORT for the port-forward benchmark: one
thread, selectors, any number of connections (bounded by RLIMIT_NOFILE).
Usage: python3 echo_server.py PORT"""
import selectors
import socket
import sys

port = int(sys.argv[1])
sel = selectors.DefaultSelector()
ls = socket.socket()
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("127.0.0.1", port))
ls.listen(4096)
ls.setblocking(False)
sel.register(ls, selectors.EVENT_READ)
while True:
    for key, _ in sel.select():
        if key.fileobj is ls:
            try:
                c, _ = ls.accept()
            except BlockingIOError:
                continue
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sel.register(c, selectors.EVENT_READ)
            continue
        c = key.fileobj
        try:
            d = c.recv(65536)  # readable: does not block
            if d:
                c.sendall(d)  # small echoes: the socket buffer takes them at once
                continue
        except OSError:
            pass
        sel.unregister(c)
        c.close()
