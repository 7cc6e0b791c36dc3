"""Problem generators shared by the tests (the benchmark's own, so both see the same problems)."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys

from vit_rerank.bench.ot import synthetic_problem


def patch_problem(Q: int, K: int, n: int = 49, m: int = 49, dim: int = 32, spread: float = 0.8, seed: int = 0):
    """Similarities ``(Q, K, n, m)`` of clustered unit vectors and random marginals, in fp32."""
    return synthetic_problem(Q, K, n=n, m=m, dim=dim, spread=spread, seed=seed)


def run_cli(*args: str, check: bool = True, in_process: bool = True) -> subprocess.CompletedProcess:
    """Run ``vit-rerank ARGS``: in this process by default (the same ``main`` the console script
    calls, without paying a Python + torch start-up per command), or as ``python -m vit_rerank``.

    Either way the result is a :class:`subprocess.CompletedProcess` with the exit code, stdout and
    stderr; ``check`` raises :class:`subprocess.CalledProcessError` on a non-zero exit.
    """
    argv = [str(a) for a in args]
    if not in_process:
        return subprocess.run([sys.executable, "-m", "vit_rerank", *argv], capture_output=True, text=True,
                              timeout=900, check=check)
    from vit_rerank.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exit_:  # argparse's usage errors
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 2)
    result = subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())
    if check and code:
        raise subprocess.CalledProcessError(code, argv, result.stdout, result.stderr)
    return result


def build_tiny_index(folder, photos, *options: str):
    """``index build FOLDER`` of ``photos`` (labelled by their parent folders) with the tiny random ViT, through
    the CLI; ``options`` are more build flags. Returns the index folder."""
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    listing = folder / "gallery.csv"
    listing.write_text("path,label\n" + "".join(f"{p},{p.parent.name}\n" for p in photos))
    index = folder / "index"
    run_cli("index", "build", str(index), "--from", str(listing), "--model", "test_vit", "--weights", "random",
            "--no-progress", "--workers", "0", *options)
    return index
