"""The host list: libvirt connections Thalunix shows beside the portable folder's VMs, and connecting to them.

Hosts live in the data folder's ``hosts.json`` (path from :class:`thalunix.store.DataFolder`), each a name and
a libvirt URI (``qemu:///system``, ``qemu:///session``, ``qemu+ssh://user@host/system``, …). Connecting runs in
a thread with a timeout, so one unreachable host never holds up the others, and a failure says its cause:
``unreachable``, ``authentication``, ``permission``, ``no-qemu`` (the host has no QEMU driver), ``missing``
(libvirt-python is not installed here) or ``error``.

libvirt-python is optional (extra ``libvirt``): it is imported on first use, and its absence is an error that
says how to install it; nothing else in Thalunix needs it.

Example::

    hosts = HostList(DataFolder.open())
    hosts.add("lab", "qemu+ssh://root@lab.example/system")
    manager = HostManager(hosts, bus)
    manager.engine("lab").list()           # a LibvirtEngine over that connection
    manager.overview()                     # every host with its VMs or its connection error, in parallel
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
import urllib.parse
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from thalunix.errors import ConflictError, NotFoundError, ThalunixError, ValidationError
from thalunix.events import EventBus
from thalunix.store import DataFolder, atomic_write_json

if TYPE_CHECKING:  # pragma: no cover
    from thalunix.libvirt.engine import LibvirtEngine

#: The name of the portable folder's own VMs (the direct engine) wherever hosts are listed.
LOCAL = "local"
CONNECT_TIMEOUT = 15.0
HOSTS_SCHEMA = 1
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,31}$")
_URI = re.compile(r"^(?P<driver>[a-z0-9]+)(\+(?P<transport>[a-z0-9]+))?://(?P<rest>[^\s]*)$")
TRANSPORTS = (None, "ssh", "tcp", "tls", "unix", "libssh", "libssh2", "ext")
CAUSES = ("unreachable", "authentication", "permission", "no-qemu", "missing", "error")


class LibvirtMissingError(ThalunixError):
    """libvirt-python is not installed where Thalunix runs."""

    code = "libvirt-missing"
    http_status = 503


class HostConnectionError(ThalunixError):
    """A host could not be reached or used; ``cause`` is one of :data:`CAUSES`."""

    code = "host-connection"
    # Not a 5xx: this Thalunix works; a host the request names cannot be used (WebDAV's Failed Dependency).
    http_status = 424

    def __init__(self, message: str, cause: str = "error") -> None:
        super().__init__(message)
        self.cause = cause


@dataclass
class Host:
    """One libvirt connection in the host list."""

    name: str
    uri: str
    #: libvirt network for new network cards (None: user-mode networking, which needs no setup on the host)
    network: str | None = None
    #: storage pool for disks, CD-ROM images and moved disks (made as a directory pool if missing)
    pool: str = "thalunix"

    @property
    def remote(self) -> bool:
        """True when the URI names another machine: local files cannot be used there and are uploaded."""
        parsed = urllib.parse.urlsplit(self.uri)
        return bool(parsed.hostname) and parsed.hostname not in ("localhost", "127.0.0.1", "::1")

    @property
    def label(self) -> str:
        return f"host {self.name!r} ({self.uri})"


def validate_host_name(name: object) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValidationError(f"name: {name!r} is not a host name; use 1-32 letters, digits, '.', '_' or '-', "
                              "starting with a letter or digit", "name")
    if name.lower() == LOCAL:
        raise ValidationError(f"name: {LOCAL!r} is the portable folder's own VMs; pick another host name", "name")
    return name


def validate_uri(uri: object) -> str:
    match = _URI.match(uri) if isinstance(uri, str) else None
    if not match:
        raise ValidationError(f"uri: {uri!r} is not a libvirt URI; write it like qemu:///system, qemu:///session "
                              "or qemu+ssh://user@host/system", "uri")
    if match.group("driver") != "qemu":
        raise ValidationError(f"uri: {uri!r} uses the {match.group('driver')!r} driver; Thalunix manages QEMU "
                              "hosts only (qemu:// or qemu+TRANSPORT://)", "uri")
    if match.group("transport") not in TRANSPORTS:
        raise ValidationError(f"uri: transport {match.group('transport')!r} is unknown; use ssh, tcp, tls, "
                              "unix, libssh or libssh2", "uri")
    return uri   # type: ignore[return-value]


class HostList:
    """``hosts.json``: the hosts, by name (case-insensitive), in the order they were added."""

    def __init__(self, data: DataFolder) -> None:
        self.data = data
        self._lock = threading.Lock()

    def list(self) -> list[Host]:
        raw = self.data.read_json(self.data.hosts_file, default=None)
        if raw is None:
            if self.data.hosts_file.exists():
                raise ThalunixError(f"the host list {self.data.hosts_file} cannot be read as JSON; fix it by hand "
                                    "or delete it to start an empty list")
            return []
        hosts = []
        for index, entry in enumerate(raw.get("hosts", []) if isinstance(raw, dict) else []):
            try:
                hosts.append(Host(name=validate_host_name(entry["name"]), uri=validate_uri(entry["uri"]),
                                  network=entry.get("network"), pool=entry.get("pool") or "thalunix"))
            except (KeyError, TypeError, ValidationError) as error:
                raise ThalunixError(f"the host list {self.data.hosts_file}: entry {index + 1} is not valid "
                                    f"({error}); fix or remove it") from None
        return hosts

    def get(self, name: str) -> Host:
        for host in self.list():
            if host.name.lower() == str(name).lower():
                return host
        known = ", ".join(h.name for h in self.list()) or "none yet"
        raise NotFoundError(f"no host named {name!r} (known: {known}); add it with `thalunix host add NAME URI`")

    def add(self, name: str, uri: str, network: str | None = None, pool: str | None = None) -> Host:
        host = Host(name=validate_host_name(name), uri=validate_uri(uri), network=network,
                    pool="thalunix" if pool is None else pool)
        if host.network is not None and not _NAME.match(host.network):
            raise ValidationError(f"network: {network!r} is not a libvirt network name", "network")
        if not _NAME.match(host.pool):
            raise ValidationError(f"pool: {pool!r} is not a storage pool name", "pool")
        with self._lock:
            hosts = self.list()
            if any(h.name.lower() == name.lower() for h in hosts):
                raise ConflictError(f"a host named {name!r} is already in the list; remove it first or pick "
                                    "another name")
            hosts.append(host)
            self._save(hosts)
        return host

    def remove(self, name: str) -> Host:
        with self._lock:
            hosts = self.list()
            host = self.get(name)
            self._save([h for h in hosts if h.name != host.name])
        return host

    def _save(self, hosts: list[Host]) -> None:
        atomic_write_json(self.data.hosts_file, {"schema": HOSTS_SCHEMA, "hosts": [asdict(h) for h in hosts]})


# -- libvirt itself ---------------------------------------------------------------------------------------------
_setup_lock = threading.Lock()
_module: Any = None


def libvirt_module() -> Any:
    """The ``libvirt`` module, with its event loop running (domain events, console streams, keepalive)."""
    global _module
    with _setup_lock:
        if _module is not None:
            return _module
        try:
            import libvirt
        except ImportError:
            raise LibvirtMissingError(
                "libvirt hosts need libvirt-python, which is not installed here; install it with "
                "`pip install 'thalunix[libvirt]'` (it builds from source: on Debian first "
                "`apt-get install libvirt-dev pkg-config gcc python3-dev`)") from None
        # libvirt prints every error to stderr by default; Thalunix reports them itself.
        libvirt.registerErrorHandler(lambda _ctx, _error: None, None)
        libvirt.virEventRegisterDefaultImpl()

        def loop() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()
        threading.Thread(target=loop, name="libvirt-events", daemon=True).start()
        _module = libvirt
        return libvirt


def classify(error: BaseException, host: Host) -> HostConnectionError:
    """A connection failure as a person reads it: the host, the cause, libvirt's words, what to do."""
    libvirt = _module
    text = str(error).strip()
    lowered = text.lower()
    code = error.get_error_code() if libvirt is not None and isinstance(error, libvirt.libvirtError) else None
    auth_codes = {getattr(libvirt, n, -1) for n in ("VIR_ERR_AUTH_FAILED", "VIR_ERR_AUTH_CANCELLED",
                                                    "VIR_ERR_AUTH_UNAVAILABLE")} if libvirt else set()
    if code in auth_codes or "authentication" in lowered or "permission denied (publickey" in lowered \
            or "permission denied, please try again" in lowered or "host key verification failed" in lowered:
        return HostConnectionError(f"{host.label}: authentication failed ({text}); check the user name in the "
                                   "URI and that your SSH key is in the host's authorized_keys (for qemu+tcp: the "
                                   "SASL user and password)",
                                   "authentication")
    if "no connection driver available" in lowered or (libvirt is not None and code == libvirt.VIR_ERR_NO_CONNECT
                                                        and "qemu" in lowered and "driver" in lowered):
        return HostConnectionError(f"{host.label}: the host's libvirt has no QEMU driver ({text}); install "
                                   "libvirt-daemon-driver-qemu there and restart libvirtd", "no-qemu")
    if "permission denied" in lowered or "access denied" in lowered or "authorization" in lowered \
            or (libvirt is not None and code == libvirt.VIR_ERR_OPERATION_DENIED):
        return HostConnectionError(f"{host.label}: permission denied ({text}); the user needs access to libvirt "
                                   "there (e.g. the libvirt group), or use qemu:///session", "permission")
    unreachable = ("connection refused", "no route to host", "could not resolve", "name or service not known",
                   "timed out", "network is unreachable", "no such file or directory", "failed to connect socket",
                   "end of file while reading data", "connection reset", "cannot recv data", "host is down")
    if any(word in lowered for word in unreachable):
        return HostConnectionError(f"{host.label}: unreachable ({text}); check the address, that the host is on "
                                   "and that libvirtd (and sshd for qemu+ssh) runs there", "unreachable")
    return HostConnectionError(f"{host.label}: cannot connect ({text})", "error")


