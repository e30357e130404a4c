"""The command line: ``thalunix vm …``, ``thalunix doctor``; a thin front over :mod:`thalunix.engine`.

Human output by default, ``--json`` for scripts. Errors print one line naming
what failed and what to do, and exit with status 1 (2 for a malformed command).

Without a command it opens the Thalunix window (or, where no window can open, serves the
interface and prints its link, saying why).

Example::

    thalunix                            # the window
    thalunix serve [--port N]           # headless: prints one line, the link to open in a browser
    thalunix vm create debian --iso debian.iso --ram 2G --disk 20G --forward tcp:2222:22
    thalunix vm start debian
    thalunix vm show debian --json      # {"name": "debian", "state": "running", ...}
    thalunix vm stop debian [--force]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import threading
from pathlib import Path
from typing import Any, Sequence

from thalunix import __version__
from thalunix.engine import CreateOptions, DirectEngine
from thalunix.errors import DataFolderError, ThalunixError, ValidationError
from thalunix.model import (ACCELERATORS, BOOT_DEVICES, DISK_BUSES, DISK_FORMATS, DISPLAYS, FIRMWARES, MACHINES,
                            OS_HINTS, TPM_MODES, CDRom, Nic, PortForward, parse_ram_mib)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="thalunix", description="Portable manager for QEMU virtual machines.")
    parser.add_argument("--version", action="version", version=f"thalunix {__version__}")
    parser.add_argument("--data-dir", help="data folder (default: $THALUNIX_DATA, else thalunix-data/ by the app)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    # --json is accepted after the verb too (`thalunix vm show web --json`), as people type it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    doctor = commands.add_parser("doctor", parents=[common],
                                 help="report QEMU, accelerators, firmware and the data folder")
    doctor.add_argument("--licences", "--licenses", action="store_true",
                        help="where the licences and sources of the bundled binaries are")
    serve = commands.add_parser("serve", help="serve the interface and API on 127.0.0.1 without a window; "
                                              "prints the link to open")
    serve.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
    serve.add_argument("--stop-vms-on-exit", action="store_true",
                       help="stop the running VMs when serving ends (default: leave them running)")

    vm_parser = commands.add_parser("vm", help="manage virtual machines")
    vm = vm_parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_parser_with(common))
    vm.required = True
    vm.add_parser("list", help="list VMs with their state")
    create = vm.add_parser("create", help="create a VM")
    create.add_argument("name")
    _vm_options(create)
    create.add_argument("--disk", help="size of a new disk (20G), path of an existing image, or none (default: "
                                       "the ISO's catalog entry's size, else none)")
    create.add_argument("--disk-format", choices=DISK_FORMATS, default="qcow2")
    create.add_argument("--win11-setup", action=argparse.BooleanOptionalAction, default=None,
                        help="attach a drive with an autounattend.xml that lets Windows 11 Setup skip its TPM, Secure "
                             "Boot and RAM checks (nothing else); default: on for --os windows11 when this host "
                             "cannot emulate a TPM")
    for verb, text in (("show", "show a VM's settings and state"), ("start", "start a VM"),
                       ("pause", "pause a running VM"), ("resume", "resume a paused VM"),
                       ("reset", "hard-reset a running VM")):
        vm.add_parser(verb, help=text).add_argument("name")
    edit = vm.add_parser("edit", help="change a stopped VM's settings")
    edit.add_argument("name")
    edit.add_argument("--rename", metavar="NEW_NAME")
    _vm_options(edit, defaults=False)
    edit.add_argument("--no-iso", action="store_true", help="empty the CD-ROM drive")
    edit.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                      help="set any vm.json field, e.g. --set serial=false")
    delete = vm.add_parser("delete", help="delete a VM and its disks")
    delete.add_argument("name")
    delete.add_argument("--keep-disks", action="store_true", help="move its disks to disks-kept/ first")
    delete.add_argument("--yes", action="store_true", help="do not ask")
    stop = vm.add_parser("stop", help="shut a VM down (ACPI power button, then quit)")
    stop.add_argument("name")
    stop.add_argument("--force", action="store_true", help="pull the plug now")
    stop.add_argument("--timeout", type=float, default=60, help="seconds to wait for the guest (default 60)")
    console = vm.add_parser("console", help="attach to the serial console (Ctrl+] leaves)")
    console.add_argument("name")
    screenshot = vm.add_parser("screenshot", help="save a running VM's screen as a PNG file")
    screenshot.add_argument("name")
    screenshot.add_argument("file", help="where to write the PNG ('-' for standard output)")
    log = vm.add_parser("log", help="print a VM's logs")
    log.add_argument("name")
    log.add_argument("--serial", action="store_true", help="the serial console log")
    log.add_argument("--qemu", action="store_true", help="QEMU's own output")
    _storage_parsers(vm)
    _network_parsers(vm, commands, common)
    firmware = vm.add_parser("firmware", help="show a VM's UEFI variable store, or reset its firmware settings")
    firmware.add_argument("name")
    firmware.add_argument("action", nargs="?", choices=("show", "reset"), default="show",
                          help="reset: forget boot entries and enrolled keys (the VM must be stopped)")
    _iso_parsers(commands, common)
    from thalunix.libvirt.cli import add_parsers as _host_parsers   # host …, vm move, --host on vm verbs
    _host_parsers(commands, common, vm)
    return parser


def _parser_with(common: argparse.ArgumentParser) -> type[argparse.ArgumentParser]:
    class VerbParser(argparse.ArgumentParser):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("parents", [common])
            super().__init__(*args, **kwargs)
    return VerbParser


def _vm_options(parser: argparse.ArgumentParser, defaults: bool = True) -> None:
    def default(value: Any) -> Any:
        return value if defaults else None
    parser.add_argument("--iso", help="ISO image for the CD-ROM drive")
    # No default for RAM, disk, firmware, TPM and OS: a catalog ISO's own defaults apply, else the engine's.
    parser.add_argument("--ram", help="memory: 2G, 512M or MiB as a number" + (
        " (default: the ISO's catalog entry's, else 2G)" if defaults else ""))
    parser.add_argument("--cpus", type=int, default=default(2), help="virtual CPUs (default 2)")
    parser.add_argument("--firmware", choices=FIRMWARES)
    parser.add_argument("--tpm", choices=TPM_MODES)
    parser.add_argument("--forward", action="append", default=None, metavar="tcp:HOSTPORT:GUESTPORT",
                        help="port forward from 127.0.0.1 (repeatable)")
    parser.add_argument("--os", choices=OS_HINTS)
    parser.add_argument("--machine", choices=MACHINES, default=default("q35"))
    parser.add_argument("--accel", choices=ACCELERATORS, default=default("auto"))
    parser.add_argument("--display", choices=DISPLAYS, default=default("vnc"))
    parser.add_argument("--disk-bus", choices=DISK_BUSES, default=None,
                        help="disk bus (default: virtio; SATA for Windows guests)")
    parser.add_argument("--boot", help=f"boot order, comma-separated from {', '.join(BOOT_DEVICES)}")


def _boot(text: str | None) -> list[str] | None:
    return [part.strip() for part in text.split(",") if part.strip()] if text else None


def _print(args: argparse.Namespace, data: Any, human: str) -> None:
    print(json.dumps(data, indent=2) if args.json else human)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    engine: DirectEngine | None = None
    try:
        engine = DirectEngine.open(args.data_dir)
        from thalunix.bundle import prepare
        prepare(engine.data)   # the portable exe: temp files in the data folder, its runtime unpacked once
        from thalunix.libvirt import cli as host_cli
        if host_cli.wants(args):
            return host_cli.run(engine, args)
        return _dispatch(engine, args)
    except DataFolderError as error:
        if engine is None and not args.command and not args.json and _choose_folder_in_window(args, error):
            return 0   # not reached: the process was replaced by one on the chosen folder
        print(f"thalunix: {error}", file=sys.stderr)
        return 1
    except ThalunixError as error:
        if args.json:
            print(json.dumps({"error": error.code, "message": str(error),
                              "field": getattr(error, "field", None)}), file=sys.stderr)
        else:
            print(f"thalunix: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        if engine is not None:
            engine.close()   # VMs keep running; only this process lets go


def _choose_folder_in_window(args: argparse.Namespace, error: DataFolderError) -> bool:
    """Started for the window (a double-click) with an unusable data folder: say so in a window, let the user pick
    another one and start again on it. False where no window can open (the message goes to stderr then)."""
    from thalunix.gui import ask_for_another_folder, window_unavailable_reason
    if window_unavailable_reason() is not None:
        return False
    chosen = ask_for_another_folder(str(error))
    if not chosen:
        sys.stdout.flush()
        os._exit(1)   # pywebview may leave a thread behind
    command = [sys.executable] if getattr(sys, "frozen", False) else [sys.executable, "-m", "thalunix"]
    os.execv(command[0], [*command, "--data-dir", chosen])
    return True


def _dispatch(engine: DirectEngine, args: argparse.Namespace) -> int:
    if not args.command:
        return _open_window(engine, args)
    if args.command == "serve":
        return _serve(engine, port=args.port, stop_vms=args.stop_vms_on_exit)
    if args.command == "doctor":
        from thalunix.doctor import diagnose, render
        if args.licences:
            from thalunix.bundle import licence_report, manifest
            _print(args, manifest() or {}, licence_report())
            return 0
        report = diagnose(engine)
        _print(args, report, render(report))
        return 0
    if args.command in ("net", "usb") or getattr(args, "verb", None) in NETWORK_VERBS:
        return _network(engine, args)
    if args.command == "iso":
        return _iso(engine, args)
    verb = args.verb
    if verb == "list":
        rows = engine.list()
        lines = [f"{'NAME':24} {'STATE':9} {'CPUS':>4} {'RAM':>8}  FIRMWARE"]
        for row in rows:
            if row["state"] == "broken":
                lines.append(f"{'(unreadable)':24} {'broken':9}  {row['error']}")
            else:
                lines.append(f"{row['name']:24} {row['state']:9} {row['cpus']:>4} {row['ram_mib']:>6}M  {row['firmware']}")
        _print(args, rows, "\n".join(lines) if rows else "No VMs yet. Create one: thalunix vm create NAME --iso FILE")
        return 0
    if verb == "create":
        config = engine.create(CreateOptions(
            name=args.name, iso=args.iso, ram=args.ram, cpus=args.cpus, disk=args.disk, disk_format=args.disk_format,
            disk_bus=args.disk_bus or "", firmware=args.firmware, tpm=args.tpm, forwards=args.forward or [], os=args.os,
            machine=args.machine, accel=args.accel, display=args.display, boot=_boot(args.boot),
            win11_setup=args.win11_setup))
        _print(args, engine.describe(config.name), f"Created VM {config.name!r} in {engine.data.vm_dir(config.id)}")
        return 0
    if verb == "show":
        info = engine.describe(args.name)
        _print(args, info, _render_vm(info))
        return 0
    if verb == "edit":
        config = engine.edit(args.name, _edit_changes(engine, args))
        _print(args, engine.describe(config.name), f"Updated VM {config.name!r}")
        return 0
    if verb == "delete":
        if not args.yes and sys.stdin.isatty():
            answer = input(f"Delete VM {args.name!r} and its disks? [y/N] ")
            if answer.strip().lower() not in ("y", "yes"):
                print("Nothing deleted.")
                return 1
        engine.delete(args.name, keep_disks=args.keep_disks)
        _print(args, {"deleted": args.name}, f"Deleted VM {args.name!r}")
        return 0
    if verb == "start":
        status = engine.start(args.name)
        _print(args, status, f"VM {args.name!r} is {status['state']} (accelerator {status['accel']}, pid {status['pid']})")
        return 0
    if verb == "stop":
        status = engine.stop(args.name, force=args.force, timeout=args.timeout)
        _print(args, status, f"VM {args.name!r} is {status['state']}")
        return 0
    if verb in ("pause", "resume", "reset"):
        getattr(engine, verb)(args.name)
        status = engine.status(args.name)
        _print(args, status, f"VM {args.name!r} is {status['state']}")
        return 0
    if verb == "log":
        return _log(engine, args)
    if verb == "console":
        return _console(engine, args.name)
    if verb == "screenshot":
        png = engine.screenshot(args.name)
        if args.file == "-":
            sys.stdout.buffer.write(png)
            sys.stdout.buffer.flush()
            return 0
        try:
            Path(args.file).expanduser().write_bytes(png)
        except OSError as error:
            raise ValidationError(f"cannot write the screenshot to {args.file}: {error.strerror or error}; "
                                  "pick another file", "file") from None
        _print(args, {"file": str(Path(args.file).expanduser().absolute()), "bytes": len(png)},
               f"Saved the screen of VM {args.name!r} to {args.file}")
        return 0
    if verb == "firmware":
        if args.action == "reset":
            result = engine.firmware_reset(args.name)
            _print(args, result, f"VM {args.name!r}: {result['note']}"
                   + (f" (the old store is kept as {result['backup']})" if result["backup"] else ""))
            return 0
        info = engine.firmware(args.name)
        store = info["vars"]
        _print(args, info, f"VM {args.name!r}: {info['description']}\n" + (
            f"  variables {store['path']} ({store['size'] >> 10} KiB, written {store['modified']})"
            if store else "  variables: none stored yet (made from the firmware's defaults at the next start)"
            if info["firmware"] != "bios" else "  BIOS keeps no settings here"))
        return 0
    if verb in ("disk", "snapshot", "clone", "export", "import"):
        return _storage(engine, args)
    raise ValidationError(f"unknown command {verb!r}")


def _serve(engine: DirectEngine, port: int = 0, stop_vms: bool = False) -> int:
    """Serve the API and interface until Ctrl+C or SIGTERM; stdout gets exactly one line, the link."""
    import signal

    from thalunix.api import ApiServer
    engine.attach_running()
    server = ApiServer(engine, port=port).start()
    finished = threading.Event()
    previous = {}
    for number in (signal.SIGINT, signal.SIGTERM):
        previous[number] = signal.signal(number, lambda *_: finished.set())
    try:
        print(server.launch_url, flush=True)
        finished.wait()
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        server.stop()
        engine.close(stop_vms=stop_vms)
    return 0


def _open_window(engine: DirectEngine, args: argparse.Namespace) -> int:
    from thalunix.gui import run_window, window_unavailable_reason
    reason = window_unavailable_reason()
    if reason:
        print(f"thalunix: no window: {reason}; serving the interface instead (open the link below "
              "in a browser; Ctrl+C ends)", file=sys.stderr, flush=True)
        return _serve(engine)
    run_window(engine)
    # pywebview can leave a non-daemon thread behind after its window closed: leave for sure.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _edit_changes(engine: DirectEngine, args: argparse.Namespace) -> dict[str, Any]:
    config = engine.get(args.name)
    changes: dict[str, Any] = {}
    if args.rename:
        changes["name"] = args.rename
    for option, key in (("cpus", "cpus"), ("firmware", "firmware"), ("tpm", "tpm"), ("os", "os"),
                        ("machine", "machine"), ("accel", "accel")):
        if getattr(args, option) is not None:
            changes[key] = getattr(args, option)
    if args.ram is not None:
        changes["ram_mib"] = parse_ram_mib(args.ram)
    if args.display is not None:
        changes["display"] = {**config.display.to_dict(), "kind": args.display}
    if args.boot:
        changes["boot_order"] = _boot(args.boot)
    if args.iso or args.no_iso:
        path = ""
        if args.iso:
            iso = Path(args.iso).expanduser()
            if not iso.is_file():
                raise ValidationError(f"ISO {args.iso!r} does not exist; check the path", "iso")
            path = engine.data.to_stored_path(iso)
        cdroms = [c.to_dict() for c in config.cdroms] or [CDRom(id="cd0").to_dict()]
        cdroms[0]["path"] = path
        changes["cdroms"] = cdroms
    if args.forward is not None:
        nics = [n.to_dict() for n in config.nics] or [Nic().to_dict()]
        nics[0]["forwards"] = [PortForward.parse(spec).to_dict() for spec in args.forward]
        changes["nics"] = nics
    for assignment in args.set:
        key, sep, value = assignment.partition("=")
        if not sep:
            raise ValidationError(f"--set {assignment!r}: write FIELD=VALUE, e.g. serial=false", "set")
        try:
            changes[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            changes[key.strip()] = value
    if not changes:
        raise ValidationError("nothing to change; give at least one option (see thalunix vm edit --help)")
    return changes


def _render_vm(info: dict[str, Any]) -> str:
    lines = [f"{info['name']}  ({info['state']})", f"  id        {info['id']}", f"  folder    {info['folder']}",
             f"  os        {info['os']}   machine {info['machine']}   firmware {info['firmware']}",
             f"  cpus      {info['cpus']}   ram {info['ram_mib']} MiB   accel {info['accel']}   tpm {info['tpm']}"]
    for disk in info["disks"]:
        lines.append(f"  disk      {disk['path']} ({disk['format']}, {disk['bus']})")
    for cdrom in info["cdroms"]:
        lines.append(f"  cdrom     {cdrom['path'] or '(empty)'}")
    for nic in info["nics"]:
        forwards = ", ".join(f"{f['protocol']}:{f['host_address']}:{f['host_port']}->{f['guest_port']}"
                             for f in nic["forwards"])
        lines.append(f"  network   {nic['mode']} {nic['model']} {nic['mac']}" + (f"  forwards {forwards}" if forwards else ""))
    lines.append(f"  boot      {', '.join(info['boot_order'])}   display {info['display']['kind']}")
    status = info["status"]
    if status.get("pid"):
        lines.append(f"  running   pid {status['pid']} since {status['started_at']} ({status['accel']})")
    last = status.get("last_exit") or {}
    if info["state"] == "crashed" and last:
        lines.append(f"  crashed   exit code {last.get('code')} at {last.get('time')}")
        for line in (last.get("qemu_output") or "").splitlines()[-5:]:
            lines.append(f"            {line}")
    return "\n".join(lines)


def _log(engine: DirectEngine, args: argparse.Namespace) -> int:
    config = engine.get(args.name)
    names = ["serial.log"] if args.serial else ["qemu.log"] if args.qemu else ["events.log", "qemu.log"]
    for name in names:
        path = engine.data.vm_path(config.id, "logs", name)
        if len(names) > 1:
            print(f"--- {name}")
        if path.exists():
            sys.stdout.write(path.read_text(encoding="utf-8", errors="replace"))
    return 0


def _console(engine: DirectEngine, name: str) -> int:
    """Relay the serial console to this terminal until Ctrl+] (or end of input when piped)."""
    config = engine.get(name)
    supervisor = engine.supervisor
    session = supervisor.require_session(config)
    out = sys.stdout.buffer
    out.write(bytes(session.serial_buffer[-4096:]))
    out.flush()
    done = threading.Event()
    interactive = sys.stdin.isatty()
    if interactive:
        print("\r\n[connected to the serial console of %s; Ctrl+] leaves]\r" % name, file=sys.stderr)

    def pump_output() -> None:
        with supervisor.bus.subscribe(accept=lambda e: e.get("vm") == config.id) as events:
            while not done.is_set():
                event = events.get(timeout=0.5)
                if event and event["type"] == "vm.serial":
                    out.write(event["data"].encode())
                    out.flush()
                if session.exited.is_set():
                    done.set()

    threading.Thread(target=pump_output, daemon=True).start()
    saved = None
    if interactive and os.name == "posix":
        import termios
        import tty
        saved = termios.tcgetattr(sys.stdin.fileno())
        tty.setraw(sys.stdin.fileno())
    try:
        while not done.is_set():
            chunk = os.read(sys.stdin.fileno(), 1024)
            if not chunk or b"\x1d" in chunk:
                break
            supervisor.send_serial(config, chunk)
        if not interactive:
            done.wait(2.0)   # let the guest answer what was piped in
    finally:
        done.set()
        if saved is not None:
            import termios
            termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, saved)
    return 0


# -- disks, snapshots, clones, export/import ----------------------------------------------------------------
def _storage_parsers(vm: Any) -> None:
    disk = vm.add_parser("disk", help="list, add, remove, resize, convert or check a VM's disks")
    disk.add_argument("name")
    disk_verbs = disk.add_subparsers(dest="disk_verb", metavar="ACTION", parser_class=type(disk))
    disk_verbs.required = True
    disk_verbs.add_parser("list", help="the VM's disks with sizes and snapshots")
    add = disk_verbs.add_parser("add", help="add a new empty disk (--size) or an existing image (--path); "
                                            "hot-plugged if the VM runs")
    add.add_argument("--size", help="size of a new disk, e.g. 20G")
    add.add_argument("--path", help="an existing image to attach")
    add.add_argument("--format", choices=DISK_FORMATS, default="qcow2")
    add.add_argument("--bus", choices=DISK_BUSES, default="virtio")
    add.add_argument("--readonly", action="store_true")
    remove = disk_verbs.add_parser("remove", help="take a disk off the VM (unplugged if it runs)")
    remove.add_argument("disk", help="disk id (disk1) or file name")
    remove.add_argument("--delete-file", action="store_true", help="also erase the image if it is in the VM's folder")
    resize = disk_verbs.add_parser("resize", help="grow a disk (shrinking needs --force-shrink)")
    resize.add_argument("disk")
    resize.add_argument("size", help="new size, e.g. 40G")
    resize.add_argument("--force-shrink", action="store_true",
                        help="allow making it smaller: data past the new end is lost")
    convert = disk_verbs.add_parser("convert", help="convert a disk between raw and qcow2 (VM stopped)")
    convert.add_argument("disk")
    convert.add_argument("format", choices=DISK_FORMATS)
    check = disk_verbs.add_parser("check", help="check a qcow2 disk for errors and leaked clusters")
    check.add_argument("disk")
    check.add_argument("--repair", choices=("leaks", "all"), help="repair what the check finds")

    snapshot = vm.add_parser("snapshot", help="take, list, revert to or delete snapshots")
    snapshot.add_argument("name")
    snapshot.add_argument("action", choices=("create", "list", "revert", "delete"))
    snapshot.add_argument("snapshot", nargs="?", help="snapshot name")
    snapshot.add_argument("--live", action="store_true", default=None,
                          help="include the memory state (the VM must be running)")
    snapshot.add_argument("--offline", dest="live", action="store_false",
                          help="disks only (the VM must be stopped)")
    snapshot.add_argument("--description", default="")

    clone = vm.add_parser("clone", help="clone a stopped VM (full copy, or --linked on the source's disks)")
    clone.add_argument("name")
    clone.add_argument("new_name")
    clone.add_argument("--linked", action="store_true", help="qcow2 overlays on the source's disks (fast, small)")
    clone.add_argument("--tpm", choices=("fresh", "copy"), default="fresh", help="a new TPM, or the source's state")

    export = vm.add_parser("export", help="write a stopped VM to one .7z file")
    export.add_argument("name")
    export.add_argument("file")
    imp = vm.add_parser("import", help="import a VM from a .7z export (verified first)")
    imp.add_argument("file")
    imp.add_argument("--name", dest="new_name", help="name for the imported VM (default: its own, renamed if taken)")


def _run_job(engine: DirectEngine, args: argparse.Namespace, start: Any) -> Any:
    """Start a job, show its progress on stderr, cancel it on Ctrl+C; return its result or raise its error."""
    from thalunix.jobs import raise_for
    show = sys.stderr.isatty() and not args.json
    with engine.bus.subscribe(accept=lambda e: e["type"] == "job.progress") as events:
        job = start()
        handle = engine.jobs.get(job["id"])
        try:
            while not handle.done.wait(0.2):
                event = events.get(timeout=0)
                while event is not None:
                    if show and event.get("job") == handle.id:
                        print(f"\r{event['percent']:6.1f}%  {event['message'][:60]:60}", end="", file=sys.stderr,
                              flush=True)
                    event = events.get(timeout=0)
        except KeyboardInterrupt:
            handle.cancel()
            handle.done.wait(60)
        if show:
            print(file=sys.stderr)
    return raise_for(handle)


def _storage(engine: DirectEngine, args: argparse.Namespace) -> int:
    verb = args.verb
    if verb == "disk":
        action = args.disk_verb
        if action == "list":
            rows = engine.disks(args.name)
            lines = [f"{'ID':7} {'FORMAT':6} {'BUS':6} {'SIZE':>9}  FILE"]
            for row in rows:
                extra = f"  (on {row['backing_file']})" if row.get("backing_file") else ""
                snaps = f"  snapshots: {', '.join(row['snapshots'])}" if row.get("snapshots") else ""
                lines.append(f"{row['id']:7} {row['format']:6} {row['bus']:6} {row.get('size', '?'):>9}  "
                             f"{row['path']}{extra}{snaps}")
            _print(args, rows, "\n".join(lines) if rows else f"VM {args.name!r} has no disks")
        elif action == "add":
            row = engine.disk_add(args.name, size=args.size, path=args.path, format=args.format, bus=args.bus,
                                  readonly=args.readonly)
            _print(args, row, f"Added {row['id']} ({row.get('size', '')} {row['format']}, {row['bus']}) to {args.name!r}")
        elif action == "remove":
            result = engine.disk_remove(args.name, args.disk, delete_file=args.delete_file)
            _print(args, result, f"Removed {result['removed']} from {args.name!r}"
                   + (" and deleted its file" if result["file_deleted"] else f"; its file stays at {result['path']}"))
        elif action == "resize":
            row = engine.disk_resize(args.name, args.disk, args.size, force_shrink=args.force_shrink)
            _print(args, row, f"Disk {row['id']} of {args.name!r} is now {row.get('size')}")
        elif action == "convert":
            result = _run_job(engine, args, lambda: engine.disk_convert(args.name, args.disk, args.format))
            _print(args, result, f"Disk {result['id']} of {args.name!r} is now {result['format']} ({result['path']})")
        elif action == "check":
            result = engine.disk_check(args.name, args.disk, repair=args.repair)
            report = result["report"]
            _print(args, result, f"Disk {result['disk']}: " + ("no errors, no leaked clusters" if result["clean"] else
                   f"{report['check-errors']} check errors, {report['corruptions']} corruptions, "
                   f"{report['leaks']} leaked clusters" + ("" if args.repair else "; repair with --repair leaks|all")))
            return 0 if result["clean"] else 3
        return 0
    if verb == "snapshot":
        action = args.action
        if action == "list":
            from thalunix.snapshots import render_tree
            listing = engine.snapshots(args.name)
            _print(args, listing, render_tree(listing))
            return 0
        if not args.snapshot:
            raise ValidationError(f"vm snapshot {action} needs a snapshot name", "snapshot")
        if action == "create":
            result = engine.snapshot_create(args.name, args.snapshot, description=args.description, live=args.live)
            _print(args, result, f"Snapshot {args.snapshot!r} of {args.name!r} taken "
                                 f"({'with memory state' if result['live'] else 'disks only'})")
        elif action == "revert":
            result = engine.snapshot_revert(args.name, args.snapshot)
            _print(args, result, f"{args.name!r} is back at {args.snapshot!r}: {result['note']}")
        else:
            result = engine.snapshot_delete(args.name, args.snapshot)
            _print(args, result, f"Deleted snapshot {args.snapshot!r} of {args.name!r}")
        return 0
    if verb == "clone":
        result = _run_job(engine, args, lambda: engine.clone(args.name, args.new_name, linked=args.linked,
                                                              tpm=args.tpm))
        _print(args, result, f"Made {'linked' if result['linked'] else 'full'} clone {result['name']!r} of "
                             f"{args.name!r} in {result['folder']}")
        return 0
    if verb == "export":
        result = _run_job(engine, args, lambda: engine.export(args.name, args.file))
        _print(args, result, f"Exported {args.name!r} to {result['file']} ({result['size'] >> 20} MiB)")
        return 0
    result = _run_job(engine, args, lambda: engine.import_vm(args.file, name=args.new_name))
    _print(args, result, f"Imported VM {result['name']!r}"
           + (f" (renamed from {result['original_name']!r}, which is taken)" if result["renamed"] else "")
           + f" into {result['folder']}")
    return 0


# -- iso: the download center -------------------------------------------------------------------------------
def _iso_parsers(commands: Any, common: argparse.ArgumentParser) -> None:
    iso_parser = commands.add_parser("iso", help="ISO images: catalog, download (verified), add, list")
    iso = iso_parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_parser_with(common))
    iso.required = True
    catalog = iso.add_parser("catalog", help="list the operating systems Thalunix can download")
    catalog.add_argument("--refresh", action="store_true", help="fetch a newer signed catalog")
    catalog.add_argument("--refresh-keys", action="store_true", help="fetch missing publisher keys (only keys "
                                                                     "whose fingerprint the catalog lists)")
    download = iso.add_parser("download", help="download an ISO, verify checksum and signature, file it in isos/")
    download.add_argument("source", metavar="CATALOG-ID|URL")
    download.add_argument("--sha256", metavar="HEX", help="the expected SHA-256 (needed for a URL, or an entry "
                                                          "whose publisher offers no checksum)")
    download.add_argument("--quiet", action="store_true", help="no progress bar")
    iso.add_parser("list", help="ISOs with their status: ready, downloading, verifying, quarantined")
    add = iso.add_parser("add", help="register a local ISO (hashed; refused if --sha256 differs)")
    add.add_argument("path")
    add.add_argument("--sha256", metavar="HEX", help="the SHA-256 the publisher lists for this file")
    add.add_argument("--copy", action="store_true", help="copy it into the data folder's isos/")
    add.add_argument("--catalog", metavar="ID", help="the catalog entry this file is (e.g. windows-11, fetched by "
                                                      "hand): a VM made from it gets that entry's defaults")
    for verb, text in (("pause", "pause a download"), ("resume", "resume a paused or failed download"),
                       ("cancel", "cancel a download and delete its partial file")):
        iso.add_parser(verb, help=text).add_argument("job", help="the download's id (iso list shows it)")


def _iso(engine: DirectEngine, args: argparse.Namespace) -> int:
    verb = args.verb
    if verb == "catalog":
        if args.refresh:
            result = engine.refresh_catalog()
            print(f"Catalog refreshed: {result['entries']} entries ({result['updated']})", file=sys.stderr)
        if args.refresh_keys:
            outcome = engine.refresh_keys()
            for fingerprint, what in outcome.items():
                print(f"{fingerprint}  {what}", file=sys.stderr)
        rows = engine.catalog()
        lines = [f"{'ID':22} {'TRUST':14} {'DEFAULTS':34} NAME"]
        for row in rows:
            d = row["defaults"]
            defaults = (f"{d.get('ram', '?')} RAM, {d.get('disk', '?')} disk, {d.get('firmware', '?')}, "
                        f"tpm {d.get('tpm', '?')}") if d else ""
            trust = row["trust"] + ("*" if row["trust"] == "signed" and not row["keys_present"] else "")
            lines.append(f"{row['id']:22} {trust:14} {defaults:34} {row['name']}")
        if any(row["trust"] == "signed" and not row["keys_present"] for row in rows):
            lines.append("* the publisher's key is not in the keyring yet: thalunix iso catalog --refresh-keys")
        _print(args, rows, "\n".join(lines))
        return 0
    if verb == "download":
        return _iso_download(engine, args)
    if verb == "list":
        rows = engine.list_isos()
        lines = [f"{'NAME':44} {'STATUS':11} {'TRUST':14} DETAIL"]
        for row in rows:
            if row["status"] in ("downloading", "verifying"):
                detail = f"{_size(row.get('bytes'))} of {_size(row.get('total'))} ({row['job_state']}, id {row['job']})"
                if row.get("error"):
                    detail += f": {row['error']}"
            elif row["status"] == "quarantined":
                detail = str(row.get("reason"))
            else:
                detail = f"{_size(row.get('size'))}  {row.get('full_path')}"
            lines.append(f"{str(row['name'])[:44]:44} {row['status']:11} {str(row.get('trust') or ''):14} {detail}")
        _print(args, rows, "\n".join(lines) if rows else "No ISOs yet: thalunix iso catalog, thalunix iso download ID")
        return 0
    if verb == "add":
        row = engine.add_iso(args.path, sha256=args.sha256, copy=args.copy, catalog_id=args.catalog)
        _print(args, row, f"Added {row['name']} ({row['trust']}, sha256 {row['sha256']})")
        return 0
    action = {"pause": engine.pause_download, "resume": engine.resume_download, "cancel": engine.cancel_download}
    job = action[verb](args.job)
    if verb == "resume":
        return _follow_download(engine, args, job["id"])
    _print(args, job, f"Download {job['id']} is {job['state']}")
    return 0


def _iso_download(engine: DirectEngine, args: argparse.Namespace) -> int:
    with engine.bus.subscribe(accept=lambda e: e["type"] == "job.progress" and e.get("kind") == "download") as events:
        job_id = engine.download_iso(args.source, sha256=args.sha256)
        return _follow_download(engine, args, job_id, events)


def _follow_download(engine: DirectEngine, args: argparse.Namespace, job_id: str, events: Any = None) -> int:
    """Show the job's progress until it ends; Ctrl+C pauses it (the same command resumes)."""
    job = engine.downloads.get(job_id)
    bar = ProgressBar(sys.stderr, enabled=not (args.json or getattr(args, "quiet", False)))
    with contextlib.ExitStack() as stack:
        if events is None:
            events = stack.enter_context(engine.bus.subscribe(
                accept=lambda e: e["type"] == "job.progress" and e.get("job") == job_id))
        try:
            bar.show(job.to_dict())
            while not job.done.is_set():
                event = events.get(timeout=0.5)
                if event is not None and event.get("job") == job_id:
                    bar.show(event)
        except KeyboardInterrupt:
            engine.pause_download(job_id)
            job.done.wait(30)
            bar.finish()
            print(f"Paused {job_id} at {_size(job.bytes)}; run the same command again to resume", file=sys.stderr)
            return 130
    final = job.to_dict()
    bar.show(final)
    bar.finish()
    if final["state"] == "ready":
        signer = f", signed by {final['signer']}" if final.get("signer") else ""
        _print(args, final, f"Ready: {final['result']['file']} ({final['trust']}{signer})")
        return 0
    if args.json:
        print(json.dumps(final, indent=2))
    else:
        print(f"thalunix: download {job_id} {final['state']}: {final['error'] or final['message']}", file=sys.stderr)
    return 1


