#!/usr/bin/env python3
"""Writes the committed seed corpus of the fuzz targets (corpus/<target>/).

Run once by hand (`python3 leak-user/fuzz/make_seeds.py [vmlinux BTF...]`) when a record
layout in leak-common changes; `cargo xtask fuzz` copies the seeds to a scratch folder under
target/ and never writes here. The record layouts mirror leak-common/src/event.rs and
sample.rs (#[repr(C)], little-endian); the sizes are checked below.

BTF seeds: a hand-made blob, the first 4 KiB of the running kernel's BTF (truncated, hence
invalid), and, for each BTF file given (default /sys/kernel/btf/vmlinux), a valid blob cut
from it that keeps only what the layout resolver reads.
"""

import os
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "corpus")

# ---------------------------------------------------------------------------- decode

TASK_COMM_LEN = 16
CGROUP_NAME_LEN = 128
MAX_CGROUP_DEPTH = 8
LRU_COUNT = 5
STAT_COUNT = 12
EVENT_COUNT = 4
MEMCG_SNAPSHOT_SIZE = (10 + STAT_COUNT + EVENT_COUNT) * 8 + CGROUP_NAME_LEN + 4 * 8
OOM_KILL_EVENT_SIZE = 144 + MAX_CGROUP_DEPTH * MEMCG_SNAPSHOT_SIZE + 8 + MEMCG_SNAPSHOT_SIZE + 8
CHARGE_SAMPLE_SIZE = 64

HAS_OOM_CONTROL, VICTIM_TASK, RSS_VALID, OOM_SCORE_ADJ_VALID = 1, 2, 4, 8
FAILCNT_VALID, CHAIN_TRUNCATED, NS_PID_VALID, FAILCNT_V1_ONLY = 16, 32, 64, 128
OOM_MEMCG, OOM_MEMCG_LEVEL, MEMSW_VALID, REACHED_ROOT = 1 << 16, 1 << 17, 1 << 18, 1 << 19
ANCESTORS_SEARCHED = 1 << 20
CONSTRAINT_NONE, CONSTRAINT_MEMCG = 0, 3
PAGES_64MIB = 16384
UNLIMITED = (2**63 - 1) // 4096


def memcg(cgroup_id, usage, limit, lru, name, failcnt=12):
    """MemcgSnapshot: ten u64, the breakdown (stat order, each in its kernel unit), the
    memory events, the kernfs name, then the memory+swap counter (usage, limit, peak,
    failcnt)."""
    anon, file = lru[0] + lru[1], lru[2] + lru[3]
    # anon, file, shmem, dirty, writeback (pages), slab x2 (bytes), stack (KiB), pagetables,
    # sock (pages), percpu (bytes), swap (pages)
    stats = [anon, file, 0, 3, 0, 81_920, 40_960, 64, 12, 0, 8_192, 0]
    events = [failcnt, 1, 1, 0]  # max, oom, oom_kill, oom_group_kill
    return struct.pack(
        "<5Q5Q12Q4Q128s4Q", cgroup_id, usage, limit, usage, failcnt, *lru, *stats, *events, name,
        usage, limit, usage, failcnt,
    )


def oom_kill_event(
    hook,
    flags,
    pid,
    comm,
    chain,
    constraint,
    oc_memcg,
    depth=None,
    stats_present=(1 << STAT_COUNT) - 1,
    events_present=(1 << EVENT_COUNT) - 1,
    above=None,
):
    snapshots = b"".join(memcg(*c) for c in chain)
    snapshots += bytes(MEMCG_SNAPSHOT_SIZE * (MAX_CGROUP_DEPTH - len(chain)))
    # oom_memcg_level, padding, then oom_memcg: the cgroup that hit its limit above the chain.
    if above is None:
        snapshots += bytes(8 + MEMCG_SNAPSHOT_SIZE)
    else:
        level, snapshot = above
        snapshots += struct.pack("<II", level, 0) + memcg(*snapshot)
    head = struct.pack(
        "<QIIII16siIQQQII16sQqQIIiIII",
        123_456_789_000,  # boot_ns
        hook,
        flags,
        pid,
        pid,
        comm,
        0,  # oom_score_adj
        1,  # ns pid: a container's main process
        16_250,  # rss anon pages
        30,
        0,
        pid,  # the trigger is the victim itself
        pid,
        comm,
        PAGES_64MIB,  # totalpages
        1_250,  # chosen_points
        oc_memcg,
        constraint,
        0xCC0,  # GFP_KERNEL
        0,
        len(chain) if depth is None else depth,
        stats_present,
        events_present,
    )
    # victim_start_ns: the victim task's start time (0 when the task was not read)
    start = 987_654_321 if flags & VICTIM_TASK else 0
    record = head + snapshots + struct.pack("<Q", start)
    assert len(record) == OOM_KILL_EVENT_SIZE, len(record)
    return record


