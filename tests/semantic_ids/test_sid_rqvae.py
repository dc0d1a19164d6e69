"""RQ-VAE: training lowers reconstruction error, more levels lower it further, numpy export == torch."""

from __future__ import annotations

import numpy as np
import torch
from conftest import clustered

from models.semantic_ids.codebooks import codebook_usage, relative_errors
from models.semantic_ids.rqvae import RQVAE, RQVAEConfig, fit_rqvae

SMALL = dict(hidden_dims=[64], latent_dim=16, batch_size=128, progress=False)


def _input_error(epochs: int, sizes: list[int], x: np.ndarray, **kw) -> float:
    q, _ = fit_rqvae(x, RQVAEConfig(codebook_sizes=sizes, epochs=epochs, **{**SMALL, **kw}))
    return relative_errors(q, x, q.quantize(x))["input"][-1]


def test_reconstruction_error_decreases_with_training():
    x = clustered()
    short, long = _input_error(2, [16, 16, 16], x), _input_error(60, [16, 16, 16], x)
    assert long < 0.7 * short, (short, long)
    assert long < 0.6


def test_reconstruction_error_decreases_with_more_levels():
    x = clustered()
    one, three = _input_error(60, [16], x), _input_error(60, [16, 16, 16], x)
    assert three < one, (one, three)
    # and inside one model, every added level brings the latent closer
    q, _ = fit_rqvae(x, RQVAEConfig(codebook_sizes=[16, 16, 16], epochs=60, **SMALL))
    latent = relative_errors(q, x, q.quantize(x))["latent"]
    assert latent[0] > latent[1] > latent[2], latent


def test_numpy_export_matches_torch_model():
    x = clustered(200)
    cfg = RQVAEConfig(codebook_sizes=[8, 8], **SMALL)
    model = RQVAE(x.shape[1], cfg)
    mean, scale = x.mean(0).astype(np.float64), float(x.std())
    q = model.export(mean, scale)
    with torch.no_grad():
        xs = torch.from_numpy(((x - mean) / scale).astype(np.float32))
        z = model.encoder(xs)
        codes, zq, _, _ = model.rq(z)
        x_hat = model.decoder(zq).numpy() * scale + mean
    np.testing.assert_allclose(q.latent(x), z.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(q.quantize(x), codes.numpy())
    np.testing.assert_allclose(q.reconstruct(codes.numpy()), x_hat, rtol=1e-3, atol=1e-5)


def test_kmeans_init_and_dead_code_reset_keep_codes_alive():
    x = clustered(400, clusters=40)
    sizes = [64]
    no_help, _ = fit_rqvae(x, RQVAEConfig(codebook_sizes=sizes, epochs=5, kmeans_init=False, dead_code_reset=False, **SMALL))
    helped, info = fit_rqvae(x, RQVAEConfig(codebook_sizes=sizes, epochs=5, **SMALL))
    used_without = codebook_usage(no_help.quantize(x), sizes)[0]["used"]
    used_with = codebook_usage(helped.quantize(x), sizes)[0]["used"]
    assert used_with > used_without, (used_without, used_with)
    assert len(info["history"]["dead_reset"]) == 5


def test_training_is_reproducible_with_a_seed():
    x = clustered(200)
    a, _ = fit_rqvae(x, RQVAEConfig(codebook_sizes=[8, 8], epochs=3, **SMALL))
    b, _ = fit_rqvae(x, RQVAEConfig(codebook_sizes=[8, 8], epochs=3, **SMALL))
    np.testing.assert_array_equal(a.quantize(x), b.quantize(x))
