#!/usr/bin/env python3
"""Side-by-side throughput of kmsfs and its reference points, in one run.

For each backing filesystem (tmpfs: the CPU and FUSE path are the bound; disk: the device is)
and each of {raw directory, bindfs, libfuse passthrough_ll, gocryptfs, kmsfs (local KMS)}, runs
the same fio jobs and a small-file job, and writes results.tsv, results.md and results.png.
CPU time per GB counts fio's own CPU and the FUSE daemon's (from /proc/PID/stat).
Run through bench/run, which installs the tools and builds kmsfs.
"""

import argparse, json, os, shutil, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KMSFS = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "release/kmsfs"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def sh(*args, check=True, **kw):
    return subprocess.run([str(a) for a in args], check=check, **kw)


def drop_caches():
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def cpu_ticks(pid):
    if not pid:
        return 0
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(f[11]) + int(f[12])  # utime + stime
    except OSError:
        return 0


def pid_of_mount(mnt):
    """The FUSE daemon serving `mnt`: the process holding /dev/fuse that names it."""
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(mnt).encode() in cmd and b"fio" not in cmd[0]:
            return int(p.name)
    return None


class Fs:
    """A filesystem under test: set up on a backing dir, mounted at `path`."""

    def __init__(self, name, base, kind=None, init_args=()):
        """`kind`: which filesystem (default: `name`); `init_args`: more `kmsfs init` arguments."""
        self.name, self.base = name, Path(base) / name
        self.kind, self.init_args = kind or name, list(init_args)
        self.backing, self.mnt = self.base / "backing", self.base / "mnt"
        self.pid = None

    def up(self):
        shutil.rmtree(self.base, ignore_errors=True)
        self.backing.mkdir(parents=True)
        self.mnt.mkdir()
        n = self.kind
        if n == "raw":
            self.mnt.rmdir()
            self.mnt = self.backing
        elif n == "bindfs":
            sh("bindfs", "-o", "big_writes", self.backing, self.mnt)
        elif n == "passthrough_ll":
            subprocess.Popen([str(PASSTHROUGH), "-o", f"source={self.backing}", str(self.mnt)])
            wait_mounted(self.mnt)
        elif n == "gocryptfs":
            pw = self.base / "pw"
            pw.write_text("benchmark-password\n")
            sh("gocryptfs", "-init", "-quiet", "-passfile", pw, "-scryptn", "10", self.backing,
               stdout=subprocess.DEVNULL)
            sh("gocryptfs", "-quiet", "-passfile", pw, self.backing, self.mnt)
        elif n == "kmsfs":
            sh(KMSFS, "init", self.backing / "vol", "--keystore", self.base / "keystore",
               *self.init_args, stdout=subprocess.DEVNULL)
            sh(KMSFS, "mount", self.backing / "vol", self.mnt, "--log-file", self.base / "kmsfs.log")
        self.pid = None if n == "raw" else pid_of_mount(self.mnt)

    def down(self):
        if self.kind != "raw":
            sh("umount", self.mnt, check=False)
            time.sleep(0.3)
        shutil.rmtree(self.base, ignore_errors=True)


def wait_mounted(mnt):
    for _ in range(100):
        if os.path.ismount(mnt):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{mnt} did not mount")


def fio(fs, name, args, size_bytes):
    """Runs one fio job; returns (value, unit, cpu seconds per GB)."""
    t0 = cpu_ticks(fs.pid)
    out = subprocess.run(
        ["fio", "--name", name, "--directory", str(fs.mnt), "--output-format=json",
         "--ioengine=psync", "--group_reporting"] + args,
        check=True, capture_output=True, text=True).stdout
    j = json.loads(out[out.index("{"):])["jobs"][0]
    daemon_s = (cpu_ticks(fs.pid) - t0) / CLK_TCK
    cpu_s = (j["usr_cpu"] + j["sys_cpu"]) / 100.0 * j["job_runtime"] / 1000.0 + daemon_s
    rw = "read" if j["read"]["io_bytes"] > 0 else "write"
    io_bytes = j[rw]["io_bytes"] or size_bytes
    return j[rw], cpu_s / (io_bytes / 1e9)


