"""Phase-1 DDP (2 CPU processes, gloo) matches a single process doing the same global batch.

BatchNorm: SyncBatchNorm needs CUDA, so each DDP process normalises with its own half batch.
The single-process reference therefore runs each rank's half batch (chosen with the very
DistributedSampler that DDP uses) through the model separately, averages the two half-batch
losses (what DDP's gradient all-reduce computes) and takes one Adam step. BatchNorm running
statistics: DDP broadcasts rank 0's buffers before every forward, so the reference keeps the
buffers as updated by rank 0's half only. No augmentation (no rotation, centre crop) and the
model has no dropout, so the two runs must agree to float rounding.
"""

from __future__ import annotations

import os
import socket
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils.data import DistributedSampler

from dicom_node_training.checkpoint import load_checkpoint
from dicom_node_training.config import load_config
from dicom_node_training.data import Split, WindowDataset, load_cache_index, save_split, write_cache_entry

WORLD = 2
STEPS = 2


def _config(study_label_weight: float = 0.0):
    c = load_config("tiny", overrides={"seed": 3, "phase1": {"width": 8, "batch_size": 8, "epochs": 1, "lr": 1e-2,
                                                              "rotation_deg": 0.0, "random_crop": False,
                                                              "study_label_weight": study_label_weight}})
    # the single-process reference below reproduces DistributedSampler's shards, so sample windows as they
    # come (the BalancedSampler's own rank sharding is tested in test_training_config.py)
    # a constant learning rate, as the reference step below takes
    return replace(c, phase1=replace(c.phase1, positive_fraction=None, windows_per_epoch=None, level_matched_negatives=0.0,
                                     lr_schedule="constant"),
                   preprocess=replace(c.preprocess, resize=20, crop=16), num_workers=0, device="cpu")


def _write_run(run: Path) -> None:
    """Fixed data: 5 studies x 4 windows in the cache layout, 4 for training, 1 for validation."""
    rng = np.random.default_rng(0)
    cache = run / "cache"
    cache.mkdir(parents=True)
    uids = [f"1.2.3.{i}" for i in range(5)]
    for i, uid in enumerate(uids):
        labels = [0, 1, 0, 1] if i % 2 else [0, 0, 1, 1]
        write_cache_entry(cache, uid, uid + ".1", rng.integers(0, 256, size=(4, 3, 10, 20, 20), dtype=np.uint8),
                          labels, [float((i + k) % 3 == 0) for k in range(9)], {})
    save_split(Split(tuple(uids[:4]), (uids[4],), (), seed=0), run / "split.json")


def _ddp_worker(rank: int, run: str, port: int, study_label_weight: float) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      # gloo otherwise picks its interface from the hostname, which a CI container may not resolve
                      GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    from dicom_node_training.distributed import setup, teardown
    from dicom_node_training.phase1 import train_phase1

    ctx = setup("cpu")
    try:
        train_phase1(_config(study_label_weight), run, ctx, resume=False, progress=False, max_steps=STEPS)
    finally:
        teardown(ctx)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reference(run: Path, study_label_weight: float) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Single process, same global batches, each rank's half forwarded separately (with the
    study-label head and its loss when `study_label_weight` > 0)."""
    from dicom_node_training.models import r3d_18
    from dicom_node_training.phase1 import make_deterministic

    config = _config(study_label_weight)
    torch.set_num_threads(1)
    make_deterministic(config.seed, torch.device("cpu"))
    ds = WindowDataset(load_cache_index(run, [f"1.2.3.{i}" for i in range(4)]), 16, augment=True,
                       seed=config.seed, max_rotation_deg=0.0, random_crop=False, study_labels=True)
    # channels-last 3D tensors, as train_phase1 uses on CPU (the layout changes float rounding, and
    # Adam's normalised first steps magnify rounding differences of near-zero gradients)
    model = r3d_18(num_outputs=1, width=8).to(memory_format=torch.channels_last_3d)
    head = torch.nn.Linear(64, 9) if study_label_weight else None  # made right after the model, as train_phase1 does
    params = [*model.parameters(), *(head.parameters() if head is not None else ())]
    optimizer = torch.optim.Adam(params, lr=config.phase1.lr)
    per_rank = config.phase1.batch_size // WORLD
    orders = []
    for r in range(WORLD):
        s = DistributedSampler(ds, num_replicas=WORLD, rank=r, shuffle=True, seed=config.seed)
        s.set_epoch(0)
        orders.append(list(s))
    model.train()
    for step in range(STEPS):
        optimizer.zero_grad()
        before = {k: v.clone() for k, v in model.named_buffers()}
        for r in reversed(range(WORLD)):  # rank 0 last, so its running statistics are the ones kept
            if r == 0:
                with torch.no_grad():
                    for k, v in model.named_buffers():
                        v.copy_(before[k])
            items = [ds[i] for i in orders[r][step * per_rank:(step + 1) * per_rank]]
            x = torch.stack([a for a, _, _ in items]).contiguous(memory_format=torch.channels_last_3d)
            y = torch.stack([b for _, b, _ in items])
            out = model(x)
            loss = F.binary_cross_entropy_with_logits(out.logit, y.float())
            if head is not None:
                s = torch.stack([c for _, _, c in items])
                loss = loss + study_label_weight * F.binary_cross_entropy_with_logits(head(out.features), s)
            # backward per half (gradients accumulate), so restoring the buffers cannot touch a live graph
            (loss / WORLD).backward()
        optimizer.step()
    return model.state_dict(), (head.state_dict() if head is not None else None)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("study_label_weight", [0.0, 0.5], ids=["window-label", "with-study-head"])
def test_ddp_two_cpu_processes_match_single_process(tmp_path, study_label_weight):
    run_ddp, run_ref = tmp_path / "ddp", tmp_path / "ref"
    _write_run(run_ddp)
    _write_run(run_ref)
    mp.spawn(_ddp_worker, args=(str(run_ddp), _free_port(), study_label_weight), nprocs=WORLD, join=True)

    ck = load_checkpoint(run_ddp / "phase1" / "last.pt")
    assert ck["world_size"] == WORLD and ck["step"] == STEPS
    ddp_state = ck["model"]
    ref_state, ref_head = _reference(run_ref, study_label_weight)
    if ref_head is None:
        assert "study_head" not in ck
    else:
        for k, v in ref_head.items():
            assert torch.allclose(ck["study_head"][k], v, atol=1e-4), k
    assert set(ddp_state) == set(ref_state)
    diffs = {k: float((ddp_state[k].double() - ref_state[k].double()).abs().max()) for k in ref_state}
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] < 1e-4, f"{worst} differs by {diffs[worst]:.2e}"

    # the comparison is not vacuous: training moved the weights away from their initialisation
    from dicom_node_training.models import r3d_18

    torch.manual_seed(3)
    fresh = r3d_18(num_outputs=1, width=8).state_dict()
    moved = max(float((fresh[k].double() - ref_state[k].double()).abs().max()) for k in ref_state if k.endswith("weight"))
    assert moved > 1e-2  # 100x the tolerance above
