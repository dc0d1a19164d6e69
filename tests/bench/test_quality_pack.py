"""bench/quality_runs.slim_moments: a resume file's AdamW moments carried in bf16, restored to fp32 on resume."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from bench.quality_runs import slim_moments


def _checkpoint(path: Path) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 8)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 16)).square().mean().backward()
        opt.step()
    torch.save({"state_dict": model.state_dict(), "optimizer": opt.state_dict(), "optimizer_format": "torch",
                "resume": {"best_state_dict": model.state_dict()}}, path)
    (path.parent / "bench.json").write_text(json.dumps({"calls": [{"outcome": "interrupted"}]}))
    return model, opt


def test_moments_travel_in_bf16_and_resume_as_fp32(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    model, opt = _checkpoint(path)
    before = path.stat().st_size
    slim_moments(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    moments = [s[k] for s in ckpt["optimizer"]["state"].values() for k in ("exp_avg", "exp_avg_sq")]
    assert all(m.dtype == torch.bfloat16 for m in moments)
    assert all(v.dtype == torch.float32 for v in ckpt["state_dict"].values())  # the weights stay exact
    assert all(v.dtype == torch.float32 for v in ckpt["resume"]["best_state_dict"].values())
    assert path.stat().st_size < before
    assert json.loads((tmp_path / "bench.json").read_text())["moments_bf16"] == [1]

    resumed = torch.optim.AdamW(model.parameters(), lr=1e-2)
    resumed.load_state_dict(ckpt["optimizer"])
    for p in model.parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            got, want = resumed.state[p][key], opt.state[p][key]
            assert got.dtype == torch.float32
            torch.testing.assert_close(got, want, rtol=2 ** -8, atol=0)

    slim_moments(path)  # already bf16: nothing rewritten, nothing recorded twice
    assert json.loads((tmp_path / "bench.json").read_text())["moments_bf16"] == [1]
