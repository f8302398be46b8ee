"""Equality checks of the fast paths on a CUDA GPU (the CPU suite checks them on CPU).

Ran on the API before cadsam.fast.runtime (runtime options as build_model keywords): kept
for reference until tests/gpu/ covers these checks.

Run: python benchmarks/experiments/gpu_checks.py  (prints one JSON object; exits 1 if a check fails)
"""

from __future__ import annotations

import copy
import json
import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from cadsam import build_model
from cadsam.methods.cad import ConvAdapter
from cadsam.sam.image_encoder import Attention


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def attention_check(dtype: torch.dtype) -> dict:
    """ViT-B's global attention (64 x 64 tokens, 12 heads): fused vs plain, values and grads."""
    torch.manual_seed(0)
    plain = Attention(768, 12, (64, 64), fused=False).cuda()
    with torch.no_grad():
        plain.rel_pos_h.normal_(0, 0.5)
        plain.rel_pos_w.normal_(0, 0.5)
    fused = copy.deepcopy(plain)
    fused.fused = True
    x = torch.randn(2, 64, 64, 768, device="cuda")
    out = {}
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        a, b = plain(x1), fused(x2)
        (a.float().square().mean()).backward()
        (b.float().square().mean()).backward()
    out["forward_rel_err"] = rel_err(b, a)
    out["input_grad_rel_err"] = rel_err(x2.grad, x1.grad)
    out["rel_pos_grad_rel_err"] = rel_err(fused.rel_pos_h.grad, plain.rel_pos_h.grad)
    backends = {}
    for name, backend in [
        ("efficient", SDPBackend.EFFICIENT_ATTENTION),
        ("flash", SDPBackend.FLASH_ATTENTION),
        ("cudnn", SDPBackend.CUDNN_ATTENTION),
    ]:
        try:
            with (
                sdpa_kernel(backend),
                torch.no_grad(),
                torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32),
            ):
                backends[name] = rel_err(fused(x), a.detach())
        except RuntimeError as exc:
            backends[name] = f"unavailable: {str(exc).splitlines()[0][:80]}"
    out["backends"] = backends
    return out


def cad_adapter_check(precision: str, **options) -> dict:
    """CAD's adapter at the bench's size (batch 4, 512 x 512) with a memory-saving path
    against the plain one, and both against the plain one in float64; fp32 with TF32 off,
    so only the arithmetic's order differs. (Float32 rounding is amplified by the LeakyReLU's
    kinks and BatchNorm's sums over a million values: the two paths are compared through
    their distances to float64.)"""
    torch.manual_seed(1)
    plain = ConvAdapter(64, tile_mib=0).cuda()
    saving = ConvAdapter(64, **options).cuda()
    exact = ConvAdapter(64, tile_mib=0).cuda().double()
    saving.load_state_dict(plain.state_dict())
    exact.load_state_dict(plain.state_dict())
    images = torch.rand(4, 3, 512, 512, device="cuda") * 255
    upstream = torch.randn(4, 256, 64, 64, device="cuda")
    outputs = []
    tf32, torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.allow_tf32, False
    for adapter in (plain, saving, exact):
        autocast = precision == "bf16" and adapter is not exact
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            x = adapter.adapter_input(images)
            out = adapter.forward_from_input(x.double() if adapter is exact else x)
        out.backward(upstream.to(out.dtype))
        outputs.append(out.double())
    torch.backends.cudnn.allow_tf32 = tf32

    # Over the whole gradient vector: some entries are zero in exact arithmetic (a conv bias
    # right before BatchNorm), so per-tensor relative errors would compare noise with noise.
    def grads(adapter: ConvAdapter) -> torch.Tensor:
        return torch.cat([p.grad.double().flatten() for p in adapter.parameters()])

    stats = max(
        rel_err(b, a)
        for a, b in zip(plain.buffers(), saving.buffers(), strict=True)
        if a.is_floating_point()
    )
    return {
        "output_rel_err": rel_err(outputs[1], outputs[0]),
        "adapter_grad_rel_err": rel_err(grads(saving), grads(plain)),
        "running_stats_rel_err": stats,
        "plain_to_float64": {
            "output": rel_err(outputs[0], outputs[2]),
            "grad": rel_err(grads(plain), grads(exact)),
        },
        "saving_to_float64": {
            "output": rel_err(outputs[1], outputs[2]),
            "grad": rel_err(grads(saving), grads(exact)),
        },
        # per weight (biases left out, see above): (plain, saving) distance to float64
        "weights_to_float64": {
            name: (rel_err(a.grad.double(), e.grad), rel_err(b.grad.double(), e.grad))
            for (name, a), b, e in zip(
                plain.named_parameters(), saving.parameters(), exact.parameters(), strict=True
            )
            if not name.endswith("bias")
        },
    }


def as_close_as_plain(check: dict, slack: float = 2.0) -> bool:
    """The saving path is no further from float64 than ``slack`` times the plain path."""
    plain, saving = check["plain_to_float64"], check["saving_to_float64"]
    return all(saving[k] <= slack * plain[k] + 1e-6 for k in ("output", "grad"))


@torch.no_grad()
def compiled_encoder_check() -> dict:
    torch.manual_seed(2)
    eager = build_model("decoder", "vit_b", encoder_chunk=0).cuda()
    compiled = build_model("decoder", "vit_b", encoder_chunk=0, compile_encoder=True).cuda()
    compiled.load_state_dict(eager.state_dict())
    images = torch.rand(2, 3, 512, 512, device="cuda") * 255
    return {
        "embedding_rel_err": rel_err(
            compiled.frozen_embeddings(images), eager.frozen_embeddings(images)
        )
    }


if __name__ == "__main__":
    report = {
        "compiled_encoder_fp32": compiled_encoder_check(),
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "attention_fp32": attention_check(torch.float32),
        "attention_bf16": attention_check(torch.bfloat16),
        "cad_checkpoint_fp32": cad_adapter_check("fp32", tile_mib=0, checkpoint_blocks=True),
        "cad_banded_fp32": cad_adapter_check("fp32", tile_mib=64),
        "cad_banded_bf16": cad_adapter_check("bf16", tile_mib=64),
    }
    print(json.dumps(report, indent=2))
    ok = (
        report["attention_fp32"]["forward_rel_err"] < 1e-4
        and report["attention_fp32"]["input_grad_rel_err"] < 1e-3
        and report["attention_bf16"]["forward_rel_err"] < 5e-2
        and report["cad_checkpoint_fp32"]["adapter_grad_rel_err"] < 1e-3
        and as_close_as_plain(report["cad_banded_fp32"])
        and as_close_as_plain(report["cad_banded_bf16"])
        and report["cad_banded_fp32"]["running_stats_rel_err"] < 1e-5
    )
    sys.exit(0 if ok else 1)
