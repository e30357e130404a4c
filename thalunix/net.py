"""Networks: port-forward checks, custom private networks and their switch, bridged cards, unique MACs.

* **NAT** (modes ``user`` and ``restricted``) is QEMU's user networking; before a start every forwarded
  host port is bound once on its address, so a port already taken is refused with its number instead
  of QEMU failing half-way.
* **Private networks** need no admin rights: a network is defined once by name
  (``networks/<name>.json``) and every VM card in mode ``private`` naming it gets a QEMU ``dgram``
  backend on 127.0.0.1 talking to a *switch*: a small Thalunix process that forwards Ethernet frames
  between its VMs (one UDP datagram per frame, learning MAC addresses). The switch is started by the
  first VM start that needs it, outlives the Thalunix process that started it (VMs do too), keeps its
  port across restarts, and leaves by itself once none of its VMs runs. It takes frames only from the
  UDP ports of VMs recorded as running on its network (``run/net.json``).
* **Bridged** cards use a host bridge through ``qemu-bridge-helper`` or an existing TAP device (on
  Windows, an installed TAP-Windows adapter); missing rights are named before QEMU is run.

Example::

    from thalunix import net
    net.create_network(engine.data, "lab", "web + db")
    engine.edit("web", {"nics": [{"mode": "private", "network": "lab"}]})
    engine.start("web")                       # starts the "lab" switch if it is not running
    net.list_networks(engine.data)            # [{"name": "lab", "vms": ["web"], "switch": {...}}]
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from thalunix.errors import ConflictError, NotFoundError, ThalunixError, ValidationError
from thalunix.model import VMConfig, random_mac
from thalunix.model.base import ModelObject
from thalunix.model.network import NETWORK_NAME, PortForward
from thalunix.store import DataFolder, FileLock, atomic_write_json

if TYPE_CHECKING:
    from thalunix.qemu.argv import Endpoint
    from thalunix.runtime import Runtime

#: How long a switch waits for its first VM, and how often it looks whether its VMs still run.
SWITCH_GRACE = 30.0
SWITCH_SCAN = 3.0
#: Ethernet frames are at least 14 bytes; a shorter datagram to the switch means "look for new VMs".
_NUDGE = b"\x01"
_BROADCAST = b"\xff" * 6


class NetworkError(ThalunixError):
    """A network could not be set up (a port taken, a missing right, an unknown network)."""

    code = "network"
    http_status = 409


# -- custom networks ---------------------------------------------------------------------------------------
@dataclass
class NetworkDef(ModelObject):
    """``networks/<name>.json``: a private network VMs attach to by name."""

    name: str
    description: str = ""
    created: str = ""


def check_network_name(name: object) -> str:
    if not isinstance(name, str) or not NETWORK_NAME.match(name):
        raise ValidationError(f"network name {name!r} is not allowed: use 1-32 letters, digits, '_' and '-', "
                              "starting with a letter or digit", "name")
    return name


def get_network(data: DataFolder, name: str) -> NetworkDef:
    check_network_name(name)
    raw = data.read_json(data.network_file(name))
    if raw is None:
        known = ", ".join(data.network_names()) or "none yet"
        raise NotFoundError(f"there is no network {name!r} (known: {known}); create it with "
                            f"`thalunix net create {name}` or on the Networks page")
    return NetworkDef.from_dict(raw, f"network {name}")


def create_network(data: DataFolder, name: str, description: str = "") -> NetworkDef:
    check_network_name(name)
    if not isinstance(description, str) or len(description) > 200:
        raise ValidationError("description: at most 200 characters of text", "description")
    existing = {n.lower(): n for n in data.network_names()}
    if name.lower() in existing:
        raise ConflictError(f"a network named {existing[name.lower()]!r} already exists; choose another name")
    import datetime
    network = NetworkDef(name, description,
                         datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    atomic_write_json(data.network_file(name), network.to_dict())
    return network


def network_users(data: DataFolder, name: str) -> list[str]:
    """Names of the VMs with a card on network ``name``."""
    return sorted(entry.config.name for entry in data.list_vms() if entry.config
                  and any(nic.mode == "private" and nic.network == name for nic in entry.config.nics))


def delete_network(data: DataFolder, name: str) -> None:
    get_network(data, name)
    users = network_users(data, name)
    if users:
        raise ConflictError(f"network {name!r} is used by VM(s) {', '.join(users)}; change their network cards "
                            "first")
    data.network_file(name).unlink(missing_ok=True)


def list_networks(data: DataFolder) -> list[dict[str, Any]]:
    rows = []
    for name in data.network_names():
        try:
            network = get_network(data, name)
        except ThalunixError as error:
            rows.append({"name": name, "error": str(error)})
            continue
        rows.append({**network.to_dict(), "vms": network_users(data, name), "switch": switch_status(data, name)})
    return rows


# -- port forwards -----------------------------------------------------------------------------------------
def check_forwards(config: VMConfig) -> None:
    """Bind every forwarded host port once on its address; raise :class:`NetworkError` naming the first taken."""
    for index, nic in enumerate(config.nics):
        if nic.mode not in ("user", "restricted"):
            continue
        for forward in nic.forwards:
            _probe_port(config, index, forward)


def _probe_port(config: VMConfig, index: int, forward: PortForward) -> None:
    kind = socket.SOCK_STREAM if forward.protocol == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as probe:
        if os.name != "nt":
            # What QEMU does too: a port in TIME_WAIT after a VM stopped is free for it.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((forward.host_address, forward.host_port))
        except OSError as error:
            why = "is already in use" if error.errno in (98, 10048, 48) else f"cannot be used ({error.strerror})"
            raise NetworkError(f"{config.label}: host port {forward.protocol.upper()} {forward.host_address}:"
                               f"{forward.host_port} (forwarded to guest port {forward.guest_port} on card "
                               f"{index + 1}) {why}; stop the program using it or forward another port") from None


def add_forward(config: VMConfig, spec: str, card: int = 0) -> VMConfig:
    """``config`` with the forward ``spec`` (``tcp:8080:80``) added to card ``card`` (0-based)."""
    forward = PortForward.parse(spec)
    nic = _card(config, card)
    if nic.mode not in ("user", "restricted"):
        raise ValidationError(f"{config.label}: card {card + 1} is in mode {nic.mode}; only a NAT card (user or "
                              "restricted) forwards ports", "forwards")
    nic.forwards.append(forward)
    return config


def remove_forward(config: VMConfig, spec: str, card: int | None = None) -> VMConfig:
    """Remove the forward of host port ``spec`` (``8080``, ``tcp:8080`` or a full spec)."""
    parts = spec.strip().lower().split(":")
    protocol = parts.pop(0) if parts and parts[0] in ("tcp", "udp") else None
    try:
        port = int(parts[-1] if len(parts) == 1 else PortForward.parse(spec).host_port)
    except (ValueError, IndexError):
        raise ValidationError(f"forward {spec!r}: give the host port (8080, tcp:8080 or tcp:8080:80)",
                              "forwards") from None
    for index, nic in enumerate(config.nics):
        if card is not None and index != card:
            continue
        for forward in list(nic.forwards):
            if forward.host_port == port and protocol in (None, forward.protocol):
                nic.forwards.remove(forward)
                return config
    raise NotFoundError(f"{config.label} forwards no host port {spec!r}; `thalunix vm net {config.name} list` "
                        "shows its forwards")


def _card(config: VMConfig, card: int) -> Any:
    if not 0 <= card < len(config.nics):
        raise ValidationError(f"{config.label} has {len(config.nics)} network card(s); there is no card "
                              f"{card + 1}", "card")
    return config.nics[card]


# -- MAC addresses -----------------------------------------------------------------------------------------
def macs_in_use(data: DataFolder, exclude_id: str | None = None) -> dict[str, str]:
    """MAC → VM name over the whole data folder."""
    used: dict[str, str] = {}
    for entry in data.list_vms():
        if entry.config and entry.id != exclude_id:
            for nic in entry.config.nics:
                used.setdefault(nic.mac.lower(), entry.config.name)
    return used


def ensure_unique_macs(data: DataFolder, config: VMConfig, generated: Iterable[int] = ()) -> None:
    """Refuse a MAC another VM has; cards in ``generated`` (indexes whose MAC Thalunix chose) get a new one."""
    used = macs_in_use(data, exclude_id=config.id)
    regenerate = set(generated)
    mine: set[str] = set()
    for index, nic in enumerate(config.nics):
        if nic.mac in used or nic.mac in mine:
            if index in regenerate:
                while nic.mac in used or nic.mac in mine:
                    nic.mac = random_mac()
            elif nic.mac in used:
                raise ValidationError(f"{config.label}: MAC address {nic.mac} of card {index + 1} is already used "
                                      f"by VM {used[nic.mac]!r}; leave it empty for a new one", f"nics[{index}].mac")
        mine.add(nic.mac)


# -- the switch --------------------------------------------------------------------------------------------
class Switch:
    """A learning Ethernet switch over UDP on 127.0.0.1: one datagram per frame, one UDP port per VM card."""

    def __init__(self, data: DataFolder, name: str, port: int = 0) -> None:
        self.data, self.name = data, name
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            self.sock.bind(("127.0.0.1", port))
        except OSError:
            self.sock.bind(("127.0.0.1", 0))   # the old port is taken: running VMs must be restarted to reach us
        self.port = int(self.sock.getsockname()[1])
        self.peers: dict[tuple[str, int], str] = {}   # (host, port) → VM name
        self.macs: dict[bytes, tuple[str, int]] = {}
        self.frames = 0
        self._last_scan = 0.0

    def scan(self) -> int:
        """Refresh the peers from the running VMs' records; return how many VMs run on this network."""
        peers: dict[tuple[str, int], str] = {}
        for run_file in self.data.vms_dir.glob("*/run/net.json"):
            record = self.data.read_json(run_file) or {}
            if not _alive(record):
                continue
            for link in record.get("links", []):
                if link.get("network") == self.name:
                    peers[("127.0.0.1", int(link["port"]))] = str(record.get("vm", "?"))
        self.peers = peers
        self.macs = {mac: peer for mac, peer in self.macs.items() if peer in peers}
        self._last_scan = time.monotonic()
        return len(set(peers.values()))

    def handle(self, frame: bytes, source: tuple[str, int]) -> None:
        if source not in self.peers:
            # A VM that just started (its starter nudges us), or a stranger: look once, then drop.
            if time.monotonic() - self._last_scan > 0.2:
                self.scan()
            if source not in self.peers:
                return
        if len(frame) < 14:
            return
        self.frames += 1
        destination, origin = frame[:6], frame[6:12]
        if not origin[0] & 1:
            self.macs[origin] = source
        target = self.macs.get(destination) if not destination[0] & 1 else None
        targets = [target] if target else [peer for peer in self.peers if peer != source]
        for peer in targets:
            with contextlib.suppress(OSError):
                self.sock.sendto(frame, peer)

    def serve(self, grace: float = SWITCH_GRACE, scan_every: float = SWITCH_SCAN) -> None:
        """Forward frames until no VM on this network has run for two scans in a row (after ``grace``)."""
        started = time.monotonic()
        idle_scans = 0
        self.sock.settimeout(scan_every)
        while True:
            try:
                frame, source = self.sock.recvfrom(65536)
                self.handle(frame, source)
            except socket.timeout:
                pass
            except OSError:
                pass   # Windows reports an ICMP "port unreachable" of an earlier send on the next receive
            if time.monotonic() - self._last_scan >= scan_every:
                running = self.scan()
                idle_scans = 0 if running else idle_scans + 1
                if idle_scans >= 2 and time.monotonic() - started > grace:
                    return


