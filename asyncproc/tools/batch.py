"""Batches for people: `asyncproc run-batch | submit | collect | status | cancel`.

JSONL in (asyncproc's request format or the OpenAI Batch API's), JSONL out (asyncproc's
result format or the OpenAI batch output format). Everything goes through the queues
(asyncproc.client); nothing here talks to the processor. An output file is also the
record of what is done: run again with it, and only what has no result yet is submitted.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Set, Tuple

import orjson

from asyncproc import config, messages, redact
from asyncproc.client import Client, ClientError, result_batch

FORMATS = ("asyncproc", "openai")
WINDOW_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
COMMANDS = ("run-batch", "submit", "collect", "status", "cancel")


class InputError(Exception):
    """One input line that cannot become a request; the message says why."""


# -- input ---------------------------------------------------------------------------------

def parse_window(text: str) -> float:
    """`24h`, `30m`, `90s`, `2d` or plain seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not match or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"not a duration like 24h, 30m, 90s or 2d: {text!r}")
    return float(match.group(1)) * WINDOW_UNITS[match.group(2)]


def parse_line(raw: bytes, now: float, window: float) -> Tuple[dict, str]:
    """One input line → (request message, its format). Raises InputError."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InputError(f"not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise InputError("not a JSON object")
    if "custom_id" in obj:
        return _openai_request(obj, now, window), "openai"
    if not messages.usable_id(obj.get("id")):
        raise InputError("needs an id (a non-empty string or an integer) or an OpenAI custom_id")
    request = dict(obj)
    if "deadline" in obj:
        if messages.parse_deadline(obj["deadline"]) is None:
            raise InputError("deadline must be Unix seconds")
    else:
        request["deadline"] = now + window
    if not isinstance(obj.get("payload"), dict):
        raise InputError("payload must be a JSON object")
    metadata = obj.get("metadata")
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise InputError("metadata must be an object of string values")
    endpoint = obj.get("endpoint")
    if endpoint is not None and not (isinstance(endpoint, str) and endpoint.startswith("/")):
        raise InputError("endpoint must be a path starting with '/'")
    return request, "asyncproc"


def _openai_request(obj: dict, now: float, window: float) -> dict:
    custom_id = obj["custom_id"]
    if not isinstance(custom_id, str) or not custom_id:
        raise InputError("custom_id must be a non-empty string")
    method = obj.get("method", "POST")
    if method != "POST":
        raise InputError(f"method must be POST (got {method!r})")
    url = obj.get("url")
    if not (isinstance(url, str) and url.startswith("/")):
        raise InputError("url must be a path such as /v1/chat/completions")
    if not isinstance(obj.get("body"), dict):
        raise InputError("body must be a JSON object")
    return {"id": custom_id, "deadline": now + window, "payload": obj["body"], "endpoint": url}


@dataclass
class Input:
    requests: List[dict] = field(default_factory=list)
    formats: Set[str] = field(default_factory=set)
    errors: List[Tuple[int, str]] = field(default_factory=list)


def read_input(path: str, now: float, window: float) -> Input:
    """Every line parsed; bad lines (and repeated ids) are listed with their numbers."""
    found = Input()
    first_line: Dict[str, int] = {}
    with open(path, "rb") as lines:
        for number, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            try:
                request, fmt = parse_line(raw, now, window)
            except InputError as exc:
                found.errors.append((number, str(exc)))
                continue
            key = messages.id_key(request["id"])
            if key in first_line:
                found.errors.append((number, f"id {key} repeats line {first_line[key]}"))
                continue
            first_line[key] = number
            found.requests.append(request)
            found.formats.add(fmt)
    return found


# -- output --------------------------------------------------------------------------------

def read_output(path: str) -> Set[str]:
    """Id keys already answered in an output file. A line torn by an interruption (no
    final newline) is cut off, so appending goes on from a clean line."""
    done: Set[str] = set()
    if not os.path.exists(path):
        return done
    with open(path, "rb+") as out:
        data = out.read()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            out.truncate(end)
    for raw in data[:end].splitlines():
        try:
            line = orjson.loads(raw)
        except orjson.JSONDecodeError:
            continue
        if isinstance(line, dict):
            value = line.get("custom_id", line.get("id"))
            if messages.usable_id(value):
                done.add(messages.id_key(value))
    return done


def outcome(result: dict) -> Tuple[bool, Optional[int], object, str]:
    """(ok, status code, response body, error) from either result format."""
    if "attempts" not in result and isinstance(result.get("payload"), str):  # --result-format llm-d-async
        ok = not result.get("error_code") and 200 <= (result.get("status_code") or 0) < 300
        raw = result.get("payload") or ""
        try:
            body = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            body = raw
        return ok, result.get("status_code") or None, body, result.get("error_message") or ""
    ok = "error" not in result
    return ok, result.get("status_code"), result.get("payload"), result.get("error") or ""


def error_code(error: str) -> str:
    if error == messages.CANCELLED:
        return "cancelled"
    if error.startswith("deadline exceeded"):
        return "expired"
    return "request_failed"


def format_result(result: dict, fmt: str) -> bytes:
    """One output line (without its newline); asyncproc's batch tag is taken out."""
    metadata = result.get("metadata")
    if isinstance(metadata, dict) and messages.BATCH_KEY in metadata:
        rest = {k: v for k, v in metadata.items() if k != messages.BATCH_KEY}
        result = dict(result, metadata=rest) if rest else {k: v for k, v in result.items() if k != "metadata"}
    if fmt == "asyncproc":
        return orjson.dumps(result)
    ok, status, body, error = outcome(result)
    digest = hashlib.sha1(orjson.dumps(result["id"])).hexdigest()[:24]
    response = None
    if status is not None:
        response = {"status_code": status, "request_id": f"req_{digest}", "body": body}
    return orjson.dumps({
        "id": f"batch_req_{digest}",
        "custom_id": str(result["id"]),
        "response": response,
        "error": None if ok else {"code": error_code(error), "message": error},
    })


