"""Run one command as a subprocess and measure its wall time and peak memory, process tree included.

Two independent sources, so each number can be checked against the other:

* ``/usr/bin/time -v`` (GNU time, when present): the kernel's ``ru_maxrss`` of the command, which
  for a process tree is the peak of the *largest single process* (the parent or one worker), plus
  user/system CPU seconds.
* ``/proc/stat`` before and after: CPU time the whole machine spent busy during the run, so the
  CPU used by *other* processes (the machine is shared and noisy) can be reported next to ours.
* A sampler thread (psutil + ``/proc``) that, every ``interval`` seconds, walks the command's
  process tree and records, per process, the kernel high-water mark ``VmHWM`` (exact, not
  sampled) and, for the whole tree at the same instant, the sum of RSS and the sum of PSS.
  The RSS sum counts pages shared between a forked worker and its parent once per process (an
  upper bound); the PSS sum splits shared pages between the processes that map them (the tree's
  real footprint). Both are sampled, so a peak shorter than ``interval`` can be missed.

Wall time is taken around ``Popen`` … ``wait`` in the calling process (interpreter start-up
included, the same for every command measured).
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

GNU_TIME = "/usr/bin/time"
MB = 1024 * 1024


def gnu_time_available() -> bool:
    if not (Path(GNU_TIME).is_file() and os.access(GNU_TIME, os.X_OK)):
        return False
    probe = subprocess.run([GNU_TIME, "-v", "true"], capture_output=True, text=True, check=False)
    return probe.returncode == 0 and "Maximum resident set size" in probe.stderr


def _status_kb(pid: int) -> tuple[int, int] | None:
    """(VmRSS, VmHWM) in kB from /proc/PID/status, or None when unavailable."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    rss = re.search(r"^VmRSS:\s+(\d+) kB", text, re.M)
    hwm = re.search(r"^VmHWM:\s+(\d+) kB", text, re.M)
    if rss is None or hwm is None:
        return None
    return int(rss.group(1)), int(hwm.group(1))


def _pss_bytes(proc: psutil.Process) -> int | None:
    try:
        return int(getattr(proc.memory_full_info(), "pss", 0)) or None
    except (psutil.Error, OSError):
        return None


@dataclass
class ProcessPeak:
    pid: int
    cmdline: str
    peak_rss: int = 0  # bytes: VmHWM when /proc has it, else the largest sampled RSS
    first_seen: float = 0.0
    last_seen: float = 0.0
    cpu_seconds: float = 0.0  # user + system, as last sampled (a little short for the last interval)


@dataclass
class Measurement:
    argv: list[str]
    returncode: int
    wall_seconds: float
    started_at: float  # time.time() just before the process was started
    finished_at: float
    stdout_path: str
    stderr_tail: str
    gnu_time: dict[str, Any] = field(default_factory=dict)
    parent_peak_rss: int = 0
    workers: list[ProcessPeak] = field(default_factory=list)
    tree_peak_rss_sum: int = 0
    tree_peak_pss_sum: int = 0
    samples: int = 0
    interval: float = 0.0
    method: str = ""
    machine: dict[str, Any] = field(default_factory=dict)
    # When the peaks happened (time.time()), to map them onto the phases of the run, and a coarse
    # timeline [seconds since start, parent RSS, tree RSS sum, tree PSS sum, processes] in bytes.
    parent_peak_at: float = 0.0
    tree_peak_at: float = 0.0
    timeline: list[list[float]] = field(default_factory=list)

    @property
    def workers_peak_rss(self) -> int:
        return max((w.peak_rss for w in self.workers), default=0)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["workers_peak_rss"] = self.workers_peak_rss
        return out


class _Sampler(threading.Thread):
    def __init__(self, popen: subprocess.Popen[bytes], through_time: bool, interval: float) -> None:
        super().__init__(daemon=True)
        self.popen = popen
        self.through_time = through_time
        self.interval = interval
        self.stop = threading.Event()
        self.target: psutil.Process | None = None
        self.peaks: dict[int, ProcessPeak] = {}
        self.procs: dict[int, psutil.Process] = {}
        self.tree_rss = 0
        self.tree_pss = 0
        self.samples = 0
        self.started = time.time()
        self.parent_rss = 0
        self.parent_peak_at = 0.0
        self.tree_peak_at = 0.0
        self.timeline: list[list[float]] = []

    def _find_target(self) -> psutil.Process | None:
        try:
            top = psutil.Process(self.popen.pid)
            if not self.through_time:
                return top
            children = top.children()
            return children[0] if children else None
        except psutil.Error:
            return None

    def _sample(self) -> None:
        if self.target is None:
            self.target = self._find_target()
            if self.target is None:
                return
        try:
            tree = [self.target, *self.target.children(recursive=True)]
        except psutil.Error:
            tree = [p for p in self.procs.values() if p.is_running()]
        now = time.time()
        rss_sum = pss_sum = 0
        for proc in tree:
            pid = proc.pid
            known = self.procs.setdefault(pid, proc)
            status = _status_kb(pid)
            if status is not None:
                rss, hwm = status[0] * 1024, status[1] * 1024
            else:
                try:
                    rss = known.memory_info().rss
                except psutil.Error:
                    continue
                hwm = rss
            pss = _pss_bytes(known)
            rss_sum += rss
            pss_sum += pss if pss is not None else rss
            peak = self.peaks.get(pid)
            if peak is None:
                try:
                    cmdline = " ".join(known.cmdline())[:200]
                except psutil.Error:
                    cmdline = "?"
                peak = self.peaks[pid] = ProcessPeak(pid, cmdline, 0, now, now)
            peak.peak_rss = max(peak.peak_rss, hwm, rss)
            peak.last_seen = now
            try:
                cpu = known.cpu_times()
                peak.cpu_seconds = cpu.user + cpu.system
            except psutil.Error:
                pass
        target_rss = 0
        status = _status_kb(self.target.pid)
        if status is not None:
            target_rss = status[0] * 1024
        if target_rss > self.parent_rss:
            self.parent_rss, self.parent_peak_at = target_rss, now
        if rss_sum > self.tree_rss:
            self.tree_rss, self.tree_peak_at = rss_sum, now
        self.tree_pss = max(self.tree_pss, pss_sum)
        if self.samples % 5 == 0 or rss_sum >= self.tree_rss:
            self.timeline.append([round(now - self.started, 2), target_rss, rss_sum, pss_sum, len(tree)])
        self.samples += 1

    def run(self) -> None:
        while not self.stop.is_set():
            self._sample()
            self.stop.wait(self.interval)


