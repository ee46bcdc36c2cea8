"""OCI images against a real registry (docker-registry on 127.0.0.1): pull, pin,
policies, auth, platforms, errors, and layer conversion with whiteouts.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from oci_helpers import Registry, busybox_entries, directory, file, image_config, layer_tar

from pytest_microsandbox.runtime._exceptions import (
    ImageError,
    ImageNotFoundError,
    ImagePlatformError,
    RegistryAuthError,
    RegistryUnreachableError,
)
from pytest_microsandbox.runtime.images import (
    RegistryAuth,
    local_image,
    parse_reference,
    pull_image,
    resolve_root_layers,
)
from pytest_microsandbox.runtime.images._oci import LayerBlob
from pytest_microsandbox.runtime.images._unpack import unpack_layer


def _extract(image: Path, dest: Path) -> Path:
    subprocess.run(["fsck.erofs", f"--extract={dest}", str(image)], check=True, capture_output=True)
    return dest


# -- references -------------------------------------------------------------------------------


def test_parse_reference_forms() -> None:
    ref = parse_reference("127.0.0.1:5000/team/app:1.4")
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (
        "127.0.0.1:5000",
        "team/app",
        "1.4",
        None,
    )
    assert ref.is_loopback
    digest = "sha256:" + "a" * 64
    ref = parse_reference(f"localhost/x@{digest}")
    assert (ref.tag, ref.digest) == (None, digest)
    assert parse_reference("alpine").name == "registry-1.docker.io/library/alpine"
    assert parse_reference("ghcr.io/x/y").tag == "latest"
    assert not parse_reference("ghcr.io/x/y").is_loopback


@pytest.mark.parametrize("bad", ["reg.io/UPPER:1", "reg.io/x@sha256:abc", "reg.io/x:bad tag"])
def test_parse_reference_rejects(bad: str) -> None:
    with pytest.raises(ImageError):
        parse_reference(bad)


# -- pulls ------------------------------------------------------------------------------------


def test_pull_by_tag_and_digest_and_config(registry: Registry, tmp_path: Path) -> None:
    cfg = image_config(
        env=["PATH=/bin", "GREETING=hello"], workdir="/home/app", user="app", cmd=["sh"]
    )
    digest = registry.push_image("t/cfg:1", [busybox_entries()], cfg)
    seen: list[tuple[str, int, int]] = []
    image = pull_image(
        registry.ref("t/cfg:1"),
        cache_dir=tmp_path,
        progress=lambda what, done, total: seen.append((what, done, total)),
    )
    assert image.digest == digest
    assert image.config.env["GREETING"] == "hello"
    assert (image.config.workdir, image.config.user, image.config.cmd) == (
        "/home/app",
        "app",
        ("sh",),
    )
    assert seen and seen[-1][1] == seen[-1][2]  # the last call says done
    by_digest = pull_image(registry.ref(f"t/cfg@{digest}"), cache_dir=tmp_path)
    assert by_digest.manifest_digest == digest


def test_tag_pinned_until_always(registry: Registry, tmp_path: Path) -> None:
    first = registry.push_image("t/pin:1", [{"a": file("one")}])
    assert pull_image(registry.ref("t/pin:1"), cache_dir=tmp_path).digest == first
    second = registry.push_image("t/pin:1", [{"a": file("two")}])  # the tag moves
    assert second != first
    assert pull_image(registry.ref("t/pin:1"), cache_dir=tmp_path).digest == first
    assert (
        pull_image(registry.ref("t/pin:1"), pull_policy="never", cache_dir=tmp_path).digest == first
    )
    assert (
        pull_image(registry.ref("t/pin:1"), pull_policy="always", cache_dir=tmp_path).digest
        == second
    )
    assert pull_image(registry.ref("t/pin:1"), cache_dir=tmp_path).digest == second


def test_never_without_local_copy(registry: Registry, tmp_path: Path) -> None:
    registry.push_image("t/never:1", [{"a": file("x")}])
    with pytest.raises(ImageNotFoundError, match="pull_policy is 'never'"):
        pull_image(registry.ref("t/never:1"), pull_policy="never", cache_dir=tmp_path)
    assert local_image(registry.ref("t/never:1"), tmp_path) is None


def test_missing_image(registry: Registry, tmp_path: Path) -> None:
    with pytest.raises(ImageNotFoundError, match="not found"):
        pull_image(registry.ref("t/nothing:1"), cache_dir=tmp_path)


def test_unreachable_registry(tmp_path: Path) -> None:
    from oci_helpers import free_port

    port = free_port()  # nothing listens there any more
    with pytest.raises(RegistryUnreachableError, match="unreachable"):
        pull_image(f"127.0.0.1:{port}/t/x:1", cache_dir=tmp_path)


def test_index_picks_amd64(registry: Registry, tmp_path: Path) -> None:
    amd = registry.push_image("t/multi:amd", [{"arch": file("amd64")}])
    arm = registry.push_image("t/multi:arm", [{"arch": file("arm64")}], image_config(arch="arm64"))
    index = registry.push_index("t/multi:1", [(arm, "arm64"), (amd, "amd64")])
    image = pull_image(registry.ref("t/multi:1"), cache_dir=tmp_path)
    assert (image.digest, image.manifest_digest) == (index, amd)


def test_non_amd64(registry: Registry, tmp_path: Path) -> None:
    arm = registry.push_image("t/arm:one", [{"arch": file("arm64")}], image_config(arch="arm64"))
    registry.push_index("t/arm:index", [(arm, "arm64")])
    with pytest.raises(ImagePlatformError, match="linux/arm64"):
        pull_image(registry.ref("t/arm:index"), cache_dir=tmp_path)
    with pytest.raises(ImagePlatformError, match="not linux/amd64"):
        pull_image(registry.ref("t/arm:one"), cache_dir=tmp_path)


def test_basic_auth(auth_registry: Registry, tmp_path: Path) -> None:
    auth_registry.push_image("t/secret:1", [{"a": file("x")}])
    ref = auth_registry.ref("t/secret:1")
    good = RegistryAuth(username="alice", password="s3cret")
    assert pull_image(ref, auth=good, cache_dir=tmp_path).layers
    assert "s3cret" not in repr(good)
    with pytest.raises(RegistryAuthError, match="refused the credentials"):
        pull_image(
            ref,
            auth=RegistryAuth(username="alice", password="wrong"),
            pull_policy="always",
            cache_dir=tmp_path,
        )


def test_bearer_token_auth(token_registry: Registry, tmp_path: Path) -> None:
    token_registry.push_image("t/bearer:1", [{"a": file("x")}])
    ref = token_registry.ref("t/bearer:1")
    # User and password exchanged for a token at the registry's realm.
    good = RegistryAuth(username="alice", password="s3cret")
    assert pull_image(ref, auth=good, cache_dir=tmp_path / "a").layers
    # A token passed as such.
    assert token_registry.token_server is not None
    token = token_registry.token_server.issue("t/bearer", ["pull"])
    assert pull_image(ref, auth=RegistryAuth(token=token), cache_dir=tmp_path / "b").layers
    with pytest.raises(RegistryAuthError, match="refused the credentials"):
        pull_image(
            ref, auth=RegistryAuth(username="alice", password="nope"), cache_dir=tmp_path / "c"
        )
    with pytest.raises(RegistryAuthError):
        pull_image(ref, auth=RegistryAuth(token="not.a.token"), cache_dir=tmp_path / "d")


def test_auth_from_docker_config(
    auth_registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    auth_registry.push_image("t/dockercfg:1", [{"a": file("x")}])
    home = tmp_path / "home"
    (home / ".docker").mkdir(parents=True)
    import base64

    token = base64.b64encode(b"alice:s3cret").decode()
    (home / ".docker/config.json").write_text(
        json.dumps({"auths": {auth_registry.host: {"auth": token}}})
    )
    monkeypatch.setenv("HOME", str(home))
    assert pull_image(auth_registry.ref("t/dockercfg:1"), cache_dir=tmp_path / "c").layers
    (home / ".docker/config.json").write_text("{}")
    with pytest.raises(RegistryAuthError, match="requires credentials"):
        pull_image(auth_registry.ref("t/dockercfg:1"), cache_dir=tmp_path / "d")


# -- layers -----------------------------------------------------------------------------------


def test_whiteouts_and_opaque_dirs(registry: Registry, tmp_path: Path) -> None:
    base = {
        "etc/keep": file("k"),
        "etc/gone": file("g"),
        "opq/old": file("o"),
        "opq/sub/deep": file("d"),
        "opq/kept/old2": file("o2"),
    }
    top = {
        "etc/.wh.gone": file(""),
        "opq/.wh..wh..opq": file(""),
        "opq/new": file("n"),
        "opq/kept": directory(),
    }
    registry.push_image("t/wh:1", [base, top])
    layers = resolve_root_layers(registry.ref("t/wh:1"), cache_dir=tmp_path)
    assert [layer.serial for layer in layers] == ["l-oci1", "l-oci0", "l-skel"]
    tree = _extract(layers[0].path, tmp_path / "x")
    gone = (tree / "etc/gone").lstat()
    assert (gone.st_mode & 0o170000, gone.st_rdev) == (0o020000, 0)  # char device 0/0
    assert not (tree / "etc/keep").exists()
    for hidden in ("opq/old", "opq/sub", "opq/kept/old2"):
        st = (tree / hidden).lstat()
        assert st.st_mode & 0o170000 == 0o020000, hidden
    assert (tree / "opq/new").read_text() == "n"
    # Cached by chain id: a second resolve builds nothing.
    again = resolve_root_layers(registry.ref("t/wh:1"), cache_dir=tmp_path)
    assert [layer.path for layer in again] == [layer.path for layer in layers]


def test_unpack_refuses_escapes(tmp_path: Path) -> None:
    import io
    import tarfile

    for name, kind, link in (
        ("../evil", tarfile.REGTYPE, ""),
        ("lnk", tarfile.LNKTYPE, "/etc/passwd"),
    ):
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w") as tar:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, link
            tar.addfile(info, io.BytesIO(b""))
        blob = tmp_path / f"{kind!r}.tar"
        blob.write_bytes(raw.getvalue())
        root = tmp_path / f"root-{kind!r}"
        root.mkdir()
        layer = LayerBlob("sha256:" + "0" * 64, "application/vnd.oci.image.layer.v1.tar", 0, blob)
        if name == "../evil":
            unpack_layer(layer, root, [])  # normalized into the root, not above it
            assert (root / "evil").exists() and not (tmp_path / "evil").exists()
        else:
            # Re-rooted: a link to the layer's own etc/passwd, which it lacks.
            with pytest.raises(ImageError, match="etc/passwd"):
                unpack_layer(layer, root, [])
            assert not (root / "lnk").exists()
    escape = {"link": file("")}
    assert layer_tar(escape)  # the helper itself stays usable


def test_oci_store_budget(registry: Registry, tmp_path: Path) -> None:
    from pytest_microsandbox.runtime.images import prune_oci_store

    old = registry.push_image("t/budget:old", [{"a": file("x" * 4096)}])
    new = registry.push_image("t/budget:new", [{"b": file("y" * 4096)}])
    pull_image(registry.ref("t/budget:old"), cache_dir=tmp_path)
    pull_image(registry.ref("t/budget:new"), cache_dir=tmp_path)
    # Nothing goes while it was used in the grace period.
    assert prune_oci_store(tmp_path, max_bytes=1).removed == ()
    import os
    import time

    pins = sorted((tmp_path / "oci/pins").glob("*.json"))
    for pin in pins:  # both used an hour ago, "old" before "new"
        digest = json.loads(pin.read_text())["digest"]
        age = 7200 if digest == old else 3600
        os.utime(pin, (time.time() - age, time.time() - age))
    for blob in (tmp_path / "oci/blobs/sha256").iterdir():
        os.utime(blob, (time.time() - 7200, time.time() - 7200))
    blobs = sum(b.stat().st_size for b in (tmp_path / "oci/blobs/sha256").iterdir())
    result = prune_oci_store(tmp_path, max_bytes=blobs - 1)
    assert len(result.removed) == 1 and result.freed_bytes > 0
    assert local_image(registry.ref("t/budget:old"), tmp_path) is None
    assert local_image(registry.ref("t/budget:new"), tmp_path) is not None
    assert new


def test_patch_layer_appends_to_the_image_file(registry: Registry, tmp_path: Path) -> None:
    from pytest_microsandbox.runtime.images import Patch

    base = {"etc/app.conf": file("a=1\n"), "etc/gone.conf": file("x\n")}
    top = {"etc/.wh.gone.conf": file("")}
    registry.push_image("t/patch:1", [base, top])
    layers = resolve_root_layers(
        registry.ref("t/patch:1"),
        cache_dir=tmp_path,
        patches=[
            Patch.append("/etc/app.conf", "b=2\n"),
            Patch.append("/etc/gone.conf", "new\n"),  # whited out below: starts empty
            Patch.text("/opt/run.sh", "#!/bin/sh\n", mode=0o755),
        ],
        scripts={"setup": "#!/bin/sh\necho hi\n"},
    )
    assert layers[0].serial == "l-patch"
    tree = _extract(layers[0].path, tmp_path / "x")
    assert (tree / "etc/app.conf").read_text() == "a=1\nb=2\n"
    assert (tree / "etc/gone.conf").read_text() == "new\n"
    assert (tree / "opt/run.sh").stat().st_mode & 0o777 == 0o755
    assert (tree / ".msb/scripts/setup").stat().st_mode & 0o111
    # The image's own layers are the same files as without patches.
    plain = resolve_root_layers(registry.ref("t/patch:1"), cache_dir=tmp_path)
    assert [layer.path for layer in layers[1:]] == [layer.path for layer in plain]


def test_unpack_refuses_writes_through_symlinks(tmp_path: Path) -> None:
    import io
    import tarfile

    outside = tmp_path / "outside"
    outside.mkdir()
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        link = tarfile.TarInfo("a")
        link.type, link.linkname = tarfile.SYMTYPE, str(outside)
        tar.addfile(link)
        evil = tarfile.TarInfo("a/evil")
        evil.size = 4
        tar.addfile(evil, io.BytesIO(b"evil"))
    blob = tmp_path / "layer.tar"
    blob.write_bytes(raw.getvalue())
    root = tmp_path / "root"
    root.mkdir()
    layer = LayerBlob("sha256:" + "1" * 64, "application/vnd.oci.image.layer.v1.tar", 0, blob)
    with pytest.raises(ImageError, match="outside"):
        unpack_layer(layer, root, [])
    assert list(outside.iterdir()) == []
    assert (root / "a").is_symlink()  # the link itself is fine: the guest resolves it


# -- progress and parallel conversion ---------------------------------------------------------


def test_pull_reports_bytes_per_layer_and_the_conversion(
    registry: Registry, tmp_path: Path
) -> None:
    import os

    from pytest_microsandbox.runtime.progress import BuildEvent, subscribe

    layers = [{f"d/{i}.bin": file(os.urandom(3 << 20))} for i in range(2)]
    registry.push_image("t/progress:1", layers)
    ref = registry.ref("t/progress:1")
    events: list[BuildEvent] = []
    unsubscribe = subscribe(events.append)
    try:
        resolve_root_layers(ref, cache_dir=tmp_path)
        resolve_root_layers(ref, cache_dir=tmp_path)  # cached: silent
    finally:
        unsubscribe()
    pulls = [e for e in events if e.kind == "pull" and e.state == "start"]
    assert [e.what for e in pulls] == [
        f"image {ref}",
        f"image {ref} (converting 2 layers to erofs)",
    ]
    download, convert = (e.id for e in pulls)
    steps = [e for e in events if e.id == download and e.state == "step" and e.total]
    assert {e.step.split(":")[0] for e in steps} >= {"layer 1/2", "layer 2/2"}
    pulled = local_image(ref, tmp_path)
    assert pulled is not None
    sizes = {f"layer {i + 1}/2": blob.size for i, blob in enumerate(pulled.layers)}
    assert all(e.total == sizes[e.step.split(":")[0]] for e in steps if e.step.startswith("layer"))
    assert any(e.done == e.total for e in steps if e.step.startswith("layer 2/2"))
    done = [e for e in events if e.id == download and e.state == "done"]
    assert len(done) == 1 and done[0].size is not None and done[0].size > 6 << 20
    # Each layer's build is a child stage of the conversion, even from worker threads.
    builds = [e for e in events if e.state == "start" and f"/2 of {ref}" in e.what]
    assert len(builds) == 2 and all(e.parent == convert for e in builds)
    counted = [e.done for e in events if e.id == convert and e.state == "step"]
    assert counted[0] == 0 and counted[-1] == 2


def test_parallel_and_sequential_conversion_build_the_same_images(
    registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pytest_microsandbox.runtime.images._unpack import layer_workers, oci_layers

    layers = [{f"f{i}": file(f"layer {i}"), f"dir{i}/x": file("x")} for i in range(4)]
    layers.append({"f0": file("top"), ".wh.dir1": file("")})
    registry.push_image("t/parallel:1", layers)
    image = pull_image(registry.ref("t/parallel:1"), cache_dir=tmp_path)
    sequential = oci_layers(image, tmp_path / "seq", workers=1)
    parallel = oci_layers(image, tmp_path / "par", workers=4)
    assert [layer.digest for layer in parallel] == [layer.digest for layer in sequential]

    def tree(image: Path, dest: Path) -> dict[str, tuple[int, bytes]]:
        root = _extract(image, dest)
        return {
            str(p.relative_to(root)): (p.lstat().st_mode, p.read_bytes() if p.is_file() else b"")
            for p in sorted(root.rglob("*"))
        }

    for n, (a, b) in enumerate(zip(parallel, sequential, strict=True)):
        assert a.serial == b.serial and a.path.name == b.path.name
        assert tree(a.path, tmp_path / f"a{n}") == tree(b.path, tmp_path / f"b{n}")
    monkeypatch.setenv("MICROSANDBOX_LAYER_WORKERS", "3")
    assert layer_workers() == 3
    monkeypatch.setenv("MICROSANDBOX_LAYER_WORKERS", "0")
    with pytest.raises(ImageError, match="MICROSANDBOX_LAYER_WORKERS='0' is not a whole number"):
        layer_workers()
