"""A throwaway MMSegmentation 1.2.2 environment, outside hooktrain's dependencies.

``pip install --target DIR --no-deps`` puts mmsegmentation, mmengine, mmcv-lite, mmpretrain and their
pure-Python dependencies (pinned) into a cache directory; torch, numpy and OpenCV come from the
running interpreter and are never installed there. Scripts run in a subprocess of the same
interpreter with DIR first on ``PYTHONPATH``, through a launcher module that stubs ``mmcv.ops``
before the script starts (mmcv-lite has no compiled ops, and ``mmseg`` imports a few at import
time; none of the models used here calls one). The launcher also makes ``timm`` and
``transformers`` unimportable (``HOOKTRAIN_MMSEG_BLOCK_IMPORTS``, default ``timm,transformers``;
set it empty to allow them): mmseg and mmengine import them only optionally, and they cost ~4 s
of start-up per run on 2 cores.

On a machine without an index (the GPU machine), ``HOOKTRAIN_MMSEG_WHEELS=DIR`` (or
``install(wheels=DIR)``) installs the same pins from the wheels in DIR (``pip --no-index
--find-links DIR``; ``bench/device_wheels.sh`` downloads them), leaving scipy out when the running
interpreter already imports one.

    env = MmsegEnv.install()                      # ~15 s the first time, then instant
    env.run("tests/mmseg_ref/reference.py", "build", "segformer_mit-b0_8xb2-160k_ade20k-512x512",
            "--out", "/tmp/ref", "--seed", "0", "--sizes", "97x131")
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

PACKAGES = [
    "mmsegmentation==1.2.2",
    "mmengine==0.10.7",
    "mmcv-lite==2.1.0",
    # mmengine's, mmcv's and mmseg's own dependencies that hooktrain's venv may lack.
    # (torch, numpy, opencv, pyyaml, packaging, pillow come from the venv; matplotlib is only
    # imported by mmengine's visualizer, which nothing here builds.)
    "addict==2.4.0",
    "yapf==0.43.0",
    "termcolor==3.3.0",
    "rich==15.0.0",
    "markdown-it-py==4.3.0",
    "mdurl==0.1.2",
    "pygments==2.21.0",
    "platformdirs==4.14.8",
    "ftfy==6.3.1",
    "wcwidth==0.2.13",
    "regex==2026.11.19",
    "prettytable==3.18.0",
    # mmpretrain (the ConvNeXt configs' backbone, `custom_imports` of mmpretrain.models) and what
    # importing mmpretrain.models needs; model-index is the `modelindex` module (PyPI's
    # `modelindex` is an empty wheel), importlib_metadata 9+ needs lazy_importer.
    "mmpretrain==1.2.0",
    "einops==0.8.2",
    "importlib_metadata==8.7.0",
    "zipp==4.1.2",
    "model-index==0.1.11",
    "ordered-set==4.1.0",
    "markdown==3.11.3",
    "scipy==1.17.1; python_version >= '3.11'",
    "scipy==1.15.3; python_version < '3.11'",
]
WHEELS_ENV = "HOOKTRAIN_MMSEG_WHEELS"  # a directory of wheels: install from it, with no index
MARKER = ".hooktrain-complete"  # written last: its presence (with these pins) means "installed"
LAUNCHER = "hooktrain_mmseg_launch"

# Written into the target directory; `python -m hooktrain_mmseg_launch SCRIPT ARGS` runs SCRIPT
# as __main__ (sys.argv and sys.path[0] as for `python SCRIPT ARGS`) with mmcv.ops stubbed.
_LAUNCHER_SOURCE = '''"""Run a script with mmcv.ops stubbed (written by tests/mmseg_ref/env.py)."""
import importlib.util
import os
import runpy
import sys
import types
import warnings

warnings.filterwarnings("ignore", message=".*MultiScaleDeformableAttention.*")


def _stub_mmcv_ops():
    """mmcv-lite ships mmcv/ops/*.py but not the compiled mmcv._ext they load, so its
    mmcv/ops/__init__.py fails. Replace the package by a module whose submodules are still the
    real files (the pure-PyTorch ones, such as point_sample, import fine; the others raise
    ImportError, which mmcv and mmseg catch) and whose other attributes are placeholders that
    raise when called."""
    spec = importlib.util.find_spec("mmcv")
    ops = types.ModuleType("mmcv.ops")
    ops.__path__ = [os.path.join(spec.submodule_search_locations[0], "ops")]
    ops.__package__ = "mmcv.ops"

    def missing(name):
        if name.startswith("__"):
            raise AttributeError(name)

        def op(*args, **kwargs):
            raise RuntimeError(f"mmcv.ops.{name} needs the full mmcv (compiled ops), not mmcv-lite")

        op.__name__ = name
        return op

    ops.__getattr__ = missing
    sys.modules["mmcv.ops"] = ops
    import mmcv

    mmcv.ops = ops
    from mmcv.ops.point_sample import bilinear_grid_sample, point_sample  # pure PyTorch

    ops.point_sample = point_sample  # (the import above bound the submodule to these names)
    ops.bilinear_grid_sample = bilinear_grid_sample


_stub_mmcv_ops()
# Optional imports that only cost start-up time (~4 s on 2 cores): mmseg's TIMMBackbone and
# mmengine's transformers optimizers (Adafactor). None of the configs used here needs them.
for _name in os.environ.get("HOOKTRAIN_MMSEG_BLOCK_IMPORTS", "timm,transformers").split(","):
    if _name.strip() and _name.strip() not in sys.modules:
        sys.modules[_name.strip()] = None  # `import` raises ImportError, which both catch
if len(sys.argv) < 2:
    raise SystemExit("usage: python -m hooktrain_mmseg_launch SCRIPT [ARGS...]")
_script = os.path.abspath(sys.argv[1])
sys.argv = sys.argv[1:]
sys.path[0] = os.path.dirname(_script)
runpy.run_path(_script, run_name="__main__")
'''


def default_cache() -> Path:
    """``$HOOKTRAIN_MMSEG_CACHE``, else ``~/.cache/hooktrain/mmseg-1.2.2``."""
    env = os.environ.get("HOOKTRAIN_MMSEG_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "hooktrain" / "mmseg-1.2.2"


def _pip_source(wheels: Path | str | None) -> tuple[list[str], list[str]]:
    """(pip's index options, the packages to install): PyPI and all of :data:`PACKAGES`, or with
    a wheel directory ``--no-index --find-links DIR`` and scipy left out when the running
    interpreter has one (the scripts run on this interpreter; scipy is the one large wheel)."""
    if not wheels:
        return [], list(PACKAGES)
    directory = Path(wheels).expanduser().resolve()
    if not directory.is_dir():
        raise RuntimeError(f"{WHEELS_ENV}: no wheel directory {directory}")
    packages = list(PACKAGES)
    if importlib.util.find_spec("scipy") is not None:
        packages = [package for package in packages if not package.startswith("scipy")]
    return ["--no-index", "--find-links", str(directory)], packages


def _expected_marker() -> dict:
    return {"packages": PACKAGES, "python": list(sys.version_info[:2])}


def _read_marker(site: Path) -> dict | None:
    try:
        marker = json.loads((site / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _write_launcher(site: Path) -> None:
    """(Re)write the launcher when its source changed; atomic, so running scripts never see half."""
    path = site / f"{LAUNCHER}.py"
    try:
        if path.read_text() == _LAUNCHER_SOURCE:
            return
    except OSError:
        pass
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(_LAUNCHER_SOURCE)
    os.replace(partial, path)


class MmsegEnv:
    """An installed MMSegmentation environment at ``site`` (a ``pip --target`` directory)."""

    def __init__(self, site: Path, install_seconds: float | None = None, reused: bool = False) -> None:
        self.site = Path(site)
        self.install_seconds = install_seconds  # of the install that made ``site``
        self.reused = reused  # True when install() found a complete install and did nothing

    def __repr__(self) -> str:
        return f"MmsegEnv({str(self.site)!r}, install_seconds={self.install_seconds}, reused={self.reused})"

    @classmethod
    def install(cls, cache_dir: Path | str | None = None, wheels: Path | str | None = None) -> MmsegEnv:
        """Install once into ``cache_dir`` (default :func:`default_cache`), then reuse it.

        Idempotent and safe for concurrent callers (a file lock next to ``cache_dir``). An
        install is complete when its marker (written last) records the same pins and Python;
        otherwise the directory is rebuilt from scratch in a staging directory and moved into
        place. ``wheels`` (default ``$HOOKTRAIN_MMSEG_WHEELS``): a directory of wheels to install
        from with no index (scipy left out when this interpreter has one). Raises RuntimeError
        with pip's output when pip fails (no network, a missing wheel, ...)."""
        site = Path(cache_dir) if cache_dir is not None else default_cache()
        site = site.expanduser().resolve()
        expected = _expected_marker()
        marker = _read_marker(site)
        if marker and all(marker.get(k) == v for k, v in expected.items()):
            _write_launcher(site)
            return cls(site, marker.get("install_seconds"), reused=True)
        site.parent.mkdir(parents=True, exist_ok=True)
        with open(site.parent / f".{site.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            marker = _read_marker(site)  # another process may have finished meanwhile
            if marker and all(marker.get(k) == v for k, v in expected.items()):
                _write_launcher(site)
                return cls(site, marker.get("install_seconds"), reused=True)
            started = time.monotonic()
            staging = site.parent / f".{site.name}.staging-{os.getpid()}"
            shutil.rmtree(staging, ignore_errors=True)
            wheels = wheels if wheels is not None else os.environ.get(WHEELS_ENV) or None
            index, packages = _pip_source(wheels)
            command = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-input", "--only-binary", ":all:",
                       "--disable-pip-version-check", "--no-warn-script-location", "--quiet", *index, "--target",
                       str(staging), *packages]  # fmt: skip
            result = subprocess.run(command, check=False, capture_output=True, text=True)
            if result.returncode != 0:
                shutil.rmtree(staging, ignore_errors=True)
                raise RuntimeError(
                    f"installing MMSegmentation's reference environment failed ({' '.join(command)}):\n"
                    f"{(result.stdout + result.stderr)[-4000:]}"
                )
            for junk in ("tests", "yapftests"):  # mmsegmentation's wheel ships a top-level `tests` package
                shutil.rmtree(staging / junk, ignore_errors=True)
            _write_launcher(staging)
            seconds = round(time.monotonic() - started, 1)
            skipped = [package for package in PACKAGES if package not in packages]
            extra = {"wheels": index[-1], "taken_from_interpreter": skipped} if index else {}
            (staging / MARKER).write_text(json.dumps({**expected, "install_seconds": seconds, **extra}, indent=1))
            if site.exists():
                shutil.rmtree(site)
            os.replace(staging, site)
            return cls(site, seconds)

    def environ(self) -> dict[str, str]:
        """The subprocess environment: this one with ``site`` first on PYTHONPATH."""
        path = os.environ.get("PYTHONPATH")
        return {**os.environ, "PYTHONPATH": os.pathsep.join([str(self.site), *([path] if path else [])])}

    def command(self, script: Path | str, *args: str) -> list[str]:
        """The command line :meth:`run` runs (use with :meth:`environ` to run it yourself)."""
        return [sys.executable, "-m", LAUNCHER, str(script), *map(str, args)]

    def run(self, script: Path | str, *args: str, timeout: int = 900, cwd: Path | str | None = None):
        """Run ``python SCRIPT ARGS`` with MMSegmentation importable; returns the
        CompletedProcess (text, stdout and stderr captured). A non-zero exit or a timeout raises
        AssertionError with the tail of stderr."""
        command = self.command(script, *args)
        try:
            result = subprocess.run(
                command, check=False, env=self.environ(), cwd=cwd, capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired as error:
            stderr = error.stderr.decode(errors="replace") if isinstance(error.stderr, bytes) else error.stderr
            raise AssertionError(
                f"{Path(script).name} {' '.join(map(str, args))} timed out after {timeout} s:\n{(stderr or '')[-4000:]}"
            ) from None
        if result.returncode != 0:
            raise AssertionError(
                f"{Path(script).name} {' '.join(map(str, args))} exited {result.returncode}:\n{result.stderr[-4000:]}"
            )
        return result

    @staticmethod
    def last_json(result: subprocess.CompletedProcess) -> dict:
        """The JSON object on the last line of a run's stdout (``reference.py bench`` prints one)."""
        lines = [line for line in result.stdout.splitlines() if line.strip()]
        if not lines:
            raise AssertionError(f"no output; stderr:\n{result.stderr[-4000:]}")
        return json.loads(lines[-1])
