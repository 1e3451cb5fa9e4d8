"""Shared fixtures: the tiny and toy base models (once per test process), S3 and Ray (once per test module), a
small image file, one CPU thread."""

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline_fixtures import AWS_ENV, local_ray, local_s3
from unziplora.models import load_base_model


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    # The tiny model's ops are so small that thread overhead dominates: one thread is ~6x faster on 2 cores.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_base():
    """The `tiny` preset (SDXL module names, toy widths). Pinned to CPU so it is fp32 everywhere:
    several tests compare outputs exactly or to 1e-5. Tests that attach an adapter must detach it."""
    return load_base_model("tiny", device="cpu")


@pytest.fixture(scope="session")
def toy_base():
    """The committed `toy` model (toyworld/weights/toy-sdxl) on CPU. Tests that attach an adapter must detach it."""
    return load_base_model("toy", device="cpu")


# S3 and Ray are per module, not per session: each sets environment variables in this process while it runs
# (credentials, Ray's auth mode), and those must not reach files that check what a fresh machine sees
# (test_submit_doc); a module's Ray workers may also be given the module's own RAY_WORKER_ENV.
@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 (pipeline_fixtures.LocalS3), its credentials in this process's environment."""
    with local_s3() as server:
        yield server


@pytest.fixture(scope="module")
def ray_cluster(request, s3):
    """A private in-process Ray whose workers reach `s3` (its credentials; MLflow's S3 client its endpoint too),
    with the test module's RAY_WORKER_ENV on top."""
    env = AWS_ENV | {"MLFLOW_S3_ENDPOINT_URL": s3.endpoint} | getattr(request.module, "RAY_WORKER_ENV", {})
    with local_ray(num_cpus=6, env=env) as ray:
        yield ray


@pytest.fixture
def sample_image(tmp_path):
    """A small random RGB PNG (96 wide, 80 high); its path."""
    rng = np.random.default_rng(1234)
    path = tmp_path / "sample.png"
    Image.fromarray(rng.integers(0, 256, (80, 96, 3), dtype=np.uint8), "RGB").save(path)
    return path


def _unet_inputs(base, seed, batch=1, tokens=7):
    g = torch.Generator().manual_seed(seed)
    cfg = base.unet.config
    side = cfg.sample_size
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    return dict(
        sample=torch.randn(batch, cfg.in_channels, side, side, generator=g),
        timestep=torch.tensor([500]),
        encoder_hidden_states=torch.randn(batch, tokens, cfg.cross_attention_dim, generator=g),
        added_cond_kwargs={"text_embeds": torch.randn(batch, pooled, generator=g),
                           "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]).repeat(batch, 1)},
    )


@pytest.fixture
def unet_inputs(tiny_base):
    """Random but fixed keyword arguments for one call of the tiny UNet: `unet(**unet_inputs)`."""
    return _unet_inputs(tiny_base, seed=0)


@pytest.fixture
def make_states(tiny_base):
    """`make_states(seed)`: random stand-in encoder states of one prompt, shaped like the UNet's context."""
    def make(seed, batch=1, tokens=7):
        g = torch.Generator().manual_seed(seed)
        return torch.randn(batch, tokens, tiny_base.unet.config.cross_attention_dim, generator=g)
    return make


@pytest.fixture
def small_adapter():
    """`small_adapter(rank=3, seed=0)`: an UnZipLoRA on a toy module holding one diffusers Attention under
    a `transformer_blocks` path (to_q 10->12, to_k/to_v 6->12, to_out.0 12->10: unequal widths), every
    block "shared". Returns the adapter; nothing to attach for calling its layers directly."""
    from diffusers.models.attention_processor import Attention
    from torch import nn

    from unziplora.layers import UnZipLoRA

    def make(rank=3, seed=0, **kwargs):
        torch.manual_seed(seed)
        block = nn.Module()
        block.attn2 = Attention(query_dim=10, cross_attention_dim=6, heads=3, dim_head=4, bias=True)
        root = nn.Module()
        root.transformer_blocks = nn.ModuleList([block])
        holder = nn.Module()
        holder.blocks = nn.ModuleList([root])
        return UnZipLoRA(holder, rank=rank, role_table=[(r".*", "shared")], seed=seed, **kwargs)
    return make
