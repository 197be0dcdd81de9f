"""The model's fast paths: one compiled graph, FlexAttention, bf16 residual stream, skipped key-slice work,
and the kernel facts for the settings hash. Same maths as the eager fp32 sdpa path (tests/test_model.py).

CPU only. Compiles take ~25 s each on the 2-core CI machine, so the compiled cases are few and tiny."""

from __future__ import annotations

import math

import pytest
import torch

from xvr_batch.model import SwinXVR, preset
from xvr_batch.model.attention import (
    COMPILE_MODE, COMPILE_OPTIONS, attention_backend_report, kernel_identity,
)
from xvr_batch.model.swin_xvr import _slice_conv

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _model(head: str = "all", residual: str = "none", seed: int = 0, **kw) -> SwinXVR:
    torch.manual_seed(seed)
    model = SwinXVR(preset("tiny", head=head, residual=residual, **kw)).eval()
    with torch.no_grad():  # non-trivial biases (they start at zero) so every term is exercised
        for name, p in model.named_parameters():
            if name.endswith("bias") or "rel_bias_table" in name:
                p.normal_(0, 0.05)
    return model


def _inputs(model: SwinXVR, b: int, h: int, w: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lr = torch.rand(b, model.cfg.num_lr, 1, h, w, generator=g)
    hr = torch.rand(b, 2, 1, 4 * h, 4 * w, generator=g)
    return lr, hr


def _features_args(model: SwinXVR, lr, hr):
    base = SwinXVR.key_base(hr) if model.cfg.residual == "key_mean" else None
    return model.encode_keys(hr), base


def _maxdiff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


# ---------------------------------------------------------------------------------------------- 1. one graph
@pytest.mark.parametrize("attention", ["sdpa", "flex"])
def test_forward_features_traces_as_one_graph(attention):
    model = _model("all", residual="key_mean").set_attention(attention)
    lr, hr = _inputs(model, 2, 12, 20)  # 12 x 20: padded to 16 x 24 (window 8)
    with torch.no_grad():
        keys, base = _features_args(model, lr, hr)
        masks = model.prepare_masks(12, 20)
        torch._dynamo.reset()
        ex = torch._dynamo.explain(model.forward_features)(lr, keys, base, masks)
        assert ex.graph_break_count == 0, ex.break_reasons
        assert ex.graph_count == 1
        # traced without masks: they are built inside the graph, still one graph
        torch._dynamo.reset()
        ex = torch._dynamo.explain(model.forward_features)(lr, keys, base)
        assert ex.graph_break_count == 0, ex.break_reasons
        assert ex.graph_count == 1
    torch._dynamo.reset()


@pytest.mark.parametrize("head,h,w,attention", [
    ("all", 12, 20, "sdpa"),     # padded frame, shifted + unshifted blocks
    ("centre", 12, 20, "flex"),  # compile + flex (the unpadded case is covered eagerly below; a compile
                                 # costs ~25 s here, so only these two)
])
def test_compiled_matches_eager(head, h, w, attention):
    model = _model(head, residual="key_mean", seed=1).set_attention(attention)
    lr, hr = _inputs(model, 2, h, w, seed=2)
    with torch.no_grad():
        keys, base = _features_args(model, lr, hr)
        model.set_attention("sdpa")
        eager = model.forward_features(lr, keys, base)
        model.set_attention(attention)
        torch._dynamo.reset()
        features = model.compiled_features()
        compiled = features(lr, keys, base)
        again = features(lr, keys, base)
    assert model.compile_mode == COMPILE_MODE
    assert compiled.shape == eager.shape
    assert _maxdiff(compiled, eager) <= 1e-5
    assert torch.equal(compiled, again)  # the same compiled kernels, the same bytes
    torch._dynamo.reset()


def test_compile_uses_no_autotuning():
    assert COMPILE_OPTIONS == {"deterministic": True}  # default mode: never max-autotune


# ---------------------------------------------------------------------------------------------- 3. flex
@pytest.mark.parametrize("h,w", [(12, 20)])
def test_flex_matches_sdpa_model(h, w):
    for head in ("all", "centre"):
        model = _model(head, seed=3)
        lr, hr = _inputs(model, 2, h, w, seed=4)
        with torch.no_grad():
            sdpa = model(lr, hr)
            flex = model.set_attention("flex")(lr, hr)
        assert _maxdiff(flex, sdpa) <= 1e-5, head


def test_flex_matches_sdpa_per_block():
    model = _model("all", seed=5)
    blocks = [blk for st in model.stages for blk in st.blocks]
    assert blocks[0].shift == (0, 0, 0) and any(blocks[1].shift)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, model.cfg.n_slices, 12, 20, model.cfg.embed_dim, generator=g)
    with torch.no_grad():
        for blk in blocks:  # unshifted, then shifted; 12 x 20 is padded
            blk.attn.kind = "sdpa"
            ref = blk(x)
            blk.attn.kind = "flex"
            out = blk(x)
            blk.attn.kind = "sdpa"
            assert _maxdiff(out, ref) <= 1e-5, blk.shift