def _alive(record: dict[str, Any]) -> bool:
    from thalunix.qemu import process
    try:
        return process.is_alive(int(record["pid"]), str(record.get("token", "")))
    except (KeyError, TypeError, ValueError):
        return False


def serve_switch(data: DataFolder, name: str) -> int:
    """The switch process's body (``thalunix net serve-switch NAME``): hold the lock, publish the port, serve."""
    get_network(data, name)
    lock = FileLock(data.network_run_path(name, "lock"))
    # switch_status() probes by taking the lock for an instant: only a lock held for a while means
    # that another switch serves this network already.
    deadline = time.monotonic() + 2.0
    while not lock.acquire():
        if time.monotonic() > deadline:
            return 0
        time.sleep(0.02)
    try:
        previous = data.read_json(data.network_run_path(name, "switch.json"), {}) or {}
        switch = Switch(data, name, int(previous.get("port", 0) or 0))
        atomic_write_json(data.network_run_path(name, "switch.json"),
                          {"port": switch.port, "pid": os.getpid(), "network": name}, durable=False)
        switch.scan()
        switch.serve()
    finally:
        lock.release()
    return 0


def switch_status(data: DataFolder, name: str) -> dict[str, Any]:
    """``{"running": bool, "port": int|None, "pid": int|None}`` of the network's switch."""
    lock = FileLock(data.network_run_path(name, "lock"))
    if lock.acquire():
        lock.release()
        return {"running": False, "port": None, "pid": None}
    info = data.read_json(data.network_run_path(name, "switch.json"), {}) or {}
    return {"running": True, "port": info.get("port"), "pid": info.get("pid")}