def charge_sample(kind, usage, inactive_file):
    record = struct.pack(
        "<7QII",
        123_456_000_000,
        4242,
        usage,
        PAGES_64MIB,
        inactive_file,
        1_000,
        usage - inactive_file - 1_000,
        kind,
        0,  # _pad
    )
    assert len(record) == CHARGE_SAMPLE_SIZE
    return record


def decode_seeds():
    leak = (4242, PAGES_64MIB, PAGES_64MIB, [16_200, 50, 0, 0, 0], b"leak\0")
    pod = (4100, PAGES_64MIB, 2 * PAGES_64MIB, [16_200, 50, 10, 10, 0], b"pod0f1e2d3c\0")
    root = (1, 200_000, UNLIMITED, [90_000, 40_000, 30_000, 20_000, 0], b"\0")
    long_name = (77, 100, UNLIMITED, [1, 2, 3, 4, 5], b"x" * CGROUP_NAME_LEN)
    all_flags = (
        HAS_OOM_CONTROL | VICTIM_TASK | RSS_VALID | OOM_SCORE_ADJ_VALID | FAILCNT_VALID
        | NS_PID_VALID
    )
    return {
        "memcg-kill-tp-btf": oom_kill_event(
            1, all_flags, 123, b"leak", [leak, pod, root], CONSTRAINT_MEMCG, 4100
        ),
        "pid-only-tracepoint": oom_kill_event(
            2,
            RSS_VALID | FAILCNT_V1_ONLY,
            124,
            b"leak-worker",
            [leak, root],
            CONSTRAINT_MEMCG,
            0,
            # 5.10: no pagetables item, no oom_group_kill event
            stats_present=((1 << STAT_COUNT) - 1) & ~(1 << 8),
            events_present=0b0111,
        ),
        "global-oom-full-chain": oom_kill_event(
            1,
            all_flags | CHAIN_TRUNCATED,
            125,
            b"x" * TASK_COMM_LEN,
            [long_name] * MAX_CGROUP_DEPTH,
            CONSTRAINT_NONE,
            0,
        ),
        # v1 with a memory+swap limit: the cgroup that hit it is ten levels above the victim.
        "limit-above-the-chain-memsw": oom_kill_event(
            1,
            all_flags | OOM_MEMCG | OOM_MEMCG_LEVEL | MEMSW_VALID,
            126,
            b"leak",
            [leak] * MAX_CGROUP_DEPTH,
            CONSTRAINT_MEMCG,
            4100,
            above=(10, pod),
        ),
        "sample-charge": charge_sample(1, 16_000, 300),
        "sample-limit-hit": charge_sample(2, PAGES_64MIB, 2_000),
        "sample-charge-failed": charge_sample(3, PAGES_64MIB, 0),
        "short-garbage": b"\x01\x00\x00\x00leak",
        "almost-a-sample": charge_sample(2, PAGES_64MIB, 2_000)[:-1],
    }


# ---------------------------------------------------------------------------- btf

MAGIC = 0xEB9F
INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF = 1, 2, 3, 4, 5, 6, 7, 8
VOLATILE, CONST, RESTRICT, FUNC, FUNC_PROTO, VAR, DATASEC = 9, 10, 11, 12, 13, 14, 15
FLOAT, DECL_TAG, TYPE_TAG, ENUM64 = 16, 17, 18, 19


def blob(types, strings):
    header = struct.pack("<HBBIIIII", MAGIC, 1, 0, 24, 0, len(types), len(types), len(strings))
    return header + types + strings


