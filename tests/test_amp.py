"""Mixed precision on the CPU: what amp='auto' resolves to, and where bf16 is (not) used."""

import pytest
import torch
import torch.nn.functional as F

from conftest import padded_batch, tiny, tiny_config
from detrkit import build_model
from detrkit.amp import amp_autocast, resolve_amp
from detrkit.models.transformer import MultiheadAttention
from detrkit.training.config import build_config
from detrkit.training.trainer import Trainer


@pytest.mark.parametrize(
    "avx512_bf16,amx,expected", [(True, False, "bf16"), (False, True, "bf16"), (False, False, "none")]
)
def test_auto_is_bf16_only_on_cpus_with_native_bf16(monkeypatch, avx512_bf16, amx, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert resolve_amp("auto", torch.device("cpu")) == expected
    # Not measured on CUDA: auto stays fp32 there; explicit choices are kept as they are.
    assert resolve_amp("auto", torch.device("cuda", 0)) == "none"
    for amp in ("none", "bf16", "fp16"):
        assert resolve_amp(amp, torch.device("cpu")) == amp


def test_cpu_tiny_preset_trains_with_auto():
    assert build_config("cpu-tiny").amp == "auto"


def test_cpu_bf16_autocast_attends_in_fp32():
    """Under CPU bf16 autocast the projections are bf16, but attention itself is computed in fp32
    from them (its bf16 backward is several times slower on the CPU), then rounded to bf16."""
    torch.manual_seed(0)
    attn = MultiheadAttention(32, 4)
    x = torch.randn(3, 40, 32)
    padding = torch.zeros(3, 40, dtype=torch.bool)
    padding[1, 30:] = True
    seen = {}
    attn.out_proj.register_forward_pre_hook(lambda m, args: seen.setdefault("core", args[0]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = attn(x, x, x, key_padding_mask=padding)
        q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    assert out.dtype == torch.bfloat16 and q.dtype == torch.bfloat16

    def heads(t):
        return t.view(3, 40, 4, 8).transpose(1, 2).float()

    expected = F.scaled_dot_product_attention(
        heads(q), heads(k), heads(v), attn_mask=~padding[:, None, None, :]
    )
    expected = expected.to(torch.bfloat16).transpose(1, 2).reshape(3, 40, 32)
    assert torch.equal(seen["core"], expected)


def test_training_and_pretraining_run_under_the_resolved_autocast_evaluation_in_fp32(
    tmp_path, data_root, monkeypatch
):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    cfg = tiny(tmp_path, data_root, epochs=1, amp="auto", backbone_pretrain_steps=2, eval_every=0)
    trainer = Trainer(cfg, log=lambda m: None)
    assert trainer.amp == "bf16"
    dtypes = []
    conv = trainer.model.backbone.body.layer2[0].conv1  # trained in both stages
    conv.register_forward_hook(lambda m, args, out: dtypes.append(("conv", out.dtype)))
    linear = trainer.model.transformer.encoder.layers[0].linear1
    linear.register_forward_hook(lambda m, args, out: dtypes.append(("linear", out.dtype)))
    trainer.fit()
    # 2 pretraining steps (backbone only), 2 DETR steps, then the evaluation at the end: in fp32,
    # the precision of `detrkit eval`, so that the logged metrics are what eval reproduces.
    bf16, fp32 = torch.bfloat16, torch.float32
    assert dtypes == [("conv", bf16)] * 2 + [("conv", bf16), ("linear", bf16)] * 2 + [
        ("conv", fp32),
        ("linear", fp32),
    ]


def test_bf16_gradients_of_a_detr_step_follow_fp32_ones():
    """Gradients under CPU bf16 autocast (attention in fp32) point where the fp32 ones do, for every
    attention projection too: the fp32 detour of the attention keeps the graph intact."""
    torch.manual_seed(0)
    model = build_model(tiny_config()).train()
    images, mask = padded_batch()
    grads = {}
    for amp in ("none", "bf16"):
        model.zero_grad()
        with amp_autocast(torch.device("cpu"), amp):
            out = model(images, mask)
        (out["pred_logits"].float().logsumexp(-1).sum() + out["pred_boxes"].float().sum()).backward()
        grads[amp] = {n: p.grad.clone() for n, p in model.named_parameters() if "attn.in_proj" in n}
    assert len(grads["none"]) == 2 * 2 + 2 * 3 * 2  # encoder + decoder self- and cross-attention
    # The first decoder layer's self-attention attends over equal values (its input state is zero):
    # its projections get no gradient at all in fp32.
    for name in ("transformer.decoder.layers.0.self_attn.in_proj_weight",):
        assert not grads["none"].pop(name).any()
    for name, fp32 in grads["none"].items():
        cosine = F.cosine_similarity(fp32.flatten(), grads["bf16"][name].flatten(), dim=0)
        assert cosine > 0.99, name
