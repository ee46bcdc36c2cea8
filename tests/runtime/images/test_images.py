"""Tests of the root-filesystem image builder (small trees only: never the real /usr)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from pytest_microsandbox.runtime._exceptions import ImageError, ImageNotFoundError
from pytest_microsandbox.runtime._integrity import record_path
from pytest_microsandbox.runtime.images import Layer, _resolve, project_layer, resolve_root_layers
from pytest_microsandbox.runtime.images._fingerprint import (
    content_fingerprint,
    file_fingerprint,
    tree_fingerprint,
)
from pytest_microsandbox.runtime.images._host import plan_host_trees, plan_usr
from pytest_microsandbox.runtime.images._layers import LayerSpec, build_layer
from pytest_microsandbox.runtime.images._mkfs import ere_escape
from pytest_microsandbox.runtime.images._staging import stage_base
from pytest_microsandbox.runtime.images._store import KEEP_PER_SOURCE

needs_erofs = pytest.mark.skipif(
    not (shutil.which("mkfs.erofs") and shutil.which("dump.erofs") and shutil.which("fsck.erofs")),
    reason="erofs-utils (mkfs.erofs, dump.erofs, fsck.erofs) not installed",
)


def ls_image(image: Path, path: str = "/") -> dict[str, str]:
    """Entries of a directory inside an image: name -> dump.erofs type digit."""
    out = subprocess.run(
        ["dump.erofs", "--ls", f"--path={path}", str(image)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    entries = {}
    for line in out.split("FILENAME", 1)[1].splitlines():
        parts = line.split(maxsplit=2)
        if len(parts) == 3 and parts[2] not in (".", ".."):
            entries[parts[2]] = parts[1]
    return entries


def image_mode(image: Path, path: str) -> int:
    out = subprocess.run(
        ["dump.erofs", f"--path={path}", str(image)], capture_output=True, text=True, check=True
    ).stdout
    match = re.search(r"Access: (\d+)/", out)
    assert match, out
    return int(match.group(1), 8)


def fsck(image: Path) -> None:
    subprocess.run(["fsck.erofs", str(image)], check=True, capture_output=True)


def write(path: Path, text: str = "x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def make_rootfs(root: Path, *, mount_points: bool = True) -> Path:
    write(root / "bin/hello", "#!/bin/sh\necho hi\n")
    write(root / "etc/hostname", "guest\n")
    if mount_points:
        for d in ("proc", "sys", "dev", "tmp", "run"):
            (root / d).mkdir()
    return root


# -- fingerprints -----------------------------------------------------------


def test_tree_fingerprint_tracks_edits_adds_and_removes(tmp_path: Path) -> None:
    f = write(tmp_path / "a/b.txt", "one")
    fp0 = tree_fingerprint(tmp_path)
    assert tree_fingerprint(tmp_path) == fp0
    f.write_text("two!")
    fp1 = tree_fingerprint(tmp_path)
    assert fp1 != fp0
    write(tmp_path / "a/c.txt")
    fp2 = tree_fingerprint(tmp_path)
    assert fp2 != fp1
    (tmp_path / "a/c.txt").unlink()
    assert tree_fingerprint(tmp_path) == fp1
    os.symlink("b.txt", tmp_path / "a/link")
    assert tree_fingerprint(tmp_path) != fp1


def test_tree_fingerprint_mtime_only_change(tmp_path: Path) -> None:
    f = write(tmp_path / "m.py", "same")
    fp0 = tree_fingerprint(tmp_path)
    os.utime(f, ns=(1_000_000_000, 1_000_000_000))
    assert tree_fingerprint(tmp_path) != fp0


def test_tree_fingerprint_skips_and_unhashed(tmp_path: Path) -> None:
    write(tmp_path / "src/m.py")
    fp0 = tree_fingerprint(
        tmp_path,
        skip_names=[".git"],
        skip_paths=[tmp_path / "venv"],
        unhashed_names=["__pycache__"],
    )
    write(tmp_path / ".git/HEAD")
    write(tmp_path / "src/.git/x")
    write(tmp_path / "venv/lib/x.py")
    write(tmp_path / "src/__pycache__/m.cpython-311.pyc")
    fp1 = tree_fingerprint(
        tmp_path,
        skip_names=[".git"],
        skip_paths=[tmp_path / "venv"],
        unhashed_names=["__pycache__"],
    )
    assert fp1 == fp0


def test_tree_fingerprint_dirs_only(tmp_path: Path) -> None:
    f = write(tmp_path / "d/f", "a")
    fp0 = tree_fingerprint(tmp_path, dirs_only=True)
    f.write_text("bb")  # an in-place edit is invisible to the coarse check
    os.utime(tmp_path / "d", ns=(1, 1))
    fp1 = tree_fingerprint(tmp_path, dirs_only=True)
    write(tmp_path / "d/g")  # an added file bumps its directory's mtime
    assert tree_fingerprint(tmp_path, dirs_only=True) != fp1
    assert fp0 != fp1  # (the utime above did too)


def test_tree_fingerprint_missing_root(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="nope"):
        tree_fingerprint(tmp_path / "nope")


def test_file_fingerprint(tmp_path: Path) -> None:
    assert file_fingerprint(tmp_path / "absent") == "absent"
    f = write(tmp_path / "status", "Package: a\n")
    fp0 = file_fingerprint(f)
    f.write_text("Package: b\n")
    assert file_fingerprint(f) != fp0


def test_content_fingerprint_ignores_mtimes(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for root in (a, b):
        write(root / "etc/passwd", "root:x:0:0::/root:/bin/sh\n")
        os.symlink("usr/bin", root / "bin")
    os.utime(b / "etc/passwd", ns=(5, 5))
    assert content_fingerprint(a) == content_fingerprint(b)
    (b / "etc/passwd").write_text("changed\n")
    assert content_fingerprint(a) != content_fingerprint(b)


def test_ere_escape() -> None:
    assert ere_escape("a.b+c") == r"a\.b\+c"
    assert ere_escape("node_modules") == "node_modules"
    assert re.fullmatch(ere_escape("x(1)[2]$"), "x(1)[2]$")


# -- staging of the host base layer ----------------------------------------


@pytest.fixture
def fake_host(tmp_path: Path) -> Path:
    host = tmp_path / "host"
    write(host / "usr/bin/bash")
    write(host / "usr/sbin/nologin")
    write(host / "usr/lib/os-release", "ID=debian\n")
    for name in ("bin", "sbin", "lib", "lib64"):
        os.symlink(f"usr/{name}", host / name)
    etc = host / "etc"
    write(etc / "passwd", "root:x:0:0::/root:/bin/bash\nalice:x:1001:1001::/home/alice:/bin/sh\n")
    write(etc / "shadow", "root:SECRET-HASH:19000::::::\n")
    write(etc / "pip.conf", "[global]\nindex-url = https://user:token@example/simple\n")
    write(etc / "ssl/private/key.pem", "PRIVATE")
    write(etc / "ssl/certs/ca-certificates.crt", "CERTS")
    os.symlink("/usr/share/ca-certificates/x.crt", etc / "ssl/certs/x.pem")
    write(etc / "ld.so.cache", "CACHE")
    write(etc / "ld.so.conf", "include /etc/ld.so.conf.d/*.conf\n")
    write(etc / "ld.so.conf.d/x86_64-linux-gnu.conf", "/usr/lib/x86_64-linux-gnu\n")
    (etc / "alternatives").mkdir()
    os.symlink("/usr/bin/vim.basic", etc / "alternatives/editor")
    os.symlink("../usr/lib/os-release", etc / "os-release")
    write(etc / "python3.11/sitecustomize.py")
    write(etc / "nsswitch.conf", "passwd: files systemd\n")
    return host


def test_stage_base(tmp_path: Path, fake_host: Path) -> None:
    root = tmp_path / "stage"
    root.mkdir()
    stage_base(root, host_root=fake_host)
    etc = root / "etc"
    passwd = (etc / "passwd").read_text()
    assert "root:x:0:0:root:/root:/bin/bash" in passwd
    assert "sandbox:x:1000:1000:sandbox:/home/sandbox:/bin/bash" in passwd
    assert "nobody:x:65534" in passwd and "/usr/sbin/nologin" in passwd
    assert "alice" not in passwd  # generated, never the host's users
    assert "sandbox:x:1000:" in (etc / "group").read_text()
    assert "localhost" in (etc / "hosts").read_text()
    assert (etc / "hostname").read_text().strip().endswith("sandbox")
    assert (etc / "resolv.conf").exists()
    assert "systemd" not in (etc / "nsswitch.conf").read_text()
    # secrets never copied
    assert not (etc / "shadow").exists()
    assert not (etc / "pip.conf").exists()
    assert not (etc / "ssl/private").exists()
    # copied, symlinks kept as symlinks
    assert (etc / "ssl/certs/ca-certificates.crt").read_text() == "CERTS"
    assert os.readlink(etc / "ssl/certs/x.pem") == "/usr/share/ca-certificates/x.crt"
    assert os.readlink(etc / "alternatives/editor") == "/usr/bin/vim.basic"
    assert os.readlink(etc / "os-release") == "../usr/lib/os-release"
    assert (etc / "ld.so.cache").read_text() == "CACHE"
    assert (etc / "ld.so.conf.d/x86_64-linux-gnu.conf").exists()
    assert (etc / "python3.11/sitecustomize.py").exists()
    # skeleton and merged-/usr links
    for name in ("bin", "sbin", "lib", "lib64"):
        assert os.readlink(root / name) == f"usr/{name}"
    assert not os.path.lexists(root / "libx32")
    for d in ("proc", "sys", "dev", "tmp", "run", "root", "home/sandbox", "var/tmp", "var/lib"):
        assert (root / d).is_dir(), d
    assert (root / "tmp").stat().st_mode & 0o7777 == 0o1777
    assert (root / "root").stat().st_mode & 0o777 == 0o700
    assert root.stat().st_mode & 0o777 == 0o755


def test_stage_base_is_deterministic(tmp_path: Path, fake_host: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    stage_base(a, host_root=fake_host)
    stage_base(b, host_root=fake_host)
    assert content_fingerprint(a) == content_fingerprint(b)


# -- real builds of small trees --------------------------------------------


@needs_erofs
def test_directory_image_roundtrip_and_cache(tmp_path: Path) -> None:
    rootfs = make_rootfs(tmp_path / "rootfs")
    os.utime(rootfs / "bin/hello", ns=(1_600_000_000_000_000_000,) * 2)
    cache = tmp_path / "cache"
    layers = resolve_root_layers(str(rootfs), cache_dir=cache)
    assert [layer.serial for layer in layers] == ["l-root"]
    (layer,) = layers
    assert isinstance(layer, Layer)
    assert layer.path.parent == cache / "images"
    fsck(layer.path)
    assert set(ls_image(layer.path)) == {"bin", "etc", "proc", "sys", "dev", "tmp", "run"}
    out = subprocess.run(
        ["dump.erofs", "--path=/bin/hello", str(layer.path)], capture_output=True, text=True
    ).stdout
    assert "2020-09-13" in out  # per-file mtimes survive (.pyc validation needs them)

    st = layer.path.stat()
    used = record_path(layer.path).stat().st_mtime_ns
    again = resolve_root_layers(str(rootfs), cache_dir=cache)
    assert again == layers
    st2 = again[0].path.stat()
    # The same file, not rebuilt, nor touched (that would change its verified
    # stamp); its digest record is: eviction goes by last use.
    assert (st2.st_ino, st2.st_mtime_ns, st2.st_ctime_ns) == (
        st.st_ino,
        st.st_mtime_ns,
        st.st_ctime_ns,
    )
    assert record_path(layer.path).stat().st_mtime_ns >= used

    (rootfs / "etc/hostname").write_text("edited, longer\n")
    edited = resolve_root_layers(str(rootfs), cache_dir=cache)
    assert edited[0].digest != layer.digest
    assert edited[0].path != layer.path
    fsck(edited[0].path)


@needs_erofs
def test_directory_without_mount_points_gets_skeleton(tmp_path: Path) -> None:
    rootfs = make_rootfs(tmp_path / "rootfs", mount_points=False)
    layers = resolve_root_layers(str(rootfs), cache_dir=tmp_path / "cache")
    assert [layer.serial for layer in layers] == ["l-root", "l-skel"]
    assert {"proc", "sys", "dev", "tmp"} <= set(ls_image(layers[1].path))
    assert image_mode(layers[1].path, "/tmp") == 0o777  # dump.erofs prints no sticky bit
    assert "proc" not in ls_image(layers[0].path)


@needs_erofs
def test_killed_build_leftover_is_not_used(tmp_path: Path) -> None:
    rootfs = make_rootfs(tmp_path / "rootfs")
    cache = tmp_path / "cache"
    (layer,) = resolve_root_layers(str(rootfs), cache_dir=cache)
    images = layer.path.parent
    family = layer.path.name.rsplit("-", 1)[0]
    # What a build killed mid-write leaves behind, for the next digest.
    leftover = images / f".{family}-deadbeef.1234.abcd.tmp"
    leftover.write_bytes(b"half an image")
    (rootfs / "etc/hostname").write_text("new\n")
    (new,) = resolve_root_layers(str(rootfs), cache_dir=cache)
    assert new.path.suffix == ".erofs" and new.path != leftover
    fsck(new.path)
    assert not leftover.exists()
    assert not list(images.glob("*.tmp"))


@needs_erofs
def test_failed_build_leaves_no_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pytest_microsandbox.runtime.images import _layers

    rootfs = make_rootfs(tmp_path / "rootfs")

    def boom(source: Path, output: Path, **kwargs: object) -> None:
        output.write_bytes(b"partial")
        raise ImageError("mkfs.erofs failed")

    monkeypatch.setattr(_layers, "build_erofs", boom)
    with pytest.raises(ImageError):
        resolve_root_layers(str(rootfs), cache_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache/images").glob("*.erofs"))
    assert not list((tmp_path / "cache/images").glob("*.tmp"))


@needs_erofs
def test_old_images_are_pruned(tmp_path: Path) -> None:
    rootfs = make_rootfs(tmp_path / "rootfs")
    cache = tmp_path / "cache"
    for i in range(KEEP_PER_SOURCE + 2):
        (rootfs / "etc/hostname").write_text("v" * (i + 1))
        resolve_root_layers(str(rootfs), cache_dir=cache)
    assert len(list((cache / "images").glob("dir-*.erofs"))) == KEEP_PER_SOURCE


@needs_erofs
def test_tree_changing_during_build_is_rebuilt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pytest_microsandbox.runtime.images import _layers

    rootfs = make_rootfs(tmp_path / "rootfs")
    real = _layers.build_erofs
    calls = []

    def racing(source: Path, output: Path, **kwargs: object) -> None:
        real(source, output, **kwargs)  # type: ignore[arg-type]
        calls.append(1)
        if len(calls) == 1:  # someone edits the tree while mkfs runs
            (rootfs / "etc/hostname").write_text("edited during the build\n")

    monkeypatch.setattr(_layers, "build_erofs", racing)
    (layer,) = resolve_root_layers(str(rootfs), cache_dir=tmp_path / "cache")
    assert len(calls) == 2
    assert layer.digest == _layers.LayerSpec(
        serial="l-root",
        label="dir",
        description="",
        source=rootfs,
        fingerprint=lambda: "",
    ).digest(tree_fingerprint(rootfs))
    assert len(list((tmp_path / "cache/images").glob("*.erofs"))) == 1


def _chain_spec(tree: Path, **kwargs: object) -> LayerSpec:
    return LayerSpec(
        serial="l-test",
        label="test",
        description=f"{tree} (test)",
        source=Path("/"),
        keep=(tree,),
        fingerprint=lambda: tree_fingerprint(tree),
        **kwargs,  # type: ignore[arg-type]
    )


@needs_erofs
def test_tree_imaged_at_its_absolute_path(tmp_path: Path) -> None:
    secret_parent = tmp_path / "home"
    tree = secret_parent / "prefix"
    write(tree / "lib/mod.py", "x = 1\n")
    write(secret_parent / "private.txt", "do not image")
    write(tmp_path / "sibling/file")
    secret_parent.chmod(0o700)
    layer = build_layer(_chain_spec(tree), tmp_path / "images")
    fsck(layer.path)
    parts = tree.parts[1:]
    # only the chain of ancestors, nothing beside it
    for depth in range(len(parts)):
        guest_dir = "/" + "/".join(parts[:depth])
        assert set(ls_image(layer.path, guest_dir)) == {parts[depth]}, guest_dir
    assert set(ls_image(layer.path, str(tree / "lib"))) == {"mod.py"}
    # ancestors opened for a non-root guest user
    assert image_mode(layer.path, str(secret_parent)) == 0o755
    assert (secret_parent.stat().st_mode & 0o777) == 0o700  # host untouched


@needs_erofs
def test_exclusions(tmp_path: Path) -> None:
    tree = tmp_path / "proj"
    write(tree / "src/pkg/__init__.py")
    write(tree / "src/pkg/node_modules/x.js")
    write(tree / "src/pkg/build/keep.py")  # "build" is only excluded at the top
    write(tree / "build/lib/out.py")
    write(tree / ".git/HEAD")
    write(tree / "src/pkg/__pycache__/__init__.cpython-311.pyc")
    spec = _chain_spec(
        tree,
        exclude_paths=(tree / "build", tmp_path / "elsewhere"),
        exclude_names=(".git", "node_modules"),
    )
    layer = build_layer(spec, tmp_path / "images")
    assert set(ls_image(layer.path, str(tree))) == {"src"}
    assert set(ls_image(layer.path, str(tree / "src/pkg"))) == {
        "__init__.py",
        "build",
        "__pycache__",
    }


def _fake_prefixes(tmp_path: Path) -> tuple[Path, Path, Path]:
    base = tmp_path / "python"
    write(base / "bin/python3")
    write(base / "lib/python3.11/os.py")
    project = tmp_path / "proj"
    venv = project / ".venv"
    write(venv / "pyvenv.cfg", f"home = {base}/bin\n")
    write(venv / "lib/python3.11/site-packages/pkg.py")
    write(project / "src/app/__init__.py")
    write(project / "tests/test_app.py")
    write(project / ".git/HEAD")
    return base, venv, project


def test_plan_host_trees_order_and_omissions(tmp_path: Path) -> None:
    base, venv, project = _fake_prefixes(tmp_path)
    cache = tmp_path / "cache"
    specs = plan_host_trees(project_root=project, cache_dir=cache, base_prefix=base, prefix=venv)
    assert [s.serial for s in specs] == ["l-project", "l-venv", "l-python"]
    assert specs[0].keep == (project.resolve(),)
    assert venv.resolve() in specs[0].exclude_paths
    assert ".git" in specs[0].exclude_names
    # no venv, Python under /usr, no project
    specs = plan_host_trees(project_root=None, cache_dir=cache, base_prefix=base, prefix=base)
    assert [s.serial for s in specs] == ["l-python"]
    specs = plan_host_trees(
        project_root=None, cache_dir=cache, base_prefix=Path("/usr"), prefix=Path("/usr")
    )
    assert specs == []


@pytest.mark.parametrize(
    ("cfg_line", "excluded"),
    [
        ("include-system-site-packages = false", True),
        ("", True),  # venv and virtualenv default to false
        ("Include-System-Site-Packages = True", False),
        (None, False),  # no pyvenv.cfg: nothing known, nothing left out
    ],
)
def test_the_prefix_layer_leaves_out_site_packages_an_isolated_venv_cannot_import(
    tmp_path: Path, cfg_line: str | None, excluded: bool
) -> None:
    base, venv, project = _fake_prefixes(tmp_path)
    write(base / "lib/python3.11/site-packages/big/__init__.py")
    cfg = venv / "pyvenv.cfg"
    if cfg_line is None:
        cfg.unlink()
    else:
        cfg.write_text(f"home = {base}/bin\n{cfg_line}\n")
    specs = plan_host_trees(
        project_root=project, cache_dir=tmp_path / "c", base_prefix=base, prefix=venv
    )
    python = specs[-1]
    site = (base / "lib/python3.11/site-packages").resolve()
    assert (site in python.exclude_paths) is excluded
    # The fingerprint follows: a change there matters only when it is imaged.
    before = python.fingerprint()
    write(base / "lib/python3.11/site-packages/big/new.py")
    assert (python.fingerprint() == before) is excluded
    write(base / "lib/python3.11/os2.py")  # the stdlib always counts
    assert python.fingerprint() != before


def test_plan_host_trees_excludes_cache_inside_project(tmp_path: Path) -> None:
    base, venv, project = _fake_prefixes(tmp_path)
    cache = project / ".cache/msb"
    cache.mkdir(parents=True)
    (spec, *_) = plan_host_trees(
        project_root=project, cache_dir=cache, base_prefix=base, prefix=venv
    )
    assert cache.resolve() in spec.exclude_paths


@pytest.mark.parametrize("bad", ["/", "~"])
def test_plan_host_trees_refuses_root_and_home(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ImageError, match="refusing"):
        plan_host_trees(project_root=Path(bad).expanduser(), cache_dir=tmp_path)


def test_plan_host_trees_missing_project(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="not a directory"):
        plan_host_trees(project_root=tmp_path / "missing", cache_dir=tmp_path)


@needs_erofs
def test_project_layer_rebuilds_on_edit_not_on_pycache(tmp_path: Path) -> None:
    base, venv, project = _fake_prefixes(tmp_path)
    images = tmp_path / "images"

    def project_layer() -> Layer:
        (spec, *_) = plan_host_trees(
            project_root=project, cache_dir=tmp_path / "cache", base_prefix=base, prefix=venv
        )
        return build_layer(spec, images)

    first = project_layer()
    top = set(ls_image(first.path, str(project.resolve())))
    assert top == {"src", "tests"}  # no .git, no .venv
    write(project / "src/app/__pycache__/__init__.cpython-311.pyc")
    write(project / ".pytest_cache/v/cache/lastfailed", "{}")
    assert project_layer() == first
    (project / "src/app/__init__.py").write_text("VERSION = 2\n")
    edited = project_layer()
    assert edited.digest != first.digest and edited.path != first.path


def test_plan_usr(tmp_path: Path) -> None:
    host = tmp_path / "host"
    write(host / "usr/bin/python3")
    write(host / "usr/share/doc/pkg/README")
    write(host / "usr/lib/llvm-14/bin/clang")
    write(host / "usr/local/bin/tool")
    status = write(host / "var/lib/dpkg/status", "Package: a\n")
    os.symlink("usr/bin", host / "bin")
    (host / "lib").mkdir()  # a host without merged /usr
    spec = plan_usr(
        usr_excludes=[f"{host}/usr/share/doc", f"{host}/usr/lib/llvm-*", f"{host}/nothing*"],
        host_root=host,
    )
    assert spec.keep == (host / "usr", host / "lib")
    assert set(spec.exclude_paths) == {host / "usr/share/doc", host / "usr/lib/llvm-14"}
    fp0 = spec.fingerprint()
    write(host / "usr/bin/unpackaged")  # outside the package db's view and not watched
    assert spec.fingerprint() == fp0
    status.write_text("Package: a\nPackage: b\n")
    fp1 = spec.fingerprint()
    assert fp1 != fp0
    write(host / "usr/local/bin/other")
    assert spec.fingerprint() != fp1


def test_plan_usr_relative_exclude_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="absolute"):
        plan_usr(usr_excludes=["usr/share/doc"], host_root=tmp_path)


@needs_erofs
def test_plan_usr_builds_with_excludes(tmp_path: Path) -> None:
    host = tmp_path / "host"
    write(host / "usr/bin/python3")
    write(host / "usr/share/doc/pkg/README")
    write(host / "usr/share/zoneinfo/UTC")
    write(host / "var/lib/dpkg/status", "Package: a\n")
    write(host / "root/secret")
    spec = plan_usr(usr_excludes=[f"{host}/usr/share/doc"], host_root=host)
    layer = build_layer(spec, tmp_path / "images")
    fsck(layer.path)
    assert set(ls_image(layer.path)) == {"usr"}
    assert set(ls_image(layer.path, "/usr/share")) == {"zoneinfo"}


@needs_erofs
def test_resolve_host_layer_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base, venv, project = _fake_prefixes(tmp_path)
    monkeypatch.setattr(sys, "base_prefix", str(base))
    monkeypatch.setattr(sys, "prefix", str(venv))
    fake_usr = tmp_path / "fakehost"
    write(fake_usr / "usr/bin/python3")
    write(fake_usr / "var/lib/dpkg/status", "Package: a\n")
    seen: list[object] = []

    def small_usr(*, usr_excludes: object, host_root: Path = fake_usr) -> LayerSpec:
        seen.append(usr_excludes)
        return plan_usr(usr_excludes=(), host_root=fake_usr)

    monkeypatch.setattr(_resolve, "plan_usr", small_usr)
    layers = resolve_root_layers("host", project_root=project, cache_dir=tmp_path / "cache")
    assert [layer.serial for layer in layers] == [
        "l-project",
        "l-venv",
        "l-python",
        "l-base",
        "l-usr",
    ]
    assert len({layer.digest for layer in layers}) == 5
    for layer in layers:
        fsck(layer.path)
    base_layer = layers[3]
    etc = ls_image(base_layer.path, "/etc")
    assert {"passwd", "group", "hosts", "resolv.conf", "nsswitch.conf"} <= set(etc)
    assert "shadow" not in etc
    assert ls_image(base_layer.path)["bin"] == "7"  # symlink (dump.erofs type 7)
    assert seen and "/usr/share/doc" in seen[0]  # the default excludes were passed
    # cached: a second resolve returns the same layers
    assert resolve_root_layers("host", project_root=project, cache_dir=tmp_path / "cache") == layers


@pytest.mark.parametrize("image", ["oci://x", "UPPER/case", "x:bad tag"])
def test_unsupported_image_names(tmp_path: Path, image: str) -> None:
    with pytest.raises(ImageError, match='"host", the path of a local directory'):
        resolve_root_layers(image, cache_dir=tmp_path)


@pytest.mark.parametrize("image", ["docker.io/library/python:3.12", "ubuntu"])
def test_registry_names_are_oci_images(tmp_path: Path, image: str) -> None:
    # pull_policy="never": no connection to a registry off this host.
    with pytest.raises(ImageNotFoundError, match="pull_policy is 'never'"):
        resolve_root_layers(image, cache_dir=tmp_path, pull_policy="never")


def test_missing_directory(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(ImageError, match=str(missing)):
        resolve_root_layers(str(missing), cache_dir=tmp_path)


def test_file_without_a_file_system(tmp_path: Path) -> None:
    f = write(tmp_path / "disk.img")
    with pytest.raises(ImageError, match="no ext2/3/4 or erofs file system"):
        resolve_root_layers(str(f), cache_dir=tmp_path)


def test_root_directory_refused(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="host"):
        resolve_root_layers("/", cache_dir=tmp_path)


def test_layer_model() -> None:
    layer = Layer(serial="l-usr", path=Path("/x.erofs"), digest="ab", description="d")
    with pytest.raises(ValidationError):  # frozen
        layer.serial = "other"  # type: ignore[misc]
    with pytest.raises(ValueError):
        Layer(serial="Bad_Serial", path=Path("/x"), digest="", description="")
    with pytest.raises(ValueError):
        Layer(serial="x" * 21, path=Path("/x"), digest="", description="")


def test_editable_install_sources_get_their_own_layers(tmp_path: Path) -> None:
    base, venv, project = _fake_prefixes(tmp_path)
    outside = tmp_path / "elsewhere" / "src"
    outside.mkdir(parents=True)
    site = venv / "lib" / "python3.11" / "site-packages"
    site.mkdir(parents=True, exist_ok=True)
    (site / "_outside.pth").write_text(f"{outside}\n")
    (site / "_inside.pth").write_text(f"{project}\n")  # already in the project layer
    (site / "hooks.pth").write_text("import sys\n# comment\nrelative/path\n")
    specs = plan_host_trees(
        project_root=project, cache_dir=tmp_path / "cache", base_prefix=base, prefix=venv
    )
    assert [s.serial for s in specs] == ["l-edit0", "l-project", "l-venv", "l-python"]
    assert specs[0].keep == (outside.resolve(),)


@needs_erofs
def test_project_layer_alone_is_the_project_layer(tmp_path: Path) -> None:
    project = tmp_path / "proj"
    (project / "pkg").mkdir(parents=True)
    (project / "pkg" / "mod.py").write_text("X = 1\n")
    (project / ".git").mkdir()
    cache = tmp_path / "cache"
    layer = project_layer(project, cache)
    assert layer.serial == "l-project" and layer.path.parent == cache / "images"
    assert project_layer(project, cache).path == layer.path  # cached, not rebuilt
    (project / "pkg" / "mod.py").write_text("X = 2\n")
    assert project_layer(project, cache).path != layer.path