class Output:
    """Appends result lines to a file, one per id, and keeps the counts."""

    def __init__(self, path: str, fmt: str, done: Set[str]) -> None:
        self.fmt = fmt
        self.done = done
        self.ok = self.failed = 0
        self._file = open(path, "ab")

    def add(self, results: List[dict], wanted: Callable[[dict], bool]) -> int:
        lines = []
        for result in results:
            key = messages.id_key(result.get("id"))
            if key in self.done or not wanted(result):
                continue
            self.done.add(key)
            lines.append(format_result(result, self.fmt) + b"\n")
            if outcome(result)[0]:
                self.ok += 1
            else:
                self.failed += 1
        if lines:
            self._file.write(b"".join(lines))
            self._file.flush()
        return len(lines)

    def close(self) -> None:
        self._file.close()


# -- commands ------------------------------------------------------------------------------

def _parser(name: str, description: str) -> argparse.ArgumentParser:
    parser = config.build_parser(os.environ, prog=f"asyncproc {name}", description=description)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _input_args(parser) -> None:
    parser.add_argument("input", help="JSONL file: asyncproc request messages or OpenAI Batch API lines")
    parser.add_argument("--completion-window", type=parse_window, default="24h",
                        help="deadline of requests that have none: now + this (24h, 30m, 90s, 2d)")
    parser.add_argument("--strict", action="store_true",
                        help="a malformed line aborts the whole submission (nothing is submitted)")


def _output_args(parser, required: bool) -> None:
    parser.add_argument("--output", "-o", required=required, help="JSONL results file (appended to; resumable)")
    parser.add_argument("--output-format", choices=FORMATS, default=None,
                        help="asyncproc results or OpenAI batch output lines (default: the input's format;"
                             " asyncproc for collect)")


def _report_input(path: str, found: Input, strict: bool) -> bool:
    """Print bad lines; False when --strict says to stop."""
    for number, reason in found.errors[:50]:
        print(f"{path}:{number}: {reason}; skipped", file=sys.stderr)
    if len(found.errors) > 50:
        print(f"{path}: ... and {len(found.errors) - 50} more malformed lines", file=sys.stderr)
    if found.errors and strict:
        print(f"asyncproc: {len(found.errors)} malformed lines in {path}; nothing submitted (--strict)",
              file=sys.stderr)
        return False
    return True