def _switch_command(data: DataFolder, name: str) -> list[str]:
    if getattr(sys, "frozen", False):
        return [sys.executable, "--data-dir", str(data.root), "net", "serve-switch", name]
    return [sys.executable, "-m", "thalunix", "--data-dir", str(data.root), "net", "serve-switch", name]


def ensure_switch(data: DataFolder, name: str, timeout: float = 20.0) -> int:
    """The UDP port of network ``name``'s switch, starting the switch process if none runs."""
    get_network(data, name)
    spawn_lock = FileLock(data.network_run_path(name, "spawn.lock"))
    deadline = time.monotonic() + timeout
    while not spawn_lock.acquire():
        if time.monotonic() > deadline:
            raise NetworkError(f"network {name!r}: another Thalunix process is starting its switch; try again")
        time.sleep(0.05)
    try:
        status = switch_status(data, name)
        if status["running"] and status["port"]:
            return int(status["port"])
        log_path = data.network_run_path(name, "switch.log")
        stale = data.network_run_path(name, "switch.json")
        previous = data.read_json(stale, {}) or {}
        from thalunix.qemu import process
        with open(log_path, "ab") as log:
            proc = process.spawn_own(_switch_command(data, name), log)
        while time.monotonic() < deadline:
            status = switch_status(data, name)
            info = data.read_json(stale, {}) or {}
            if status["running"] and info.get("pid") == proc.pid and info != previous:
                return int(info["port"])
            if proc.poll() is not None:
                break
            time.sleep(0.02)
        with contextlib.suppress(OSError):
            proc.kill()
        tail = log_path.read_text(errors="replace")[-400:] if log_path.exists() else ""
        raise NetworkError(f"network {name!r}: its switch did not start ({tail.strip() or 'no output'}); "
                           f"see {log_path}")
    finally:
        spawn_lock.release()


