#!/usr/bin/env python3
"""A fixture Kubernetes API server for ringvip's API-source tests and benchmarks.

Python standard library only. It serves, over plain HTTP on 127.0.0.1:

  GET /api/v1/services
  GET /apis/discovery.k8s.io/v1/endpointslices
  GET /api/v1/nodes                (fieldSelector=metadata.name=N honoured)

as list (a `...List` with metadata.resourceVersion; items without kind and
apiVersion, as the API server sends them) and as watch (`watch=true`, chunked
JSON lines). Like the real API server (and its watch cache):

  * `limit=N` pages a list: items in key order (namespace/name), at most N
    per response, metadata.continue set while more remain; a request with
    `continue=T` gets the next page of the same snapshot (the resourceVersion
    of the first page). A token older than the compaction point (or one of a
    snapshot no longer kept: the last 16 are) gets HTTP 410 with a Status of
    reason Expired, as the real API server answers an expired continue;
  * every object is serialized once, when written, and lists and watch
    events are assembled from those bytes (the python side must not be what
    a scale benchmark measures);

  * resourceVersion is one global counter, bumped by every write;
  * a watch from resourceVersion R replays every event after R, then streams;
    from R=0 or none it first sends the current objects as ADDED;
  * a watch from an R older than the compaction point gets HTTP 200 with one
    ERROR event holding a Status with code 410 (reason Expired), then EOF;
  * `allowWatchBookmarks=true` gets BOOKMARK events (kind, apiVersion and
    metadata.resourceVersion only) every --bookmark-interval seconds;
  * `timeoutSeconds` ends a watch.

A control server on a second port changes the world (JSON bodies):

  POST /apply    {"resource": "services", "object": {...}}   create or replace
  POST /delete   {"resource": "services", "namespace": "default", "name": "x"}
  POST /batch    [{"op": "apply"|"delete", ...}, ...]       all in one go
  POST /hold     {"resource": "endpointslices"}: lists of it wait until /release;
                 with "continued": true only the pages after a list's first wait
  POST /release  {"resource": "endpointslices"}
  POST /drop     close every open watch (clients see EOF and resume)
  POST /expire   compact: one write's worth of resourceVersion is skipped and
                 everything older is expired (resumes get 410); drops watches
  POST /stop     the API port stops listening, every connection is closed
  POST /start    listen again on the same port (watch cache rebuilt: older
                 resourceVersions are expired, as after an API server restart)
  POST /restart  /stop then /start
  GET  /stats    {"watches": N, "lists": N, "pages": N, "watch_requests": N,
                  "expired_continues": N, "rv": N}  (a paged list counts
                 once in "lists", each of its responses in "pages")

On start it writes {"api": port, "control": port, "kubeconfig": path} as one
JSON line to stdout (and to --info FILE when given).
"""

import argparse
import base64
import bisect
import gc
import json
import os
import socket
import socketserver
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

RESOURCES = {
    "services": ("/api/v1/services", "v1", "Service"),
    "endpointslices": ("/apis/discovery.k8s.io/v1/endpointslices", "discovery.k8s.io/v1", "EndpointSlice"),
    "nodes": ("/api/v1/nodes", "v1", "Node"),
}
PATHS = {path: name for name, (path, _, _) in RESOURCES.items()}