def _proc_stat() -> dict[str, float] | None:
    """Machine-wide CPU seconds by state from /proc/stat (all CPUs together)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
    except OSError:
        return None
    tick = os.sysconf("SC_CLK_TCK")
    names = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
    values = dict(zip(names, (int(v) / tick for v in fields[1:9]), strict=False))
    values["busy"] = sum(values.get(k, 0.0) for k in ("user", "nice", "system", "irq", "softirq"))
    return values


def _loadavg() -> list[float]:
    try:
        return list(os.getloadavg())
    except OSError:
        return []


def _parse_gnu_time(text: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    patterns = {
        "max_rss_kb": r"Maximum resident set size \(kbytes\): (\d+)",
        "user_seconds": r"User time \(seconds\): ([\d.]+)",
        "system_seconds": r"System time \(seconds\): ([\d.]+)",
        "cpu_percent": r"Percent of CPU this job got: (\d+)%",
        "major_faults": r"Major \(requiring I/O\) page faults: (\d+)",
        "voluntary_switches": r"Voluntary context switches: (\d+)",
        "involuntary_switches": r"Involuntary context switches: (\d+)",
    }
    for key, pattern in patterns.items():
        match = re.search(pattern, text)
        if match:
            out[key] = float(match.group(1)) if "." in match.group(1) else int(match.group(1))
    match = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text)
    if match:
        seconds = 0.0
        for part in match.group(1).split(":"):
            seconds = seconds * 60 + float(part)
        out["elapsed_seconds"] = seconds
    return out


def measure(argv: list[str], *, cwd: Path, stdout_path: Path, interval: float = 0.1,
            use_gnu_time: bool | None = None, env: dict[str, str] | None = None) -> Measurement:
    """Run `argv` to completion, its standard output to `stdout_path`; measure it."""
    if use_gnu_time is None:
        use_gnu_time = gnu_time_available()
    time_file = stdout_path.with_suffix(".time")
    cmd = [GNU_TIME, "-v", "-o", str(time_file), *argv] if use_gnu_time else list(argv)
    stderr_path = stdout_path.with_suffix(".stderr")
    stat_before, load_before = _proc_stat(), _loadavg()
    with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
        started_at = time.time()
        t0 = time.perf_counter()
        popen = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=err, env=env)
        sampler = _Sampler(popen, use_gnu_time, interval)
        sampler.start()
        returncode = popen.wait()
        wall = time.perf_counter() - t0
        finished_at = time.time()
    sampler.stop.set()
    sampler.join()
    stat_after, load_after = _proc_stat(), _loadavg()
    stderr_text = stderr_path.read_text(errors="replace")
    gnu: dict[str, Any] = {}
    if use_gnu_time and time_file.exists():
        gnu = _parse_gnu_time(time_file.read_text(errors="replace"))
    target_pid = sampler.target.pid if sampler.target is not None else None
    parent = sampler.peaks.get(target_pid) if target_pid is not None else None
    workers = [p for pid, p in sampler.peaks.items() if pid != target_pid]
    if "user_seconds" in gnu:
        own_cpu = gnu["user_seconds"] + gnu.get("system_seconds", 0.0)
    else:
        own_cpu = sum(p.cpu_seconds for p in sampler.peaks.values())
    machine: dict[str, Any] = {"own_cpu_seconds": own_cpu, "loadavg_before": load_before,
                               "loadavg_after": load_after, "cpus": os.cpu_count()}
    if stat_before and stat_after:
        busy = stat_after["busy"] - stat_before["busy"]
        machine["machine_busy_cpu_seconds"] = busy
        machine["other_cpu_seconds"] = max(busy - own_cpu, 0.0)
        machine["other_load_cores"] = machine["other_cpu_seconds"] / wall if wall > 0 else 0.0
        machine["steal_seconds"] = stat_after.get("steal", 0.0) - stat_before.get("steal", 0.0)
        machine["iowait_seconds"] = stat_after.get("iowait", 0.0) - stat_before.get("iowait", 0.0)
    return Measurement(
        argv=list(argv),
        returncode=returncode,
        wall_seconds=wall,
        started_at=started_at,
        finished_at=finished_at,
        stdout_path=str(stdout_path),
        stderr_tail=stderr_text[-2000:],
        gnu_time=gnu,
        parent_peak_rss=parent.peak_rss if parent else 0,
        workers=sorted(workers, key=lambda p: p.first_seen),
        tree_peak_rss_sum=sampler.tree_rss,
        tree_peak_pss_sum=sampler.tree_pss,
        samples=sampler.samples,
        interval=interval,
        method=("GNU time -v + " if use_gnu_time else "") + "psutil//proc sampling",
        machine=machine,
        parent_peak_at=sampler.parent_peak_at,
        tree_peak_at=sampler.tree_peak_at,
        timeline=sampler.timeline,
    )

