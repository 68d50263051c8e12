"""Benchmark: how long the book takes to build, notebook by notebook.

    python benchmarks/book_build.py --cold     # clean copy of the tracked files, empty model cache, strict build
    python benchmarks/book_build.py            # the times recorded by the last build of this checkout

``--cold`` copies the files git tracks into a temporary folder, points ``DDPM_CACHE`` at an empty folder (so every
model is trained), runs ``jupyter-book build . -W -n --keep-going`` there, then builds again with nothing changed.
It prints the cold build's wall time, the execution time of every notebook as jupyter-cache recorded it, and the
time of the rebuild, and writes them to ``benchmarks/results/book_build.json``. Without ``--cold`` it prints the
execution times stored in ``_build/.jupyter_cache`` by the last build.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def notebook_times(book: Path) -> dict[str, float]:
    """Execution seconds of each notebook's latest cache record in ``book/_build/.jupyter_cache``."""
    from jupyter_cache import get_cache

    cache_path = book / "_build" / ".jupyter_cache"
    if not cache_path.is_dir():
        raise SystemExit(f"no execution cache at {cache_path}: build the book first (make book), or pass --cold")
    latest: dict[str, tuple] = {}
    for record in get_cache(str(cache_path)).list_cache_records():
        name = Path(record.uri).relative_to(book).as_posix() if Path(record.uri).is_relative_to(book) else record.uri
        if name not in latest or record.created > latest[name][0]:
            latest[name] = (record.created, float(record.data.get("execution_seconds", float("nan"))))
    return {name: seconds for name, (_, seconds) in sorted(latest.items())}


def build(book: Path, env: dict) -> float:
    start = time.perf_counter()
    exe = shutil.which("jupyter-book", path=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    if exe is None:
        raise SystemExit("jupyter-book is not installed: run make install")
    done = subprocess.run([exe, "build", str(book), "-W", "-n", "--keep-going"],
                          cwd=book, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        print(done.stdout[-4000:], file=sys.stderr)
        raise SystemExit(f"the book build failed (exit {done.returncode}); its log ends above")
    return seconds


def print_times(times: dict[str, float]) -> None:
    width = max(len(name) for name in times)
    for name, seconds in times.items():
        print(f"  {name:<{width}}  {seconds:7.1f} s  ({seconds / 60:.1f} min)")
    print(f"  {'all notebooks':<{width}}  {sum(times.values()):7.1f} s  ({sum(times.values()) / 60:.1f} min)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cold", action="store_true", help="build a clean copy with an empty model cache")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copy (its path is printed)")
    args = parser.parse_args()
    if not args.cold:
        print("notebook execution times of the last build of this checkout:")
        print_times(notebook_times(ROOT))
        return 0

    work = Path(tempfile.mkdtemp(prefix="ddpm-book-"))
    book, cache = work / "book", work / "cache"
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, check=True, stdout=subprocess.PIPE, text=True).stdout.split()
    for name in files:
        target = book / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target)
    cache.mkdir()
    env = {**os.environ, "DDPM_CACHE": str(cache), "DDPM_PROGRESS": "0"}
    print(f"cold build of {len(files)} tracked files in {book} (model cache {cache}) ...", flush=True)
    cold = build(book, env)
    times = notebook_times(book)
    print(f"cold strict build: {cold:.0f} s ({cold / 60:.1f} min)")
    print_times(times)
    rebuild = build(book, env)
    print(f"rebuild with nothing changed: {rebuild:.0f} s")

    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {"cold_build_s": round(cold, 1), "rebuild_s": round(rebuild, 1),
              "notebooks_s": {k: round(v, 1) for k, v in times.items()}, "cpu_count": os.cpu_count(),
              "profile": os.environ.get("DDPM_PROFILE", "auto")}
    (RESULTS / "book_build.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS / 'book_build.json'}")
    if args.keep:
        print(f"kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
