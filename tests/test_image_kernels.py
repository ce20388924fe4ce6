"""The kernel table, the package sources derived from the host's, and the
kernel packages an image build unpacks (no network, no guest)."""

from __future__ import annotations

import re

import pytest

from labkit.errors import ConfigError, HostSetupError, ImageMissing
from labkit.image import build, kernels, sources
from labkit.image.kernelpkg import image_package, kernel_debs, parse_depends, split_parts
from labkit.settings import Settings

V73 = kernels.KERNELS["7.3"]

# -- the table ----------------------------------------------------------------


def test_table_has_the_four_kernels_default_first():
    assert list(kernels.KERNELS) == ["6.1", "6.12", "7.3", "5.10"]
    assert kernels.DEFAULT_KERNEL == "6.1"
    assert all(name == v.name for name, v in kernels.KERNELS.items())


def test_rows_name_suites_and_packages_not_abi_strings():
    assert (kernels.KERNELS["6.1"].suite, kernels.KERNELS["6.1"].package) == ("bookworm", "linux-image-amd64")
    assert (kernels.KERNELS["6.12"].suite, kernels.KERNELS["6.12"].package) == ("bookworm",
                                                                                 "linux-image-6.12-amd64")
    assert (V73.suite, V73.extra_suites, V73.package_suite) == ("trixie", ("trixie-backports",),
                                                                "trixie-backports")
    # metapackages only: the build resolves the release from the mirror's metadata
    assert not [v.package for v in kernels.VARIANTS if re.search(r"\d+\.\d+\.\d+|\+deb", v.package)]


def test_unknown_kernel_names_the_choices():
    with pytest.raises(ConfigError) as e:
        kernels.check_kernel("5.4")
    assert "6.1, 6.12, 7.3" in str(e.value)


@pytest.mark.parametrize("name,release,ok", [
    ("6.1", "6.1.0-37-amd64", True), ("6.1", "6.12.38+deb12-amd64", False),
    ("6.12", "6.12.38+deb12-amd64", True), ("7.3", "7.3.4+deb13-amd64", True),
    ("7.3", "7.30.1-amd64", False), ("7.3", "6.12.117+deb13-amd64", False)])
def test_release_matches_its_variant_only(name, release, ok):
    assert kernels.KERNELS[name].release_matches(release) is ok


def test_recipe_key_ignores_notes_and_keeps_the_bookworm_rows_short():
    assert kernels.KERNELS["6.1"].recipe_key() == "suite=bookworm kernel=6.1 package=linux-image-amd64"
    from dataclasses import replace
    assert replace(V73, notes="changed").recipe_key() == V73.recipe_key()
    assert build.recipe_hash("7.3") != build.recipe_hash("6.1")


def test_mmdebstrap_uses_the_rows_suite():
    argv = build.mmdebstrap_argv("7.3", ["kmod"], ["deb X trixie main"], "root")
    assert argv[-3:] == ["trixie", "/dev/null", "deb X trixie main"]
    assert build.mmdebstrap_argv("6.12", ["kmod"], [], "root")[-2:] == ["bookworm", "/dev/null"]

# -- sources --------------------------------------------------------------------


DEB822 = """\
Types: deb
# a comment naming bookworm stays a comment
URIs: http://mirror.invalid/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://mirror.invalid/debian-security
Suites: bookworm-security
Components: main
"""


def test_deb822_moves_every_suite_and_adds_backports_beside_the_main_one():
    out = sources.derive_deb822(DEB822, "bookworm", V73)
    assert "Suites: trixie trixie-backports trixie-updates\n" in out
    assert "Suites: trixie-security\n" in out
    assert "URIs: http://mirror.invalid/debian\n" in out and "naming bookworm stays" in out


def test_deb822_unchanged_for_the_hosts_own_suite():
    assert sources.derive_deb822(DEB822, "bookworm", kernels.KERNELS["6.12"]) == DEB822


LIST = """\
# deb http://mirror.invalid/debian bookworm main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://mirror.invalid/debian bookworm main contrib
deb http://mirror.invalid/debian bookworm-updates main
deb http://mirror.invalid/debian-security bookworm-security main
deb http://other.invalid/repo nodistro main
"""


def test_sources_list_gets_one_line_per_suite():
    out = sources.derive_list(LIST, "bookworm", V73).splitlines()
    assert out[0] == "# deb http://mirror.invalid/debian bookworm main"
    assert out[1:] == [
        "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://mirror.invalid/debian trixie main "
        "contrib",
        "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://mirror.invalid/debian "
        "trixie-backports main contrib",
        "deb http://mirror.invalid/debian trixie-updates main",
        "deb http://mirror.invalid/debian-security trixie-security main",
        "deb http://other.invalid/repo nodistro main"]


