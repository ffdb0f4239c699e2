"""`asyncproc top`: a live terminal view of one running asyncproc, read from its /metrics.

For the operator on a VM or a bare-metal host who has no Grafana: per queue, requests
received and results per second, backlog, requests in flight against the gate's budget,
what is held back and why, retries and sheds; for the process, workers, the outbox and
errors. Every `--interval` seconds it reads /metrics (parsed by prometheus_client's own
parser) and /readyz; rates are the counters' differences between two readings, latency
percentiles come from the histograms' buckets over the same interval. `q` or Ctrl-C quits.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import select
import shutil
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from prometheus_client.parser import text_string_to_metric_families

from asyncproc import redact

Labels = Tuple[Tuple[str, str], ...]
FAILED = ("gateway_error", "invalid", "deadline_exceeded", "max_attempts")
HELD_REASONS = ("gate", "queue_limit", "adaptive")
#: counters another release may add; shown when present
OPTIONAL_ERRORS = (("asyncproc_internal_errors_total", "internal errors"),
                   ("asyncproc_subscriber_dropped_total", "subscriber dropped"))

ALT_SCREEN, MAIN_SCREEN = "\x1b[?1049h\x1b[?25l", "\x1b[?25h\x1b[?1049l"
HOME, CLEAR_LINE, CLEAR_BELOW = "\x1b[H", "\x1b[K", "\x1b[J"


@dataclass
class Reading:
    """One scrape: every sample by (name, labels), when it was taken, and /readyz."""

    at: float
    samples: Dict[Tuple[str, Labels], float] = field(default_factory=dict)
    ready: str = ""
    error: str = ""

    def values(self, name: str, **match: str) -> Dict[Labels, float]:
        return {labels: v for (n, labels), v in self.samples.items()
                if n == name and all(dict(labels).get(k) == want for k, want in match.items())}

    def sum(self, name: str, **match: str) -> float:
        return sum(self.values(name, **match).values())

    def has(self, name: str) -> bool:
        return any(n == name for n, _ in self.samples)

    def by(self, name: str, label: str, **match: str) -> Dict[str, float]:
        out: Dict[str, float] = {}
        for labels, value in self.values(name, **match).items():
            key = dict(labels).get(label, "")
            out[key] = out.get(key, 0.0) + value
        return out


def parse(text: str, at: float) -> Reading:
    reading = Reading(at)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            reading.samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return reading


def fetch(base: str, timeout: float) -> Reading:
    now = time.monotonic()
    try:
        with urllib.request.urlopen(base + "/metrics", timeout=timeout) as reply:
            reading = parse(reply.read().decode("utf-8", "replace"), now)
    except (OSError, ValueError) as exc:
        return Reading(now, error=redact.scrub(f"unreachable: {getattr(exc, 'reason', exc)}"))
    try:
        with urllib.request.urlopen(base + "/readyz", timeout=timeout) as reply:
            reading.ready = reply.read().decode().strip()
    except urllib.error.HTTPError as exc:
        reading.ready = "not ready: " + exc.read().decode(errors="replace").strip()
    except OSError as exc:
        reading.ready = redact.scrub(f"/readyz: {exc}")
    return reading


class View:
    """Turns the last two readings into the lines of one screen."""

    def __init__(self, base: str) -> None:
        self.base = base

    def rate(self, cur: Reading, prev: Optional[Reading], name: str, **match: str) -> Optional[float]:
        if prev is None or prev.error or cur.at <= prev.at:
            return None
        return max(cur.sum(name, **match) - prev.sum(name, **match), 0.0) / (cur.at - prev.at)

    def quantile(self, cur: Reading, prev: Optional[Reading], name: str, q: float) -> Optional[float]:
        """Like PromQL's histogram_quantile over the buckets' increase since `prev`."""
        if prev is None or prev.error:
            return None
        buckets: Dict[float, float] = {}
        for labels, value in cur.values(name + "_bucket").items():
            le = float(dict(labels)["le"])
            before = prev.samples.get((name + "_bucket", labels), 0.0)
            buckets[le] = buckets.get(le, 0.0) + max(value - before, 0.0)
        bounds = sorted(buckets)
        if not bounds or buckets[bounds[-1]] <= 0:
            return None
        rank = q * buckets[bounds[-1]]
        lower, below = 0.0, 0.0
        for bound in bounds:
            if buckets[bound] >= rank:
                if math.isinf(bound):
                    return lower
                return lower + (bound - lower) * (rank - below) / max(buckets[bound] - below, 1e-12)
            lower, below = bound, buckets[bound]
        return lower

    def lines(self, cur: Reading, prev: Optional[Reading], width: int) -> List[str]:
        stamp = time.strftime("%H:%M:%S")
        head = f"asyncproc top  {redact.url(self.base)}  {cur.error or cur.ready}"
        out = [head + " " * max(width - len(head) - len(stamp) - 11, 2) + stamp + "  q quits", ""]
        if cur.error:
            return out + ["waiting for asyncproc to answer..."]
        r = self.rate
        limit = cur.sum("asyncproc_adaptive_limit")
        in_flight = cur.sum("asyncproc_in_flight")
        out.append(
            f"workers {cur.sum('asyncproc_workers_alive'):.0f} alive  restarts {cur.sum('asyncproc_worker_restarts_total'):.0f}"
            f"  in flight {in_flight:.0f}" + (f" / adaptive limit {limit:.0f}" if limit else "")
            + f"  waiting {cur.sum('asyncproc_waiting'):.0f}  outbox {cur.sum('asyncproc_outbox'):.0f}")
        errors = [f"transport errors {_num(r(cur, prev, 'asyncproc_transport_errors_total'))}/s"
                  f" ({cur.sum('asyncproc_transport_errors_total'):.0f})",
                  f"gate source errors {cur.sum('asyncproc_gate_source_errors_total'):.0f}",
                  f"dead letters {cur.sum('asyncproc_dead_letters_total'):.0f}",
                  f"bad messages {cur.sum('asyncproc_bad_messages_total'):.0f}"]
        errors += [f"{label} {cur.sum(name):.0f}" for name, label in OPTIONAL_ERRORS if cur.has(name)]
        out += ["errors  " + "  ".join(errors), ""]
        out += self.table(cur, prev)
        done = cur.by("asyncproc_results_total", "outcome")
        out += ["", "results since start  " + ("  ".join(f"{k} {v:.0f}" for k, v in sorted(done.items())) or "none")]
        latency = []
        for title, name in (("end-to-end", "asyncproc_end_to_end_seconds"),
                            ("gateway", "asyncproc_gateway_latency_seconds")):
            p50, p95 = (self.quantile(cur, prev, name, q) for q in (0.5, 0.95))
            latency.append(f"{title} p50 {_secs(p50)} p95 {_secs(p95)}")
        out.append("latency (last interval)  " + "  ".join(latency))
        return out

    def table(self, cur: Reading, prev: Optional[Reading]) -> List[str]:
        queues = sorted(set(cur.by("asyncproc_in_flight", "queue")) | set(cur.by("asyncproc_gate_budget", "queue"))
                        | set(cur.by("asyncproc_requests_received_total", "queue")))
        header = ("QUEUE", "RECV/S", "DONE/S", "FAILED/S", "BACKLOG", "OLDEST", "IN_FLIGHT", "BUDGET",
                  "HELD_BACK", "RETRY/S", "SHED/S")
        rows = [header]
        depth = cur.by("asyncproc_queue_depth", "queue")
        oldest = cur.by("asyncproc_queue_oldest_age_seconds", "queue")
        budget = cur.by("asyncproc_gate_budget", "queue")
        for queue in queues:
            failed = [self.rate(cur, prev, "asyncproc_results_total", queue=queue, outcome=o) for o in FAILED]
            held = cur.by("asyncproc_held_back", "reason", queue=queue)
            rows.append((
                queue or "-",
                _num(self.rate(cur, prev, "asyncproc_requests_received_total", queue=queue)),
                _num(self.rate(cur, prev, "asyncproc_results_total", queue=queue, outcome="success")),
                _num(None if None in failed else sum(failed)),
                f"{depth[queue]:.0f}" if queue in depth else "-",
                _secs(oldest.get(queue)),
                f"{cur.sum('asyncproc_in_flight', queue=queue):.0f}",
                f"{budget[queue]:.0%}" if queue in budget else "-",
                ",".join(f"{k}:{held[k]:.0f}" for k in HELD_REASONS if held.get(k)) or "-",
                _num(self.rate(cur, prev, "asyncproc_retries_total", queue=queue)),
                _num(self.rate(cur, prev, "asyncproc_shed_total", queue=queue)),
            ))
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        return ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
                for row in rows]


def _num(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.1f}"


def _secs(value: Optional[float]) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.0f}ms" if value < 1 else f"{value:.1f}s"


def base_url(target: str) -> str:
    """`9090`, `host:9090` or a URL (with or without /metrics) → the endpoint's base URL."""
    if re.fullmatch(r"\d+", target):
        target = "127.0.0.1:" + target
    if "://" not in target:
        target = "http://" + target
    return re.sub(r"/(metrics)?/?$", "", target)


