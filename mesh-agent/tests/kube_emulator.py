"""Starts KMock's KubernetesEmulator (PyPI `kmock`, pinned by `cargo xtask test`) on
127.0.0.1:PORT for the Kubernetes discovery tests (mesh-agent/tests/kube_discovery.rs), with
nothing preloaded. It prints `listening on PORT` once it serves, and runs until killed.

    python3 kube_emulator.py --port 0 [--host ADDRESS] [--preload FILE]

(`--preload` puts the objects of a JSON array into the store before serving, as if created one
by one: creating 10,000 pods over HTTP takes the emulator many minutes, as it scans every
object on each request; mesh-agent/tests/kube_memory.rs preloads.)

(tests/tests/kubernetes.rs, the lab's Kubernetes mode, serves it on a node's underlay address.)

The emulator is an independent in-memory Kubernetes API over HTTP (list, watch, create, patch,
delete, API discovery). What it lacks and the agent's watchers rely on is added here, and only
here (docs/kubernetes.md says so too):

- resourceVersion: KMock 0.8 stamps none on objects or lists, and a kube-rs watcher cannot
  resume without one. Every create, patch and delete gets the next number of one counter; a
  list carries the current one.
- watch from a resourceVersion: KMock replays every object as ADDED on each watch; here a
  watch that names a resourceVersion gets only what changed after it (objects changed or
  deleted in between first, then the live events), as the API server does.
- 410 Gone: POST /_emulator/expire ends every open watch and answers the next watches that
  resume from an older resourceVersion with an ERROR event of code 410 (Expired), so that
  the watchers must relist.
- dropped connections: POST /_emulator/drop ends every open watch (the connection closes), so
  that the watchers must resume from their last resourceVersion.
- the Namespace resource itself: KMock 0.8 reads `/api/v1/namespaces[/NAME]` as a namespace
  prefix without a resource (and fails); here those paths are the cluster-scoped resource
  `namespaces` (with `status` and `finalize` as its subresources).
- field selectors: KMock 0.8 ignores `fieldSelector`; here lists and watches honour its
  `path=value` and `path!=value` terms on any dotted field path (the agent selects its own
  node's pods with `spec.nodeName=NODE`). An object that stops matching is not turned into a
  DELETED event, as an API server would (a pod's node never changes).
- resources are declared up front (KMock knows a resource only once it holds an object of
  it, and answers a list of an unknown one with 404, where an API server lists nothing).
- the `status` subresource of HTTPRoutes (`gateway.networking.k8s.io/v1`, served without a
  CRD, as AuthorizationPolicy is): a patch of `.../NAME/status` changes the status alone, a
  patch of the object itself leaves the status alone; and the metadata the API server sets:
  `creationTimestamp` and `uid` on create, `generation` 1 on create and one more at each patch
  of `spec` (the waypoint's route status reports `observedGeneration`, its routes their age).

Not emulated, and not used by the watchers: label selectors, server-side apply,
deletion of a key by a merge patch with null (the tests change labels instead of removing
them), PUT. KMock keeps the `status` an object is created with (an API server takes status
only through the status subresource): the tests create pods with their status, as a kubelet
would have reported it.

MESH_EMULATOR_DEBUG=1 logs every request to stderr.
"""

import argparse
import asyncio
import json
import os
import sys
import time
import uuid

import kmock
from kmock._internal import enums, parsing

_parse_path = parsing.parse_path


def parse_path(path: str) -> parsing.ParsedPath:
    """KMock's path parser, plus the cluster-scoped `namespaces` resource."""
    parts = path.strip("/").split("/")
    if parts[:3] == ["api", "v1", "namespaces"] and (
        len(parts) <= 4 or (len(parts) == 5 and parts[4] in ("status", "finalize"))
    ):
        name = parts[3] if len(parts) > 3 else None
        sub = parts[4] if len(parts) > 4 else None
        return parsing.ParsedPath("", "v1", "namespaces", None, name, sub)
    return _parse_path(path)


parsing.parse_path = parse_path