def tiny_btf():
    """int and struct point { int x; int y; }, as in the parser's unit test."""
    strings = b"\0int\0point\0x\0y\0"
    types = struct.pack("<4I", 1, INT << 24, 4, (1 << 24) | 32)
    types += struct.pack("<9I", 5, (STRUCT << 24) | 2, 8, 11, 1, 0, 13, 1, 32)
    return blob(types, strings)


def parse_btf(data):
    _, _, _, hdr_len, type_off, type_len, str_off, str_len = struct.unpack_from("<HBBIIIII", data)
    types_data = data[hdr_len + type_off : hdr_len + type_off + type_len]
    strings = data[hdr_len + str_off : hdr_len + str_off + str_len]

    def name(off):
        return strings[off : strings.index(b"\0", off)].decode()

    types = [None]
    at = 0
    while at < len(types_data):
        name_off, info, size_or_type = struct.unpack_from("<3I", types_data, at)
        at += 12
        kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
        extra_len = {INT: 4, ARRAY: 12, VAR: 4, DECL_TAG: 4}.get(kind, 0)
        extra_len += {STRUCT: 12, UNION: 12, ENUM: 8, FUNC_PROTO: 8, DATASEC: 12, ENUM64: 12}.get(
            kind, 0
        ) * vlen
        extra = types_data[at : at + extra_len]
        at += extra_len
        types.append(
            dict(name=name(name_off), info=info, kind=kind, vlen=vlen, st=size_or_type, extra=extra)
        )
    return types, name


# What the layout resolver reads (leak-user's kernel/layout): structs and their members.
NEEDED = {
    "task_struct": {"pid", "tgid", "comm", "mm", "signal", "cgroups", "thread_pid"},
    "pid": {"level", "numbers"},
    "upid": {"nr", "ns"},
    "signal_struct": {"oom_score_adj"},
    "css_set": {"subsys"},
    "cgroup_subsys_state": {"cgroup", "parent"},
    "cgroup": {"kn"},
    "kernfs_node": {"id", "name"},
    "mem_cgroup": {"css", "memory", "vmstats", "memsw"},
    "page_counter": {"usage", "max", "watermark", "failcnt"},
    "oom_control": {"memcg", "chosen", "chosen_points", "totalpages", "constraint", "gfp_mask", "order"},
    "mm_struct": {"rss_stat"},
    "mm_rss_stat": {"count"},
    "percpu_counter": {"count"},
    "memcg_vmstats": {"state"},
}
ENUMERATORS = ["memory_cgrp_id", "MM_FILEPAGES", "NR_INACTIVE_ANON"]
TYPEDEFS = ["btf_trace_mark_victim", "btf_trace_signal_generate"]
FUNCS = ["oom_kill_process", "__oom_kill_process", "try_charge_memcg", "try_charge",
         "try_to_free_mem_cgroup_pages"]


