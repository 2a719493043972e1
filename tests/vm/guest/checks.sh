#!/bin/sh
# The SELinux checks, run in the shim's domain (shimlet_t) by the VM's PID 1.
# Prints "CHECK <name>: PASS|FAIL <detail>"; tests/integration/test_selinux_vm.py
# requires every expected check to be present and PASS.
L=/usr/local/libexec/shimlet/selinux-launch
B=/var/lib/shimlet-vm/ctr
CT=system_u:system_r:shimlet_container_t
ctx() { tr -d '\0' < /proc/$1/attr/current; }
check() { # name, status (0 = pass), detail
  if [ "$2" = 0 ]; then echo "CHECK $1: PASS $3"; else echo "CHECK $1: FAIL $3"; fi
}
ok() { "$@" >/dev/null 2>&1; echo $?; }
wait_for() { # file, seconds, pid that must stay alive
  i=0; while [ ! -s "$1" ] && [ $i -lt $(($2 * 10)) ] && kill -0 $3 2>/dev/null; do sleep 0.1; i=$((i + 1)); done
}
cleanup() {
  for p in $SESSION_PIDS; do kill -9 $p 2>/dev/null; done
  for c in ctr1 ctr2 ctr3; do runc --root /run/runc delete -f $c >/dev/null 2>&1; done
}
trap cleanup EXIT

echo "checks: running as $(ctx self)"
check enforcing "$(ok test "$(cat /sys/fs/selinux/enforce)" = 1)" "enforce=$(cat /sys/fs/selinux/enforce)"
st=$($L --status 2>&1)
check backend-status "$(ok test "$st" = "SELinux enforcing")" "$st"
mods=$(semodule -l 2>&1)
check module-loaded "$(ok sh -c "echo '$mods' | grep -qx shimlet")" "$(echo "$mods" | grep shimlet | tr '\n' ' ')"
me=$(ctx self)
check shim-domain "$(ok sh -c "echo '$me' | grep -q ':shimlet_t:'")" "$me"
fl=$(ls -Z $L)
check exec-file-context "$(ok sh -c "echo '$fl' | grep -q ':shimlet_exec_t:'")" "$fl"

# Two containers started by runc in the container domain with distinct MCS pairs.
mkdir -p /run/runc
for c in ctr1 ctr2; do
  lvl=$(cat $B/$c/level)
  chcon -R -h system_u:object_r:shimlet_container_file_t:$lvl $B/$c/rootfs
  runc --root /run/runc run -d --pid-file /run/$c.pid -b $B/$c $c </dev/null >/run/$c.log 2>&1
  rc=$?
  pid=$(cat /run/$c.pid 2>/dev/null)
  label=$(ctx "$pid" 2>/dev/null)
  check container-$c-label "$(ok test $rc = 0 -a "$label" = "$CT:$lvl")" "rc=$rc pid=$pid label=$label $(head -c 300 /run/$c.log)"
done
C1=$(cat /run/ctr1.pid)
R=$B/ctr1/rootfs

# Two concurrent exec sessions of ctr1, each launched like the shim does it.
for s in A B; do
  peer=B; [ $s = B ] && peer=A
  $L --pid $C1 --pty --socket --env SECRET=session-$s -- sh /probe.sh $s $peer >/run/s$s.out 2>/run/s$s.err &
  SESSION_PIDS="$SESSION_PIDS $!"
  eval "LP$s=$!"
done
field() { sed -n "s/^selinux-launch: container=.* $2=\([^ ]*\).*/\1/p" "$1"; }
for s in A B; do
  eval "lp=\$LP$s"
  i=0; while ! grep -q ' pid=' /run/s$s.err 2>/dev/null && [ $i -lt 200 ] && kill -0 $lp 2>/dev/null; do
    sleep 0.1; i=$((i + 1))
  done
  eval "P$s=\$(field /run/s$s.err pid)"
  eval "S$s=\$(field /run/s$s.err session)"
  eval "Y$s=\$(sed -n 's/^selinux-launch: pty=\([^ ]*\) .*/\1/p' /run/s$s.err)"
