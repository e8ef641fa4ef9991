"""Partial loading: bytes read and peak memory of loading a quarter of the experts vs all of them.

Writes a checkpoint of the real transformers DeepSeek-V2 class in its original
per-expert safetensors layout, random weights in bfloat16, with DeepSeek-V2-Lite's
expert shape (hidden 2048, expert width 1408: 17 MB per expert) but only 16 routed
experts in 2 MoE layers, plus an FP8 block copy of it. Each mode loads in a fresh
process, with the checkpoint evicted from the page cache first (posix_fadvise
DONTNEED), and measures:

- ``reader``: bytes the moebench reader materialised from the files (its own count);
- ``from disk``: bytes of the checkpoint files resident in the page cache after the
  load (mincore): what the kernel actually read, readahead included;
- ``io read``: the process's storage reads (/proc/self/io read_bytes);
- ``weights``: bytes of the loaded model's weights as stored (the size metric's count);
- ``peak``: the process's peak resident memory during the load alone (VmHWM, reset
  through /proc/self/clear_refs just before loading, after the imports).

``quarter-nf4`` also stores the kept routed experts in 4 bits (bitsandbytes NF4, the
``bnb_4bit`` method's storage) after loading them.

Experts are large on purpose: the kernel reads ahead around every page fault of a
memory-mapped file (``read_ahead_kb``, 8 MB on the machine measured), so the gaps
between kept experts must exceed that for skipped experts to stay unread.

    python bench/partial_load.py [--experts 16] [--layers 3] [--hidden 2048] [--inter 1408]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import subprocess
import sys
import tempfile
from pathlib import Path

MODES = ("transformers", "full", "quarter", "full-fp8", "quarter-fp8", "quarter-nf4")


def make(folder: Path, args) -> None:
    import torch
    import transformers
    from moebench import zoo

    config = zoo.config(
        "deepseek_v2",
        num_hidden_layers=args.layers,
        hidden_size=args.hidden,
        moe_intermediate_size=args.inter,
        n_routed_experts=args.experts,
        intermediate_size=2 * args.hidden,
        dtype="bfloat16",
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    zoo.tokenizer().save_pretrained(folder)


def evict(folder: Path) -> None:
    for file in folder.glob("*.safetensors"):
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_bytes(folder: Path) -> int:
    """Bytes of the checkpoint files in the page cache (mincore over a fresh read-only mapping)."""
    import numpy as np

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte))
    page = os.sysconf("SC_PAGE_SIZE")
    total = 0
    for file in folder.glob("*.safetensors"):
        size = file.stat().st_size
        with open(file, "rb") as fh, mmap.mmap(fh.fileno(), size, prot=mmap.PROT_READ) as mm:
            view = np.frombuffer(mm, dtype=np.uint8)  # no copy, no page touched: just the address
            vec = (ctypes.c_ubyte * ((size + page - 1) // page))()
            if libc.mincore(view.ctypes.data, size, vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore failed")
            total += sum(v & 1 for v in vec) * page
            del view
    return total


def io_read_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


def peak_reset() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def peak_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child(mode: str, folder: Path, fp8: Path, keep_fraction: float) -> dict:
    """One measurement, in this (fresh) process."""
    import torch
    from moebench import checkpoint as ck
    from moebench import models
    from moebench.plugins import host

    host()  # plugins imported before the measurement starts
    path = fp8 if mode.endswith("fp8") else folder
    skel, _ = ck.skeleton(path, dtype=torch.bfloat16)
    step = round(1 / keep_fraction)
    keep = {b.layer: list(range(0, b.num_experts, step)) for b in skel.blocks()} if mode.startswith("quarter") else None
    del skel
    evict(path)
    io0 = io_read_bytes()
    peak_reset()
    rss0 = peak_bytes()
    out = {"mode": mode}
    if mode == "transformers":
        moe = models.load(str(path), dtype="bfloat16")
        out.update(experts=sum(moe.expert_counts().values()), reader_bytes=None)
    else:
        moe, report = ck.load(path, keep=keep, dtype="bfloat16")
        out.update(experts=report.experts_kept, reader_bytes=report.bytes_read)
        if mode.endswith("nf4"):  # the kept experts stored in 4 bits (the bnb_4bit method's storage)
            from moebench.method import Context

            method = host().method("bnb_4bit")()
            method.apply(moe, method.Params(), Context())
    out["peak_bytes"] = peak_bytes() - rss0
    out["io_read_bytes"] = io_read_bytes() - io0
    out["from_disk_bytes"] = resident_bytes(path)
    from moebench_plugins.metrics import weight_bytes

    out["weight_bytes"] = weight_bytes(moe.model)
    with torch.no_grad():  # the loaded model runs
        moe.model(input_ids=torch.zeros(1, 8, dtype=torch.long))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=1408)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--keep", type=float, default=0.25, help="fraction of experts kept by the partial modes")
    ap.add_argument("--dir", help="keep (and reuse) the checkpoints in this folder instead of a temporary one")
    ap.add_argument("--child", nargs=3, metavar=("MODE", "FOLDER", "FP8"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        mode, folder, fp8 = args.child
        print(json.dumps(child(mode, Path(folder), Path(fp8), args.keep)))
        return

    from moebench import checkpoint as ck

    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/var/tmp")) as tmp:
        root = Path(args.dir) if args.dir else Path(tmp)
        folder, fp8 = root / "ckpt", root / "ckpt-fp8"
        if not (folder / "config.json").exists():
            make(folder, args)
            ck.write_fp8(folder, fp8)
        read_ahead = _read_ahead(folder)
        size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        size8 = sum(f.stat().st_size for f in fp8.glob("*.safetensors"))
        print(
            f"checkpoint: deepseek_v2 class, {args.layers} layers ({args.layers - 1} MoE) x {args.experts} routed experts, "
            f"hidden {args.hidden}, expert width {args.inter}; {size / 2**20:.1f} MiB bfloat16, FP8 copy {size8 / 2**20:.1f} MiB"
        )
        rows = []
        for mode in MODES:
            res = subprocess.run(
                [sys.executable, __file__, "--keep", str(args.keep), "--child", mode, str(folder), str(fp8)],
                capture_output=True,
                text=True,
                check=False,
            )
            if res.returncode != 0:
                print(res.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"mode {mode} failed")
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    mib = lambda b: "–" if b is None else f"{b / 2**20:.1f}"
    print(f"read_ahead_kb of the checkpoint's disk: {read_ahead}")
    print("| mode | experts kept | reader MiB | from disk MiB | io read MiB | weights MiB | peak during load MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['mode']} | {r['experts']} | {mib(r['reader_bytes'])} | {mib(r['from_disk_bytes'])} | {mib(r['io_read_bytes'])} "
            f"| {mib(r['weight_bytes'])} | {mib(r['peak_bytes'])} |"
        )


def _read_ahead(path: Path) -> str:
    """read_ahead_kb of the block device holding ``path`` (its parent disk for a partition)."""
    st = os.stat(path)
    dev = Path(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}").resolve()
    for d in (dev, dev.parent):
        f = d / "queue" / "read_ahead_kb"
        if f.exists():
            return f"{d.name} {f.read_text().strip()} KB"
    return "unknown"

if __name__ == "__main__":
    main()
