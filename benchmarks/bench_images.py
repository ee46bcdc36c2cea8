"""OCI image benchmark, against a local docker-registry on 127.0.0.1.

Plain script (``python benchmarks/bench_images.py [--rounds 3] [--mb 100]``).
Measured in the same run, alternating:

* pull + convert of a ~100 MB image (4 layers of incompressible data) into a
  fresh cache: ``pull_image`` + the erofs layers, against the baseline of
  ``oras`` downloading the same blobs alone;
* the cached second use of that image (pinned digest, layers already built);
* converting its 4 layers to erofs with one worker per CPU (the default)
  against one at a time (``workers=1``), blobs already local;
* create -> first exec -> close of a sandbox from a busybox OCI image's
  template, against ``image="host"`` (both templates built before timing).

Prints p50/p95 per case and the ratios. Under load (other VMs on the host)
expect the VM figures to move by several times; compare ratios, not seconds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "runtime" / "images"))
from oci_helpers import busybox_entries, file, image_config, run_registry

from pytest_microsandbox.runtime import SandboxConfig, SyncSandbox
from pytest_microsandbox.runtime.images import pull_image
from pytest_microsandbox.runtime.images._reference import parse_reference
from pytest_microsandbox.runtime.images._unpack import layer_workers, oci_layers


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def oras_pull(ref: str, dest: Path) -> float:
    """The baseline: oras downloads the config and layer blobs, nothing else."""
    import oras.provider

    parsed = parse_reference(ref)
    client = oras.provider.Registry(hostname=parsed.registry, insecure=True)
    start = time.monotonic()
    with client.session:
        manifest = client.get_manifest(f"{parsed.registry}/{parsed.repository}:{parsed.tag}")
        for blob in [manifest["config"], *manifest["layers"]]:
            client.download_blob(
                f"{parsed.registry}/{parsed.repository}", blob["digest"], str(dest / blob["digest"])
            )
    return time.monotonic() - start


def pull_convert(ref: str, cache: Path) -> float:
    start = time.monotonic()
    image = pull_image(ref, cache_dir=cache)
    oci_layers(image, cache / "images")
    return time.monotonic() - start


def convert(ref: str, cache: Path, images: Path, workers: int | None) -> float:
    image = pull_image(ref, cache_dir=cache)  # local: pinned and complete
    start = time.monotonic()
    oci_layers(image, images, workers=workers)
    elapsed = time.monotonic() - start
    shutil.rmtree(images)
    return elapsed


def vm_round(config: SandboxConfig) -> float:
    start = time.monotonic()
    with SyncSandbox.create(config) as sb:
        sb.exec("true")
    return time.monotonic() - start


def main(args: argparse.Namespace) -> None:
    times: dict[str, list[float]] = {}
    with run_registry() as registry, tempfile.TemporaryDirectory(prefix="msb-bench-img-") as tmp:
        layer_mb = max(1, args.mb // 4)
        big = [{f"data/{i}.bin": file(os.urandom(layer_mb << 20))} for i in range(4)]
        big_ref = registry.ref("bench/big:1")
        registry.push_image("bench/big:1", big, image_config())
        small_ref = registry.ref("bench/busybox:1")
        registry.push_image("bench/busybox:1", [busybox_entries()], image_config())

        for round_no in range(args.rounds):
            dest = Path(tmp) / f"oras{round_no}"
            dest.mkdir()
            times.setdefault("oras pull alone (baseline)", []).append(oras_pull(big_ref, dest))
            shutil.rmtree(dest)
            cache = Path(tmp) / f"cache{round_no}"
            times.setdefault("pull + convert", []).append(pull_convert(big_ref, cache))
            times.setdefault("cached second use", []).append(pull_convert(big_ref, cache))
            cases = (("convert, sequential (baseline)", 1), ("convert, parallel", None))
            for case, workers in cases:
                times.setdefault(case, []).append(
                    convert(big_ref, cache, Path(tmp) / f"conv{round_no}", workers)
                )
            shutil.rmtree(cache)
        if args.no_vm:
            report(times, layer_mb, args.rounds)
            return

        oci = SandboxConfig(name="bench-oci", image=small_ref)
        host = SandboxConfig(name="bench-host")
        vm_round(oci)  # templates built once, outside the timing
        vm_round(host)
        for _ in range(args.rounds):
            times.setdefault("create->exec, OCI busybox", []).append(vm_round(oci))
            times.setdefault('create->exec, image="host" (baseline)', []).append(vm_round(host))

    report(times, layer_mb, args.rounds)


def report(times: dict[str, list[float]], layer_mb: int, rounds: int) -> None:
    print(
        f"\nimage of {4 * layer_mb} MiB in 4 layers; {rounds} rounds; "
        f"{layer_workers()} conversion workers"
    )
    print(f"{'case':44} {'p50 s':>8} {'p95 s':>8}")
    for case, values in times.items():
        print(f"{case:44} {pct(values, 0.5):8.3f} {pct(values, 0.95):8.3f}")
    med = {case: statistics.median(values) for case, values in times.items()}

    def ratio(label: str, case: str, baseline: str, digits: int = 2) -> None:
        if case in med and baseline in med:
            print(f"{label}: {med[case] / med[baseline]:.{digits}f}")

    print()
    ratio("pull + convert / oras alone", "pull + convert", "oras pull alone (baseline)")
    ratio("cached second use / pull + convert", "cached second use", "pull + convert", 3)
    ratio(
        "convert parallel / sequential",
        "convert, parallel",
        "convert, sequential (baseline)",
    )
    ratio(
        "OCI create->exec / host create->exec",
        "create->exec, OCI busybox",
        'create->exec, image="host" (baseline)',
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mb", type=int, default=100, help="image size in MiB")
    parser.add_argument("--no-vm", action="store_true", help="skip the sandbox cases")
    main(parser.parse_args())