RESOURCES = {
    # key: (kind, namespaced, singular name, short names), as the API server's discovery has them
    "v1/namespaces": ("Namespace", False, "namespace", {"ns"}),
    "v1/pods": ("Pod", True, "pod", {"po"}),
    "v1/services": ("Service", True, "service", {"svc"}),
    "discovery.k8s.io/v1/endpointslices": ("EndpointSlice", True, "endpointslice", set()),
    "security.istio.io/v1/authorizationpolicies": ("AuthorizationPolicy", True, "authorizationpolicy", {"ap"}),
    "events.k8s.io/v1/events": ("Event", True, "event", {"ev"}),
    "gateway.networking.k8s.io/v1/httproutes": ("HTTPRoute", True, "httproute", set()),
}

# Resources whose status changes only through their `status` subresource, and whose objects
# get the metadata the API server sets (generation, creationTimestamp, uid).
WITH_STATUS = {"gateway.networking.k8s.io/v1/httproutes"}


def resource_key(resource) -> str:
    return f"{resource.group}/{resource.version}/{resource.plural}".lstrip("/")


def field_matches(raw: dict, selector: str) -> bool:
    """Whether an object matches a field selector of `path=value` / `path!=value` terms."""
    for term in filter(None, selector.split(",")):
        negate = "!=" in term
        path, _, want = term.partition("!=" if negate else "=")
        want = want.lstrip("=")  # `==` is `=`
        value = raw
        for part in path.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        have = "" if value is None else str(value)
        if (have == want) == negate:
            return False
    return True