def nudge(port: int) -> None:
    """Tell a switch to look for new VMs now rather than on their first frame."""
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto(_NUDGE, ("127.0.0.1", port))


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# -- bridged cards -----------------------------------------------------------------------------------------
BRIDGE_HELPERS = ("/usr/lib/qemu/qemu-bridge-helper", "/usr/libexec/qemu-bridge-helper",
                  "/usr/local/libexec/qemu-bridge-helper")
BRIDGE_CONF = "/etc/qemu/bridge.conf"


def bridge_helper(runtime_dir: Path | None = None) -> str:
    candidates = [str(runtime_dir / "qemu-bridge-helper")] if runtime_dir else []
    return next((path for path in [*candidates, *BRIDGE_HELPERS] if os.path.isfile(path)), "")


def check_bridge(config: VMConfig, index: int, sysfs: Path = Path("/sys/class/net"), helper: str = "",
                 conf: Path = Path(BRIDGE_CONF), is_root: bool | None = None) -> None:
    """Raise :class:`NetworkError` naming what is missing for card ``index`` in mode bridge (Linux)."""
    nic = config.nics[index]
    where = f"{config.label}, card {index + 1}"
    root = (os.geteuid() == 0) if is_root is None and hasattr(os, "geteuid") else bool(is_root)
    if os.name == "nt" and is_root is None:
        _check_windows_tap(config, index)
        return
    if nic.tap:
        if not (sysfs / nic.tap).exists():
            raise NetworkError(f"{where}: there is no TAP device {nic.tap!r} on this host; create it once as "
                               f"root (ip tuntap add dev {nic.tap} mode tap user $USER) or pick a host bridge")
        owner = _read(sysfs / nic.tap / "owner")
        if not root and owner not in ("", "-1", str(os.getuid() if hasattr(os, "getuid") else "")):
            raise NetworkError(f"{where}: TAP device {nic.tap!r} belongs to user id {owner}, so QEMU may not open "
                               f"it; recreate it with `ip tuntap add dev {nic.tap} mode tap user $USER` (as root)")
        if not root and not os.access("/dev/net/tun", os.R_OK | os.W_OK):
            raise NetworkError(f"{where}: no permission to open /dev/net/tun, needed for TAP device {nic.tap!r}; "
                               "ask an administrator to give your user read/write access to it")
        return
    if not (sysfs / nic.bridge / "bridge").is_dir():
        raise NetworkError(f"{where}: there is no bridge {nic.bridge!r} on this host; create it (ip link add "
                           f"{nic.bridge} type bridge) or choose an existing bridge")
    if not helper:
        raise NetworkError(f"{where}: qemu-bridge-helper was not found (looked in {', '.join(BRIDGE_HELPERS)}); "
                           "install QEMU's bridge helper (Debian: qemu-system-common)")
    mode = os.stat(helper).st_mode
    if not root and not mode & 0o4000:
        raise NetworkError(f"{where}: {helper} lacks the setuid bit (or CAP_NET_ADMIN), the permission it needs "
                           f"to add a TAP device to bridge {nic.bridge!r}; as root: chmod u+s {helper}")
    allowed = _allowed_bridges(conf)
    if allowed is None:
        raise NetworkError(f"{where}: {conf} is missing or unreadable, so qemu-bridge-helper refuses every bridge; "
                           f"as root: echo 'allow {nic.bridge}' >> {conf}")
    if nic.bridge not in allowed and "all" not in allowed:
        raise NetworkError(f"{where}: {conf} does not allow bridge {nic.bridge!r}; as root: "
                           f"echo 'allow {nic.bridge}' >> {conf}")