def small_files(fs, n):
    d = fs.mnt / "small"
    d.mkdir()
    data = os.urandom(4096)
    t0, c0 = time.time(), cpu_ticks(fs.pid)
    for i in range(n):
        (d / f"f{i}").write_bytes(data)
    os.sync()
    t1 = time.time()
    drop_caches()
    t2 = time.time()
    for i in range(n):
        (d / f"f{i}").read_bytes()
    t3 = time.time()
    for i in range(n):
        (d / f"f{i}").unlink()
    t4 = time.time()
    return n / (t1 - t0), n / (t3 - t2), n / (t4 - t3)


def run_suite(fs, quick):
    size = "256M" if quick else "1G"
    size_b = (256 if quick else 1024) << 20
    runtime = "3" if quick else "10"
    r = {}
    drop_caches()
    w, cpu = fio(fs, "seqwrite", ["--rw=write", "--bs=1M", f"--size={size}", "--end_fsync=1"], size_b)
    r["seq write MB/s"] = (w["bw_bytes"] / 1e6, cpu)
    drop_caches()
    rd, cpu = fio(fs, "seqwrite", ["--rw=read", "--bs=1M", f"--size={size}"], size_b)
    r["seq read MB/s"] = (rd["bw_bytes"] / 1e6, cpu)
    drop_caches()
    rr, cpu = fio(fs, "seqwrite", ["--rw=randread", "--bs=4k", f"--size={size}", "--time_based",
                                   f"--runtime={runtime}"], size_b)
    r["rand read 4K IOPS (QD1)"] = (rr["iops"], cpu)
    drop_caches()
    rr4, cpu = fio(fs, "seqwrite", ["--rw=randread", "--bs=4k", f"--size={size}", "--time_based",
                                    f"--runtime={runtime}", "--numjobs=4"], size_b)
    r["rand read 4K IOPS (4 jobs)"] = (rr4["iops"], cpu)
    drop_caches()
    rw, cpu = fio(fs, "randwrite", ["--rw=randwrite", "--bs=64k", f"--size={size}", "--end_fsync=1",
                                    "--time_based", f"--runtime={runtime}"], size_b)
    r["rand write 64K IOPS"] = (rw["iops"], cpu)
    n = 1000 if quick else 5000
    c, rd_, dl = small_files(fs, n)
    r[f"small files create/s ({n}x4K)"] = (c, None)
    r["small files read/s"] = (rd_, None)
    r["small files delete/s"] = (dl, None)
    return r


# The filesystems compared: name → (kind, more `kmsfs init` arguments). "kmsfs 4K" is a volume
# made for small random I/O (`kmsfs init --block-size 4K`); "kmsfs" has the default 64 KiB.
FILESYSTEMS = {
    "raw": ("raw", []),
    "bindfs": ("bindfs", []),
    "passthrough_ll": ("passthrough_ll", []),
    "gocryptfs": ("gocryptfs", []),
    "kmsfs": ("kmsfs", []),
    "kmsfs 4K": ("kmsfs", ["--block-size", "4K"]),
}


