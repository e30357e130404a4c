"""The command line's libvirt part: ``thalunix host …``, ``--host NAME`` on the ``vm`` verbs, and ``vm move``.

:func:`add_parsers` is called by :func:`thalunix.cli.build_parser`; :func:`wants` tells
:func:`thalunix.cli.main` when a command is ours and :func:`run` carries it out. Without ``--host`` every
``vm`` verb keeps going to the portable folder (the direct engine), as before.

Example::

    thalunix host add lab qemu+ssh://root@lab.example/system
    thalunix host list                                   # each host: connected (N VMs) or its error and cause
    thalunix vm list --host lab
    thalunix vm create web --host lab --iso debian.iso --disk 20G --accel tcg
    thalunix vm move web --to lab                        # portable → host (checksums compared)
    thalunix vm move web --host lab --to local           # and back
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from thalunix.engine import CreateOptions, DirectEngine
from thalunix.errors import ValidationError
from thalunix.libvirt.hosts import LOCAL, HostManager

#: vm verbs a libvirt host offers (the rest are the portable folder's: disk, export, import, log files …).
HOST_VERBS = ("list", "create", "show", "edit", "delete", "start", "stop", "pause", "resume", "reset", "console",
              "screenshot", "snapshot", "clone", "log", "move")


def add_parsers(commands: Any, common: argparse.ArgumentParser, vm: Any) -> None:
    host_parser = commands.add_parser("host", help="libvirt hosts shown beside the portable VMs")
    hosts = host_parser.add_subparsers(dest="host_verb", metavar="VERB", parser_class=type(host_parser))
    hosts.required = True
    add = hosts.add_parser("add", parents=[common], help="add a libvirt host (nothing is connected yet)")
    add.add_argument("name", help="a short name (--host NAME uses it)")
    add.add_argument("uri", help="qemu:///system, qemu:///session, qemu+ssh://user@host/system, …")
    add.add_argument("--network", help="libvirt network for new network cards (default: user-mode networking)")
    add.add_argument("--pool", help="storage pool for disks (default: thalunix, made when missing)")
    hosts.add_parser("list", parents=[common], help="the hosts, each connected with its VM count or its error")
    remove = hosts.add_parser("remove", parents=[common], help="take a host off the list (its VMs stay on it)")
    remove.add_argument("name")

    move = vm.add_parser("move", help="move a stopped VM to a libvirt host (--to HOST) or back (--to local)")
    move.add_argument("name")
    move.add_argument("--to", required=True, metavar="HOST", help="a host name, or 'local' for the portable folder")
    move.add_argument("--keep-source", action="store_true", help="copy: leave the VM where it is as well")
    for name, parser in vm.choices.items():
        if name in HOST_VERBS:
            parser.add_argument("--host", metavar="NAME",
                                help=f"a libvirt host from `thalunix host list` (default: {LOCAL}, this folder)")


def wants(args: argparse.Namespace) -> bool:
    host = getattr(args, "host", None)
    return args.command == "host" or getattr(args, "verb", None) == "move" or bool(host and host != LOCAL)


def _print(args: argparse.Namespace, data: Any, human: str) -> None:
    print(json.dumps(data, indent=2) if getattr(args, "json", False) else human)


def run(direct: DirectEngine, args: argparse.Namespace) -> int:
    manager = HostManager(direct.data, direct.bus)
    try:
        if args.command == "host":
            return _hosts(manager, args)
        if args.verb == "move":
            return _move(direct, manager, args)
        return _vm(manager.engine(args.host), args)
    finally:
        manager.close()


def _hosts(manager: HostManager, args: argparse.Namespace) -> int:
    if args.host_verb == "add":
        host = manager.hosts.add(args.name, args.uri, network=args.network, pool=args.pool)
        _print(args, host.__dict__, f"Added host {host.name!r} ({host.uri}); `thalunix vm list --host {host.name}` "
                                    "lists its VMs")
    elif args.host_verb == "remove":
        host = manager.hosts.remove(args.name)
        _print(args, {"removed": host.name}, f"Removed host {host.name!r} from the list; its VMs stay on it")
    else:
        rows = manager.overview()
        lines = [f"{'NAME':12} {'STATE':10} URI"]
        for row in rows:
            detail = f"{len(row['vms'])} VMs" if row["state"] == "connected" else f"{row['cause']}: {row['error']}"
            lines.append(f"{row['name']:12} {row['state']:10} {row['uri']}\n{'':12} {detail}")
        _print(args, rows, "\n".join(lines) if rows else "No hosts yet. Add one: thalunix host add NAME URI")
    return 0


def _move(direct: DirectEngine, manager: HostManager, args: argparse.Namespace) -> int:
    from thalunix.libvirt.move import move_to_host, move_to_local
    source = getattr(args, "host", None) or LOCAL
    if (source == LOCAL) == (args.to == LOCAL):
        raise ValidationError("move goes from the portable folder to a host (--to HOST) or from a host to it "
                              "(--host HOST --to local)", "to")
    if source == LOCAL:
        job = move_to_host(direct, args.name, manager.engine(args.to), keep_source=args.keep_source, wait=True)
    else:
        job = move_to_local(manager.engine(source), args.name, direct, keep_source=args.keep_source, wait=True)
    from thalunix.jobs import raise_for
    result = raise_for(direct.jobs.get(job["id"]))
    sums = ", ".join(f"{disk} sha256 {digest[:16]}…" for disk, digest in result["checksums"].items())
    _print(args, result, f"Moved VM {result['name']!r} to {args.to} ({sums or 'no disks'}); {result['note']}")
    return 0


def _vm(engine: Any, args: argparse.Namespace) -> int:
    verb = args.verb
    name = getattr(args, "name", None)
    if verb == "list":
        rows = engine.list()
        lines = [f"{'NAME':24} {'STATE':9} {'CPUS':>4} {'RAM':>8}  FIRMWARE"]
        for row in rows:
            lines.append(f"{row['name']:24} {row['state']:9} {row.get('cpus', ''):>4} {row.get('ram_mib', ''):>6}M  "
                         f"{row.get('firmware', '')}{'' if row.get('managed') else '  (defined by another tool)'}")
        _print(args, rows, "\n".join(lines) if rows else f"No VMs on host {args.host!r}")
    elif verb == "create":
        config = engine.create(CreateOptions(
            name=args.name, iso=args.iso, ram=args.ram, cpus=args.cpus, disk=args.disk, disk_format=args.disk_format,
            disk_bus=args.disk_bus, firmware=args.firmware, tpm=args.tpm, forwards=args.forward or [], os=args.os,
            machine=args.machine, accel=args.accel, display=args.display,
            boot=[p.strip() for p in args.boot.split(",") if p.strip()] if args.boot else None))
        _print(args, engine.describe(config.name), f"Created VM {config.name!r} on host {args.host!r}")
    elif verb == "show":
        info = engine.describe(name)
        human = [f"VM {info['name']!r} on host {info['host']!r}: {info['state']}",
                 f"  cpus {info['cpus']}   ram {info['ram_mib']} MiB   firmware {info['firmware']}   "
                 f"machine {info['machine']}   tpm {info['tpm']}"]
        human += [f"  disk      {d['path']} ({d['format']}, {d['bus']})" for d in info["disks"]]
        human += [f"  cdrom     {c['path'] or '(empty)'}" for c in info["cdroms"]]
        if info["unmodeled"]:
            human.append(f"  kept as is (not modelled): {', '.join(info['unmodeled'])}")
        human += [f"  note      {note}" for note in info["notes"]]
        _print(args, info, "\n".join(human))
    elif verb == "edit":
        from thalunix.cli import _edit_changes
        config = engine.edit(name, _edit_changes(engine, args))
        _print(args, engine.describe(config.name), f"Updated VM {config.name!r} on host {args.host!r}")
    elif verb == "delete":
        if not args.yes and sys.stdin.isatty():
            if input(f"Delete VM {name!r} on host {args.host!r} and its disks? [y/N] ").strip().lower() not in ("y", "yes"):
                print("Nothing deleted.")
                return 1
        engine.delete(name, keep_disks=args.keep_disks)
        _print(args, {"deleted": name}, f"Deleted VM {name!r} on host {args.host!r}")
    elif verb == "start":
        status = engine.start(name)
        _print(args, status, f"VM {name!r} on host {args.host!r} is {status['state']}")
    elif verb == "stop":
        status = engine.stop(name, force=args.force, timeout=args.timeout)
        _print(args, status, f"VM {name!r} on host {args.host!r} is {status['state']}")
    elif verb in ("pause", "resume", "reset"):
        getattr(engine, verb)(name)
        status = engine.status(name)
        _print(args, status, f"VM {name!r} on host {args.host!r} is {status['state']}")
    elif verb == "screenshot":
        png = engine.screenshot(name)
        if args.file == "-":
            sys.stdout.buffer.write(png)
        else:
            Path(args.file).expanduser().write_bytes(png)
            _print(args, {"file": str(Path(args.file).expanduser().absolute()), "bytes": len(png)},
                   f"Saved the screen of VM {name!r} to {args.file}")
    elif verb == "log":
        sys.stdout.write(engine.read_log(name, "serial" if args.serial else "qemu" if args.qemu else "events"))
    elif verb == "console":
        return _console(engine, name)
    elif verb == "snapshot":
        if args.action == "list":
            rows = engine.snapshots(name)["snapshots"]
            _print(args, rows, "\n".join(f"{r['name']:20} {r['state']:8} {r['description']}" for r in rows)
                   or f"VM {name!r} has no snapshots")
        elif not args.snapshot:
            raise ValidationError(f"snapshot {args.action} needs a snapshot name", "snapshot")
        elif args.action == "create":
            row = engine.snapshot_create(name, args.snapshot, description=args.description, live=args.live)
            _print(args, row, f"Took snapshot {args.snapshot!r} of VM {name!r}")
        else:
            result = getattr(engine, f"snapshot_{args.action}")(name, args.snapshot)
            _print(args, result, f"{args.action.capitalize()}d snapshot {args.snapshot!r} of VM {name!r}".replace(
                "Reverted", "Reverted to").replace("Revertd", "Reverted to"))
    elif verb == "clone":
        result = engine.clone(name, args.new_name, linked=getattr(args, "linked", False))
        _print(args, result, f"Cloned VM {name!r} as {args.new_name!r} on host {args.host!r}")
    else:
        raise ValidationError(f"`vm {verb}` is not offered for libvirt hosts; leave out --host", "host")
    return 0


def _console(engine: Any, name: str) -> int:
    """Relay the console stream to this terminal until Ctrl+] (or the end of piped input)."""
    import threading
    out = sys.stdout.buffer
    out.write(engine.serial_output(name)[-4096:])
    out.flush()
    done = threading.Event()
    domain_id = engine.get(name).id

    def pump() -> None:
        with engine.bus.subscribe(accept=lambda e: e.get("vm") == domain_id) as events:
            while not done.is_set():
                event = events.get(timeout=0.5)
                if event is None:
                    continue
                if event["type"] == "vm.serial":
                    out.write(event["data"].encode("utf-8", errors="replace"))
                    out.flush()
                elif event["type"] == "vm.state" and event["state"] in ("stopped", "crashed"):
                    done.set()
    threading.Thread(target=pump, daemon=True).start()
    try:
        while not done.is_set():
            chunk = sys.stdin.buffer.read1(1024) if hasattr(sys.stdin.buffer, "read1") else sys.stdin.buffer.read(1)
            if not chunk or b"\x1d" in chunk:
                break
            engine.send_serial(name, chunk)
    finally:
        time.sleep(0.2)
        done.set()
    return 0