class _NoProgress:
    """Without tqdm (the tools extra): no bar."""

    def update(self, _n: int = 1) -> None:
        pass

    def set_postfix_str(self, *_args, **_kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, initial: int, disable: bool):
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoProgress()
    return tqdm(total=total, initial=initial, unit="req", dynamic_ncols=True, disable=disable,
                smoothing=0.1, file=sys.stderr)


def run_batch(argv: List[str]) -> int:
    parser = _parser("run-batch", "Submit a JSONL file of requests to asyncproc's queue, wait, and write"
                     " every result to --output. Run it again with the same --output to resume.")
    _input_args(parser)
    _output_args(parser, required=True)
    parser.add_argument("--batch", help="batch id (default: derived from the output file, so a resumed"
                        " run is the same batch)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds to wait for results before giving up (run again to resume)")
    settings, ns = config.parse_args(argv, parser=parser)
    found = read_input(ns.input, time.time(), ns.completion_window)
    if not _report_input(ns.input, found, ns.strict):
        return 1
    fmt = ns.output_format or ("openai" if found.formats == {"openai"} else "asyncproc")
    batch = ns.batch or "run-" + hashlib.sha1(os.path.abspath(ns.output).encode()).hexdigest()[:12]
    done_before = read_output(ns.output)
    awaiting = {messages.id_key(r["id"]) for r in found.requests} - done_before
    to_submit = [r for r in found.requests if messages.id_key(r["id"]) in awaiting]
    print(f"batch {batch}: {len(found.requests)} requests, {len(found.requests) - len(to_submit)} already in"
          f" {ns.output}; submitting {len(to_submit)} to {settings.queue_names[0]} ({settings.message_queue_impl})",
          file=sys.stderr)
    client = Client(settings)
    output = Output(ns.output, fmt, done_before)
    started = time.monotonic()
    bar = _progress(len(found.requests), len(found.requests) - len(to_submit), ns.no_progress)

    def ours(result: dict) -> bool:
        return result_batch(result) == batch and messages.id_key(result["id"]) in awaiting

    def take(results: List[dict]) -> None:
        wrote = output.add(results, ours)
        bar.update(wrote)
        in_flight = len(awaiting) - output.ok - output.failed
        bar.set_postfix_str(f"ok {output.ok}, failed {output.failed}, in flight {in_flight}", refresh=False)

    try:
        with client.results(batch=batch, total=len(found.requests)) as results:
            if client.persisted and to_submit:  # what an interrupted run left in Redis counts
                while (found_now := results.poll(0)):
                    take(found_now)
                to_submit = [r for r in to_submit if messages.id_key(r["id"]) not in output.done]
            client.submit(to_submit, batch=batch, forget=True, batch_total=len(found.requests))
            end = None if ns.timeout is None else time.monotonic() + ns.timeout
            while output.ok + output.failed < len(awaiting):
                if end is not None and time.monotonic() >= end:
                    bar.close()
                    missing = len(awaiting) - output.ok - output.failed
                    print(f"asyncproc: timed out with {missing} results missing; run again to resume",
                          file=sys.stderr)
                    return 1
                take(results.poll(0.5))
        client.finish_batch(batch)
    except ClientError as exc:
        bar.close()
        print(f"asyncproc: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        bar.close()
        print(f"\ninterrupted: {len(output.done)} of {len(found.requests)} results in {ns.output};"
              " run the same command again to resume", file=sys.stderr)
        return 130
    finally:
        output.close()
        client.close()
    bar.close()
    elapsed = time.monotonic() - started
    print(f"done: {output.ok} ok, {output.failed} failed, {len(found.errors)} malformed lines skipped;"
          f" {output.ok + output.failed} results in {elapsed:.1f}s"
          f" ({(output.ok + output.failed) / max(elapsed, 1e-9):.0f}/s) -> {ns.output}", file=sys.stderr)
    return 0


def submit(argv: List[str]) -> int:
    parser = _parser("submit", "Submit a JSONL file of requests to asyncproc's queue; prints the batch id.")
    _input_args(parser)
    parser.add_argument("--batch", help="batch id (default: a new random one)")
    settings, ns = config.parse_args(argv, parser=parser)
    found = read_input(ns.input, time.time(), ns.completion_window)
    if not _report_input(ns.input, found, ns.strict):
        return 1
    batch = ns.batch or "batch_" + uuid.uuid4().hex[:16]
    client = Client(settings)
    try:
        count = client.submit(found.requests, batch=batch)
    except ClientError as exc:
        print(f"asyncproc: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
    print(f"submitted {count} requests to {settings.queue_names[0]} ({settings.message_queue_impl});"
          f" {len(found.errors)} malformed lines skipped", file=sys.stderr)
    if not client.persisted:
        print(f"note: redis-pubsub publishes each result once, on {settings.redis.result_queue}: only a subscriber"
              " listening then gets it (run-batch listens while it submits)", file=sys.stderr)
    print(batch)
    return 0


def collect(argv: List[str]) -> int:
    parser = _parser("collect", "Write the results of a batch (or all results) waiting in Redis to a file.")
    _output_args(parser, required=True)
    parser.add_argument("--batch", help="only this batch's results (default: all)")
    parser.add_argument("--wait", action="store_true", help="wait until the batch is complete (needs --batch)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds --wait waits at most")
    settings, ns = config.parse_args(argv, parser=parser)
    client = Client(settings)
    if not client.persisted:
        client.close()
        print("asyncproc: collect needs a transport that keeps results (redis-sortedset or redis-streams);"
              f" with {settings.message_queue_impl} use run-batch, which listens while it submits", file=sys.stderr)
        return 2
    if ns.wait and not ns.batch:
        client.close()
        print("asyncproc: --wait: needs --batch", file=sys.stderr)
        return 2
    output = Output(ns.output, ns.output_format or "asyncproc", read_output(ns.output))
    try:
        total = int(client.batch(ns.batch).get("total", 0)) if ns.batch else 0
        if ns.batch and not total:
            print(f"asyncproc: no batch {ns.batch!r} was submitted", file=sys.stderr)
            return 1
        seen: Set[str] = set()

        def wanted(result: dict) -> bool:
            return ns.batch is None or result_batch(result) == ns.batch

        bar = _progress(total or None, 0, ns.no_progress)
        end = None if ns.timeout is None else time.monotonic() + ns.timeout
        if client.results_per_batch and not ns.batch:
            print(f"asyncproc: --batch: required with {settings.message_queue_impl} (each batch has its own"
                  " results subscription)", file=sys.stderr)
            return 2
        with client.results(batch=ns.batch) as results:
            while True:
                batch_results = results.poll(0.5 if ns.wait else 0)
                counted = [r for r in batch_results if wanted(r)]
                seen.update(messages.id_key(r["id"]) for r in counted)
                bar.update(output.add(counted, wanted))
                if not ns.wait and not batch_results:
                    break
                if ns.wait and (len(seen) >= total or (end is not None and time.monotonic() >= end)):
                    break
        bar.close()
    except ClientError as exc:
        print(f"asyncproc: {exc}", file=sys.stderr)
        return 1
    finally:
        output.close()
        client.close()
    print(f"wrote {output.ok + output.failed} results ({output.ok} ok, {output.failed} failed) to {ns.output}",
          file=sys.stderr)
    if ns.wait and len(seen) < total:
        print(f"asyncproc: timed out: {total - len(seen)} of {total} results missing", file=sys.stderr)
        return 1
    return 0


def batch_progress(client: Client, batches: List[str]) -> Dict[str, Dict[str, int]]:
    """Per batch: ok and failed results found in the result list or stream (one pass)."""
    counts = {b: {"ok": 0, "failed": 0} for b in batches}
    seen: Set[Tuple[str, str]] = set()
    if not client.counts_results:
        return counts
    with client.results() as results:
        while (found := results.poll(0)):
            for result in found:
                batch = result_batch(result)
                key = (batch, messages.id_key(result["id"]))
                if batch in counts and key not in seen:
                    seen.add(key)
                    counts[batch]["ok" if outcome(result)[0] else "failed"] += 1
    return counts


def status(argv: List[str]) -> int:
    parser = _parser("status", "Queue depth, in flight, retry set, dead letters and per-batch progress.")
    parser.add_argument("--batch", action="append", help="only this batch (may repeat; default: the last 20)")
    parser.add_argument("--json", action="store_true", help="one JSON object instead of tables")
    settings, ns = config.parse_args(argv, parser=parser)
    client = Client(settings)
    try:
        stats = client.queue_stats()
        batches = ns.batch or client.batch_ids()[-20:]
        records = {b: client.batch(b) for b in batches}
        progress = batch_progress(client, batches)
    except ClientError as exc:
        print(f"asyncproc: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
    rows = []
    for batch in batches:
        record, done = records[batch], progress[batch]
        total = int(record.get("total", 0))
        row = {"batch": batch, "total": total, "ok": done["ok"], "failed": done["failed"],
               "pending": total - done["ok"] - done["failed"],
               "state": "cancelled" if "cancelled" in record else ("unknown" if not record else
                                                                  "complete" if done["ok"] + done["failed"] >= total
                                                                  else "in progress"),
               "created": float(record.get("created", 0))}
        if not client.counts_results:
            row.update(ok=None, failed=None, pending=None, state="unknown" if not record else "submitted")
        rows.append(row)
    if ns.json:
        print(orjson.dumps({"transport": settings.message_queue_impl, "queues": stats, "batches": rows}).decode())
        return 0
    print(f"transport {settings.message_queue_impl} at {redact.url(settings.redis.url)}")
    for gauge, by_queue in stats.items():
        for queue, value in by_queue.items():
            print(f"  {gauge:<20} {queue:<32} {value:>10g}")
    if rows:
        print(f"{'batch':<28} {'state':<12} {'total':>8} {'ok':>8} {'failed':>8} {'pending':>8}  created")
        for row in rows:
            cells = [("-" if row[k] is None else row[k]) for k in ("total", "ok", "failed", "pending")]
            created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row["created"])) if row["created"] else "-"
            print(f"{row['batch']:<28} {row['state']:<12} {cells[0]:>8} {cells[1]:>8} {cells[2]:>8} {cells[3]:>8}"
                  f"  {created}")
    if not client.counts_results:
        print(f"({settings.message_queue_impl}: results cannot be counted without taking them, so per-batch"
              " progress is unknown here)")
    return 0


def cancel(argv: List[str]) -> int:
    parser = _parser("cancel", "Queued requests of a batch (or with given ids) get the error result"
                     " 'cancelled': queued ones are not dispatched, ones in flight are aborted.")
    parser.add_argument("--batch", help="the batch id submit printed")
    parser.add_argument("--id", action="append", default=[], help="a request id (may repeat)")
    settings, ns = config.parse_args(argv, parser=parser)
    client = Client(settings)
    try:
        client.cancel(ns.batch, ns.id)
    except ClientError as exc:
        print(f"asyncproc: {exc}", file=sys.stderr)
        return 2 if "nothing to cancel" in str(exc) else 1
    finally:
        client.close()
    what = ([f"batch {ns.batch}"] if ns.batch else []) + [f"id {i}" for i in ns.id]
    print(f"cancelled {', '.join(what)}: queued requests get the result 'cancelled' within a second",
          file=sys.stderr)
    return 0


def main(name: str, argv: List[str]) -> int:
    command = {"run-batch": run_batch, "submit": submit, "collect": collect, "status": status,
               "cancel": cancel}[name]
    try:
        return command(argv)
    except ClientError as exc:
        print(f"asyncproc {name}: {exc}", file=sys.stderr)
        return 1
    except config.ConfigError as exc:
        config.print_error(str(exc), prog=f"asyncproc {name}")
        return 2
    except OSError as exc:
        print(f"asyncproc {name}: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 2


