#!/usr/bin/python3 -I
"""Stand-in for shimlet-session used by test_hook.py to check the shim's side
of its contracts (docs/design.md "shim -> session fd contract" and
"Pre-authentication gate"). TCP connections reach it as the gate: the shim
execs it with `--gate IDLE_S` and the listening socket on fd 3, the gate
control socket on fd 4 (shim/gate_proto.h). It accepts connections and
reads one command line from each:

  report  -> writes a JSON description of its fds (as exec'd), argv, env,
             mounts and the shim's answers to admission requests ('S': the
             same jti twice, then a malformed one), then exits 0
  hold    -> asks the shim to admit a session ('S'); on 'A' forks: the
             parent holds the connection until killed (the "session"), the
             child takes over as the gate ('G' + its pidfd) and accepts the
             next connection; on another answer writes it and closes
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
        return {"family": int(s.family), "type": int(s.type),
                "listening": bool(s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))}
    finally:
        s.close()


def admit(ctl, digest):
    ctl.send(b"S" + digest + struct.pack("<q", int(time.time()) + 60))
    return ctl.recv(16).decode()


def read_command(conn):
    conn.settimeout(10)
    cmd = b""
    while not cmd.endswith(b"\n") and len(cmd) < 64:
        b = conn.recv(1)
        if not b:
            break
        cmd += b
    return cmd.strip()


def take_over(ctl):
    """Tell the shim that this process is the gate now ('G' + its pidfd)."""
    pidfd = os.pidfd_open(os.getpid())
    socket.send_fds(ctl, [b"G" + struct.pack("<i", os.getpid())], [pidfd])
    os.close(pidfd)


def main():
    fds = describe_fds()  # before opening anything ourselves
    listener = socket.socket(fileno=3)
    listener.setblocking(True)
    ctl = socket.socket(fileno=4)
    while True:
        conn, _ = listener.accept()
        cmd = read_command(conn)
        if not cmd:  # a bare connect (a probe): next
            conn.close()
            continue
        if cmd == b"hold":
            answer = admit(ctl, os.urandom(32))
            if answer != "A":
                conn.sendall(answer.encode() + b"\n")
                conn.close()
                continue
            if os.fork() == 0:  # the new gate
                conn.close()
                take_over(ctl)
                continue
            listener.close()  # the session
            ctl.close()
            conn.sendall(b"holding\n")
            while True:
                time.sleep(3600)
        me = os.path.realpath(sys.argv[0])
        try:
            open(me, "a").close()
            write_err = None
        except OSError as e:
            write_err = e.errno
        with open("/proc/self/mountinfo") as f:
            mounts = [line.split() for line in f]
        my_mount = [m for m in mounts if m[4] == me]
        digest = os.urandom(32)
        # Once admitted, this process is a session: the shim admits only from
        # the gate it knows by its pidfd, so a second admission is refused
        # until a gate takes over.
        replay = [admit(ctl, digest), admit(ctl, os.urandom(32))]
        take_over(ctl)
        replay.append(admit(ctl, digest))
        ctl.send(b"S" + b"short")
        replay.append(ctl.recv(16).decode())
        report = {
            "argv": sys.argv,
            "fds": fds,
            "fd3": sock_info(3),
            "fd4": sock_info(4),
            "env": dict(os.environ),
            "replay": replay,
            "write_self_errno": write_err,
            "self_mount_opts": my_mount[-1][5] if my_mount else None,
            "ppid": os.getppid(),
            "cwd": os.getcwd(),
        }
        conn.sendall(json.dumps(report).encode() + b"\n")
        conn.close()
        return


if __name__ == "__main__":
    main()