def connect(host: Host, timeout: float = CONNECT_TIMEOUT) -> Any:
    """Open ``host``'s connection in a thread; give up after ``timeout`` seconds with an ``unreachable`` error."""
    libvirt = libvirt_module()
    outcome: dict[str, Any] = {}
    done = threading.Event()
    abandoned = threading.Event()

    def work() -> None:
        try:
            connection = libvirt.open(host.uri)
        except libvirt.libvirtError as error:
            outcome["error"] = error
        else:
            if abandoned.is_set():   # the caller gave up: do not leak a connection nobody holds
                with contextlib.suppress(Exception):
                    connection.close()
                return
            outcome["connection"] = connection
        finally:
            done.set()
    threading.Thread(target=work, name=f"libvirt-connect-{host.name}", daemon=True).start()
    if not done.wait(timeout):
        abandoned.set()
        if done.is_set() and "connection" in outcome:   # finished in the meantime
            return _checked(outcome["connection"], host)
        raise HostConnectionError(f"{host.label}: unreachable (no answer within {timeout:g} s); check the address "
                                  "and that the host is on", "unreachable")
    if "error" in outcome:
        raise classify(outcome["error"], host)
    return _checked(outcome["connection"], host)


def _checked(connection: Any, host: Host) -> Any:
    libvirt = _module
    try:
        kind = connection.getType()
        if kind.upper() != "QEMU":
            raise HostConnectionError(f"{host.label}: the connection is to a {kind} driver, not QEMU; use a qemu:// "
                                      "URI", "no-qemu")
        # A dead link shows as an error on the next call instead of a hang: libvirt pings every 5 s.
        with contextlib.suppress(libvirt.libvirtError):
            connection.setKeepAlive(5, 3)
    except libvirt.libvirtError as error:
        with contextlib.suppress(Exception):
            connection.close()
        raise classify(error, host) from None
    return connection