class ProgressBar:
    """One line redrawn in place on a terminal; on a pipe, a line per 10 % and per state change."""

    def __init__(self, stream: Any, enabled: bool = True, width: int = 24) -> None:
        self.stream = stream
        self.enabled = enabled
        self.width = width
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self._last_state: str | None = None
        self._last_decile = -1
        self._drawn = False

    def show(self, job: dict[str, Any]) -> None:
        if not self.enabled:
            return
        state, done, total = job.get("state"), job.get("bytes") or 0, job.get("total")
        fraction = min(1.0, done / total) if total else 0.0
        filled = int(self.width * fraction)
        bar = "#" * filled + "." * (self.width - filled)
        percent = f"{100 * fraction:5.1f}%" if total else "   ?  "
        rate = job.get("rate") or 0
        eta = job.get("eta")
        eta_text = f"ETA {int(eta) // 60}:{int(eta) % 60:02d}" if eta is not None else "ETA  -  "
        name = str(job.get("filename") or job.get("source") or "")[:32]
        line = (f"{name:32} [{bar}] {percent} {_size(done):>10} / {_size(total):>10}  {_size(rate):>9}/s  "
                f"{eta_text}  {state}")
        if self.tty:
            self.stream.write("\r" + line + "\x1b[K")
            self._drawn = True
        else:
            decile = int(fraction * 10)
            if state == self._last_state and decile == self._last_decile:
                return
            self._last_decile = decile
            self.stream.write(line + "\n")
        self._last_state = state
        self.stream.flush()

    def finish(self) -> None:
        if self.enabled and self.tty and self._drawn:
            self.stream.write("\n")
            self.stream.flush()