class World:
    """Objects, the event log and the resourceVersion counter, under one lock."""

    def __init__(self):
        self.cond = threading.Condition()
        self.rv = 1
        self.compacted = 0  # a resume from rv < compacted is expired
        self.objects = {name: {} for name in RESOURCES}
        # The list form of each object (JSON without kind and apiVersion),
        # serialized once when written.
        self.raw = {name: {} for name in RESOURCES}
        # Paged lists in progress: (resource, rv, fieldSelector) -> the
        # snapshot's items in key order (the last SNAPSHOTS kept).
        self.snapshots = {}
        # Per resource: events in resourceVersion order, and their versions
        # (for bisect: a watch finds its place without scanning the log).
        self.log = {name: [] for name in RESOURCES}  # (rv, resource, type, object)
        self.log_rvs = {name: [] for name in RESOURCES}
        self.drop_gen = 0
        self.held = set()
        self.held_continued = set()  # only pages after the first are held
        self.stopped = False
        self.stats = {"watches": 0, "lists": 0, "pages": 0, "watch_requests": 0, "held_lists": 0,
                      "expired_continues": 0}

    def _bump(self):
        self.rv += 1
        return self.rv

    def apply(self, resource, obj):
        meta = obj.setdefault("metadata", {})
        key = (meta.get("namespace", ""), meta["name"])
        rv = self._bump()
        meta["resourceVersion"] = str(rv)
        meta.setdefault("uid", "uid-%s-%d" % (meta["name"], rv))
        _, api_version, kind = RESOURCES[resource]
        obj["apiVersion"], obj["kind"] = api_version, kind
        kind_of = "MODIFIED" if key in self.objects[resource] else "ADDED"
        raw = item_bytes(obj)
        self.objects[resource][key] = obj
        self.raw[resource][key] = raw
        self.log[resource].append((rv, resource, kind_of, obj, event_bytes(kind_of, resource, raw)))
        self.log_rvs[resource].append(rv)

    def delete(self, resource, namespace, name):
        obj = self.objects[resource].pop((namespace or "", name), None)
        if obj is None:
            return False
        del self.raw[resource][(namespace or "", name)]
        rv = self._bump()
        gone = json.loads(json.dumps(obj))
        gone["metadata"]["resourceVersion"] = str(rv)
        raw = item_bytes(gone)
        self.log[resource].append((rv, resource, "DELETED", gone, event_bytes("DELETED", resource, raw)))
        self.log_rvs[resource].append(rv)
        return True

    def expire(self):
        """Compacts everything up to a fresh resourceVersion."""
        self.compacted = self._bump()
        for name in RESOURCES:
            i = bisect.bisect_left(self.log_rvs[name], self.compacted)
            del self.log[name][:i]
            del self.log_rvs[name][:i]
        # Continue tokens of older snapshots are expired from now on.
        self.snapshots = {k: v for k, v in self.snapshots.items() if k[1] >= self.compacted}

    def snapshot(self, resource, field_selector):
        """The current items of `resource` in key order, kept for paging."""
        key = (resource, self.rv, field_selector or "")
        items = self.snapshots.get(key)
        if items is None:
            objects, raw = self.objects[resource], self.raw[resource]
            items = [raw[k] for k in sorted(raw) if matches(objects[k], field_selector)]
            self.snapshots[key] = items
            while len(self.snapshots) > SNAPSHOTS:
                del self.snapshots[next(iter(self.snapshots))]
        return items

    def since(self, resource, rv):
        """Events of `resource` after resourceVersion `rv`."""
        i = bisect.bisect_right(self.log_rvs[resource], rv)
        return self.log[resource][i:]


# Paged-list snapshots kept for their continue tokens.
SNAPSHOTS = 16


def item_bytes(obj):
    """An object's list form: compact JSON without kind and apiVersion."""
    item = dict(obj)
    item.pop("kind", None)
    item.pop("apiVersion", None)
    return json.dumps(item, separators=(",", ":")).encode()


def event_bytes(typ, resource, raw):
    """A watch event line of an object, from its list form."""
    _, api_version, kind = RESOURCES[resource]
    head = b'{"kind":"%s","apiVersion":"%s"' % (kind.encode(), api_version.encode())
    body = head + (b"," + raw[1:] if len(raw) > 2 else b"}")
    return b'{"type":"%s","object":%s}\n' % (typ.encode(), body)


def encode_token(resource, rv, field_selector, start):
    t = json.dumps({"r": resource, "rv": rv, "f": field_selector or "", "start": start})
    return base64.urlsafe_b64encode(t.encode()).decode()


def decode_token(token):
    """(resource, rv, fieldSelector, start) of a continue token; ValueError if malformed."""
    try:
        t = json.loads(base64.urlsafe_b64decode(token.encode()))
        return t["r"], int(t["rv"]), t["f"], int(t["start"])
    except (KeyError, TypeError, ValueError, UnicodeDecodeError, base64.binascii.Error) as e:
        raise ValueError(str(e))