def _allowed_bridges(conf: Path, depth: int = 0) -> set[str] | None:
    try:
        text = conf.read_text()
    except OSError:
        return None
    allowed: set[str] = set()
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if len(words) == 2 and words[0] == "allow":
            allowed.add(words[1])
        elif len(words) == 2 and words[0] == "include" and depth < 4:
            allowed |= _allowed_bridges(Path(words[1]), depth + 1) or set()
    return allowed


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


#: Component ids of the TAP-Windows drivers (OpenVPN's tap-windows6, older tap0801).
TAP_COMPONENT_IDS = ("tap0901", "tap0801", "root\\tap0901")


def parse_windows_adapters(adapters: Iterable[dict[str, str]]) -> list[str]:
    """Names of TAP adapters among registry entries ``{"ComponentId": …, "Name": …}`` (pure, unit-tested)."""
    return sorted(a.get("Name", "") for a in adapters
                  if a.get("ComponentId", "").lower() in TAP_COMPONENT_IDS and a.get("Name"))


def windows_tap_adapters() -> list[str]:
    """The installed TAP adapters' connection names, read from the registry (Windows only)."""
    if os.name != "nt":
        return []
    import winreg  # type: ignore[import-not-found]
    klass = r"SYSTEM\CurrentControlSet\Control\Class\{4D36E972-E325-11CE-BFC1-08002BE10318}"
    network = r"SYSTEM\CurrentControlSet\Control\Network\{4D36E972-E325-11CE-BFC1-08002BE10318}"
    found: list[dict[str, str]] = []
    with contextlib.suppress(OSError), winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE, klass) as root:
        for index in range(1000):
            try:
                sub = winreg.EnumKey(root, index)
            except OSError:
                break
            with contextlib.suppress(OSError), winreg.OpenKey(root, sub) as key:
                component = winreg.QueryValueEx(key, "ComponentId")[0]
                guid = winreg.QueryValueEx(key, "NetCfgInstanceId")[0]
                with winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE, rf"{network}\{guid}\Connection") as conn:
                    found.append({"ComponentId": component, "Name": winreg.QueryValueEx(conn, "Name")[0]})
    return parse_windows_adapters(found)


def _check_windows_tap(config: VMConfig, index: int, adapters: list[str] | None = None) -> None:
    nic = config.nics[index]
    adapters = windows_tap_adapters() if adapters is None else adapters
    wanted = nic.tap or nic.bridge
    if not adapters:
        raise NetworkError(f"{config.label}, card {index + 1}: no TAP-Windows adapter is installed; install one "
                           "(OpenVPN's TAP-Windows 6 driver), bridge it with your network adapter in Network "
                           "Connections, and give its name here")
    if wanted not in adapters:
        raise NetworkError(f"{config.label}, card {index + 1}: there is no TAP adapter named {wanted!r}; "
                           f"installed: {', '.join(adapters)}")