done
echo "session A: host pid=$PA label=$SA pty=$YA"; cat /run/sA.err
echo "session B: host pid=$PB label=$SB pty=$YB"; cat /run/sB.err
for s in A B; do
  eval p=\$P$s l=\$S$s
  live=$(ctx "$p" 2>/dev/null)
  check session-$s-label "$(ok sh -c "echo '$live' | grep -Eqx '$CT:s0:c1,c2,c10[0-2][0-9]' && test '$live' = '$l'")" \
    "process=$live launcher=$l"
  pl=$(sed -n 's/^selinux-launch: pty=[^ ]* label=//p' /run/s$s.err)
  check session-$s-pty-label "$(ok test -n "$l" -a "$pl" = "system_u:object_r:devpts_t:${l#$CT:}")" "$pl"
  sl=$(sed -n 's/^selinux-launch: socket label=//p' /run/s$s.err)
  check session-$s-socket-label "$(ok test -n "$l" -a "$sl" = "$l")" "$sl"
done
check sessions-distinct "$(ok test -n "$SA" -a "$SA" != "$SB")" "A=$SA B=$SB"

# Publish each session's in-container pid and pty to the other, at the container's level.
for s in A B; do
  eval p=\$P$s y=\$Y$s
  ns=$(awk '/^NSpid/{print $NF}' /proc/$p/status)
  echo "$ns $y" > $R/tmp/peer-$s.tmp && mv $R/tmp/peer-$s.tmp $R/tmp/peer-$s
  chcon -h system_u:object_r:shimlet_container_file_t:s0:c1,c2 $R/tmp/peer-$s
  eval N$s=$ns
done
wait_for $R/tmp/done-A 60 $LPA
wait_for $R/tmp/done-B 60 $LPB
cat /run/sA.out /run/sB.out
probe() { # session, probe name, expected verdict
  line=$(grep "^PROBE $1 $2: " /run/s$1.out | head -1)
  case "$line" in *": $3"*) st=0 ;; *) st=1 ;; esac  # (output may contain quotes: no sh -c here)
  check "session-$1-$2" $st "${line:-no output (see s$1.err: $(tr '\n' ' ' < /run/s$1.err))}"
}
for s in A B; do
  probe $s read-peer-environ DENIED
  probe $s read-peer-fd DENIED
  probe $s signal-peer DENIED
  probe $s write-peer-pty DENIED
  probe $s write-own-pty ALLOWED
  probe $s read-container-init-environ ALLOWED
  probe $s read-container-file ALLOWED
  probe $s write-container-file ALLOWED
  probe $s create-file ALLOWED
  f=$(ls -Z $R/tmp/new-$s 2>&1)
  echo "note: a file created by session $s is labelled: $f"
done
# Both sessions wrote the container's file; the host-side view sees both lines.
check container-file-written "$(ok sh -c "grep -q written-by-A $R/data/ctr-file && grep -q written-by-B $R/data/ctr-file")" \
  "$(tr '\n' '|' < $R/data/ctr-file)"

# The container's own processes (runc exec: the container's label) do not dominate a session.
out=$(runc --root /run/runc exec ctr1 sh -c "cat /proc/self/attr/current; echo; cat /proc/$NA/environ" 2>&1)
case "$out" in *SECRET=session*) st=1 ;; *"Permission denied"*) st=0 ;; *) st=1 ;; esac
check container-cannot-read-session $st \
  "$(echo "$out" | tr '\0\n' ' |')"

# Denied accesses are audited (AVC records naming both session labels).
avc=$(dmesg | grep -E 'avc: +denied')
for pair in "A $SA $SB" "B $SB $SA"; do
  set -- $pair
  n=$(echo "$avc" | grep -c "scontext=$2 tcontext=$3 ")
  check "avc-session-$1-denied" "$(ok test "$n" -gt 0)" "$n AVC denials scontext=$2 tcontext=$3"
done
n=$(echo "$avc" | grep "{ signal }" | grep -c "scontext=$CT:s0:c1,c2,c10")
check avc-signal "$(ok test "$n" -gt 0)" "$n signal denials between sessions"

# ---------------------------------------------------------------------------
# The real path: runc starts ctr3 with shimlet-hook (createRuntime) which
# starts the shim; `shimctl --local exec` sessions go through the shim and
# shimlet-session (its local socket, ticket, nsenter), which sets the superset label with
# setexeccon. The hook config turns Landlock off: the isolation is SELinux's.
busybox ip link set lo up 2>/dev/null || ip link set lo up 2>/dev/null
S=/usr/local/bin/shimctl
R3=$B/ctr3/rootfs
L3=$(cat $B/ctr3/level)
chcon -R -h system_u:object_r:shimlet_container_file_t:$L3 $R3
runc --root /run/runc run -d --pid-file /run/ctr3.pid -b $B/ctr3 ctr3 </dev/null >/run/ctr3.log 2>&1
rc=$?
reg=/run/shimlet/ctr3/registration.json
check real-hook-registered "$(ok test $rc = 0 -a -s $reg)" \
  "rc=$rc $(head -c 300 /run/ctr3.log) $(tail -c 600 /run/shimlet/hook.log 2>/dev/null)"