def cut_btf(data):
    """A valid BTF blob with only the types (and members) the resolver reads; other structs
    are kept by name and size with no members, function pointers become void pointers."""
    types, name_of = parse_btf(data)
    keep_fn_ptrs = {t["st"] for t in types[1:] if t["kind"] == TYPEDEF and t["name"] in TYPEDEFS}
    out_types, out_strings, string_at, new_id = [], bytearray(b"\0"), {"": 0}, {}

    def string(s):
        if s not in string_at:
            string_at[s] = len(out_strings)
            out_strings.extend(s.encode() + b"\0")
        return string_at[s]

    def has_needed(old, needed):
        t = types[old]
        while t and t["kind"] in (TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG):
            t = types[t["st"]]
        if not t or t["kind"] not in (STRUCT, UNION):
            return False
        for i in range(t["vlen"]):
            m_name, m_type, _ = struct.unpack_from("<3I", t["extra"], 12 * i)
            m = name_of(m_name)
            if m in needed or (m == "" and has_needed(m_type, needed)):
                return True
        return False

    def emit(old, needed=None):
        if old == 0:
            return 0
        key = (old, frozenset(needed) if needed else None)
        if key in new_id:
            return new_id[key]
        t = types[old]
        slot = len(out_types)
        out_types.append(None)
        new_id[key] = slot + 1
        kind, st, extra, info = t["kind"], t["st"], t["extra"], t["info"]
        if kind in (STRUCT, UNION):
            own = NEEDED.get(t["name"]) if t["name"] else needed
            members = []
            if own is not None or not t["name"]:
                for i in range(t["vlen"]):
                    m_name, m_type, m_off = struct.unpack_from("<3I", extra, 12 * i)
                    m = name_of(m_name)
                    if own is None:
                        members.append((m, emit(m_type), m_off))
                    elif m in own:
                        members.append((m, emit(m_type), m_off))
                    elif m == "" and has_needed(m_type, own):
                        members.append((m, emit(m_type, own), m_off))
            info = (info & 0xFFFF0000) | len(members)
            extra = b"".join(struct.pack("<3I", string(m), ty, off) for m, ty, off in members)
        elif kind in (PTR, TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG, FUNC, VAR, DECL_TAG):
            target = types[st]
            if kind == PTR and target and target["kind"] == FUNC_PROTO and old not in keep_fn_ptrs:
                st = 0  # a function pointer member: void *
            else:
                st = emit(st, needed if kind != PTR else None)
        elif kind == ARRAY:
            elem, index, count = struct.unpack("<3I", extra)
            extra = struct.pack("<3I", emit(elem), emit(index), count)
        elif kind == FUNC_PROTO:
            st = emit(st)
            params = []
            for i in range(t["vlen"]):
                p_name, p_type = struct.unpack_from("<2I", extra, 8 * i)
                params.append(struct.pack("<2I", string(name_of(p_name)), emit(p_type)))
            extra = b"".join(params)
        elif kind in (ENUM, ENUM64):
            step = 8 if kind == ENUM else 12
            values = []
            for i in range(t["vlen"]):
                e_name = struct.unpack_from("<I", extra, step * i)[0]
                values.append(struct.pack("<I", string(name_of(e_name))) + extra[step * i + 4 : step * (i + 1)])
            extra = b"".join(values)
        out_types[slot] = struct.pack("<3I", string(t["name"]), info, st) + extra
        return slot + 1

    for old, t in enumerate(types):
        if t is None:
            continue
        root = (
            (t["kind"] == STRUCT and t["name"] in NEEDED and t["vlen"] > 0)
            or (t["kind"] in (ENUM, ENUM64) and any(
                name_of(struct.unpack_from("<I", t["extra"], (8 if t["kind"] == ENUM else 12) * i)[0])
                in ENUMERATORS for i in range(t["vlen"])))
            or (t["kind"] == FUNC and t["name"] in FUNCS)
        )
        if root or (t["kind"] == TYPEDEF and t["name"] in TYPEDEFS):
            emit(old)
    return blob(b"".join(out_types), bytes(out_strings))


def btf_seeds(paths):
    seeds = {"tiny-point": tiny_btf()}
    vmlinux = "/sys/kernel/btf/vmlinux"
    if os.path.exists(vmlinux):
        with open(vmlinux, "rb") as f:
            seeds["vmlinux-first-4k-truncated"] = f.read(4096)
    for path in paths or [vmlinux]:
        with open(path, "rb") as f:
            data = f.read()
        label = os.path.basename(path).removesuffix(".btf")
        seeds[f"cut-{label}"] = cut_btf(data)
    return seeds


# ---------------------------------------------------------------------------- text

OOM_REPORT = """\
leak invoked oom-killer: gfp_mask=0xcc0(GFP_KERNEL), order=0, oom_score_adj=0
CPU: 1 PID: 123 Comm: leak Not tainted 6.1.0-40-cloud-amd64 #1  Debian 6.1.153-1
memory: usage 65536kB, limit 65536kB, failcnt 12
memory+swap: usage 65536kB, limit 9007199254740988kB, failcnt 0
kmem: usage 412kB, limit 9007199254740988kB, failcnt 0
Memory cgroup stats for /x:
anon 66289664
file 0
kernel 421888
inactive_anon 66281472
active_anon 8192
inactive_file 0
active_file 0
unevictable 0
Tasks state (memory values in pages):
[  pid  ]   uid  tgid total_vm      rss pgtables_bytes swapents oom_score_adj name
[    123]     0   123    17000    16200   180224        0             0 leak
oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset=/,mems_allowed=0,oom_memcg=/leak,task_memcg=/leak,task=leak,pid=123,uid=0
Memory cgroup out of memory: Killed process 123 (leak) total-vm:1kB, anon-rss:65000kB, file-rss:0kB, shmem-rss:0kB, UID:0 pgtables:1kB oom_score_adj:0
"""

