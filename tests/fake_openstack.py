"""A small fake of Chameleon's OpenStack on 127.0.0.1, enough for python-chi's lease -> server ->
floating IP -> release flow: Keystone tokens, Blazar leases/hosts/allocations, Nova servers/keypairs/
flavors, Glance images, Neutron networks/floating IPs/ports, and the resource API's sites and nodes.

Two sites, CHI@UC and CHI@TACC, share one server under path prefixes. python-chi builds a site's
Keystone URL as `<web>:5000/v3`, so `web` is `http://127.0.0.1:PORT/uc` and Keystone answers on the
path `/uc:5000/v3`. Knobs on `FakeCloud` make leases fail (`lease_outcome="ERROR"`), Blazar refuse
(`refuse_lease`), builds fail (`server_outcome="ERROR"`), nodes be booked (`booked`: Blazar then refuses
them with "Not enough hosts available", as the real one does), the site refuse floating-IP reservations
(`fip_reservable`; listing Blazar's floating IPs is admin-only, as in Chameleon's policy: 403), the on-demand floating-IP pool hold only so many (`fip_pool`, None: no limit) or any
request fail (`faults`).

A lease holds `min` hosts of its node type (Blazar refuses with "Not enough hosts available" when fewer are
free: not held by another live lease, nor `booked`); held hosts show in the allocations the hardware API
reads. Nova builds as many servers on a reservation as it holds hosts (one more goes to ERROR, "No valid
host"). Every server's fixed (private) address is 127.0.0.1, so a hop to a node lands on a loopback sshd.

Where the real services take their time, so does the fake: a new lease is CREATING, then PENDING,
STARTING and ACTIVE; a deleted lease is DELETING for a few polls, then gone (with the floating IPs
reserved in it); a deleted bare-metal server stays listed for a few polls.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

from keystoneauth1 import fixture

SITES = {"uc": "CHI@UC", "tacc": "CHI@TACC"}
NODES = {"uc": [("gpu_a100_pcie", 2), ("compute_gigaio", 1), ("compute_skylake", 2)], "tacc": [("compute_liqid", 2)]}
POLLS_TO_DELETE = 2  # reads of a deleted lease or server before it is gone
FMT = "%Y-%m-%dT%H:%M:%S.%f"
# python-chi keeps its session (and token) across tests, each of which starts a fresh fake: they share the
# tokens issued, as clients of one Keystone would
ISSUED: set[str] = set()


CLOCK = [dt.timedelta(0)]  # how far the fake's clock is ahead of the real one (FakeCloud.advance)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None) + CLOCK[0]


class Site:
    def __init__(self, uid: str):
        self.uid, self.name = uid, SITES[uid]
        self.leases: dict[str, dict] = {}
        self.servers: dict[str, dict] = {}
        self.fips: dict[str, dict] = {}
        self.ports: dict[str, dict] = {}
        self.keypairs: dict[str, dict] = {}
        self.polls: dict[str, int] = {}
        self.held: dict[str, list[str]] = {}  # lease id -> the host ids it holds
        self.hosts = [{"id": str(i), "hypervisor_hostname": f"{uid}-{t}-{n}", "node_type": t, "reservable": True}
                      for i, (t, n) in enumerate((t, n) for t, count in NODES[uid] for n in range(count))]
        self.networks = [{"id": f"net-shared-{uid}", "name": "sharednet1", "router:external": False},
                         {"id": f"net-public-{uid}", "name": "public", "router:external": True}]
        self.images = [{"id": f"img-{uid}-{i}", "name": name, "status": "active",
                        "created_at": "2026-01-01T00:00:00Z", "visibility": "public"}
                       for i, name in enumerate(("CC-Ubuntu22.04-CUDA", "CC-Ubuntu24.04-CUDA"))]


class FakeCloud:
    """The fake cloud, served on a free port; use as a context manager."""

    def __init__(self, polls_to_active: int = 2):
        self.sites = {uid: Site(uid) for uid in SITES}
        self.lock = threading.RLock()
        self.requests: list[tuple[str, str]] = []
        self.polls_to_active = polls_to_active
        self.lease_outcome = "ACTIVE"
        self.server_outcome = "ACTIVE"
        self.refuse_lease: str | None = None
        self.booked: set[str] = set()  # node types with every node reserved from an hour ago until booked_for from now
        self.booked_for = dt.timedelta(days=2)
        self.booked_after_first_look: dt.timedelta | None = None  # set: the booking ends that long after it is first read
        self.fip_reservable = True  # Blazar accepts virtual:floatingip reservations
        self.fip_pool: int | None = None  # on-demand floating IPs left (None: no limit)
        self.access_token = "hub-oidc-access-token"  # what Chameleon's JupyterHub puts in OS_ACCESS_TOKEN
        self.tokens = ISSUED  # the Keystone tokens issued (one Keystone for every fake in a test session)
        self.scopes: list[dict] = []  # the scope each token request asked for
        # (method, path regex, when, HTTP code): answer a matching request with that error, "before" doing it,
        # "after" doing it, or "drop" the connection after doing it (a lost reply); tests/test_faults.py
        self.faults: list[tuple[str, str, str, int]] = []
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.cloud = self  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> "FakeCloud":
        CLOCK[0] = dt.timedelta(0)
        self.booked_until = _now() + self.booked_for
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        CLOCK[0] = dt.timedelta(0)

    def advance(self, delta: dt.timedelta) -> None:
        """Move the fake's clock on (a booked lease starts when it passes the lease's start)."""
        CLOCK[0] += delta

    def booking(self) -> tuple[dt.datetime, dt.datetime]:
        """The window in which the `booked` node types are taken by someone else."""
        with self.lock:
            if self.booked_after_first_look is not None:
                self.booked_until, self.booked_after_first_look = _now() + self.booked_after_first_look, None
        return self.booked_until - self.booked_for - dt.timedelta(hours=1), self.booked_until

    def env(self, site: str = "CHI@UC") -> dict[str, str]:
        """The environment an application-credential openrc would set, pointed at this fake."""
        uid = next(u for u, n in SITES.items() if n == site)
        return {"CHI_RESOURCE_API_URL": f"{self.url}/resource-api", "OS_AUTH_URL": f"{self.url}/{uid}:5000/v3",
                "OS_AUTH_TYPE": "v3applicationcredential", "OS_APPLICATION_CREDENTIAL_ID": "fake-cred",
                "OS_APPLICATION_CREDENTIAL_SECRET": "fake-secret", "OS_REGION_NAME": site, "OS_INTERFACE": "public",
                "OS_IDENTITY_API_VERSION": "3", "OS_PROJECT_NAME": "CHI-000000"}

    def live(self, uid: str = "uc") -> dict[str, list]:
        """What is left at a site: leases not terminated, servers, floating IPs."""
        s = self.sites[uid]
        with self.lock:
            return {"leases": [lease for lease in s.leases.values() if lease["status"] != "TERMINATED"],
                    "servers": list(s.servers.values()), "fips": list(s.fips.values())}

    def token(self) -> dict:
        t = fixture.V3Token(project_id="proj-1", project_name="CHI-000000", user_id="user-1", user_name="tester")
        for uid, region in SITES.items():
            for stype, path in (("reservation", "blazar/v1"), ("compute", "nova/v2.1"), ("image", "glance"),
                                ("network", "neutron"), ("identity", f"{uid}:5000/v3")):
                t.add_service(stype).add_standard_endpoints(public=f"{self.url}/{uid}/{path}" if stype != "identity"
                                                            else f"{self.url}/{path}", region=region)
        return t


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    @property
    def cloud(self) -> FakeCloud:
        return self.server.cloud  # type: ignore[attr-defined]

    def _send(self, code: int, body: Any = None, headers: dict | None = None) -> None:
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> dict:
        n = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(n) or b"{}") if n else {}

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def do_PUT(self) -> None:
        self._route("PUT")

    def do_DELETE(self) -> None:
        self._route("DELETE")

    def _route(self, method: str) -> None:
        url = urlparse(self.path)
        path, query = url.path.rstrip("/"), {k: v[0] for k, v in parse_qs(url.query).items()}
        body = self._body() if method in ("POST", "PUT") else {}
        cloud = self.cloud
        with cloud.lock:
            cloud.requests.append((method, url.path))
            fault = next((f for f in cloud.faults if f[0] == method and re.search(f[1], path)), None)
            try:
                if fault and fault[2] == "before":
                    raise LookupError(fault[3])
                found = self._dispatch(method, path, query, body)
                if fault and fault[2] == "drop":
                    self.close_connection = True
                    return
                if fault:
                    raise LookupError(fault[3])
            except LookupError as e:  # KeyError: not found; each client reads its own error shape
                code = 404 if isinstance(e, KeyError) else e.args[0]
                msg = f"not found: {path}" if code == 404 else f"injected fault {code} on {method} {path}"
                found = (code, {"itemNotFound" if code == 404 else "computeFault": {"code": code, "message": msg}}
                         if "/nova" in path else
                         {"NeutronError": {"type": "NotFound" if code == 404 else "Fault", "message": msg,
                                           "detail": ""}} if "/neutron" in path
                         else {"error_code": code, "error_message": msg})
        code, payload, *headers = found
        self._send(code, payload, headers[0] if headers else None)

    def _dispatch(self, method: str, path: str, q: dict, body: dict) -> tuple:
        cloud, base = self.cloud, self.cloud.url
        if path == "/resource-api/sites.json":
            return 200, {"items": [{"name": n, "uid": u, "web": f"{base}/{u}", "site_class": "core",
                                    "location": "loopback", "user_support_contact": "nobody"} for u, n in SITES.items()]}
        m = re.fullmatch(r"/resource-api/sites/(\w+)/clusters/chameleon/nodes.json", path)
        if m:
            return 200, {"items": [{"uid": h["hypervisor_hostname"], "node_name": h["hypervisor_hostname"],
                                    "node_type": h["node_type"], "architecture": {"smt_size": 64},
                                    "gpu": {"gpu": h["node_type"] != "compute_skylake", "gpu_model": "A100"}}
                                   for h in cloud.sites[m.group(1)].hosts]}
        m = re.fullmatch(r"/(\w+):5000/v3(/.*)?", path)
        if m:
            if method == "POST" and m.group(2) == "/auth/tokens":
                return self._token(body)
            fed = re.fullmatch(r"/OS-FEDERATION/identity_providers/([^/]+)/protocols/([^/]+)/auth", m.group(2) or "")
            if method == "POST" and fed:  # the hub's OIDC access token, traded for an unscoped Keystone token
                if fed.groups() != ("chameleon", "openid"):
                    raise KeyError(path)
                if self.headers.get("Authorization") != f"Bearer {cloud.access_token}":
                    return 401, {"error": {"code": 401, "title": "Unauthorized",
                                           "message": "The request you have made requires authentication."}}
                return self._issue(unscoped=True)
            return 200, {"version": {"id": "v3.14", "status": "stable", "links": [{"rel": "self", "href": f"{base}{path}/"}]}}
        m = re.fullmatch(r"/(\w+)/(blazar|nova|glance|neutron)(/.*)?", path)
        if not m:
            raise KeyError(path)
        site, service, rest = cloud.sites[m.group(1)], m.group(2), m.group(3) or ""
        return getattr(self, f"_{service}")(site, method, rest, q, body, f"{base}/{m.group(1)}/{service}")

    # -- Keystone ------------------------------------------------------------------------------
    def _issue(self, unscoped: bool = False) -> tuple:
        token = uuid.uuid4().hex
        self.cloud.tokens.add(token)
        body = {"token": {"methods": ["token"], "expires_at": "2099-01-01T00:00:00Z", "user": {"id": "user-1",
                "name": "tester", "domain": {"id": "default", "name": "Default"}}}} if unscoped else self.cloud.token()
        return 201, body, {"X-Subject-Token": token}

    def _token(self, body: dict) -> tuple:
        """POST /auth/tokens: the application credential of `env()`, or a token this fake issued (the OIDC path)
        scoped to a project it knows, by name (with its domain) or id; anything else is refused, as Keystone does."""
        auth = body.get("auth", {})
        methods, scope = auth.get("identity", {}).get("methods", []), auth.get("scope", {})
        self.cloud.scopes.append(scope)
        unauthorized = 401, {"error": {"code": 401, "title": "Unauthorized",
                                       "message": "The request you have made requires authentication."}}
        if methods not in (["token"], ["application_credential"]):  # no password, no other method: as the hub and openrc
            return unauthorized
        if "token" in methods and auth["identity"]["token"].get("id") not in self.cloud.tokens:
            return 404, {"error": {"code": 404, "title": "Not Found", "message": "Could not find token."}}
        cred = auth["identity"].get("application_credential", {})
        if "application_credential" in methods and (cred.get("id"), cred.get("secret")) != ("fake-cred", "fake-secret"):
            return unauthorized
        project = scope.get("project", {})
        if "token" in methods and project.get("id") != "proj-1" and project.get("name") != "CHI-000000":
            return 401, {"error": {"code": 401, "title": "Unauthorized",
                                   "message": f"No project {project} for this user."}}
        return self._issue()

    # -- Blazar --------------------------------------------------------------------------------
    def _blazar(self, s: Site, method: str, rest: str, q: dict, body: dict, root: str) -> tuple:
        cloud = self.cloud
        rest = rest.removeprefix("/v1")
        if rest == "":
            return 200, {"versions": [{"id": "v1.0", "status": "CURRENT", "links": [{"rel": "self", "href": f"{root}/v1/"}]}]}
        if rest == "/leases" and method == "GET":
            for lease in list(s.leases.values()):
                _tick_deleting(s, lease)
            return 200, {"leases": list(s.leases.values())}
        if rest == "/leases" and method == "POST":
            if cloud.refuse_lease:
                return 409, {"error_code": 409, "error_message": cloud.refuse_lease}
            kinds = [r["resource_type"] for r in body["reservations"]]
            if "virtual:floatingip" in kinds and not cloud.fip_reservable:
                return 400, {"error_code": 400, "error_message": "Invalid resource type virtual:floatingip"}
            for r in body["reservations"]:  # Blazar's floating-IP plugin checks these (check_params)
                if r["resource_type"] == "virtual:floatingip" and not {"network_id", "amount"} <= set(r):
                    return 400, {"error_code": 400, "error_message": "Missing parameter network_id or amount"}
            now = _now()
            start = now if body["start_date"] == "now" else dt.datetime.strptime(body["start_date"], "%Y-%m-%d %H:%M")
            end = dt.datetime.strptime(body["end_date"], "%Y-%m-%d %H:%M")
            if start < now - dt.timedelta(minutes=1) or end <= start:
                return 400, {"error_code": 400, "error_message": "Start date must be later than current date"}
            held = []
            for r in body["reservations"]:
                if r["resource_type"] != "physical:host" or not r.get("resource_properties"):
                    continue
                node_type = json.loads(r["resource_properties"])[2]
                free = [h["id"] for h in s.hosts if h["node_type"] == node_type and _free(cloud, s, h, start, end)]
                if int(r.get("min", 1)) > len(free):
                    return 409, {"error_code": 409, "error_message": "Not enough hosts available"}
                held += free[:int(r.get("min", 1))]
            lease = {"id": str(uuid.uuid4()), "name": body["name"], "status": "CREATING", "user_id": "user-1",
                     "project_id": "proj-1", "created_at": now.strftime("%Y-%m-%d %H:%M:%S"),
                     "start_date": start.strftime(FMT), "end_date": end.strftime(FMT), "degraded": False,
                     "reservations": [{**r, "id": str(uuid.uuid4()), "status": "pending"} for r in body["reservations"]]}
            s.leases[lease["id"]] = lease
            s.polls[lease["id"]] = 0
            s.held[lease["id"]] = held
            return 201, {"lease": lease}
        m = re.fullmatch(r"/leases/([^/]+)", rest)
        if m:
            lease = s.leases[m.group(1)]  # by id only, like Blazar: a name gives 404
            if method == "DELETE":
                if lease["status"] == "DELETING":
                    return 409, {"error_code": 409, "error_message": f"Lease {lease['id']} is being deleted"}
                lease["status"], lease["delete_polls"] = "DELETING", POLLS_TO_DELETE
                return 204, None
            if _tick_deleting(s, lease):
                raise KeyError(rest)
            s.polls[lease["id"]] = s.polls.get(lease["id"], 0) + 1
            if lease["status"] == "STARTING" and s.polls[lease["id"]] >= cloud.polls_to_active:
                lease["status"] = cloud.lease_outcome
                if lease["status"] == "ACTIVE":
                    _reserve_fips(s, lease)
            elif lease["status"] == "CREATING":
                lease["status"] = "PENDING"
            elif lease["status"] == "PENDING" and dt.datetime.strptime(lease["start_date"], FMT) <= _now():
                lease["status"] = "STARTING"  # a lease booked ahead stays PENDING until its start
            return 200, {"lease": lease}
        if rest.startswith("/floatingips"):  # Blazar's policy: blazar:floatingips:* is rule:admin; users get 403
            return 403, {"error_code": 403,
                         "error_message": f"Policy doesn't allow blazar:floatingips:{method.lower()} to be performed."}
        if rest == "/os-hosts":
            return 200, {"hosts": s.hosts}
        if rest == "/os-hosts/allocations":
            return 200, {"allocations": [_allocation(cloud, s, h) for h in s.hosts]}
        m = re.fullmatch(r"/os-hosts/([^/]+)/allocation", rest)
        if m:
            return 200, {"allocation": _allocation(cloud, s, next(h for h in s.hosts if h["id"] == m.group(1)))}
        raise KeyError(rest)

    # -- Nova ----------------------------------------------------------------------------------
    def _nova(self, s: Site, method: str, rest: str, q: dict, body: dict, root: str) -> tuple:
        cloud = self.cloud
        rest = rest.removeprefix("/v2.1")
        if rest == "":
            v = {"id": "v2.1", "status": "CURRENT", "version": "2.96", "min_version": "2.1",
                 "links": [{"rel": "self", "href": f"{root}/v2.1/"}]}
            return 200, ({"version": v} if self.path.rstrip("/").endswith("v2.1") else {"versions": [v]})
        if rest == "/flavors/detail" or rest == "/flavors":
            return 200, {"flavors": [{"id": "fl-bm", "name": "baremetal", "ram": 1, "disk": 1, "vcpus": 1,
                                      "links": [], "OS-FLV-EXT-DATA:ephemeral": 0, "description": None,
                                      "os-flavor-access:is_public": True, "extra_specs": {}}]}
        m = re.fullmatch(r"/os-keypairs(?:/([^/]+))?", rest)
        if m:
            name = m.group(1)
            if method == "POST":
                kp = body["keypair"]
                s.keypairs[kp["name"]] = {"name": kp["name"], "public_key": kp["public_key"], "type": "ssh",
                                          "fingerprint": _fingerprint(kp["public_key"])}
                return 200, {"keypair": s.keypairs[kp["name"]]}
            if method == "DELETE":
                del s.keypairs[name]
                return 202, None
            if name:
                return 200, {"keypair": s.keypairs[name]}
            return 200, {"keypairs": [{"keypair": k} for k in s.keypairs.values()]}
        if rest in ("/servers/detail", "/servers") and method == "GET":
            for x in list(s.servers.values()):
                _tick_server(s, x)
            return 200, {"servers": [self._server_view(s, x) for x in s.servers.values()]}
        if rest == "/servers" and method == "POST":
            req = body["server"]
            sid = str(uuid.uuid4())
            hint = (body.get("OS-SCH-HNT:scheduler_hints") or req.get("scheduler_hints") or {}).get("reservation")
            hosts = next((int(r.get("min", 1)) for lease in s.leases.values() for r in lease["reservations"]
                          if r["id"] == hint), 0)
            on_it = sum(1 for x in s.servers.values() if x["reservation"] == hint and "delete_polls" not in x)
            s.servers[sid] = {"id": sid, "name": req["name"], "status": "BUILD", "key_name": req.get("key_name"),
                              "image": {"id": req.get("imageRef")}, "reservation": hint, "polls": 0,
                              "outcome": None if on_it < hosts else "ERROR"}  # no host left on the reservation
            s.ports[f"port-{sid}"] = {"id": f"port-{sid}", "device_id": sid, "network_id": f"net-shared-{s.uid}",
                                      "fixed_ips": [{"ip_address": "127.0.0.1"}], "status": "ACTIVE"}
            return 202, {"server": {"id": sid, "links": [], "adminPass": "x"}}
        m = re.fullmatch(r"/servers/([^/]+)", rest)
        if m:
            server = s.servers[m.group(1)]
            if method == "DELETE":
                server.setdefault("delete_polls", POLLS_TO_DELETE)  # bare metal: cleaned before it goes
                return 204, None
            if _tick_server(s, server):
                raise KeyError(rest)
            server["polls"] += 1
            if server["status"] == "BUILD" and server["polls"] >= cloud.polls_to_active:
                server["status"] = server["outcome"] or cloud.server_outcome
            return 200, {"server": self._server_view(s, server)}
        raise KeyError(rest)

    def _server_view(self, s: Site, x: dict) -> dict:
        addrs = [{"addr": "127.0.0.1", "version": 4, "OS-EXT-IPS:type": "fixed", "OS-EXT-IPS-MAC:mac_addr": "aa"}]
        addrs += [{"addr": f["floating_ip_address"], "version": 4, "OS-EXT-IPS:type": "floating",
                   "OS-EXT-IPS-MAC:mac_addr": "aa"} for f in s.fips.values() if f["port_id"] == f"port-{x['id']}"]
        view = {"id": x["id"], "name": x["name"], "status": x["status"], "key_name": x["key_name"],
                "image": x["image"], "flavor": {"original_name": "baremetal"}, "hostId": "h",
                "addresses": {"sharednet1": addrs} if x["status"] == "ACTIVE" else {},
                "created": "2026-01-01T00:00:00Z", "updated": "2026-01-01T00:00:00Z", "tenant_id": "proj-1",
                "user_id": "user-1", "links": [], "metadata": {}, "OS-EXT-STS:task_state": None}
        if x["status"] == "ERROR":
            view["fault"] = {"code": 500, "message": "No valid host was found. There are not enough hosts available."}
        return view

    # -- Glance --------------------------------------------------------------------------------
    def _glance(self, s: Site, method: str, rest: str, q: dict, body: dict, root: str) -> tuple:
        if rest in ("", "/versions"):
            return 200, {"versions": [{"id": "v2.16", "status": "CURRENT", "links": [{"rel": "self", "href": f"{root}/v2/"}]}]}
        if rest == "/v2/schemas/image":
            return 200, {"name": "image", "properties": {"id": {"type": "string"}, "name": {"type": ["null", "string"]},
                                                         "status": {"type": "string"}}, "additionalProperties": {"type": "string"}}
        if rest == "/v2/images":
            return 200, {"images": [i for i in s.images if "name" not in q or i["name"] == q["name"]]}
        m = re.fullmatch(r"/v2/images/([^/]+)", rest)
        if m:
            return 200, next(i for i in s.images if i["id"] == m.group(1))
        raise KeyError(rest)

    # -- Neutron -------------------------------------------------------------------------------
    def _neutron(self, s: Site, method: str, rest: str, q: dict, body: dict, root: str) -> tuple:
        cloud = self.cloud
        rest = rest.removeprefix("/v2.0")
        if rest == "":
            return 200, {"versions": [{"id": "v2.0", "status": "CURRENT", "links": [{"rel": "self", "href": f"{root}/v2.0/"}]}]}
        if rest == "/networks":
            return 200, {"networks": [n for n in s.networks if "name" not in q or n["name"] == q["name"]]}
        m = re.fullmatch(r"/networks/([^/]+)", rest)
        if m:
            return 200, {"network": next(n for n in s.networks if n["id"] == m.group(1))}
        if rest == "/ports":
            return 200, {"ports": [p for p in s.ports.values() if "device_id" not in q or p["device_id"] == q["device_id"]]}
        if rest == "/floatingips" and method == "GET":
            return 200, {"floatingips": list(s.fips.values())}
        if rest == "/floatingips" and method == "POST":
            if cloud.fip_pool is not None:
                if cloud.fip_pool <= 0:
                    return 409, {"NeutronError": {"type": "IpAddressGenerationFailure", "detail": "",
                                                  "message": "No more IP addresses available on network public."}}
                cloud.fip_pool -= 1
            fid = str(uuid.uuid4())
            s.fips[fid] = {"id": fid, "floating_ip_address": "127.0.0.1", "port_id": None, "fixed_ip_address": None,
                           "floating_network_id": body["floatingip"]["floating_network_id"], "status": "DOWN",
                           "tags": [], "description": body["floatingip"].get("description", "")}
            return 201, {"floatingip": s.fips[fid]}
        m = re.fullmatch(r"/floatingips/([^/]+)", rest)
        if m:
            fip = s.fips[m.group(1)]
            if method == "DELETE":
                del s.fips[fip["id"]]
                return 204, None
            if method == "PUT":
                fip.update(body["floatingip"])
                fip["status"] = "ACTIVE" if fip["port_id"] else "DOWN"
            return 200, {"floatingip": fip}
        raise KeyError(rest)


def _tick_deleting(s: Site, lease: dict) -> bool:
    """One more read of a DELETING lease; True once it is gone (with the floating IPs reserved in it)."""
    if lease["status"] != "DELETING":
        return False
    lease["delete_polls"] -= 1
    if lease["delete_polls"] > 0:
        return False
    del s.leases[lease["id"]]
    s.held.pop(lease["id"], None)
    ids = {f"reservation:{r['id']}" for r in lease["reservations"]}
    for fid in [f["id"] for f in s.fips.values() if ids & set(f["tags"])]:
        del s.fips[fid]
    return True


def _tick_server(s: Site, server: dict) -> bool:
    """One more read of a server being deleted; True once it is gone (its port with it)."""
    if "delete_polls" not in server:
        return False
    server["delete_polls"] -= 1
    if server["delete_polls"] > 0:
        return False
    del s.servers[server["id"]]
    s.ports.pop(f"port-{server['id']}", None)
    for fip in s.fips.values():
        if fip["port_id"] == f"port-{server['id']}":
            fip["port_id"] = fip["fixed_ip_address"] = None
    return True


def _reserve_fips(s: Site, lease: dict) -> None:
    """The floating IPs of a lease's virtual:floatingip reservations, made when it starts (tagged as Blazar does)."""
    for r in lease["reservations"]:
        for _ in range(int(r.get("amount", 1)) if r["resource_type"] == "virtual:floatingip" else 0):
            fid = str(uuid.uuid4())
            s.fips[fid] = {"id": fid, "floating_ip_address": "127.0.0.1", "port_id": None, "fixed_ip_address": None,
                           "floating_network_id": r["network_id"], "status": "DOWN", "description": "",
                           "tags": ["blazar", f"reservation:{r['id']}"]}


