"""What the rehearsal measures per stage (peak memory while it runs, throughput from its TensorBoard
scalars, the error line of a failure) and the report it writes (Markdown table + JSON)."""

import json
import re
import shutil
import subprocess
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

_GIB = 1024**3


@dataclass
class StageResult:
    name: str
    title: str
    status: str = "skipped"
    """completed | failed | timeout | skipped"""
    exit_code: int | None = None
    wall_s: float | None = None
    throughput: str = ""
    peak_memory: str = ""
    error: str = ""
    """Failed: the last error line of its log. Skipped: why."""
    notes: list[str] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    log: str = ""


class MemorySampler:
    """Polls memory in a thread while a stage runs: per-GPU memory.used from nvidia-smi when there are GPUs,
    else the summed RSS of the stage's process tree."""

    def __init__(self, use_gpu: bool, interval_s: float = 0.5) -> None:
        self.use_gpu = use_gpu and shutil.which("nvidia-smi") is not None
        self.interval_s = interval_s
        self.peak_gpu_mib: dict[int, float] = {}
        self.peak_rss_bytes = 0
        self._root_pid: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, root_pid: int) -> None:
        self._root_pid = root_pid
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._sample()
            except (OSError, ValueError, subprocess.SubprocessError):
                pass  # a process ending between listing and reading, or nvidia-smi hiccups: skip this sample
            self._stop.wait(self.interval_s)

    def _sample(self) -> None:
        if self.use_gpu:
            output = subprocess.run(
                ["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"],
                capture_output=True, text=True, timeout=10,
            ).stdout
            for line in output.strip().splitlines():
                index, used = (part.strip() for part in line.split(","))
                self.peak_gpu_mib[int(index)] = max(self.peak_gpu_mib.get(int(index), 0.0), float(used))
            return
        import psutil

        rss = 0
        try:
            root = psutil.Process(self._root_pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.Error:  # the stage's process has just ended
            return
        for process in tree:
            try:
                rss += process.memory_info().rss
            except psutil.Error:
                continue
        self.peak_rss_bytes = max(self.peak_rss_bytes, rss)

    def describe(self) -> str:
        if self.use_gpu:
            if not self.peak_gpu_mib:
                return "n/a"
            per_gpu = " / ".join(f"{mib / 1024:.1f}" for _, mib in sorted(self.peak_gpu_mib.items()))
            return f"{max(self.peak_gpu_mib.values()) / 1024:.1f} GiB max (GPUs: {per_gpu})"
        return f"{self.peak_rss_bytes / _GIB:.1f} GiB RSS (process tree)" if self.peak_rss_bytes else "n/a"


def scalar_events(log_dir: Path, tag: str) -> list[tuple[int, float, float]]:
    """(step, wall time, value) of a TensorBoard scalar in every event file under `log_dir`, by step."""
    if not log_dir.is_dir():
        return []
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = []
    for event_file in sorted(log_dir.rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(event_file), size_guidance={"scalars": 0})
        accumulator.Reload()
        if tag in accumulator.Tags().get("scalars", []):
            events += [(e.step, e.wall_time, e.value) for e in accumulator.Scalars(tag)]
    return sorted(events)


def steady_rate(events: list[tuple[int, float, float]], samples_per_step: int) -> tuple[float, int] | None:
    """(samples/s, steps measured) between the logged steps after a warm-up of a quarter of them (at least 2:
    compilation, first-batch loading), from the events' wall times; None when too few steps were logged."""
    if len(events) < 4:
        return None
    skip = max(2, len(events) // 4)
    (first_step, first_time, _), (last_step, last_time, _) = events[skip - 1], events[-1]
    if last_step <= first_step or last_time <= first_time:
        return None
    return (last_step - first_step) * samples_per_step / (last_time - first_time), last_step - first_step


_EXCEPTION = re.compile(r"^(\[rank\d+\]:\s*)?([A-Za-z_][\w.]*(Error|Exception|Interrupt)\b|.*\berror: )")
"""A raised exception's last traceback line (`[rank1]: AttributeError: ...`) or a CLI's one-line `...: error: ...`."""
_ERRORISH = re.compile(r"(error|exception|killed|out of memory|nccl)", re.IGNORECASE)


def last_error_line(log: Path, max_chars: int = 300) -> str:
    """The failure of a stage's log: its first raised exception (under DDP the rank that died first; the
    others then fail on closed connections), with the last one appended when it differs; else the last line
    that mentions an error, else the last line."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").replace("\r", "\n").splitlines()]
    except OSError:
        return ""
    lines = [line for line in lines if line]
    exceptions = [line for line in lines if _EXCEPTION.match(line) and "Warning" not in line]
    if exceptions:
        first, last = exceptions[0], exceptions[-1]
        return (first if first == last else f"{first[:max_chars]} (then: {last})")[: 2 * max_chars]
    for line in reversed(lines):
        if _ERRORISH.search(line) and "Warning" not in line:
            return line[:max_chars]
    return lines[-1][:max_chars] if lines else ""


def format_table(results: list[StageResult]) -> str:
    header = "| stage | status | exit | wall (s) | throughput | peak memory | error / notes |"
    lines = [header, "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        wall = "" if r.wall_s is None else f"{r.wall_s:.0f}"
        exit_code = "" if r.exit_code is None else str(r.exit_code)
        remark = "; ".join(([r.error] if r.error else []) + r.notes).replace("|", "\\|")
        lines.append(f"| {r.title} | {r.status} | {exit_code} | {wall} | {r.throughput} | {r.peak_memory} | {remark} |")
    return "\n".join(lines)


def write_report(out_dir: Path, header: dict, results: list[StageResult], overrides: dict[str, list[str]]) -> Path:
    """report.md (header, per-stage overrides, the table) and report.json in `out_dir`; returns report.md."""
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = ["# Rehearsal of the paper path", ""]
    lines += [f"- {name}: {value}" for name, value in header.items()]
    lines += ["", "## Overrides of the paper configs, per stage", ""]
    for stage, keys in overrides.items():
        lines.append(f"- {stage}: " + ("; ".join(f"`{key}`" for key in keys) if keys else "none"))
    lines += ["", "## Stages", "", format_table(results), "", "## Commands (run in the work dir)", ""]
    for r in results:
        lines += [f"- {r.title}:"] + [f"  `{command}`" for command in r.commands]
    report = out_dir / "report.md"
    report.write_text("\n".join(lines))
    (out_dir / "report.json").write_text(json.dumps(
        {"header": header, "overrides": overrides, "stages": [asdict(r) for r in results]}, indent=2) + "\n")
    return report