# -- before a start ----------------------------------------------------------------------------------------
def prepare_launch(data: DataFolder, config: VMConfig, runtime: "Runtime", agent: "Endpoint | None") -> dict[str, Any]:
    """Check forwards and bridges, start the switches and the share: the LaunchPlan fields for networking.

    Writes ``run/net.json`` (the VM's switch ports) so its switches accept its frames.
    """
    check_forwards(config)
    plan: dict[str, Any] = {"agent": agent if config.guest_agent else None}
    links: list[tuple[int, int, int]] = []
    records: list[dict[str, Any]] = []
    for index, nic in enumerate(config.nics):
        if nic.mode == "private":
            try:
                switch_port = ensure_switch(data, nic.network)
            except NotFoundError as error:
                raise NetworkError(f"{config.label}, card {index + 1}: {error}") from None
            local = _free_udp_port()
            links.append((index, local, switch_port))
            records.append({"network": nic.network, "port": local, "switch": switch_port})
        elif nic.mode == "bridge":
            helper = bridge_helper(getattr(runtime, "data_dir", None))
            check_bridge(config, index, helper=helper)
            plan["bridge_helper"] = helper
    plan["private_links"] = tuple(links)
    if config.shared_folder:
        from thalunix import share
        plan["share"] = share.serve_for(data, config)
    if config.usb_devices:
        from thalunix import usb
        plan["usb_host"] = usb.present_at_start(config)
    write_run_record(data, config, records)
    return plan


def write_run_record(data: DataFolder, config: VMConfig, links: list[dict[str, Any]], pid: int = 0,
                     token: str = "") -> None:
    path = data.vm_path(config.id, "run", "net.json")
    if not links:
        path.unlink(missing_ok=True)
        return
    atomic_write_json(path, {"vm": config.name, "pid": pid, "token": token, "links": links}, durable=False)


def launched(data: DataFolder, config: VMConfig, pid: int, token: str) -> None:
    """QEMU runs: record its pid beside its switch ports and tell the switches."""
    path = data.vm_path(config.id, "run", "net.json")
    record = data.read_json(path)
    if not record:
        return
    write_run_record(data, config, record.get("links", []), pid, token)
    for link in record.get("links", []):
        nudge(int(link["switch"]))


def nic_rows(config: VMConfig) -> list[dict[str, Any]]:
    """The VM's cards for listings: mode, model, MAC, what it connects to, its forwards as specs."""
    rows = []
    for index, nic in enumerate(config.nics):
        target = {"private": nic.network, "bridge": nic.bridge or (f"tap {nic.tap}" if nic.tap else "")}.get(
            nic.mode, "NAT" if nic.mode == "user" else ("NAT, no outbound" if nic.mode == "restricted" else ""))
        rows.append({"card": index + 1, "mode": nic.mode, "model": nic.model, "mac": nic.mac, "network": nic.network,
                     "bridge": nic.bridge, "tap": nic.tap, "target": target,
                     "forwards": [f"{f.protocol}:{f.host_address}:{f.host_port}:{f.guest_port}" for f in nic.forwards]})
    return rows


def doctor_report(runtime: "Runtime | None") -> dict[str, Any]:
    """What networking can do on this host (``thalunix doctor``): private networks, bridges, TAP, USB."""
    netdevs = list(getattr(getattr(runtime, "caps", None), "netdevs", []) or [])
    private = "dgram" if (not netdevs or "dgram" in netdevs) else ("socket" if "socket" in netdevs else "")
    report: dict[str, Any] = {"private_backend": private, "private_ok": bool(private)}
    if os.name == "nt":
        adapters = windows_tap_adapters()
        report["tap_adapters"] = adapters
        report["bridge_summary"] = (f"TAP adapters: {', '.join(adapters)}" if adapters else
                                    "no TAP-Windows adapter installed (needed for bridged cards)")
    else:
        helper = bridge_helper(getattr(runtime, "data_dir", None))
        root = hasattr(os, "geteuid") and os.geteuid() == 0
        setuid = bool(helper) and bool(os.stat(helper).st_mode & 0o4000)
        allowed = sorted(_allowed_bridges(Path(BRIDGE_CONF)) or [])
        report.update({"bridge_helper": helper, "bridge_helper_setuid": setuid, "bridge_conf": BRIDGE_CONF,
                       "bridges_allowed": allowed, "tun_access": os.access("/dev/net/tun", os.R_OK | os.W_OK),
                       "root": root})
        if not helper:
            report["bridge_summary"] = "no qemu-bridge-helper: bridged cards need an existing TAP device"
        elif not setuid and not root:
            report["bridge_summary"] = f"{helper} is not setuid: bridged cards need an existing TAP device"
        else:
            report["bridge_summary"] = (f"bridges allowed in {BRIDGE_CONF}: {', '.join(allowed)}" if allowed
                                        else f"no bridge allowed in {BRIDGE_CONF}")
    try:
        from thalunix import usb
        report["usb_devices"] = len(usb.list_host_devices())
    except ThalunixError as error:
        report["usb_devices"] = None
        report["usb_error"] = str(error)
    return report