def median_of(runs):
    """Per metric, the median value and the median CPU figure over the runs (each a dict
    metric → (value, cpu or None))."""
    out = {}
    for metric in runs[0]:
        vals = sorted(r[metric][0] for r in runs)
        cpus = sorted(r[metric][1] for r in runs if r[metric][1] is not None)
        out[metric] = (vals[len(vals) // 2], cpus[len(cpus) // 2] if cpus else None)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=1,
                    help="runs of every job on every filesystem, alternating; the tables give the median")
    ap.add_argument("--out", default=str(ROOT / "bench/results"))
    ap.add_argument("--passthrough", required=True)
    a = ap.parse_args()
    global PASSTHROUGH
    PASSTHROUGH = Path(a.passthrough)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    backings = [("tmpfs", "/dev/shm/kmsfs-bench")] + ([] if a.quick else [("disk", "/var/tmp/kmsfs-bench")])
    names = list(FILESYSTEMS)
    runs = {(b, n): [] for b, _ in backings for n in names}
    for r in range(a.rounds):
        for bname, base in backings:
            Path(base).mkdir(parents=True, exist_ok=True)
            for n in names:
                kind, init_args = FILESYSTEMS[n]
                fs = Fs(n.replace(" ", "-"), base, kind=kind, init_args=init_args)
                print(f"round {r + 1}/{a.rounds} [{bname}] {n} …", file=sys.stderr, flush=True)
                try:
                    fs.up()
                    runs[(bname, n)].append(run_suite(fs, a.quick))
                finally:
                    fs.down()
            shutil.rmtree(base, ignore_errors=True)
    rows = []  # (backing, metric, {fs: (value, cpu)})
    for bname, _ in backings:
        results = {n: median_of(runs[(bname, n)]) for n in names}
        for metric in results["raw"]:
            rows.append((bname, metric, {n: results[n][metric] for n in names}))

    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    host = os.uname()
    with open(out / "results.tsv", "w") as f:
        peers = [n for n in names if not n.startswith("kmsfs")]
        f.write("backing\tmetric\t" + "\t".join(names) + "\t" + "\t".join(f"kmsfs/{n}" for n in peers) + "\n")
        for b, m, v in rows:
            f.write(f"{b}\t{m}\t" + "\t".join(f"{v[n][0]:.0f}" for n in names) + "\t"
                    + "\t".join(f"{v['kmsfs'][0] / v[n][0]:.2f}" if v[n][0] else "-" for n in peers) + "\n")
    with open(out / "results.md", "w") as f:
        f.write(f"Run {stamp} on {host.nodename} ({os.cpu_count()} cores, {host.release}), "
                f"{'quick' if a.quick else 'full'} mode; "
                + ("one run" if a.rounds == 1 else f"median of {a.rounds} rounds (filesystems alternating)")
                + ", compare within it only.\n\n")
        f.write("| backing | metric | " + " | ".join(names)
                + " | kmsfs ÷ bindfs | kmsfs ÷ passthrough_ll | kmsfs ÷ gocryptfs | kmsfs 4K ÷ gocryptfs |\n")
        f.write("|---|---|" + "---:|" * (len(names) + 4) + "\n")
        for b, m, v in rows:
            ratio = lambda k, n: f"{v[k][0] / v[n][0]:.2f}" if v[n][0] else "-"
            f.write(f"| {b} | {m} | " + " | ".join(f"{v[n][0]:,.0f}" for n in names)
                    + f" | {ratio('kmsfs', 'bindfs')} | {ratio('kmsfs', 'passthrough_ll')}"
                    + f" | {ratio('kmsfs', 'gocryptfs')} | {ratio('kmsfs 4K', 'gocryptfs')} |\n")
        f.write("\nCPU seconds per GB moved (fio + FUSE daemon):\n\n| backing | metric | "
                + " | ".join(names) + " |\n|---|---|" + "---:|" * len(names) + "\n")
        for b, m, v in rows:
            if v["raw"][1] is None:
                continue
            f.write(f"| {b} | {m} | " + " | ".join(f"{v[n][1]:.2f}" for n in names) + " |\n")
    plot(out, rows, names, stamp)
    print((out / "results.md").read_text())


def plot(out, rows, names, stamp):
    """A grouped bar chart of each metric relative to gocryptfs (the raw directory, tens of
    times faster on tmpfs, would flatten every other bar), with gnuplot."""
    data = out / "chart.dat"
    names = [n for n in names if n != "raw"]
    with open(data, "w") as f:
        f.write("metric " + " ".join(n.replace(" ", "_") for n in names) + "\n")
        for b, m, v in rows:
            label = f"{b}:{m.replace(' IOPS', '').replace(' MB/s', '').replace(' ', '_')}"
            base = v["gocryptfs"][0]
            f.write(label + " " + " ".join(f"{v[n][0] / base:.3f}" if base else "0" for n in names) + "\n")
    script = f"""
set terminal pngcairo size 1400,600 font ",9" noenhanced
set output "{out / 'results.png'}"
set title "kmsfs and peers, relative to gocryptfs (higher is faster; {stamp})"
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.8 border -1
set ylabel "× gocryptfs"
set yrange [0:*]
set xtics rotate by -30
set key outside top center horizontal
set grid ytics
plot for [i=2:{len(names) + 1}] "{data}" using i:xtic(1) title columnheader(i)
"""
    r = subprocess.run(["gnuplot"], input=script, text=True, capture_output=True)
    if r.returncode != 0:
        print("gnuplot failed: " + r.stderr, file=sys.stderr)


if __name__ == "__main__":
    main()