class Emulator(kmock.KubernetesEmulator):
    """KMock's emulator with the behaviours listed in the module documentation."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.revision = 1
        # Watches resuming from a resourceVersion at or below this one get 410 Gone.
        self.expired_up_to = 0
        self.end_watches = asyncio.Event()
        for key, (kind, namespaced, singular, short) in RESOURCES.items():
            self.resources[key] = kmock.ResourceInfo(
                kind=kind,
                namespaced=namespaced,
                singular=singular,
                shortnames=short,
                verbs={"get", "list", "watch", "create", "patch", "delete"},
                subresources={"status"} if key in WITH_STATUS else set(),
            )
        self["post /_emulator/expire"] << self._expire
        self["post /_emulator/drop"] << self._drop

    def preload(self, objects: list) -> None:
        """Stores `objects` as if each had been created (a resourceVersion each)."""
        keys = {(kind, key.rsplit("/", 1)[0]): key for key, (kind, *_) in RESOURCES.items()}
        for raw in objects:
            group_version = raw.get("apiVersion", "")
            key = keys.get((raw.get("kind"), group_version))
            if key is None:
                raise SystemExit(f"--preload: no resource for {group_version} {raw.get('kind')}")
            meta = raw.setdefault("metadata", {})
            meta["resourceVersion"] = self._next()
            self.objects[key, meta.get("namespace"), meta["name"]] = raw

    def _next(self) -> str:
        self.revision += 1
        return str(self.revision)

    def _expire(self) -> dict:
        self.expired_up_to = self.revision
        self._next()
        self._end_open_watches()
        return {"expired_up_to": self.expired_up_to}

    def _drop(self) -> dict:
        self._end_open_watches()
        return {"dropped": True}

    def _end_open_watches(self) -> None:
        self.end_watches.set()
        self.end_watches = asyncio.Event()

    async def _handle(self, request):
        if os.environ.get("MESH_EMULATOR_DEBUG"):
            print(f"emulator: {request.method} {request.url.path_qs}", file=sys.stderr, flush=True)
        if request.resource is not None and isinstance(request.data, dict):
            if resource_key(request.resource) in WITH_STATUS:
                self._as_the_api_server(request)
            if request.action in (enums.action.CREATE, enums.action.UPDATE):
                request.data.setdefault("metadata", {})["resourceVersion"] = self._next()
        if request.resource is not None and request.action == enums.action.DELETE:
            key = (request.resource, request.namespace, request.name)
            if key in self.objects and not self.objects[key].deleted:
                self.objects[key].patch({"metadata": {"resourceVersion": self._next()}})
        return await super()._handle(request)

    def _as_the_api_server(self, request) -> None:
        """The status subresource and the server-set metadata (WITH_STATUS resources)."""
        data = request.data
        meta = data.setdefault("metadata", {})
        if request.action == enums.action.CREATE:
            meta["generation"] = 1
            meta.setdefault("creationTimestamp", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            meta.setdefault("uid", str(uuid.uuid4()))
            data.pop("status", None)
        elif request.action == enums.action.UPDATE:
            if request.subresource == "status":
                for field in [f for f in data if f not in ("status", "metadata")]:
                    del data[field]
                data["metadata"] = {}
            else:
                data.pop("status", None)
                key = (request.resource, request.namespace, request.name)
                if "spec" in data and key in self.objects:
                    current = self.objects[key].get("metadata", {}).get("generation", 0)
                    meta["generation"] = int(current) + 1

    async def _serve_version(self, request):
        served = await super()._serve_version(request)
        # KMock names the core group's version "/v1"; kubectl's discovery wants "v1".
        served["groupVersion"] = served["groupVersion"].lstrip("/")
        return served

    async def _serve_list(self, request):
        listed = await super()._serve_list(request)
        fields = request.params.get("fieldSelector", "")
        listed["items"] = [o for o in listed["items"] if field_matches(o, fields)]
        listed["metadata"] = {"resourceVersion": str(self.revision)}
        info = RESOURCES.get(resource_key(request.resource))
        if info is not None:
            listed["kind"] = f"{info[0]}List"
        listed["apiVersion"] = (
            f"{request.resource.group}/{request.resource.version}"
            if request.resource.group
            else request.resource.version
        )
        return listed

    async def _serve_watch(self, request):
        fields = request.params.get("fieldSelector", "")
        async for event in self._watch(request):
            if isinstance(event, dict) and event.get("type") != "ERROR":
                if not field_matches(event.get("object", {}), fields):
                    continue
            yield event

    async def _watch(self, request):
        since = request.params.get("resourceVersion", "")
        if not since or since == "0":
            async for event in super()._serve_watch(request):
                yield event
            return
        yield b""
        if int(since) <= self.expired_up_to:
            yield {
                "type": "ERROR",
                "object": {
                    "apiVersion": "v1",
                    "kind": "Status",
                    "metadata": {},
                    "status": "Failure",
                    "message": f"too old resource version: {since} ({self.expired_up_to + 1})",
                    "reason": "Expired",
                    "code": 410,
                },
            }
            return
        end = self.end_watches
        since = int(since)

        def newer(raw) -> bool:
            rv = raw.get("metadata", {}).get("resourceVersion", "0")
            return int(rv) > since

        # Mark the bus before looking at the objects, so that nothing falls between the two
        # (an object changed in between comes twice, which a watcher takes as it is).
        bus = self._buses[request.resource]
        marker = await bus.mark()
        stream = bus.stream(since=marker).__aiter__()
        # Objects changed or deleted between the list and this watch, as the API server's
        # watch cache replays them (a deletion in that gap must not be lost: the watcher
        # would keep the object until its next relist).
        for (resource, namespace, name), obj in list(self.objects.items()):
            if resource != request.resource or obj.empty:
                continue
            if request.namespace is not None and namespace != request.namespace:
                continue
            last = obj.last.raw
            if newer(last):
                yield {"type": "DELETED" if obj.deleted else "MODIFIED", "object": last}
        ended = asyncio.ensure_future(end.wait())
        try:
            while True:
                following = asyncio.ensure_future(stream.__anext__())
                done, _ = await asyncio.wait({following, ended}, return_when=asyncio.FIRST_COMPLETED)
                if following not in done:
                    following.cancel()
                    return
                event = following.result()
                raw = event.get("object", {})
                meta = raw.get("metadata", {})
                if request.namespace is not None and meta.get("namespace") != request.namespace:
                    continue
                if newer(raw):
                    yield event
        finally:
            ended.cancel()
            await bus.unmark(marker)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    # The lab's Kubernetes test serves it on a node's underlay address, inside that node's
    # network namespace, so that every node's agent reaches it.
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--preload", help="a JSON array of objects to hold from the start")
    args = parser.parse_args()
    async with Emulator() as emulator, kmock.Server(emulator, host=args.host, port=args.port) as server:
        if args.preload:
            with open(args.preload) as f:
                emulator.preload(json.load(f))
        print(f"listening on {server.port}", flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