def test_sources_list_unchanged_for_the_hosts_own_suite():
    assert sources.derive_list(LIST, "bookworm", kernels.KERNELS["6.1"]) == LIST


def _apt_dir(tmp_path, name, text):
    d = tmp_path / "apt"
    (d / "sources.list.d").mkdir(parents=True)
    (d / "sources.list.d" / name).write_text(text)
    (d / "sources.list.d" / "vendor.list.disabled").write_text("deb http://x.invalid/debian bookworm main\n")
    return d


@pytest.mark.parametrize("name,text", [("debian.sources", DEB822), ("debian.list", LIST)])
def test_apt_sources_from_the_host_files(tmp_path, monkeypatch, name, text):
    out = tmp_path / "out"
    out.mkdir()
    got = sources.apt_sources(V73, out, Settings.from_env({}), _apt_dir(tmp_path, name, text),
                              {"ID": "debian", "VERSION_CODENAME": "bookworm"})
    assert len(got) == 1 and got[0].endswith(name[name.index("."):])
    written = [ln for ln in (out / got[0].rsplit("/", 1)[1]).read_text().splitlines() if not ln.startswith("#")]
    assert "trixie-backports" in "\n".join(written) and "bookworm" not in "\n".join(written)


def test_mirror_override_lists_the_rows_suites(monkeypatch, tmp_path):
    settings = Settings.from_env({"LABKIT_MIRROR": "http://mirror.invalid/debian"})
    assert sources.apt_sources(V73, tmp_path, settings) == [
        "deb http://mirror.invalid/debian trixie main", "deb http://mirror.invalid/debian trixie-updates main",
        "deb http://mirror.invalid/debian trixie-backports main"]


def test_sources_file_override_wins(monkeypatch, tmp_path):
    f = tmp_path / "mine.sources"
    f.write_text(DEB822)
    settings = Settings.from_env({"LABKIT_APT_SOURCES": str(f), "LABKIT_MIRROR": "http://ignored.invalid/"})
    assert sources.apt_sources(V73, tmp_path, settings) == [str(f)]


def test_non_debian_host_names_the_suites_it_needs(monkeypatch, tmp_path):
    with pytest.raises(HostSetupError) as e:
        sources.apt_sources(V73, tmp_path, Settings.from_env({}), tmp_path, {"ID": "fedora", "PRETTY_NAME": "Fedora"})
    assert "trixie-backports" in str(e.value) and "LABKIT_MIRROR" in str(e.value)

# -- kernel packages -------------------------------------------------------------


APT_CACHE_IMAGE_73 = """\
linux-image-7.3.4+deb13-amd64
  PreDepends: linux-base
 |Depends: dracut
 |Depends: initramfs-tools
  Depends: <linux-initramfs-tool>
    dracut
    initramfs-tools
  Depends: linux-base-7.3.4+deb13-amd64
  Depends: linux-binary-7.3.4+deb13-amd64
  Depends: linux-modules-7.3.4+deb13-amd64
"""

MIRROR_73 = {   # trixie-backports' metadata, as apt-cache depends --important shows it
    "linux-image-amd64": ["linux-base-amd64", "linux-image-7.3.4+deb13-amd64", "linux-modules-amd64"],
    "linux-image-7.3.4+deb13-amd64": parse_depends(APT_CACHE_IMAGE_73),
}
MIRROR_61 = {
    "linux-image-amd64": ["linux-image-6.1.0-37-amd64"],
    "linux-image-6.1.0-37-amd64": ["kmod", "linux-base", "initramfs-tools"],
}


def test_parse_depends_keeps_hard_named_dependencies():
    assert parse_depends(APT_CACHE_IMAGE_73) == [
        "linux-base", "linux-base-7.3.4+deb13-amd64", "linux-binary-7.3.4+deb13-amd64",
        "linux-modules-7.3.4+deb13-amd64"]


def test_split_kernel_unpacks_four_packages():
    assert kernel_debs("linux-image-amd64", lambda p: MIRROR_73.get(p, [])) == [
        "linux-image-7.3.4+deb13-amd64", "linux-base-7.3.4+deb13-amd64", "linux-binary-7.3.4+deb13-amd64",
        "linux-modules-7.3.4+deb13-amd64"]


def test_6x_kernel_is_one_package():
    assert kernel_debs("linux-image-amd64", lambda p: MIRROR_61.get(p, [])) == ["linux-image-6.1.0-37-amd64"]
    assert image_package("linux-image-6.1.0-37-amd64", lambda p: MIRROR_61.get(p, [])) == \
        "linux-image-6.1.0-37-amd64"