def _size(value: Any) -> str:
    if value is None:
        return "?"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


if __name__ == "__main__":
    sys.exit(main())


# -- networks, USB, guest agent, shared folder ---------------------------------------------------------------
NETWORK_VERBS = ("net", "usb", "agent", "copy-in", "copy-out", "share")


def _network_parsers(vm: Any, commands: Any, common: argparse.ArgumentParser) -> None:
    from thalunix.model import NIC_MODELS, NIC_MODES
    vnet = vm.add_parser("net", help="a VM's network cards and port forwards")
    vnet.add_argument("name")
    actions = vnet.add_subparsers(dest="net_verb", metavar="ACTION", parser_class=type(vnet))
    actions.required = True
    actions.add_parser("list", help="the VM's cards: mode, model, MAC, network, forwards")
    add = actions.add_parser("add", help="add a network card")
    add.add_argument("--mode", choices=NIC_MODES, default="user")
    add.add_argument("--model", choices=NIC_MODELS, default="virtio-net-pci")
    add.add_argument("--network", default="", help="mode private: the custom network's name")
    add.add_argument("--bridge", default="", help="mode bridge: the host bridge (Linux) or TAP adapter (Windows)")
    add.add_argument("--tap", default="", help="mode bridge: an existing TAP device instead of a bridge")
    add.add_argument("--mac", default="", help="default: a new unique one")
    add.add_argument("--forward", action="append", default=[], metavar="tcp:HOSTPORT:GUESTPORT")
    remove = actions.add_parser("remove", help="remove network card CARD (1 is the first)")
    remove.add_argument("card", type=int)
    forward = actions.add_parser("forward", help="add or remove a port forward")
    forward.add_argument("action", choices=("add", "remove"))
    forward.add_argument("spec", metavar="[tcp|udp:][HOSTADDR:]HOSTPORT[:GUESTPORT]",
                         help="add: tcp:8080:80 (127.0.0.1 unless an address is given); remove: the host port")
    forward.add_argument("--card", type=int, default=None, help="the card (default: the first)")

    vusb = vm.add_parser("usb", help="plug host USB devices into a running VM, or unplug them")
    vusb.add_argument("name")
    vusb.add_argument("action", choices=("list", "attach", "detach"))
    vusb.add_argument("device", nargs="?", help="vendor:product as `thalunix usb list` shows, or usb-kbd/usb-mouse")
    vusb.add_argument("--remember", action="store_true", help="attach: plug it in again at every start")
    vusb.add_argument("--keep", action="store_true", help="detach: keep it remembered for the next start")

    vagent = vm.add_parser("agent", help="ask the guest agent (qemu-guest-agent in the guest)")
    vagent.add_argument("name")
    vagent.add_argument("action", choices=("info", "sync-time"))
    copy_in = vm.add_parser("copy-in", help="copy a host file into the guest through the guest agent")
    copy_in.add_argument("name")
    copy_in.add_argument("host_file")
    copy_in.add_argument("guest_path")
    copy_out = vm.add_parser("copy-out", help="copy a file out of the guest through the guest agent")
    copy_out.add_argument("name")
    copy_out.add_argument("guest_path")
    copy_out.add_argument("host_file")
    vshare = vm.add_parser("share", help="offer a host folder to this VM (WebDAV at http://10.0.2.100/ in the guest)")
    vshare.add_argument("name")
    vshare.add_argument("folder", nargs="?", help="the folder (none: show the current share)")
    vshare.add_argument("--off", action="store_true", help="stop sharing")

    net_parser = commands.add_parser("net", help="custom private networks between VMs")
    net = net_parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_parser_with(common))
    net.required = True
    create = net.add_parser("create", help="define a private network VMs can join (no admin rights needed)")
    create.add_argument("network")
    create.add_argument("--description", default="")
    net.add_parser("list", help="the custom networks, their VMs and switches")
    delete = net.add_parser("delete", help="delete a custom network no VM uses")
    delete.add_argument("network")
    serve_switch = net.add_parser("serve-switch")   # internal: the switch process a VM start spawns
    serve_switch.add_argument("network")
    serve_share = net.add_parser("serve-share")   # internal: a VM's shared-folder server process
    serve_share.add_argument("vm_id")
    usb_parser = commands.add_parser("usb", help="the host's USB devices")
    usb = usb_parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_parser_with(common))
    usb.required = True
    usb.add_parser("list", help="USB devices plugged into this host")


