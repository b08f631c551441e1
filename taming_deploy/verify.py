"""`taming-deploy verify BUNDLE`: every file the bundle's manifests name, hashed, whichever backend would
load it (a tampered fp16 graph or TensorRT plan is found on a machine that would never open it)."""
from __future__ import annotations

from pathlib import Path

from taming_deploy.bundle import Bundle
from taming_deploy.errors import UserError
from taming_deploy.fileutil import contained_path, sha256_file


def engine_problems(bundle: Bundle) -> list[str]:
    """The TensorRT plans engines/engines.json names that are missing, outside the bundle or changed."""
    from taming_deploy.engines.engine_manifest import ENGINES_MANIFEST, engines_dir, read_engine_manifest

    directory = engines_dir(bundle.path)
    if not (directory / ENGINES_MANIFEST).is_file():
        return []
    found = []
    for name, entry in read_engine_manifest(bundle.path).engines.items():
        try:
            path = contained_path(directory, entry.file, str(directory / ENGINES_MANIFEST))
            if not path.is_file():
                raise UserError(f"{path}: the {name} engine is listed in {ENGINES_MANIFEST} but missing")
            if sha256_file(path) != entry.sha256:
                raise UserError(f"{path}: the {name} engine does not match {ENGINES_MANIFEST} (changed or damaged)")
        except UserError as exc:
            found.append(str(exc))
    return found


def bundle_problems(path: Path) -> list[str]:
    """One line per missing, escaping or changed file; empty when the bundle is intact."""
    bundle = Bundle(Path(path))
    return bundle.problems() + engine_problems(bundle)
