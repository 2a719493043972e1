#!/bin/sh
# PID 1 of the SELinux test VM (no systemd): load the policy, run the checks
# in the shim's domain, print the AVC denials, power off. Everything goes to
# the serial console, which tests/vm/build_image.py --boot collects.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc 2>/dev/null
mount -t sysfs sysfs /sys 2>/dev/null
mount -t devtmpfs devtmpfs /dev 2>/dev/null
echo "=== VM T0 uptime=$(cut -d' ' -f1 /proc/uptime) lsm=$(cat /sys/kernel/security/lsm 2>/dev/null)"
load_policy -i || echo "=== load_policy failed rc=$?"
# AVC records reach the console through printk's rate limit: widen it so none is dropped.
echo 10000 > /proc/sys/kernel/printk_ratelimit_burst
mount -t tmpfs -o mode=0755 tmpfs /run
mount -t tmpfs tmpfs /tmp
mkdir -p /dev/pts /dev/shm /sys/fs/cgroup
mount -t devpts devpts /dev/pts
mount -t cgroup2 cgroup2 /sys/fs/cgroup
echo "=== policy loaded: enforce=$(cat /sys/fs/selinux/enforce) mls=$(cat /sys/fs/selinux/mls) pid1=$(tr -d '\0' < /proc/self/attr/current)"
runcon system_u:system_r:shimlet_t:s0 /bin/sh /root/vmtest/checks.sh 2>&1
echo "=== AVC denials:"
dmesg | grep -E 'avc: +denied' | sed 's/.*avc:/avc:/' | sort | uniq -c | sort -rn
echo "=== VM T_END uptime=$(cut -d' ' -f1 /proc/uptime)"
sync
echo o > /proc/sysrq-trigger
sleep 30
