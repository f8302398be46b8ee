"""The two-GPU check: ``torchrun --nproc_per_node 2`` training against one GPU with the same
global batch (the weights each run ends with), and the embedding cache built by one and by two
processes (the rate past each command's startup). Random ViT-B weights, synthetic images.
Writes a JSON report to OUT_DIR/multi_gpu.json.

Run: python benchmarks/multi_gpu.py OUT_DIR  (needs two CUDA GPUs)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from cadsam.data.synthetic import make_synthetic_set
from cadsam.sam import build_sam


def run(command: list[str], gpus: str) -> float:
    start = time.perf_counter()
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpus}
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def cadsam(nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "cadsam"]
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone"]  # torchrun
    return [*run, f"--nproc_per_node={nproc}", "-m", "cadsam"]


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    work = Path("/tmp/multi_gpu")
    data = make_synthetic_set(work / "data", 16, 0, size=256) / "train"
    checkpoint = work / "vit_b.pth"
    torch.manual_seed(0)
    torch.save(build_sam("vit_b").state_dict(), checkpoint)
    report: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}

    # training: one process with batch 4 against two with batch 2, two epochs of 4 steps; the
    # adapter's blocks whole in both (under two processes BatchNorm is SyncBatchNorm, which
    # takes the whole-block path)
    train = ["train", "--method", "cad", "--backbone", "vit_b", "--checkpoint", str(checkpoint)]
    train += ["--images", str(data / "images"), "--masks", str(data / "masks")]
    train += ["--epochs", "2", "--image-size", "256", "--precision", "fp32"]
    train += ["--set", "num_workers=0", "--set", "adapter_tile_mib=0"]
    seconds = {}
    for nproc, batch, gpus in ((1, 4, "0"), (2, 2, "0,1")):
        command = [*cadsam(nproc), *train, "--batch-size", str(batch), "--out"]
        seconds[nproc] = run([*command, str(work / f"train-{nproc}")], gpus)
    one = load_file(str(work / "train-1" / "last.safetensors"))
    two = load_file(str(work / "train-2" / "last.safetensors"))
    assert one.keys() == two.keys()
    floats = [k for k in one if one[k].is_floating_point() and one[k].norm() > 0]
    differences = {k: ((one[k] - two[k]).norm() / one[k].norm()).item() for k in floats}
    worst = max(differences, key=differences.get)
    # a convolution bias right before BatchNorm has a gradient of zero in exact arithmetic:
    # AdamW turns rounding noise into steps of the learning rate's size there
    other = max((k for k in differences if not k.endswith("conv.bias")), key=differences.get)
    whole = torch.cat([one[k].flatten() for k in floats])
    whole_diff = torch.cat([(one[k] - two[k]).flatten() for k in floats])
    report["training"] = {
        "tensors": len(one),
        "worst_tensor": worst,
        "worst_tensor_relative_l2_difference": differences[worst],
        "worst_other_tensor": other,
        "worst_other_tensor_relative_l2_difference": differences[other],
        "all_weights_relative_l2_difference": (whole_diff.norm() / whole.norm()).item(),
        "seconds_one_gpu": round(seconds[1], 1),
        "seconds_two_gpus": round(seconds[2], 1),
    }

    # the cache, by one process and by two. Each command's wall time includes a startup
    # (checkpoint, process group, loader workers) of several seconds, as long as a small
    # build itself: so each is built for two numbers of images, and the rate is the extra
    # images over the extra time. On a RAM disk where there is room: at 2 MiB an image, a
    # machine's disk would limit two GPUs.
    made = sorted((data / "images").iterdir())
    sizes = (1536, 4608)
    folders = {size: work / f"images-{size}" for size in sizes}  # the 16 under new names
    for size, folder in folders.items():
        folder.mkdir(exist_ok=True)
        for i in range(size):
            link = folder / f"{i:05d}.png"
            if not link.exists():
                link.hardlink_to(made[i % len(made)])
    ram = Path("/dev/shm")
    room = ram.is_dir() and shutil.disk_usage(ram).free > 2 * max(sizes) * 2**21
    caches = ram / "cadsam-multi-gpu" if room else work / "caches"
    report["cache"] = {"images": list(sizes), "on": str(caches)}
    for nproc, gpus in ((1, "0"), (2, "0,1")):
        walls = []
        for size, folder in folders.items():
            cache = ["cache", "--backbone", "vit_b", "--checkpoint", str(checkpoint)]
            cache += ["--images", str(folder), "--num-workers", "6", "--batch-size", "32"]
            target = caches / f"cache-{nproc}-{size}"
            walls.append(run([*cadsam(nproc), *cache, "--out", str(target)], gpus))
            shutil.rmtree(target)
        report["cache"][f"seconds_{nproc}_process"] = [round(wall, 1) for wall in walls]
        rate = (sizes[1] - sizes[0]) / (walls[1] - walls[0])
        report["cache"][f"images_per_second_{nproc}_process"] = round(rate, 1)
    one, two = (report["cache"][f"images_per_second_{n}_process"] for n in (1, 2))
    report["cache"]["speedup"] = round(two / one, 2)
    print(json.dumps(report, indent=2))
    (out / "multi_gpu.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