WORLD = World()
OPEN = set()  # every open API connection, closed on /stop
OPEN_LOCK = threading.Lock()
ARGS = None


def status_410(rv):
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": "too old resource version: %s (%d)" % (rv, WORLD.compacted),
        "reason": "Expired",
        "code": 410,
    }


def status(code, reason, message):
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


def matches(obj, field_selector):
    if not field_selector:
        return True
    for term in field_selector.split(","):
        if "=" not in term:
            continue
        k, v = term.split("=", 1)
        k = k.rstrip("=")
        if k == "metadata.name" and obj["metadata"].get("name") != v:
            return False
        if k == "metadata.namespace" and obj["metadata"].get("namespace") != v:
            return False
    return True


def send_json(handler, code, body):
    """One JSON response (compact, with its length) from either server."""
    send_bytes(handler, code, json.dumps(body, separators=(",", ":")).encode())


def send_bytes(handler, code, data):
    """One JSON response already serialized."""
    handler.send_response(code)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


class ApiHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # TCP_NODELAY: a response's headers and body, and a watch's events, are
    # separate writes; with Nagle a write after an unacknowledged one waits
    # for the peer's delayed ACK (40 ms), which a real API server never adds.
    disable_nagle_algorithm = True

    def log_message(self, *a):
        pass

    def setup(self):
        super().setup()
        with OPEN_LOCK:
            OPEN.add(self.connection)

    def finish(self):
        with OPEN_LOCK:
            OPEN.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def send_json(self, code, body):
        send_json(self, code, body)

    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        resource = PATHS.get(url.path)
        if resource is None:
            self.send_json(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                 "reason": "NotFound", "code": 404, "message": "not found"})
            return
        q = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query).items()}
        if q.get("watch") in ("true", "1"):
            self.watch(resource, q)
        else:
            self.list(resource, q)

    def list(self, resource, q):
        _, api_version, kind = RESOURCES[resource]
        token = q.get("continue", "")
        try:
            limit = int(q.get("limit", "0") or "0")
            start = decode_token(token) if token else None
        except ValueError as e:
            self.send_json(400, status(400, "BadRequest", "invalid list parameters: %s" % e))
            return
        with WORLD.cond:
            def held():
                return resource in WORLD.held or (token and resource in WORLD.held_continued)
            WORLD.stats["held_lists"] += bool(held())
            while held():
                WORLD.cond.wait()
            WORLD.stats["pages"] += 1
            if start is None:
                # A new list (a continuation is a page of the same list).
                WORLD.stats["lists"] += 1
                rv, field_selector, first = WORLD.rv, q.get("fieldSelector"), 0
                if limit > 0:
                    items = WORLD.snapshot(resource, field_selector)
                else:
                    objects, raw = WORLD.objects[resource], WORLD.raw[resource]
                    items = [raw[k] for k, o in objects.items() if matches(o, field_selector)]
            else:
                r, rv, field_selector, first = start
                items = WORLD.snapshots.get((r, rv, field_selector))
                if r != resource or items is None or rv < WORLD.compacted:
                    WORLD.stats["expired_continues"] += 1
                    items = None
        if items is None:
            # What the API server answers once the token's snapshot is compacted.
            self.send_json(410, status(410, "Expired",
                                       "The provided continue parameter is too old to display a "
                                       "consistent list result. You can start a new list without "
                                       "the continue parameter."))
            return
        meta = {"resourceVersion": str(rv)}
        if limit > 0 and first + limit < len(items):
            page = items[first:first + limit]
            meta["continue"] = encode_token(resource, rv, field_selector, first + limit)
            meta["remainingItemCount"] = len(items) - first - limit
        else:
            page = items[first:] if first else items
        head = json.dumps({"kind": kind + "List", "apiVersion": api_version, "metadata": meta},
                          separators=(",", ":")).encode()
        send_bytes(self, 200, head[:-1] + b',"items":[' + b",".join(page) + b"]}")

    def chunk(self, event):
        self.chunk_bytes(json.dumps(event, separators=(",", ":")).encode() + b"\n")

    def chunk_bytes(self, data):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def watch(self, resource, q):
        _, api_version, kind = RESOURCES[resource]
        field_selector = q.get("fieldSelector")
        bookmarks = q.get("allowWatchBookmarks") in ("true", "1")
        timeout = float(q.get("timeoutSeconds", "1800"))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        deadline = time.monotonic() + timeout
        next_bookmark = time.monotonic() + ARGS.bookmark_interval
        with WORLD.cond:
            WORLD.stats["watch_requests"] += 1
            rv_param = q.get("resourceVersion", "")
            initial = []
            if rv_param in ("", "0"):
                last = WORLD.rv
                raw = WORLD.raw[resource]
                initial = [event_bytes("ADDED", resource, raw[k])
                           for k, o in WORLD.objects[resource].items() if matches(o, field_selector)]
            else:
                last = int(rv_param)
                if last < WORLD.compacted:
                    expired = True
                else:
                    expired = False
            drop_gen = WORLD.drop_gen
            WORLD.stats["watches"] += 1
        try:
            if rv_param not in ("", "0") and expired:
                self.chunk({"type": "ERROR", "object": status_410(rv_param)})
                return
            for ev in initial:
                self.chunk_bytes(ev)
            while True:
                with WORLD.cond:
                    pending = WORLD.since(resource, last)
                    if not pending:
                        now = time.monotonic()
                        wait = min(deadline, next_bookmark if bookmarks else deadline) - now
                        if WORLD.drop_gen == drop_gen and not WORLD.stopped and wait > 0:
                            WORLD.cond.wait(wait)
                        pending = WORLD.since(resource, last)
                    if WORLD.drop_gen != drop_gen or WORLD.stopped:
                        break
                    current_rv = WORLD.rv
                # Every pending event in one write: a burst of changes is
                # delivered at once, not one flush per event.
                out = []
                for rv, _, typ, obj, data in pending:
                    last = rv
                    if matches(obj, field_selector):
                        out.append(b"%x\r\n%s\r\n" % (len(data), data))
                if out:
                    self.wfile.write(b"".join(out))
                    self.wfile.flush()
                now = time.monotonic()
                if now >= deadline:
                    break
                if bookmarks and now >= next_bookmark:
                    next_bookmark = now + ARGS.bookmark_interval
                    last = max(last, current_rv)
                    self.chunk({"type": "BOOKMARK", "object": {
                        "kind": kind, "apiVersion": api_version,
                        "metadata": {"resourceVersion": str(last)}}})
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError:
            pass
        finally:
            with WORLD.cond:
                WORLD.stats["watches"] -= 1
            self.close_connection = True


class ApiServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128


API = {"server": None, "port": 0}


def start_api():
    server = ApiServer(("127.0.0.1", API["port"]), ApiHandler)
    API["port"] = server.server_address[1]
    API["server"] = server
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()


def stop_api():
    server = API["server"]
    if server is None:
        return
    API["server"] = None
    with WORLD.cond:
        WORLD.stopped = True
        WORLD.cond.notify_all()
    server.shutdown()
    server.server_close()
    with OPEN_LOCK:
        conns = list(OPEN)
    for c in conns:
        try:
            c.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
    # Watch handlers see `stopped` and return.
    time.sleep(0.05)
    with WORLD.cond:
        WORLD.stopped = False


class ControlHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # See ApiHandler: a kept-alive client would wait 40 ms per request.
    disable_nagle_algorithm = True

    def log_message(self, *a):
        pass

    def reply(self, code, body):
        send_json(self, code, body)

    def do_GET(self):
        if self.path == "/stats":
            with WORLD.cond:
                self.reply(200, dict(WORLD.stats, rv=WORLD.rv, listening=API["server"] is not None))
        else:
            self.reply(404, {"error": "unknown path"})

    def do_POST(self):
        n = int(self.headers.get("Content-Length", "0"))
        body = json.loads(self.rfile.read(n) or b"null") if n else None
        try:
            self.run_command(self.path, body)
        except (KeyError, ValueError, TypeError) as e:
            self.reply(400, {"error": repr(e)})
            return
        self.reply(200, {"rv": WORLD.rv})

    def run_command(self, path, body):
        if path in ("/apply", "/delete", "/batch"):
            ops = body if path == "/batch" else [dict(body, op=path[1:])]
            with WORLD.cond:
                for op in ops:
                    if op["op"] == "apply":
                        WORLD.apply(op["resource"], op["object"])
                    elif op["op"] == "delete":
                        WORLD.delete(op["resource"], op.get("namespace", ""), op["name"])
                    else:
                        raise ValueError("unknown op %r" % op["op"])
                WORLD.cond.notify_all()
        elif path in ("/hold", "/release"):
            with WORLD.cond:
                if path == "/hold":
                    held = WORLD.held_continued if body.get("continued") else WORLD.held
                    held.add(body["resource"])
                else:
                    WORLD.held.discard(body["resource"])
                    WORLD.held_continued.discard(body["resource"])
                WORLD.cond.notify_all()
        elif path == "/drop":
            with WORLD.cond:
                WORLD.drop_gen += 1
                WORLD.cond.notify_all()
        elif path == "/expire":
            with WORLD.cond:
                WORLD.expire()
                WORLD.drop_gen += 1
                WORLD.cond.notify_all()
        elif path == "/stop":
            stop_api()
        elif path == "/start":
            if API["server"] is None:
                with WORLD.cond:
                    WORLD.expire()
                start_api()
        elif path == "/restart":
            stop_api()
            with WORLD.cond:
                WORLD.expire()
            start_api()
        else:
            raise ValueError("unknown path %s" % path)


