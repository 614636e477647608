"""Phase-1 training throughput (windows/s) of the real training loop at a preset's settings.

    .venv/bin/python benchmarks/phase1_throughput.py --out /tmp/p1tp                    # paper preset
    .venv/bin/python benchmarks/phase1_throughput.py --out /tmp/p1tp --preset tiny --steps 40
    python3 benchmarks/phase1_throughput.py --out /tmp/p1tp --compare-fp32 --workers 12  # on a GPU

It writes a synthetic on-disk cache in the format `dicom-node-train cache` writes (uint8 windows
of the preset's resize, random content and labels: the speed of a training step does not depend
on them), then runs `dicom_node_training.phase1.train_phase1` itself, unchanged, for `--epochs` epochs of
`--steps` optimiser steps each (the preset's batch size, crop and rotation augmentation, Adam,
mixed precision on CUDA when the preset asks for it, the DataLoader with `--workers` workers).
Each epoch's `train_windows_per_s` (training part only, validation excluded) is printed; the
first epoch includes warm-up, so the figure reported is the best of the later epochs.
`--compare-fp32` repeats the run with mixed precision off (a ratio measured in the same run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_synthetic_cache(run: Path, *, studies: int, windows: int, resize: int, slices: int, preprocess: dict,
                          seed: int = 0) -> None:
    """RUN/cache/<uid>.npy + .json and RUN/split.json: all studies but two train, two validate."""
    from dicom_node_training.data import Split, save_split, write_cache_entry

    rng = np.random.default_rng(seed)
    cache = run / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    uids = [f"1.2.826.0.1.3680043.10.1.{i}" for i in range(studies)]
    for uid in uids:
        arr = rng.integers(0, 256, size=(windows, 3, slices, resize, resize), dtype=np.uint8)
        write_cache_entry(cache, uid, uid + ".1", arr, rng.random(windows) < 0.3, [0.0] * 9, preprocess)
    save_split(Split(train=tuple(uids[:-2]), validation=tuple(uids[-2:]), test=(), seed=seed), run / "split.json")


def measure(preset: str, run: Path, *, epochs: int, steps: int, workers: int, amp: bool, device: str,
            batch_size: int | None = None) -> list[dict]:
    from dicom_node_training.config import load_config
    from dicom_node_training.phase1 import train_phase1

    cfg = load_config(preset)
    batch = batch_size or cfg.phase1.batch_size
    p1 = replace(cfg.phase1, epochs=epochs, batch_size=batch, windows_per_epoch=steps * batch)
    cfg = replace(cfg, phase1=p1, num_workers=workers, amp=amp, device=device)
    shutil.rmtree(run / "phase1", ignore_errors=True)
    result = train_phase1(cfg, run, resume=False, progress=False)
    return result["history"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="work folder (synthetic cache and checkpoints; reused)")
    p.add_argument("--preset", default="paper", choices=("paper", "tiny"))
    p.add_argument("--epochs", type=int, default=3, help="epochs to run; the first counts as warm-up (default 3)")
    p.add_argument("--steps", type=int, default=50, help="optimiser steps per epoch (default 50)")
    p.add_argument("--studies", type=int, default=12, help="synthetic studies in the cache (default 12)")
    p.add_argument("--windows", type=int, default=24, help="windows per synthetic study (default 24)")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: the preset's)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    p.add_argument("--batch-size", type=int, default=None,
                   help="phase-1 batch size (default: the preset's; the paper's is 16); the learning rate is not changed")
    p.add_argument("--compare-fp32", action="store_true", help="also run with mixed precision off (CUDA)")
    args = p.parse_args(argv)
    if args.epochs < 2:
        p.error("--epochs must be at least 2: the first epoch is warm-up")

    import torch

    from dicom_node.log import configure_logging
    from dicom_node_training.config import load_config
    from dicom_node_training.data import cache_stamp

    configure_logging(level="WARNING")
    cfg = load_config(args.preset)
    pp = cfg.preprocess
    workers = cfg.num_workers if args.workers is None else args.workers
    want = cache_stamp(pp)
    marker = args.out / "synthetic.json"
    spec = {"studies": args.studies, "windows": args.windows, "preprocess": want}
    if not (marker.is_file() and json.loads(marker.read_text()) == spec):
        shutil.rmtree(args.out / "cache", ignore_errors=True)
        write_synthetic_cache(args.out, studies=args.studies, windows=args.windows, resize=pp.resize,
                              slices=pp.window_slices, preprocess=want)
        marker.write_text(json.dumps(spec))
    dev = "cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device)
    gpu = torch.cuda.get_device_name(0) if dev.startswith("cuda") else "none"
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, GPU {gpu}; torch {torch.__version__}")
    print(f"preset {args.preset}: width {cfg.phase1.width}, batch {args.batch_size or cfg.phase1.batch_size}, windows 3x{pp.window_slices}x"
          f"{pp.crop}x{pp.crop} (random crop of {pp.resize}, rotation +-{cfg.phase1.rotation_deg} deg), Adam lr "
          f"{cfg.phase1.lr}; {args.steps} steps x {args.epochs} epochs, {workers} loader workers, device {dev}")
    first = "amp" if cfg.amp and dev.startswith("cuda") else "fp32"
    runs = [(first, cfg.amp)]
    if args.compare_fp32 and first == "amp":
        runs.append(("fp32", False))
    best = {}
    for name, amp in runs:
        hist = measure(args.preset, args.out, epochs=args.epochs, steps=args.steps, workers=workers, amp=amp, device=dev,
                       batch_size=args.batch_size)
        per_epoch = [h["train_windows_per_s"] for h in hist]
        best[name] = max(per_epoch[1:])
        print(f"  {name}: windows/s per epoch {per_epoch} (epoch 1 = warm-up); best after warm-up {best[name]:.1f}; "
              f"epoch seconds incl. validation {[h['seconds'] for h in hist]}")
        if dev.startswith("cuda"):
            print(f"  {name}: peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
            torch.cuda.reset_peak_memory_stats()
    if "amp" in best and "fp32" in best:
        print(f"  mixed precision / fp32 throughput: {best['amp'] / best['fp32']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
