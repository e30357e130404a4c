"""helper-vm/build.py's check of the helper kernel's configuration, without compiling a kernel.

kernel.config is merged over tinyconfig and `make olddefconfig` silently drops what a missing dependency
forbids; the build must refuse that by name, yet accept a symbol that a newer kernel no longer defines at all.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

HELPER_VM = Path(__file__).resolve().parents[2] / "helper-vm"


@pytest.fixture(scope="module")
def build():
    spec = importlib.util.spec_from_file_location("helper_vm_build_for_unit", HELPER_VM / "build.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _as_olddefconfig_writes(wanted: dict[str, str]) -> str:
    return "\n".join(f"# {name} is not set" if value == "n" else f"{name}={value}" for name, value in wanted.items())


def test_kernel_config_parses_both_forms(build) -> None:
    wanted = build._wanted_config()
    assert wanted["CONFIG_PVH"] == "y" and wanted["CONFIG_VIRTIO_MMIO"] == "y"
    assert wanted["CONFIG_MODULES"] == "n"                    # "# CONFIG_MODULES is not set"
    assert wanted["CONFIG_LOCALVERSION"] == '"-thalunix-helper"'


def test_every_setting_kept_passes(build) -> None:
    wanted = build._wanted_config()
    assert build._check_config(_as_olddefconfig_writes(wanted), set(wanted)) == []


def test_a_dropped_setting_is_refused_by_name(build) -> None:
    wanted = build._wanted_config()
    dropped = {**wanted, "CONFIG_VIRTIO_NET": "n"}
    with pytest.raises(build.HelperBuildError, match=r"CONFIG_VIRTIO_NET=y \(got n\)"):
        build._check_config(_as_olddefconfig_writes(dropped), set(wanted))
    # an option kernel.config turns off that Kconfig turned on anyway
    forced = {**wanted, "CONFIG_MODULES": "y"}
    with pytest.raises(build.HelperBuildError, match=r"CONFIG_MODULES=n \(got y\)"):
        build._check_config(_as_olddefconfig_writes(forced), set(wanted))


def test_a_symbol_the_kernel_no_longer_defines_is_reported_not_refused(build) -> None:
    wanted = build._wanted_config()
    newer = {name: value for name, value in wanted.items() if name != "CONFIG_RANDOM_TRUST_CPU"}
    absent = build._check_config(_as_olddefconfig_writes(newer), set(newer))
    assert absent == ["CONFIG_RANDOM_TRUST_CPU"]


def test_kconfig_symbols_are_read_from_the_tree(build, tmp_path: Path) -> None:
    (tmp_path / "arch" / "x86").mkdir(parents=True)
    (tmp_path / "Kconfig").write_text('config PVH\n\tbool "PVH"\nmenuconfig VIRTIO_MENU\n\tbool "x"\n')
    (tmp_path / "arch" / "x86" / "Kconfig.cpu").write_text("  config X86_TSC\n\tdef_bool y\n# config NOT_ME\n")
    assert build._kconfig_symbols(tmp_path) == {"CONFIG_PVH", "CONFIG_VIRTIO_MENU", "CONFIG_X86_TSC"}
