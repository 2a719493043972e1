#!/usr/bin/python3 -I
"""Stand-in for shimlet-session used by test_hook.py to check the shim's side
of the shim -> session fd contract (docs/design.md). The shim execs it with
the contract's fds; it reads one command line from the connection (fd 3):

  report  -> writes a JSON description of its fds, argv, env, mounts and the
             replay-cache answers it got, then exits 0
  hold    -> stays alive until killed (session-limit / shutdown tests)
"""
import json
import os
import socket
import struct
import sys
import time


def describe_fds():
    fds = {}
    for fd in range(0, 256):
        try:
            fds[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass
    return fds


def sock_info(fd):
    try:
        s = socket.socket(fileno=os.dup(fd))
    except OSError as e:
        return {"error": str(e)}
    try:
        return {"family": int(s.family), "type": int(s.type)}
    finally:
        s.close()


def replay(ctl):
    out = []
    digest = os.urandom(32)
    req = digest + struct.pack("<q", int(time.time()) + 60)
    for payload in (req, req, b"short"):
        ctl.send(payload)
        out.append(ctl.recv(16).decode())
    return out


def main():
    fds = describe_fds()  # before opening anything ourselves
    conn = socket.socket(fileno=3)
    conn.settimeout(10)
    cmd = b""
    while not cmd.endswith(b"\n") and len(cmd) < 64:
        b = conn.recv(1)
        if not b:
            break
        cmd += b
    cmd = cmd.strip()
    if cmd == b"hold":
        conn.sendall(b"holding\n")
        while True:
            time.sleep(3600)
    ctl = socket.socket(fileno=4)
    me = os.path.realpath(sys.argv[0])
    try:
        open(me, "a").close()
        write_err = None
    except OSError as e:
        write_err = e.errno
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split() for line in f]
    my_mount = [m for m in mounts if m[4] == me]
    report = {
        "argv": sys.argv,
        "fds": fds,
        "fd3": sock_info(3),
        "fd4": sock_info(4),
        "env": dict(os.environ),
        "replay": replay(ctl),
        "write_self_errno": write_err,
        "self_mount_opts": my_mount[-1][5] if my_mount else None,
        "ppid": os.getppid(),
        "cwd": os.getcwd(),
    }
    conn.sendall(json.dumps(report).encode() + b"\n")
    conn.close()


if __name__ == "__main__":
    main()
