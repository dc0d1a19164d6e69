"""RQ-VAE (TIGER, Rajput et al. 2023; OneRec): an MLP autoencoder whose latent is residual-quantized.

x (fused item vector) -> encoder MLP -> z -> L levels of nearest-codeword quantization on the residual
-> z_q (straight-through) -> decoder MLP -> x_hat.

loss = ||x - x_hat||^2 + sum_l ( ||sg[r_l] - e_l||^2 + beta * ||r_l - sg[e_l]||^2 )

Codebooks start from k-means on the residuals of the initial encoder (so none start dead), and any code
unused for a whole epoch is reset to a random residual of that level (dead-code reset). The trained model
is exported as numpy (:class:`~models.semantic_ids.codebooks.ResidualQuantizer`), which is all that
serving needs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from models.semantic_ids.codebooks import MLP, ResidualQuantizer
from models.semantic_ids.rqkmeans import residual_kmeans

log = logging.getLogger(__name__)


@dataclass
class RQVAEConfig:
    codebook_sizes: list[int] = field(default_factory=lambda: [256, 256, 256])
    hidden_dims: list[int] = field(default_factory=lambda: [256, 128])
    latent_dim: int = 32
    beta: float = 0.25  # commitment weight (VQ-VAE / TIGER value)
    epochs: int = 300
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    kmeans_init: bool = True
    kmeans_niter: int = 25
    dead_code_reset: bool = True
    threads: int = 1  # torch CPU threads; 1 is fastest for these small matmuls, and robust on a busy box
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.codebook_sizes or any(int(k) < 1 for k in self.codebook_sizes):
            raise ValueError(f"codebook_sizes must be a non-empty list of positive ints, got {self.codebook_sizes}")
        if self.latent_dim < 1 or self.epochs < 0 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("rqvae needs latent_dim >= 1, epochs >= 0, batch_size >= 1 and lr > 0")


def _mlp(dims: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers.append(nn.SiLU())
    return nn.Sequential(*layers)


class ResidualVQ(nn.Module):
    """L codebooks over the latent; forward returns codes, z_q and the codebook + commitment loss."""

    def __init__(self, codebook_sizes: list[int], dim: int, beta: float):
        super().__init__()
        self.codebooks = nn.ParameterList([nn.Parameter(torch.randn(k, dim) * 0.1) for k in codebook_sizes])
        self.beta = beta

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        residual, zq = z, torch.zeros_like(z)
        codes, residuals, loss = [], [], z.new_zeros(())
        for book in self.codebooks:
            residuals.append(residual.detach())
            dist = (book * book).sum(1)[None, :] - 2.0 * residual @ book.T  # (B, K); ||r||^2 dropped
            idx = dist.argmin(1)
            e = book[idx]  # (B, d)
            loss = loss + F.mse_loss(e, residual.detach()) + self.beta * F.mse_loss(residual, e.detach())
            zq = zq + e
            residual = residual - e.detach()
            codes.append(idx)
        return torch.stack(codes, 1), zq, loss, residuals


class RQVAE(nn.Module):
    def __init__(self, input_dim: int, config: RQVAEConfig):
        super().__init__()
        dims = [input_dim, *config.hidden_dims, config.latent_dim]
        self.config = config
        self.encoder = _mlp(dims)
        self.decoder = _mlp(dims[::-1])
        self.rq = ResidualVQ(list(config.codebook_sizes), config.latent_dim, config.beta)

    def forward(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        z = self.encoder(x)  # (B, latent)
        codes, zq, rq_loss, residuals = self.rq(z)
        zq_st = z + (zq - z).detach()  # straight-through: decoder grads flow to the encoder
        x_hat = self.decoder(zq_st)
        recon = F.mse_loss(x_hat, x)
        out = {"codes": codes, "z": z, "x_hat": x_hat, "recon": recon, "rq": rq_loss, "residuals": residuals}
        return out, recon + rq_loss

    @torch.no_grad()
    def init_codebooks(self, x: torch.Tensor) -> None:
        """k-means on each level's residual of the (untrained) encoder output."""
        z = self.encoder(x).cpu().numpy()
        books = residual_kmeans(z, list(self.config.codebook_sizes), self.config.kmeans_niter, self.config.seed)
        for param, book in zip(self.rq.codebooks, books, strict=True):
            param.copy_(torch.from_numpy(book))

    @torch.no_grad()
    def reset_dead_codes(self, x: torch.Tensor, usage: list[torch.Tensor], gen: torch.Generator) -> int:
        """Move every code unused this epoch onto a random residual of its level; returns how many moved."""
        _, _, _, residuals = self.rq(self.encoder(x))
        moved = 0
        for level, (book, used) in enumerate(zip(self.rq.codebooks, usage, strict=True)):
            dead = (used == 0).nonzero().flatten()
            if len(dead) == 0:
                continue
            res = residuals[level]
            pick = torch.randint(len(res), (len(dead),), generator=gen)
            noise = 0.01 * res.std() * torch.randn(len(dead), res.shape[1], generator=gen)
            book[dead] = res[pick] + noise
            moved += len(dead)
        return moved

    def export(self, mean: np.ndarray, scale: float) -> ResidualQuantizer:
        """The numpy quantizer serving runs; the input standardisation is folded into the first/last layer."""

        def linear_arrays(seq: nn.Sequential) -> MLP:
            lins = [m for m in seq if isinstance(m, nn.Linear)]
            return MLP(
                [m.weight.detach().cpu().numpy().astype(np.float64) for m in lins],
                [m.bias.detach().cpu().numpy().astype(np.float64) for m in lins],
            )

        enc, dec = linear_arrays(self.encoder), linear_arrays(self.decoder)
        # encoder sees (x - mean) / scale:  W (x - m)/s + b  =  (W/s) x + (b - W m / s)
        enc.biases[0] = enc.biases[0] - enc.weights[0] @ mean / scale
        enc.weights[0] = enc.weights[0] / scale
        # decoder output is in standardised units: s (W h + b) + m
        dec.weights[-1], dec.biases[-1] = dec.weights[-1] * scale, dec.biases[-1] * scale + mean
        as32 = lambda mlp: MLP([w.astype(np.float32) for w in mlp.weights], [b.astype(np.float32) for b in mlp.biases])  # noqa: E731
        books = [b.detach().cpu().numpy().astype(np.float32) for b in self.rq.codebooks]
        return ResidualQuantizer(books, as32(enc), as32(dec))