GROUP_AND_GLOBAL = """\
leak invoked oom-killer: gfp_mask=0x140cca(GFP_HIGHUSER_MOVABLE|__GFP_COMP), order=0, oom_score_adj=0
memory: usage 49152kB, limit 49152kB, failcnt 3
Memory cgroup stats for /leak-e2e/group:
anon 49000000
inactive_file 4096
oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset=/,mems_allowed=0,oom_memcg=/leak-e2e/group,task_memcg=/leak-e2e/group,task=leak,pid=200,uid=0
Memory cgroup out of memory: Killed process 200 (leak) total-vm:80000kB, anon-rss:40000kB, file-rss:12kB, shmem-rss:0kB, UID:0 pgtables:120kB oom_score_adj:0
Memory cgroup out of memory: Killed process 201 (leak) total-vm:20000kB, anon-rss:9000kB, file-rss:0kB, shmem-rss:0kB, UID:0 pgtables:40kB oom_score_adj:0
leak invoked oom-killer: gfp_mask=0x140dca(GFP_HIGHUSER_MOVABLE|__GFP_COMP|__GFP_ZERO), order=0, oom_score_adj=1000
oom-kill:constraint=CONSTRAINT_NONE,nodemask=(null),cpuset=/,mems_allowed=0,global_oom,task_memcg=/,task=leak,pid=300,uid=0
Out of memory: Killed process 300 (leak) total-vm:2000000kB, anon-rss:1900000kB, file-rss:0kB, shmem-rss:0kB, UID:0 pgtables:3800kB oom_score_adj:1000
"""

MOUNTINFO = """\
24 30 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
29 24 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
35 24 0:30 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:14 - cgroup cgroup rw,memory
36 24 0:31 / /sys/fs/cgroup/cpu\\040set rw,relatime - cgroup cgroup rw,cpuset
"""

MARK_VICTIM_FORMAT = """\
name: mark_victim
ID: 609
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:int pid;\toffset:8;\tsize:4;\tsigned:1;
\tfield:__data_loc char[] comm;\toffset:12;\tsize:4;\tsigned:0;
\tfield:unsigned long total_vm;\toffset:16;\tsize:8;\tsigned:0;
\tfield:unsigned long anon_rss;\toffset:24;\tsize:8;\tsigned:0;
\tfield:uid_t uid;\toffset:48;\tsize:4;\tsigned:0;
\tfield:short oom_score_adj;\toffset:64;\tsize:2;\tsigned:1;

print fmt: "pid=%d comm=%s total-vm=%lukB anon-rss=%lukB uid=%u oom_score_adj=%hd", REC->pid, __get_str(comm), REC->total_vm, REC->anon_rss, REC->uid, REC->oom_score_adj
"""


def text_seeds():
    return {
        "oom-report-memcg": OOM_REPORT,
        "oom-report-group-and-global": GROUP_AND_GLOBAL,
        "cgroupfs-container": "/kubepods/burstable/pod0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0/"
        "3a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f6071829",
        "systemd-container": "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/"
        "kubelet-kubepods-besteffort-pod0f1e2d3c_4b5a_6978_8796_a5b4c3d2e1f0.slice/"
        "cri-containerd-3a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f6071829.scope",
        "systemd-pod-guaranteed": "/kubepods.slice/kubepods-pod11111111_2222_3333_4444_555555555555.slice",
        "mountinfo": MOUNTINFO,
        "tracepoint-format-mark-victim": MARK_VICTIM_FORMAT,
    }


def write(target, seeds):
    folder = os.path.join(CORPUS, target)
    os.makedirs(folder, exist_ok=True)
    for name, content in seeds.items():
        if isinstance(content, str):
            content = content.encode()
        with open(os.path.join(folder, name), "wb") as f:
            f.write(content)
        print(f"{target}/{name}: {len(content)} bytes")


if __name__ == "__main__":
    write("decode", decode_seeds())
    if sys.argv[1:] == ["--decode-only"]:
        sys.exit(0)
    write("btf", btf_seeds(sys.argv[1:]))
    write("text", text_seeds())
