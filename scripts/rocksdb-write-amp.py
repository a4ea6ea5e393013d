#!/usr/bin/env python3
# Write amplification per RocksDB column family, from a replica's RocksDB LOG
# (e.g. <data-dir>/cluster/broker-a-1/sm/state-0/db/LOG after a backlog run with
# KEEP=1): the bytes of SST files written by flushes and by compactions, their
# ratio, and the trivial moves (files moved down a level without a rewrite, and
# their bytes; RocksDB's trivial_move event names no column family, so they are
# read from its "[cf] Moved #N files to level-L B bytes" lines).
# It joins each table_file_creation event to the flush or compaction job that
# made it. Used for #18, five minutes into the 10^8 run: 2.76 compacted bytes per
# flushed byte in the ConsumeQueue with epochs counted in entries, 1.77 with epochs
# of 2^16 rows, 0.00 with memtables switched at epoch ends (0.22 over the whole run,
# 444 files moved). Pass LOG and LOG.old.* for a run spanning restarts.
import collections
import json
import re
import sys

kind = {}
made = []
moves = collections.Counter()
moved = collections.Counter()
MOVED = re.compile(r"\[([^\]]+)\] Moved #(\d+) files to level-\d+ (\d+) bytes")
for path in sys.argv[1:]:
    for line in open(path, errors="replace"):
        m = MOVED.search(line)
        if m:
            moves[m.group(1)] += int(m.group(2))
            moved[m.group(1)] += int(m.group(3))
            continue
        i = line.find("EVENT_LOG_v1")
        if i < 0:
            continue
        try:
            ev = json.loads(line[i + len("EVENT_LOG_v1"):].strip())
        except ValueError:
            continue
        e = ev.get("event")
        if e == "flush_started":
            kind[(path, ev["job"])] = "flush"
        elif e == "compaction_started":
            kind[(path, ev["job"])] = "compaction"
        elif e == "table_file_creation":
            made.append((path, ev.get("job"), ev.get("cf_name", "?"), ev.get("file_size", 0)))
if not made:
    sys.exit("no table_file_creation events: pass RocksDB LOG files")
tot = collections.defaultdict(collections.Counter)
for path, job, cf, size in made:
    tot[cf][kind.get((path, job), "?")] += size
print(f"{'cf':12} {'flushed MiB':>12} {'compacted MiB':>14} {'ratio':>6} {'files moved':>11} {'moved MiB':>10}")
for cf, c in sorted(tot.items()):
    f, k = c["flush"] / 2**20, c["compaction"] / 2**20
    print(f"{cf:12} {f:12.1f} {k:14.1f} {k / f if f else 0:6.2f} {moves[cf]:11} {moved[cf] / 2**20:10.1f}")
