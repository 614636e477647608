"""Time and peak memory of one 32-window study: onnxruntime (the node's Predictor) vs torch eager.

    .venv/bin/python benchmarks/inference.py                 # paper-size and tiny models
    .venv/bin/python benchmarks/inference.py --models tiny --repeats 5
    .venv/bin/python benchmarks/inference.py --models paper --repeats 1 --compare-conv3d

Stage 1 is exported with every Conv3d rewritten as Conv2d (`dicom_node_export.conv_rewrite`, the bundle
default); `--compare-conv3d` also times a bundle exported with plain Conv3d ("ort-cpu-conv3d")
in the same run.

Models have random weights (timing does not depend on them): "paper" is R3D-18 width 64 on
3 x 10 x 192 x 192 windows + TCN (128 channels); "tiny" is the tiny preset (width 16, 56 x 56
crops, 64 channels). Each engine runs in its own subprocess so its peak RSS is its own. Per study:
stage 1 over 32 windows in batches of 8 (features, logit, CAM heatmap), the fixed-length
sequence, stage 2. torch runs eager under no_grad with the same batching; onnxruntime runs
through `dicom_node.model.inference.Predictor`. CUDA is timed when onnxruntime offers it ("ort-cuda"), and
torch eager on the GPU ("torch-cuda") when torch sees one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = {
    # name: (width, hidden, resize, crop)
    "paper": (64, 128, 224, 192),
    "tiny": (16, 64, 64, 56),
}
N_WINDOWS = 32
BATCH = 8


def _preprocess(name: str):
    from dicom_node.imaging.preprocess import PreprocessConfig

    _, _, resize, crop = MODELS[name]
    return replace(PreprocessConfig(), resize=resize, crop=crop)


def _models(name: str):
    import torch

    from dicom_node_training.models import r3d_18, sequence_model

    width, hidden, _, _ = MODELS[name]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m1 = r3d_18(width=width)
    return m1.eval(), sequence_model(in_features=8 * width, hidden=hidden).eval()


def random_windows(cfg, n: int = 0):
    """`n` windows (default N_WINDOWS; a Shi bundle's slab count when `cfg.slabs`) of random values with `cfg`'s
    window size, channels (one per HU window) and crop, and a geometry that covers them: timing does not depend on
    the values (also used by triton_inference.py)."""
    from dicom_node.imaging.preprocess import Geometry, Windows

    ws, size, crop = cfg.window_slices, cfg.resize, cfg.crop
    n = cfg.slabs or n or N_WINDOWS
    off = (size - crop) // 2
    g = Geometry(original_shape=(n * ws, size, size), original_spacing_mm=(1.0, 1.0, 1.0),
                 resampled_shape=(n * ws, size, size), lung_box=(0, n * ws, 0, size, 0, size), resize=size,
                 crop=crop, crop_offset=(off, off), window_slices=ws, n_windows=n)
    arr = np.random.default_rng(0).random((n, len(cfg.hu_windows), ws, crop, crop), dtype=np.float32)
    idx = g.window_slice_indices()
    return Windows(array=arr, series_instance_uid="1.2.3", slice_uids=tuple(tuple(str(i) for i in w) for w in idx),
                   geometry=g, config=cfg, slice_indices=idx)


def _rss_mb() -> float:
    """Peak resident set of this process (VmHWM; ru_maxrss would carry the parent's peak over exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def worker(engine: str, name: str, bundle: str, repeats: int, threads_opt: int | None = None) -> dict:
    windows = random_windows(_preprocess(name))
    base = _rss_mb()
    if engine in ("torch", "torch-cuda"):
        import torch

        from dicom_node.model.sequence import to_fixed_length
        from dicom_node_training.models import cam

        dev = torch.device("cuda" if engine == "torch-cuda" else "cpu")
        m1, m2 = (m.to(dev) for m in _models(name))

        def run_once():
            with torch.no_grad():
                x = torch.from_numpy(windows.array).to(dev)
                feats = []
                for i in range(0, len(x), BATCH):
                    out = m1(x[i:i + BATCH])
                    cam(out.activations, m1.fc.weight[0])
                    feats.append(out.features)
                seq = to_fixed_length(torch.cat(feats).cpu().numpy())
                m2(torch.from_numpy(seq.x)[None].to(dev), torch.from_numpy(seq.mask)[None].to(dev))
                if dev.type == "cuda":
                    torch.cuda.synchronize()
        threads = torch.get_num_threads()
    else:
        from dicom_node.model.inference import Predictor

        providers = ("CUDAExecutionProvider",) if engine == "ort-cuda" else ("CPUExecutionProvider",)
        pred = Predictor(bundle, providers=providers, require_gpu=engine == "ort-cuda", batch_size=BATCH,
                         precision="fp32", intra_op_threads=threads_opt)

        def run_once():
            pred.predict(windows)
        threads = threads_opt or os.cpu_count()
    run_once()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run_once()
        times.append(time.perf_counter() - t0)
    return {"engine": engine, "model": name, "median_s": statistics.median(times), "min_s": min(times),
            "times_s": times, "peak_rss_mb": _rss_mb(), "rss_before_model_mb": base, "threads": threads}


def _build_bundle(name: str, out: Path, conv_rewrite: str | None = "gather") -> None:
    from dicom_node_export.bundle import write_bundle

    m1, m2 = _models(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_bundle(m1, m2, out, name=f"bench-{name}", version="0", preprocess=_preprocess(name),
                     sequence_length=40, metrics={"data": "random weights"}, parity_batches=(1, 2),
                     stage1_conv_rewrite=conv_rewrite)


def _spawn(engine: str, name: str, bundle: Path, repeats: int, threads: int | None = None) -> dict:
    cmd = [sys.executable, __file__, "--worker", engine.removesuffix("-conv3d"), "--models", name,
           "--bundle", str(bundle), "--repeats", str(repeats)]
    if threads:
        cmd += ["--intra-op-threads", str(threads)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        raise RuntimeError(f"{engine}/{name} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="paper,tiny", help="comma-separated: paper, tiny")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per engine after one warm-up (median reported)")
    p.add_argument("--compare-conv3d", action="store_true",
                   help="also time stage 1 exported with plain Conv3d (no Conv2d rewrite) in the same run")
    p.add_argument("--intra-op-threads", type=int, default=None,
                   help="onnxruntime intra-op threads (default: onnxruntime's choice, all cores)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--bundle", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        from dicom_node.log import configure_logging

        configure_logging(level="WARNING")
        print(json.dumps(worker(args.worker, args.models, args.bundle, args.repeats, args.intra_op_threads)))
        return 0

    import onnxruntime as ort

    cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    import torch

    torch_cuda = torch.cuda.is_available()  # torch eager on the GPU: the paper model's GPU time without onnxruntime-gpu
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, {platform.platform()}; "
          f"onnxruntime {ort.__version__} providers {ort.get_available_providers()}")
    print(f"study: {N_WINDOWS} windows, stage-1 batch {BATCH}, random weights; median of {args.repeats} after a warm-up")
    print(f"load average at start: {os.getloadavg()[0]:.2f} (1 min) on {os.cpu_count()} cores")
    for name in args.models.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            bundle = Path(tmp) / "bundle"
            _build_bundle(name, bundle)
            res = {e: _spawn(e, name, bundle, args.repeats, args.intra_op_threads) for e in ("ort-cpu", "torch")}
            if args.compare_conv3d:
                plain = Path(tmp) / "bundle-conv3d"
                _build_bundle(name, plain, conv_rewrite=None)
                res["ort-cpu-conv3d"] = _spawn("ort-cpu-conv3d", name, plain, args.repeats, args.intra_op_threads)
            if cuda:
                res["ort-cuda"] = _spawn("ort-cuda", name, bundle, args.repeats)
            if torch_cuda:
                res["torch-cuda"] = _spawn("torch-cuda", name, bundle, args.repeats)
        width, _, _, crop = MODELS[name]
        print(f"\n[{name}] width {width}, windows 3x10x{crop}x{crop}")
        for e, r in res.items():
            print(f"  {e:9s} {r['median_s'] * 1000:9.1f} ms/study (min {r['min_s'] * 1000:.1f})  "
                  f"peak RSS {r['peak_rss_mb']:.0f} MB (before model {r['rss_before_model_mb']:.0f} MB)")
        ratio = res["torch"]["median_s"] / res["ort-cpu"]["median_s"]
        print(f"  onnxruntime CPU is {ratio:.2f}x the speed of torch eager (goal >= 1.1x)")
        if "ort-cpu-conv3d" in res:
            r3 = res["torch"]["median_s"] / res["ort-cpu-conv3d"]["median_s"]
            print(f"  onnxruntime CPU with plain Conv3d is {r3:.2f}x the speed of torch eager")
        print(f"  load average after this model: {os.getloadavg()[0]:.2f} (1 min), {os.getloadavg()[1]:.2f} (5 min)")
        if not cuda:
            print("  onnxruntime offers no CUDAExecutionProvider here: the node's GPU path is not timed"
                  + (" (torch-cuda above is torch eager on the GPU)" if torch_cuda else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