def test_set_attention_is_runtime_only():
    model = _model()
    keys = set(model.state_dict())
    assert model.attention == "sdpa"
    model.set_attention("flex")
    assert set(model.state_dict()) == keys and model.cfg == _model().cfg
    assert all(blk.attn.kind == "flex" for st in model.stages for blk in st.blocks)
    with pytest.raises(ValueError, match="attention must be one of"):
        model.set_attention("flash")


def test_attention_backend_report_and_kernel_identity():
    model = _model()
    lr, _ = _inputs(model, 2, 12, 20)
    rep = attention_backend_report(model, lr)
    assert rep["attention"] == "sdpa" and rep["kernel"].startswith("sdpa-") and rep["dtype"] == "float32"
    assert rep["n_windows"] == 6 and rep["window"] == [5, 8, 8]  # first shifted block: 16 x 24 padded / 8
    model.set_attention("flex")
    assert attention_backend_report(model, lr)["kernel"] == "flex-compiled"
    ident = kernel_identity(model, "cpu")
    assert ident["attention"] == "flex" and ident["compile"] is None and ident["device_name"] == "cpu"
    assert ident["torch"] == torch.__version__ and ident["cuda"] is None
    model.compiled_features()  # compiles lazily: nothing runs here
    assert kernel_identity(model, "cpu")["compile"] == COMPILE_MODE
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------- 2. bf16
def _psnr(a: torch.Tensor, ref: torch.Tensor) -> float:
    mse = ((a.float() - ref.float()) ** 2).mean().item()
    rng = (ref.max() - ref.min()).item()
    return 10 * math.log10(rng ** 2 / mse)


@pytest.mark.parametrize("residual", ["none", "key_mean"])
def test_bf16_autocast_keeps_a_bf16_residual_stream(residual):
    model = _model("all", residual=residual, seed=7, depths=(2, 2), num_heads=(3, 3))
    lr, hr = _inputs(model, 2, 12, 20, seed=8)
    seen: dict[str, torch.dtype] = {}

    def hook(name):
        def fn(_mod, _inp, out):
            seen[name] = out.dtype
        return fn

    handles = []
    for name, mod in model.named_modules():
        if name and (name.count(".") <= 2 or name.endswith(("norm1", "norm2", "mlp", "attn"))) \
                and not name.startswith(("hr_", "lr_", "pool", "lrelu", "head", "upsample", "shuffle", "conv_last")):
            handles.append(mod.register_forward_hook(hook(name)))
    with torch.no_grad():
        ref = model(lr, hr)
        seen.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            keys, base = _features_args(model, lr, hr)
            masks = model.prepare_masks(12, 20)
            out = model.forward_features(lr, keys, base)
    for h in handles:
        h.remove()
    assert "stages.0.blocks.0.norm1" in seen and "stages.1" in seen and "norm" in seen
    assert all(dt == torch.bfloat16 for dt in seen.values()), {k: v for k, v in seen.items() if v != torch.bfloat16}
    assert masks[1].dtype == torch.bfloat16  # sdpa mask cached in the compute dtype
    assert _psnr(out, ref) > 40, _psnr(out, ref)


# ---------------------------------------------------------------------------------------------- masks cache
def test_masks_are_cached_and_follow_the_weights():
    model = _model()
    with torch.no_grad():
        a = model.prepare_masks(12, 20)
        assert model.prepare_masks(12, 20) is a  # same objects: nothing rebuilt
        assert model.prepare_masks(12, 20, dtype=torch.bfloat16)[0].dtype == torch.bfloat16
        table = model.stages[0].blocks[1].attn.rel_bias_table
        table.add_(1.0)  # in-place update (EMA, load_state_dict): the version changes
        b = model.prepare_masks(12, 20)
        assert b is not a and _maxdiff(b[1], a[1]) == pytest.approx(1.0, abs=1e-4)  # -100 entries round
    # training: not cached, differentiable through the bias table
    model.train()
    masks = model.prepare_masks(12, 20)
    masks[1].sum().backward()
    assert table.grad is not None and table.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------- 4. key slices