#: A host that just failed answers with the same error for this long, so a front refreshing its list does not
#: wait a whole connect timeout for every refresh of an unreachable host.
RETRY_AFTER = 10.0


@dataclass
class _Slot:
    connection: Any = None
    engine: "LibvirtEngine | None" = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    failure: HostConnectionError | None = None
    failed_at: float = 0.0


class HostManager:
    """One open connection (and :class:`LibvirtEngine`) per host, reopened when it died."""

    def __init__(self, data: DataFolder, bus: EventBus | None = None, timeout: float = CONNECT_TIMEOUT) -> None:
        self.hosts = HostList(data)
        self.data = data
        self.bus = bus or EventBus()
        self.timeout = timeout
        self._slots: dict[str, _Slot] = {}
        self._lock = threading.Lock()

    def engine(self, name: str) -> "LibvirtEngine":
        from thalunix.libvirt.engine import LibvirtEngine
        host = self.hosts.get(name)
        with self._lock:
            slot = self._slots.setdefault(host.name, _Slot())
        with slot.lock:
            if slot.engine is not None and slot.engine.host == host and slot.engine.alive():
                return slot.engine
            if slot.engine is not None:
                slot.engine.close()
                slot.engine = None
            if slot.failure is not None and time.monotonic() - slot.failed_at < RETRY_AFTER:
                raise slot.failure
            try:
                slot.engine = LibvirtEngine(host, connect(host, self.timeout), self.bus, self.data)
            except HostConnectionError as error:
                slot.failure, slot.failed_at = error, time.monotonic()
                raise
            slot.failure = None
            return slot.engine

    def overview(self, timeout: float | None = None) -> list[dict[str, Any]]:
        """Every host with its VMs, or its connection error and cause; hosts are asked in parallel."""
        hosts = self.hosts.list()
        rows: list[dict[str, Any]] = [{**asdict(h), "state": "connecting", "vms": [], "error": None, "cause": None}
                                      for h in hosts]

        def fill(row: dict[str, Any]) -> None:
            try:
                engine = self.engine(row["name"])
                row["vms"] = engine.list()
                row["state"] = "connected"
                row["version"] = engine.version()
            except HostConnectionError as error:
                row.update(state="error", error=str(error), cause=error.cause)
            except ThalunixError as error:
                row.update(state="error", error=str(error), cause=getattr(error, "cause", "error"))
        threads = [threading.Thread(target=fill, args=(row,), daemon=True) for row in rows]
        for thread in threads:
            thread.start()
        limit = (timeout or self.timeout) + 5
        deadline = time.monotonic() + limit
        for thread, row in zip(threads, rows):
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                row.update(state="error", cause="unreachable",
                           error=f"host {row['name']!r} ({row['uri']}): no answer within {limit:g} s")
        return rows

    def forget(self, name: str) -> None:
        with self._lock:
            slot = self._slots.pop(name, None)
        if slot is not None and slot.engine is not None:
            slot.engine.close()

    def close(self) -> None:
        for name in list(self._slots):
            self.forget(name)