C3=$(cat /run/ctr3.pid 2>/dev/null)
shimpid=$(sed -n 's/.*"shim_pid": *\([0-9]*\).*/\1/p' $reg 2>/dev/null)
sd=$(ctx "$shimpid" 2>/dev/null)
check real-shim-domain "$(ok sh -c "echo '$sd' | grep -q ':shimlet_t:'")" "shim pid=$shimpid label=$sd"
for s in A B; do
  peer=B; [ $s = B ] && peer=A
  # Each session reports its in-container pid, tty and label (file at its own level: the host relays it).
  $S --local exec -t ctr3 -- sh -c \
    "echo \"\$\$ \$(tty) \$(tr -d '\\0' < /proc/self/attr/current)\" > /tmp/self-$s; exec sh /probe.sh $s $peer 3>&1" \
    </dev/null >/run/r$s.out 2>/run/r$s.err &
  SESSION_PIDS="$SESSION_PIDS $!"
  eval "RP$s=$!"
done
for s in A B; do
  eval "rp=\$RP$s"
  wait_for $R3/tmp/self-$s 60 $rp
  read n y l < $R3/tmp/self-$s
  eval "RN$s=$n RY$s=$y RS$s=$l"
  echo "real session $s: pid=$n tty=$y label=$l $(tr '\n' ' ' < /run/r$s.err)"
  check real-session-$s-label "$(ok sh -c "echo '$l' | grep -Eqx '$CT:$L3,c10[0-2][0-9]'")" "label=$l"
  pl=$(ls -Z /proc/$C3/root$y 2>&1 | cut -d' ' -f1)
  check real-session-$s-pty-label "$(ok test -n "$l" -a "$pl" = "system_u:object_r:devpts_t:${l#$CT:}")" "$pl"
done
check real-sessions-distinct "$(ok test -n "$RSA" -a "$RSA" != "$RSB")" "A=$RSA B=$RSB"
for s in A B; do
  eval n=\$RN$s y=\$RY$s
  echo "$n $y" > $R3/tmp/peer-$s.tmp && mv $R3/tmp/peer-$s.tmp $R3/tmp/peer-$s
  chcon -h system_u:object_r:shimlet_container_file_t:$L3 $R3/tmp/peer-$s
done
wait_for $R3/tmp/done-A 90 $RPA
wait_for $R3/tmp/done-B 90 $RPB
tr -d '\r' < /run/rA.out; tr -d '\r' < /run/rB.out
rprobe() { # session, probe name, expected verdict
  line=$(tr -d '\r' < /run/r$1.out | grep "^PROBE $1 $2: " | head -1)
  case "$line" in *": $3"*) st=0 ;; *) st=1 ;; esac
  check "real-session-$1-$2" $st "${line:-no output (see r$1.err: $(tr '\n' ' ' < /run/r$1.err))}"
}
for s in A B; do
  rprobe $s read-peer-environ DENIED
  rprobe $s read-peer-fd DENIED
  rprobe $s signal-peer DENIED
  rprobe $s write-peer-pty DENIED
  rprobe $s write-own-pty ALLOWED
  rprobe $s read-container-init-environ ALLOWED
  rprobe $s read-container-file ALLOWED
  rprobe $s write-container-file ALLOWED
  rprobe $s create-file ALLOWED
done
check real-container-file-written "$(ok sh -c "grep -q written-by-A $R3/data/ctr-file && grep -q written-by-B $R3/data/ctr-file")" \
  "$(tr '\n' '|' < $R3/data/ctr-file)"
out=$(runc --root /run/runc exec ctr3 sh -c "cat /proc/$RNA/environ" 2>&1)
case "$out" in *SECRET=*) st=1 ;; *"Permission denied"*) st=0 ;; *) st=1 ;; esac
check real-container-cannot-read-session $st "$(echo "$out" | tr '\0\n' ' |')"
# (nlohmann/json writes keys sorted: isolation{landlock, selinux} before msg)
sl=$(grep -c '"landlock":"off".*"selinux":"system_u:system_r:shimlet_container_t:[^"]*".*"msg":"exec.start"' \
  /run/shimlet/ctr3/shim.log)
check real-isolation-logged "$(ok test "$sl" -ge 2)" "$sl exec.start lines with landlock off + session label"
avc=$(dmesg | grep -E 'avc: +denied')
for pair in "A $RSA $RSB" "B $RSB $RSA"; do
  set -- $pair
  n=$(echo "$avc" | grep -c "scontext=$2 tcontext=$3 ")
  check "real-avc-session-$1-denied" "$(ok test "$n" -gt 0)" "$n AVC denials scontext=$2 tcontext=$3"
done
echo "=== real path shim.log:"; tail -n 20 /run/shimlet/ctr3/shim.log 2>/dev/null | cut -c1-400
echo "checks: done"
