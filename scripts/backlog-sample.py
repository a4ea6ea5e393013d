#!/usr/bin/env python3
"""Once a second, what the machine does under a backlog run (scripts/backlog-run.sh
with SAMPLE=1): the kernel's dirty and writeback page totals, the disk's write rate,
and the brokers' CPU split into RocksDB's background threads (flush, compaction:
threads named rocksdb:*) and everything else. Lines are tab-separated with a header,
so a dip in the produce rate can be matched to the second it happened.

Usage: backlog-sample.py PIDFILE... (stops when every process has exited or after
--max-seconds)."""
import argparse
import os
import sys
import time

TICK = os.sysconf("SC_CLK_TCK")


def meminfo():
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, v = line.split(":", 1)
            if k in ("Dirty", "Writeback"):
                out[k] = int(v.split()[0])
    return out


def sectors_written():
    # Whole disks only (/sys/block lists no partitions), so nothing counts twice.
    disks = {d for d in os.listdir("/sys/block") if not d.startswith(("loop", "ram", "dm-"))}
    total = 0
    with open("/proc/diskstats") as f:
        for line in f:
            p = line.split()
            if p[2] in disks:
                total += int(p[9])
    return total


def thread_ticks(pids):
    rocks = other = 0
    for pid in pids:
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                with open(f"/proc/{pid}/task/{t}/stat") as f:
                    s = f.read()
            except OSError:
                continue
            comm = s[s.index("(") + 1 : s.rindex(")")]
            fields = s[s.rindex(")") + 2 :].split()
            ticks = int(fields[11]) + int(fields[12])
            if comm.startswith("rocksdb"):
                rocks += ticks
            else:
                other += ticks
    return rocks, other


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("pidfiles", nargs="+")
    ap.add_argument("--max-seconds", type=int, default=7200)
    a = ap.parse_args()
    pids = []
    for p in a.pidfiles:
        with open(p) as f:
            pids.append(int(f.read().strip()))
    print("t_s\tdirty_mib\twriteback_mib\tdisk_write_mib_s\trocksdb_cpu_pct\tother_cpu_pct", flush=True)
    t0 = time.monotonic()
    last = (sectors_written(), *thread_ticks(pids), t0)
    while time.monotonic() - t0 < a.max_seconds:
        time.sleep(1)
        if not any(os.path.exists(f"/proc/{p}") for p in pids):
            break
        now = time.monotonic()
        sec = sectors_written()
        rocks, other = thread_ticks(pids)
        dt = now - last[3]
        m = meminfo()
        print(
            f"{now - t0:.0f}\t{m.get('Dirty', 0) / 1024:.0f}\t{m.get('Writeback', 0) / 1024:.0f}\t"
            f"{(sec - last[0]) * 512 / dt / 2**20:.0f}\t{(rocks - last[1]) * 100 / TICK / dt:.0f}\t"
            f"{(other - last[2]) * 100 / TICK / dt:.0f}",
            flush=True,
        )
        last = (sec, rocks, other, now)


if __name__ == "__main__":
    sys.exit(main())
