#!/bin/sh
# Runs INSIDE the test container as one exec session (label set by
# selinux-launch): waits for the host to publish the sibling session's pid and
# pty, then tries to reach it and the container's files. One line per probe:
#   PROBE <me> <name>: ALLOWED|DENIED <output>
me=$1; peer=$2
i=0
while [ ! -s /tmp/peer-$peer ]; do
  sleep 0.2; i=$((i + 1))
  [ $i -gt 600 ] && { echo "PROBE $me setup: DENIED no peer info"; exit 1; }
done
read ppid ppty < /tmp/peer-$peer
echo "PROBE $me self: ALLOWED $(tr -d '\0' < /proc/self/attr/current) peer=$ppid pty=$ppty"
p() {
  if out=$(sh -c "$2" 2>&1); then v=ALLOWED; else v=DENIED; fi
  echo "PROBE $me $1: $v $(echo "$out" | tr '\n\0' '  ' | cut -c1-160)"
}
p read-peer-environ "cat /proc/$ppid/environ > /dev/null"
p read-peer-fd "ls /proc/$ppid/fd"
p signal-peer "kill -USR1 $ppid"
p write-peer-pty "echo hello-from-$me > $ppty"
p write-own-pty "echo own-pty-$me >&3"
p read-container-init-environ "grep -c SECRET=container /proc/1/environ"
p read-container-file "cat /data/ctr-file"
p write-container-file "echo written-by-$me >> /data/ctr-file"
p create-file "echo x > /tmp/new-$me"
echo done > /tmp/done-$me.tmp && mv /tmp/done-$me.tmp /tmp/done-$me
exec sleep 1000