def _network(engine: DirectEngine, args: argparse.Namespace) -> int:
    if args.command == "net":
        if args.verb == "serve-switch":
            from thalunix.net import serve_switch
            return serve_switch(engine.data, args.network)
        if args.verb == "serve-share":
            from thalunix.share import serve_share
            return serve_share(engine.data, args.vm_id)
        if args.verb == "create":
            row = engine.network_create(args.network, args.description)
            _print(args, row, f"Created network {row['name']!r}; attach VMs with "
                              f"`thalunix vm net VM add --mode private --network {row['name']}`")
        elif args.verb == "delete":
            engine.network_delete(args.network)
            _print(args, {"deleted": args.network}, f"Deleted network {args.network!r}")
        else:
            rows = engine.networks()
            lines = [f"{'NETWORK':20} {'SWITCH':16} VMS"]
            for row in rows:
                switch = row.get("switch") or {}
                state = f"udp {switch['port']}" if switch.get("running") else "not running"
                lines.append(f"{row['name']:20} {state:16} {', '.join(row.get('vms', [])) or '-'}")
            _print(args, rows, "\n".join(lines) if rows else "No networks yet: thalunix net create NAME")
        return 0
    if args.command == "usb":
        rows = engine.usb_host_devices()
        lines = [f"{'ID':10} {'BUS':>3} {'ADDR':>4}  DEVICE"]
        lines += [f"{r['id']:10} {r['bus'] or '':>3} {r['address'] or '':>4}  {r['manufacturer']} {r['product']}".rstrip()
                  for r in rows]
        _print(args, rows, "\n".join(lines) if rows else "No USB devices found on this host")
        return 0
    verb = args.verb
    if verb == "net":
        action = args.net_verb
        if action == "add":
            rows = engine.nic_add(args.name, mode=args.mode, model=args.model, network=args.network,
                                  bridge=args.bridge, tap=args.tap, mac=args.mac, forwards=args.forward)
        elif action == "remove":
            rows = engine.nic_remove(args.name, args.card)
        elif action == "forward" and args.action == "add":
            rows = engine.forward_add(args.name, args.spec, args.card or 1)
        elif action == "forward":
            rows = engine.forward_remove(args.name, args.spec, args.card)
        else:
            rows = engine.nics(args.name)
        lines = [f"{'CARD':4} {'MODE':10} {'MODEL':15} {'MAC':17}  TARGET / FORWARDS"]
        for row in rows:
            lines.append(f"{row['card']:<4} {row['mode']:10} {row['model']:15} {row['mac']:17}  {row['target']}"
                         + (f"  {', '.join(row['forwards'])}" if row["forwards"] else ""))
        _print(args, rows, "\n".join(lines) if rows else f"VM {args.name!r} has no network cards")
    elif verb == "usb":
        if args.action == "list":
            rows = engine.usb_devices(args.name)
            _print(args, rows, "\n".join(json.dumps(r) for r in rows) or f"VM {args.name!r} has no USB devices")
            return 0
        if not args.device:
            raise ValidationError(f"vm usb {args.action} needs a device (vendor:product)", "device")
        if args.action == "attach":
            result = engine.usb_attach(args.name, args.device, remember=args.remember)
            _print(args, result, f"Plugged {args.device} into {args.name!r}"
                   + (" (remembered for the next start)" if result["remembered"] else ""))
        else:
            result = engine.usb_detach(args.name, args.device, forget=not args.keep)
            _print(args, result, f"Unplugged {args.device} from {args.name!r}")
    elif verb == "agent":
        if args.action == "sync-time":
            from thalunix import agent
            done = agent.sync_time(engine.supervisor, engine.get(args.name))
            _print(args, {"synced": done}, "Guest clock set to the host's" if done else "No guest agent answered")
            return 0 if done else 1
        info = engine.agent_info(args.name)
        os_name = (info.get("os") or {}).get("pretty-name") or (info.get("os") or {}).get("name") or "?"
        _print(args, info, f"OS: {os_name}\nHost name: {info.get('hostname') or '?'}\n"
                           f"IP addresses: {', '.join(info['ips']) or 'none'}")
    elif verb in ("copy-in", "copy-out"):
        if verb == "copy-in":
            result = _run_job(engine, args, lambda: engine.copy_in(args.name, args.host_file, args.guest_path))
        else:
            result = _run_job(engine, args, lambda: engine.copy_out(args.name, args.guest_path, args.host_file))
        check = "verified in the guest" if result["verified"] else "not verified (the guest cannot run sha256sum)"
        _print(args, result, f"Copied {result['bytes']} bytes in {result['seconds']} s, SHA-256 {result['sha256']} "
                             f"({check})")
    else:
        if args.off or args.folder:
            result = engine.share_set(args.name, None if args.off else args.folder)
        else:
            result = engine.share_info(args.name)
        _print(args, result, f"{args.name!r} shares {result['folder']} at {result['guest_url']} (in the guest)"
               if result["folder"] else f"{args.name!r} shares no folder")
    return 0