def test_split_parts_ignore_other_releases_and_the_generic_linux_base():
    deps = ["linux-base", "linux-base-7.2.13-amd64", "linux-modules-7.3.4+deb13-amd64"]
    assert split_parts("linux-image-7.3.4+deb13-amd64", deps) == ["linux-modules-7.3.4+deb13-amd64"]

# -- building on demand -----------------------------------------------------------


def test_missing_image_refused_when_auto_build_is_off(tmp_path, monkeypatch):
    monkeypatch.setenv("LABKIT_IMAGES_DIR", str(tmp_path))
    monkeypatch.setenv("LABKIT_AUTO_BUILD", "0")
    called = []
    monkeypatch.setattr(build, "build_image", lambda *a, **k: called.append(a))
    with pytest.raises(ImageMissing, match="not built yet"):
        build.ensure_image("7.3")
    with pytest.raises(ImageMissing):
        build.ensure_image("7.3", build=False)
    assert called == []


def test_missing_image_is_built_on_demand_with_progress(tmp_path, monkeypatch):
    monkeypatch.setenv("LABKIT_IMAGES_DIR", str(tmp_path))
    monkeypatch.delenv("LABKIT_AUTO_BUILD", raising=False)
    lines: list[str] = []
    monkeypatch.setattr(build, "build_image", lambda k, progress=None, **kw: ("built", k))
    assert build.ensure_image("7.3", progress=lines.append) == ("built", "7.3")
    assert "not built yet; building it now" in lines[0]


def test_corrupt_image_is_not_rebuilt_behind_the_learners_back(tmp_path, monkeypatch):
    (tmp_path / "7.3").mkdir()
    (tmp_path / "7.3" / "manifest.json").write_text("{")
    monkeypatch.setenv("LABKIT_IMAGES_DIR", str(tmp_path))
    monkeypatch.setattr(build, "build_image", lambda *a, **k: pytest.fail("must not build"))
    with pytest.raises(ImageMissing, match="corrupt"):
        build.ensure_image("7.3", build=True)

# -- vmlinux from a zstd bzImage (Debian's 7.x kernels) ------------------------------


def test_zstd_payload_is_found_after_a_false_magic_and_before_trailing_code():
    import zstandard

    from labkit.image.vmlinux import decompress_payload
    elf = b"\x7fELF\x02" + bytes(300)
    blob = (b"MZ setup code \x28\xb5\x2f\xfd not a frame" + zstandard.ZstdCompressor(level=19).compress(elf)
            + b"decompressor code after the payload" * 4)
    assert decompress_payload(blob) == elf


def test_the_build_sees_the_packages_module_sources_as_the_recipes_modules(tmp_path):
    """The module sources live in the package (issue 22 item 7); the build script still reads
    ``$LABKIT_RECIPE/modules`` and the recipe hash still names them ``images/modules/...``."""
    from labkit.lab.guest import files
    from labkit.settings import from_environment
    settings = from_environment()
    staged = build.stage_recipe(tmp_path, settings)
    for name, data in files.module_sources().items():
        assert (staged / "modules" / name).read_bytes() == data
    for script in ("customize.sh", "build-modules.sh", "packages.txt", "guest/labkit-init"):
        assert (staged / script).read_bytes() == (settings.recipe_dir / script).read_bytes()
    assert not (staged / "build").exists()
    hashed = [name for name, _ in build.recipe_files(settings)]
    assert "images/modules/Kbuild" in hashed and "images/modules/labkit_no_layout_wait.c" in hashed


def test_the_recipe_hash_never_reads_built_images_wherever_they_are_put(tmp_path):
    """With LABKIT_IMAGES_DIR elsewhere, images built earlier in the recipe's own build/
    are not recipe files: hashing them read gigabytes into memory (an image build was
    killed by the OOM killer at 24 GiB) and made the hash depend on them."""
    import shutil
    from labkit.settings import from_environment
    recipe = tmp_path / "images"
    shutil.copytree(from_environment().recipe_dir, recipe, ignore=shutil.ignore_patterns("build"))
    (recipe / "build" / "6.1").mkdir(parents=True)
    (recipe / "build" / "6.1" / "root.ext4").write_bytes(b"an old image")
    (recipe / "build" / "6.1.log").write_text("an old log")
    for images_dir in (recipe / "build", tmp_path / "elsewhere"):
        settings = from_environment().with_(recipe_dir=recipe, images_dir=images_dir)
        hashed = [name for name, _ in build.recipe_files(settings)]
        assert "images/customize.sh" in hashed
        assert not [n for n in hashed if n.startswith("images/build/")], hashed
