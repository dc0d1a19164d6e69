"""RQ-VAE: training lowers reconstruction error, more levels lower it further, numpy export == torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sid_synthetic import clustered

from models.semantic_ids.codebooks import codebook_usage, relative_errors
from models.semantic_ids.rqvae import RQVAE, RQVAEConfig, fit_rqvae

SMALL = dict(hidden_dims=[64], latent_dim=16, batch_size=100, progress=False)
X = clustered(300)


def _fit(sizes: list[int], epochs: int, **kw):
    q, info = fit_rqvae(X, RQVAEConfig(codebook_sizes=sizes, epochs=epochs, **{**SMALL, **kw}))
    return q, relative_errors(q, X, q.quantize(X)), info


@pytest.fixture(scope="module")
def trained3():
    return _fit([16, 16, 16], 40)


def test_reconstruction_error_decreases_with_training(trained3):
    _, short, _ = _fit([16, 16, 16], 2)
    _, long, _ = trained3
    assert long["input"][-1] < 0.7 * short["input"][-1], (short, long)
    assert long["input"][-1] < 0.6


def test_reconstruction_error_decreases_with_more_levels(trained3):
    _, one, _ = _fit([16], 40)
    _, three, _ = trained3
    assert three["input"][-1] < one["input"][-1], (one, three)
    # and inside one model, every added level brings the latent closer
    latent = three["latent"]
    assert latent[0] > latent[1] > latent[2], latent


def test_numpy_export_matches_torch_model():
    x = X[:100]
    model = RQVAE(x.shape[1], RQVAEConfig(codebook_sizes=[8, 8], **SMALL))
    mean, scale = x.mean(0).astype(np.float64), float(x.std())
    q = model.export(mean, scale)
    with torch.no_grad():
        z = model.encoder(torch.from_numpy(((x - mean) / scale).astype(np.float32)))
        codes, zq, _, _ = model.rq(z)
        x_hat = model.decoder(zq).numpy() * scale + mean
    np.testing.assert_allclose(q.latent(x), z.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(q.quantize(x), codes.numpy())
    np.testing.assert_allclose(q.reconstruct(codes.numpy()), x_hat, rtol=1e-3, atol=1e-5)


def test_kmeans_init_and_dead_code_reset_keep_codes_alive():
    sizes = [64]
    no_help, _, _ = _fit(sizes, 3, kmeans_init=False, dead_code_reset=False)
    helped, _, info = _fit(sizes, 3)
    used_without = codebook_usage(no_help.quantize(X), sizes)[0]["used"]
    used_with = codebook_usage(helped.quantize(X), sizes)[0]["used"]
    assert used_with > used_without, (used_without, used_with)
    assert len(info["history"]["dead_reset"]) == 3


def test_training_is_reproducible_with_a_seed():
    a, _, _ = _fit([8, 8], 2)
    b, _, _ = _fit([8, 8], 2)
    np.testing.assert_array_equal(a.quantize(X), b.quantize(X))


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="codebook_sizes"):
        RQVAEConfig(codebook_sizes=[])