def main():
    global ARGS
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", required=True, help="where the kubeconfig is written")
    p.add_argument("--bookmark-interval", type=float, default=1.0)
    p.add_argument("--load", help="JSON file: a /batch body applied before serving")
    p.add_argument("--info", help="also write the start-up line to this file")
    p.add_argument("--stdin", action="store_true", help="exit when stdin reaches EOF")
    ARGS = p.parse_args()
    # No cycle collection at all: the objects and the event log are JSON
    # documents (no reference cycles; reference counting frees them), and a
    # full collection walks every one of them with every thread stopped.
    # With the collector on, at 100,000 Services a collection stalled the
    # server for seconds after the load, and under 1,000 changes/s the
    # growing event log made watch delivery's p99 ~150 ms (max ~0.5 s) at
    # any size, which benches/kube_scale.py measured as ringvip's latency.
    gc.disable()
    if ARGS.load:
        with open(ARGS.load) as f:
            for op in json.load(f):
                if op["op"] == "apply":
                    WORLD.apply(op["resource"], op["object"])
        # The watch cache starts now, as when an API server starts.
        WORLD.expire()
    start_api()
    control = ThreadingHTTPServer(("127.0.0.1", 0), ControlHandler)
    control.daemon_threads = True
    kubeconfig = os.path.join(ARGS.dir, "kubeconfig")
    with open(kubeconfig, "w") as f:
        f.write(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fixture\n  cluster:\n"
            "    server: http://127.0.0.1:%d\ncontexts:\n- name: fixture\n  context:\n"
            "    cluster: fixture\n    user: fixture\ncurrent-context: fixture\n"
            "users:\n- name: fixture\n  user: {}\n" % API["port"])
    line = json.dumps({"api": API["port"], "control": control.server_address[1], "kubeconfig": kubeconfig})
    if ARGS.info:
        with open(ARGS.info, "w") as f:
            f.write(line + "\n")
    print(line, flush=True)
    threading.Thread(target=control.serve_forever, daemon=True).start()
    try:
        if ARGS.stdin:
            # Ends with the parent: stdin at EOF means the test is gone.
            while sys.stdin.buffer.read(4096):
                pass
        else:
            threading.Event().wait()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