def _free(cloud: FakeCloud, s: Site, host: dict, start: dt.datetime, end: dt.datetime) -> bool:
    """Whether no live lease holds `host`, and no booking takes its type, in any part of [start, end)."""
    for lease_id, ids in s.held.items():
        lease = s.leases.get(lease_id)
        if host["id"] in ids and lease and lease["status"] not in ("TERMINATED", "DELETED") and \
                dt.datetime.strptime(lease["start_date"], FMT) < end and start < dt.datetime.strptime(lease["end_date"], FMT):
            return False
    b_start, b_end = cloud.booking()
    return not (host["node_type"] in cloud.booked and b_start < end and start < b_end)


def _allocation(cloud: FakeCloud, s: Site, host: dict) -> dict:
    reservations = [{"id": lease["reservations"][0]["id"], "lease_id": lease["id"], "start_date": lease["start_date"],
                     "end_date": lease["end_date"]}
                    for lease_id, ids in s.held.items() if host["id"] in ids for lease in [s.leases[lease_id]]]
    if host["node_type"] in cloud.booked:
        start, end = cloud.booking()
        reservations.append({"id": "r-other", "lease_id": "l-other", "start_date": start.strftime(FMT),
                             "end_date": end.strftime(FMT)})
    return {"resource_id": host["id"], "reservations": reservations}


def _fingerprint(public_key: str) -> str:
    import base64
    import hashlib

    raw = hashlib.md5(base64.b64decode(public_key.split()[1])).hexdigest()
    return ":".join(raw[i:i + 2] for i in range(0, len(raw), 2))