def fit_rqvae(x: np.ndarray, config: RQVAEConfig) -> tuple[ResidualQuantizer, dict]:
    """Train on fused item vectors ``x`` (N, D) on CPU; returns the numpy quantizer and the training log."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, config.threads))
    try:
        return _fit(x, config)
    finally:
        torch.set_num_threads(previous_threads)


def _fit(x: np.ndarray, config: RQVAEConfig) -> tuple[ResidualQuantizer, dict]:
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    # standardise (one scalar scale keeps the geometry): fused vectors have per-dim variance ~1/D, which
    # would make the reconstruction loss vanish next to the codebook loss
    x64 = np.asarray(x, np.float64)
    mean = x64.mean(0)
    scale = float(np.sqrt(((x64 - mean) ** 2).mean())) or 1.0
    data = torch.from_numpy(((x64 - mean) / scale).astype(np.float32))
    model = RQVAE(data.shape[1], config)
    start = time.perf_counter()
    if config.kmeans_init:
        model.init_codebooks(data)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    history: dict[str, list[float]] = {"loss": [], "recon": [], "rq": [], "dead_reset": []}
    n = len(data)
    bar = tqdm(range(config.epochs), desc="rq-vae", disable=not config.progress, leave=False)
    for _epoch in bar:
        model.train()
        usage = [torch.zeros(k, dtype=torch.long) for k in config.codebook_sizes]
        perm = torch.randperm(n, generator=gen)
        tot = {"loss": 0.0, "recon": 0.0, "rq": 0.0}
        for i in range(0, n, config.batch_size):
            batch = data[perm[i : i + config.batch_size]]
            out, loss = model(batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            w = len(batch) / n
            tot["loss"] += loss.item() * w
            tot["recon"] += out["recon"].item() * w
            tot["rq"] += out["rq"].item() * w
            for level in range(len(usage)):
                usage[level] += torch.bincount(out["codes"][:, level], minlength=len(usage[level]))
        moved = model.reset_dead_codes(data, usage, gen) if config.dead_code_reset else 0
        for key, value in tot.items():
            history[key].append(value)
        history["dead_reset"].append(float(moved))
        bar.set_postfix(loss=f"{tot['loss']:.4f}", recon=f"{tot['recon']:.4f}", dead=moved)
    model.eval()
    info = {
        "method": "rqvae",
        "config": asdict(config),
        "train_seconds": time.perf_counter() - start,
        "history": history,
    }
    log.info("rq-vae %s trained %d epochs in %.1fs", config.codebook_sizes, config.epochs, info["train_seconds"])
    return model.export(mean, scale), info