def _naive(model: SwinXVR, lr, hr) -> torch.Tensor:
    """Every slice through the whole body, then the head on the read slices (the old code path)."""
    b, nl, _, h, w = lr.shape
    shallow = torch.cat((model.encode_lr(lr), model.encode_keys(hr)), 1).permute(0, 1, 3, 4, 2).contiguous()
    x = shallow
    for st in model.stages:
        x = st(x)
    x = shallow + _slice_conv(model.conv_after_body, model.norm(x))
    keep = slice(0, nl) if model.cfg.head == "all" else slice(nl // 2, nl // 2 + 1)
    feat = x[:, keep]
    n = feat.shape[1]
    y = model.head_act(model.head_conv(feat.reshape(b * n, h, w, -1).permute(0, 3, 1, 2)))
    for up in model.upsample:
        y = model.shuffle(up(y))
    return model.conv_last(y).view(b, n, 1, 4 * h, 4 * w)


@pytest.mark.parametrize("head", ["all", "centre"])
def test_key_slices_skip_work_same_output(head):
    model = _model(head, seed=9, depths=(2, 2), num_heads=(3, 3))
    lr, hr = _inputs(model, 2, 12, 20, seed=10)
    shapes = {}
    def record(name):
        def hook(_mod, _inp, out):
            shapes.setdefault(name, tuple(out.shape))  # returns None: the output is not replaced
        return hook

    model.stages[-1].register_forward_hook(record("last"))
    model.stages[0].register_forward_hook(record("first"))
    with torch.no_grad():
        out = model(lr, hr)
        ref = _naive(model, lr, hr)
    n_out = model.cfg.n_out
    assert shapes["first"][1] == model.cfg.n_slices  # attention stages see every slice
    assert shapes["last"][1] == n_out  # the last stage hands on only the read slices
    assert _maxdiff(out, ref) <= 1e-5


# ---------------------------------------------------------------------------------------------- CUDA (GPU only)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
may_skip = pytest.mark.may_skip_in_ci(reason="the CI machine has no GPU")


def _all_paths(model: SwinXVR, lr, hr, autocast: bool) -> dict[str, torch.Tensor]:
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if autocast else torch.autocast("cuda", enabled=False)
    outs = {}
    with torch.no_grad(), ctx:
        keys, base = _features_args(model, lr, hr)
        for name, attention, compiled in (("eager", "sdpa", False), ("flex", "flex", False),
                                          ("compile", "sdpa", True), ("compile+flex", "flex", True)):
            model.set_attention(attention)
            torch._dynamo.reset()
            fn = model.compiled_features() if compiled else model.forward_features
            outs[name] = fn(lr, keys, base).float()
            if compiled:
                assert torch.equal(fn(lr, keys, base).float(), outs[name]), name  # same kernels, same bytes
            model.compile_mode = None
    model.set_attention("sdpa")
    torch._dynamo.reset()
    return outs


@needs_cuda
@may_skip
@pytest.mark.parametrize("head", ["all", "centre"])
def test_cuda_paths_agree_fp32_and_bf16(head):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(11)
    model = SwinXVR(preset("lite", head=head)).cuda().eval()  # head dim 16: FlexAttention's minimum on CUDA
    g = torch.Generator().manual_seed(12)
    lr = torch.rand(2, model.cfg.num_lr, 1, 20, 36, generator=g).cuda()  # padded: 24 x 40
    hr = torch.rand(2, 2, 1, 80, 144, generator=g).cuda()
    fp32 = _all_paths(model, lr, hr, autocast=False)
    for name, out in fp32.items():
        assert _maxdiff(out, fp32["eager"]) <= 1e-4, name
    bf16 = _all_paths(model, lr, hr, autocast=True)
    for name, out in bf16.items():
        assert _psnr(out, fp32["eager"]) > 40, (name, _psnr(out, fp32["eager"]))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        rep = attention_backend_report(model, lr)
    assert rep["kernel"] in ("sdpa-efficient", "sdpa-math", "sdpa-cudnn"), rep  # a float mask: never flash
    ident = kernel_identity(model, "cuda")
    assert ident["device_name"] == torch.cuda.get_device_name() and ident["cuda"] == torch.version.cuda