class Keys:
    """Single key presses from a terminal on stdin (cbreak mode), restored on exit."""

    def __init__(self) -> None:
        self.fd = sys.stdin.fileno() if sys.stdin is not None and sys.stdin.isatty() else None
        self.saved = None
        if self.fd is not None:
            import termios
            import tty

            self.saved = termios.tcgetattr(self.fd)
            tty.setcbreak(self.fd)

    def wait(self, seconds: float) -> str:
        """Sleep up to `seconds`, returning early with the key pressed ('' for none)."""
        if self.fd is None:
            time.sleep(max(seconds, 0.0))
            return ""
        ready, _, _ = select.select([self.fd], [], [], max(seconds, 0.0))
        return os.read(self.fd, 16).decode(errors="replace") if ready else ""

    def restore(self) -> None:
        if self.saved is not None:
            import termios

            termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="asyncproc top", description=__doc__.split("\n\n")[0])
    p.add_argument("target", nargs="?", default="127.0.0.1:9090",
                   help="asyncproc's metrics endpoint: port, host:port or URL (default 127.0.0.1:9090)")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes (default 1)")
    p.add_argument("--count", type=int, default=0, help="stop after this many refreshes; 0: until q (default)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.interval <= 0:
        build_parser().error("--interval must be above 0")
    base = base_url(args.target)
    redact.register_url(base)
    view = View(base)
    screen = sys.stdout.isatty()
    keys = Keys()
    prev: Optional[Reading] = None
    shown = 0
    if screen:
        sys.stdout.write(ALT_SCREEN)
    try:
        next_at = time.monotonic()
        while True:
            cur = fetch(base, timeout=min(args.interval, 2.0) + 0.5)
            width, height = shutil.get_terminal_size((120, 40))
            lines = [line[:width] for line in view.lines(cur, prev, width)]
            if screen:
                sys.stdout.write(HOME + "".join(line + CLEAR_LINE + "\r\n" for line in lines[:height - 1]) + CLEAR_BELOW)
            else:
                sys.stdout.write("\n".join(lines) + "\n\n")
            sys.stdout.flush()
            prev = None if cur.error else cur
            shown += 1
            if args.count and shown >= args.count:
                return 0
            next_at = max(next_at + args.interval, time.monotonic())
            while True:
                key = keys.wait(next_at - time.monotonic())
                if key[:1] in ("q", "Q"):
                    return 0
                if time.monotonic() >= next_at:
                    break
    except KeyboardInterrupt:
        return 0
    finally:
        keys.restore()
        if screen:
            sys.stdout.write(MAIN_SCREEN)
            sys.stdout.flush()
