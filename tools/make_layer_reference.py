#!/usr/bin/env python3
"""Make the Embedding / Conv1d / Conv2d / Conv3d reference data in tests/data/layers/ with real PEFT.

Same conventions as tools/make_reference.py (the nn.Linear data): each case builds a tiny torch module
holding one base layer named ``layer`` (nn.Embedding or nn.Conv1d/2d/3d) and wraps it with
``peft.get_peft_model(model, LoraConfig(r, lora_alpha, use_dora, use_rslora, target_modules=["layer"],
lora_dropout=0.0, init_lora_weights=False))``, everything built under ``torch.set_default_dtype(dtype)``
after ``torch.manual_seed(seed)``. With ``init_lora_weights=False`` PEFT keeps A and B random and nonzero
(Embedding: randn; Conv: the conv layers' default kaiming-uniform), so the DoRA magnitude PEFT sets at
creation (``m_init``) sees B != 0. The forward then uses ``m = m_init * (1 + 0.2 randn)``.

Saved per case (``<out>/<name>.safetensors`` + ``<out>/<name>.json``), tensors in PEFT's layouts:
  Embedding: W (num_embeddings, dim), A = lora_embedding_A (r, num_embeddings),
             B = lora_embedding_B (dim, r), ids (n,) int64, dy / y (n, dim), m / m_init / grad_m (dim,).
  ConvNd:    W (out, in/groups, k...), bias (out,), A = lora_A.weight (r, in, k...),
             B = lora_B.weight (out, r/groups, 1...), x (N, in, spatial...), dy / y (N, out, spatial'...),
             m / m_init / grad_m (1, out, 1...) as PEFT stores lora_magnitude_vector.
  y, grad_A, grad_B, grad_m (DoRA), grad_x (conv): PEFT's forward and autograd of sum(y * dy) through
  PEFT's module (PEFT detaches the DoRA norm). W_merged: merge_and_unload() of a deep copy (absent where
  PEFT refuses to merge: grouped convolutions).
  DoRA only: weight_norm (flat vector: PEFT's get_weight_norm with the current A, B), y_exact and
  grad_*_exact: an independent float64 torch autograd of the same forward with the norm NOT detached
  (stored rounded to the case dtype).
Also <out>/index.json (case names) and <out>/refused.json (what PEFT refused, with its messages).

Usage (needs torch and peft; CPU, a few seconds):
  CUDA_VISIBLE_DEVICES="" python3 tools/make_layer_reference.py --out tests/data/layers
"""

import argparse
import copy
import inspect
import json
import math
import os
import sys
import traceback

ADAPTER = "default"

CONVENTION = {
    "embedding": "W is (num_embeddings, dim) (torch Embedding), A = lora_embedding_A (r, num_embeddings), "
                 "B = lora_embedding_B (dim, r), ids (n,) int64; LoRA: y = W[ids] + s A^T[ids] B^T; "
                 "DoRA: y = (W[ids] + s A^T[ids] B^T) * m / n, n_j = ||(W^T + s B A)[j, :]|| (per embedding "
                 "dimension, over the vocabulary); m (dim,); grads are of sum(y * dy); padding_idx as in "
                 "F.embedding (the id still reads its row; no gradient reaches column padding_idx of A "
                 "through the lookup)",
    "conv": "W is (out, in/groups, k...) (torch ConvNd), A = lora_A.weight (r, in, k...) (a conv with the "
            "base's kernel, stride, padding), B = lora_B.weight (out, r/groups, 1...) (a 1x1 conv with the "
            "base's groups), x (N, in, spatial...); LoRA: y = conv(x, W) + s convB(convA(x)) + bias; DoRA: "
            "y = (conv(x, W) + s convB(convA(x))) * g + bias, g_o = m_o / n_o, n_o = ||V[o]|| over (in x k...), "
            "V = W + s reshape(B.view(-1, r) @ A.view(r, -1), W.shape); m as PEFT stores it (1, out, 1...); "
            "grads are of sum(y * dy)",
}

# Embedding cases: name, kind, num_embeddings, dim, r, alpha, n_ids, padding_idx, use_rslora, dtype, seed
EMB_CASES = [
    ("embedding_dora_f64", "dora", 20, 12, 4, 8, 10, None, False, "float64", 101),
    ("embedding_dora_f32", "dora", 24, 16, 4, 8, 12, None, False, "float32", 102),
    ("embedding_lora_f64", "lora", 20, 12, 4, 8, 10, None, False, "float64", 103),
    ("embedding_lora_f32", "lora", 24, 16, 4, 8, 12, None, False, "float32", 104),
    ("embedding_dora_f64_padding_idx", "dora", 20, 12, 4, 8, 10, 3, False, "float64", 105),
    ("embedding_lora_f64_padding_idx", "lora", 20, 12, 4, 8, 10, 3, False, "float64", 106),
    ("embedding_dora_f64_rank1_rslora", "dora", 16, 10, 1, 4, 8, None, True, "float64", 107),
    ("embedding_dora_f32_rank1_rslora", "dora", 16, 10, 1, 4, 8, None, True, "float32", 108),
]

# Conv cases: name, kind, nd, in, out, kernel, stride, padding, dilation, groups, bias, r, alpha,
#             input spatial, batch, use_rslora, dtype, seed
CONV_CASES = [
    ("conv1d_dora_f64_bias", "dora", 1, 4, 6, (3,), (1,), (1,), (1,), 1, True, 4, 8, (10,), 2, False, "float64", 201),
    ("conv1d_dora_f32_bias", "dora", 1, 4, 6, (3,), (2,), (0,), (1,), 1, True, 4, 8, (11,), 2, False, "float32", 202),
    ("conv1d_lora_f64_bias", "lora", 1, 4, 6, (3,), (1,), (1,), (1,), 1, True, 4, 8, (10,), 2, False, "float64", 203),
    ("conv1d_dora_f64_nobias_rank1_rslora", "dora", 1, 3, 5, (5,), (1,), (2,), (1,), 1, False, 1, 4, (9,), 2, True,
     "float64", 204),
    ("conv1d_dora_f64_dilation2", "dora", 1, 4, 6, (3,), (1,), (2,), (2,), 1, True, 4, 8, (10,), 2, False,
     "float64", 205),
    ("conv2d_dora_f64_bias", "dora", 2, 3, 5, (3, 3), (1, 1), (1, 1), (1, 1), 1, True, 4, 8, (6, 7), 2, False,
     "float64", 301),
    ("conv2d_dora_f32_bias", "dora", 2, 3, 5, (3, 3), (1, 1), (1, 1), (1, 1), 1, True, 4, 8, (6, 7), 2, False,
     "float32", 302),
    ("conv2d_lora_f64_bias", "lora", 2, 3, 5, (3, 3), (1, 1), (1, 1), (1, 1), 1, True, 4, 8, (6, 7), 2, False,
     "float64", 303),
    ("conv2d_lora_f32_nobias", "lora", 2, 3, 5, (3, 3), (1, 1), (0, 0), (1, 1), 1, False, 4, 8, (6, 7), 2, False,
     "float32", 304),
    ("conv2d_dora_f64_nobias", "dora", 2, 3, 5, (3, 3), (1, 1), (0, 0), (1, 1), 1, False, 4, 8, (6, 7), 2, False,
     "float64", 305),
    ("conv2d_dora_f64_rank1_rslora", "dora", 2, 3, 5, (3, 3), (1, 1), (1, 1), (1, 1), 1, True, 1, 4, (5, 6), 2,
     True, "float64", 306),
    ("conv2d_dora_f32_rank1_rslora", "dora", 2, 3, 5, (3, 3), (1, 1), (1, 1), (1, 1), 1, True, 1, 4, (5, 6), 2,
     True, "float32", 307),
    ("conv2d_dora_f64_stride2_pad1_k3x2", "dora", 2, 3, 4, (3, 2), (2, 2), (1, 1), (1, 1), 1, True, 4, 8, (9, 8),
     2, False, "float64", 308),
    ("conv2d_dora_f64_stride2_pad1_dil2_k3x2", "dora", 2, 3, 4, (3, 2), (2, 2), (1, 1), (2, 2), 1, True, 4, 8,
     (9, 8), 2, False, "float64", 309),
    ("conv2d_lora_f64_stride2_pad1_dil2_k3x2", "lora", 2, 3, 4, (3, 2), (2, 2), (1, 1), (2, 2), 1, True, 4, 8,
     (9, 8), 2, False, "float64", 310),
    ("conv2d_dora_f64_k1x1", "dora", 2, 6, 5, (1, 1), (1, 1), (0, 0), (1, 1), 1, True, 3, 6, (4, 5), 2, False,
     "float64", 311),
    ("conv2d_dora_f64_groups2", "dora", 2, 4, 6, (3, 3), (1, 1), (1, 1), (1, 1), 2, True, 4, 8, (5, 5), 2, False,
     "float64", 312),
    ("conv2d_lora_f64_groups2", "lora", 2, 4, 6, (3, 3), (1, 1), (1, 1), (1, 1), 2, True, 4, 8, (5, 5), 2, False,
     "float64", 313),
    ("conv3d_dora_f64_bias", "dora", 3, 2, 4, (3, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1, 1), 1, True, 2, 4, (4, 4, 5),
     1, False, "float64", 401),
    ("conv3d_dora_f32_bias", "dora", 3, 2, 4, (3, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1, 1), 1, True, 2, 4, (4, 4, 5),
     1, False, "float32", 402),
    ("conv3d_lora_f64_bias", "lora", 3, 2, 4, (3, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1, 1), 1, True, 2, 4, (4, 4, 5),
     1, False, "float64", 403),
    ("conv3d_dora_f64_nobias_rank1_rslora", "dora", 3, 2, 3, (2, 3, 2), (2, 1, 1), (0, 1, 0), (1, 1, 1), 1, False,
     1, 2, (5, 4, 4), 2, True, "float64", 404),
]


class PeftRefused(Exception):
    """PEFT itself raised (creation, forward or merge): recorded, not a failure of this script."""

    def __init__(self, stage, exc):
        super().__init__(f"{stage}: {type(exc).__name__}: {exc}")
        self.stage = stage
        self.exc = exc


def tolerances(torch, dtype):
    return (1e-11, 1e-12) if dtype == torch.float64 else (2e-5, 2e-6)  # (rtol, atol)


def check_close(torch, name, a, b, dtype, checks, fatal=True):
    rtol, atol = tolerances(torch, dtype)
    a = a.double()
    b = b.double()
    assert a.shape == b.shape, (name, tuple(a.shape), tuple(b.shape))
    diff = (a - b).abs().max().item()
    scale = b.abs().max().item()
    print(f"    check {name}: max|diff| = {diff:.3e} (max|ref| = {scale:.3e})")
    checks[name] = {"max_abs_diff": diff, "max_abs_ref": scale}
    if not torch.allclose(a, b, rtol=rtol, atol=atol * max(1.0, scale)):
        if not fatal:
            print(f"    NOTE (not fatal): {name} differs beyond rtol={rtol} atol={atol}")
            checks[name]["within_tolerance"] = False
            return False
        raise AssertionError(f"{name}: max|diff| {diff:.3e} exceeds rtol={rtol} atol={atol}")
    return True


def conv_fn(F, nd):
    return {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]


def ref_embedding(torch, F, W, A, B, m, s, ids, pad, dora, detach):
    """Float64 re-implementation of PEFT's Embedding forward (LoRA or DoRA)."""
    base = F.embedding(ids, W, padding_idx=pad)
    after_a = F.embedding(ids, A.T, padding_idx=pad)  # (n, r), as PEFT's _embed(x, lora_embedding_A.T)
    h = base + s * (after_a @ B.T)
    if not dora:
        return h, None
    V = W.T + s * (B @ A)  # (dim, num_embeddings)
    nrm = torch.linalg.norm(V, dim=1)
    if detach:
        nrm = nrm.detach()
    return h * (m / nrm), nrm


def conv_norm(torch, W, A, B, s):
    """PEFT's conv DoRA norm per output channel (literally _DoraConvNdLayer.get_lora_weight + get_weight_norm;
    for groups > 1 the product is only reshaped to W's shape, see the README)."""
    r = A.shape[0]
    lw = torch.mm(B.reshape(-1, r), A.reshape(r, -1)).reshape(W.shape)
    return (W + s * lw).flatten(1).norm(dim=1)


def ref_conv(torch, F, geo, W, bias, A, B, m, s, x, dora, detach):
    """Float64 re-implementation of PEFT's ConvNd forward (LoRA or DoRA)."""
    cf = conv_fn(F, geo["nd"])
    base = cf(x, W, None, geo["stride"], geo["padding"], geo["dilation"], geo["groups"])
    after_a = cf(x, A, None, geo["A_stride"], geo["A_padding"], geo["A_dilation"], geo["A_groups"])
    lora = cf(after_a, B, None, 1, 0, 1, geo["B_groups"])
    h = base + s * lora
    view = (1, -1) + (1,) * geo["nd"]
    nrm = None
    if dora:
        nrm = conv_norm(torch, W, A, B, s)
        if detach:
            nrm = nrm.detach()
        h = h * (m.reshape(-1) / nrm).view(*view)
    if bias is not None:
        h = h + bias.view(*view)
    return h, nrm


def build(torch, nn, dtype, seed, make_base, config_kwargs):
    from peft import LoraConfig, get_peft_model

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = make_base()

        def forward(self, x):
            return self.layer(x)

    old_default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # every parameter (base and adapter) is born in this dtype
    try:
        torch.manual_seed(seed)
        base = Tiny()
        kw = dict(target_modules=["layer"], lora_dropout=0.0, bias="none", init_lora_weights=False)
        kw.update(config_kwargs)
        config = LoraConfig(**kw)
        try:
            model = get_peft_model(base, config)
        except Exception as e:
            raise PeftRefused("create (get_peft_model)", e)
    finally:
        torch.set_default_dtype(old_default)
    return model


def make_case(torch, peft, out_dir, spec, layer_type):
    from torch import nn
    import torch.nn.functional as F
    from safetensors.torch import save_file

    checks = {}
    notes = []
    if layer_type == "embedding":
        name, kind, V, D, r, alpha, n, pad, use_rslora, dtype_name, seed = spec
        print(f"== {name}: {kind} embedding num_embeddings={V} dim={D} r={r} alpha={alpha} n={n} "
              f"padding_idx={pad} rslora={use_rslora} {dtype_name} seed={seed}")
        make_base = lambda: nn.Embedding(V, D, padding_idx=pad)  # noqa: E731
        bias = False
    else:
        (name, kind, nd, cin, cout, ksize, stride, padding, dilation, groups, bias, r, alpha, spatial, batch,
         use_rslora, dtype_name, seed) = spec
        layer_type = f"conv{nd}d"
        pad = None
        print(f"== {name}: {kind} {layer_type} in={cin} out={cout} kernel={ksize} stride={stride} "
              f"padding={padding} dilation={dilation} groups={groups} bias={bias} r={r} alpha={alpha} "
              f"x=({batch}, {cin}, {spatial}) rslora={use_rslora} {dtype_name} seed={seed}")
        conv_cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[nd]
        make_base = lambda: conv_cls(cin, cout, ksize, stride=stride, padding=padding,  # noqa: E731
                                     dilation=dilation, groups=groups, bias=bias)
    dtype = getattr(torch, dtype_name)
    dora = kind == "dora"

    model = build(torch, nn, dtype, seed, make_base,
                  dict(r=r, lora_alpha=alpha, use_dora=dora, use_rslora=use_rslora))
    layer = model.base_model.model.layer
    assert type(layer).__module__.startswith("peft."), type(layer)
    scaling = float(layer.scaling[ADAPTER])
    expect_s = alpha / math.sqrt(r) if use_rslora else alpha / r
    assert abs(scaling - expect_s) < 1e-12, (scaling, expect_s)
    base_mod = layer.get_base_layer()
    W = base_mod.weight.detach().clone()
    b = base_mod.bias.detach().clone() if bias else None
    if layer_type == "embedding":
        A_p = layer.lora_embedding_A[ADAPTER]
        B_p = layer.lora_embedding_B[ADAPTER]
        assert tuple(A_p.shape) == (r, V) and tuple(B_p.shape) == (D, r), (A_p.shape, B_p.shape)
        geo = None
    else:
        la = layer.lora_A[ADAPTER]
        lb = layer.lora_B[ADAPTER]
        A_p = la.weight
        B_p = lb.weight
        geo = {"nd": nd, "stride": tuple(base_mod.stride), "padding": tuple(base_mod.padding),
               "dilation": tuple(base_mod.dilation), "groups": base_mod.groups,
               "A_stride": tuple(la.stride), "A_padding": tuple(la.padding), "A_dilation": tuple(la.dilation),
               "A_groups": la.groups, "B_groups": lb.groups}
        print(f"    PEFT lora_A: stride={la.stride} padding={la.padding} dilation={la.dilation} groups={la.groups}"
              f" padding_mode={la.padding_mode}; lora_B: kernel={lb.kernel_size} groups={lb.groups}"
              f" bias={lb.bias is not None}")
        assert tuple(A_p.shape) == (r, cin) + tuple(ksize), A_p.shape
        assert tuple(B_p.shape) == (cout, r // groups) + (1,) * nd, B_p.shape
        if tuple(la.dilation) != tuple(base_mod.dilation):
            notes.append(f"PEFT's lora_A has dilation {tuple(la.dilation)}, the base layer {tuple(base_mod.dilation)}")
    A = A_p.detach().clone()
    B = B_p.detach().clone()
    for t, tn in ((W, "W"), (A, "A"), (B, "B")):
        assert t.dtype == dtype, (tn, t.dtype)
    assert B.abs().min().item() > 0.0, "B must be nonzero"

    gen = torch.Generator().manual_seed(1000 + seed)
    if layer_type == "embedding":
        ids = torch.randint(0, V, (n,), generator=gen, dtype=torch.int64)
        ids[-1] = ids[0]  # a repeated id
        ids[n // 2] = ids[1]
        if pad is not None:
            ids[2] = pad
            ids[n - 3] = pad  # padding_idx hit twice
        inp = ids
        tensors = {"W": W, "A": A, "B": B, "ids": ids}
    else:
        x = torch.randn((batch, cin) + tuple(spatial), generator=gen, dtype=torch.float64).to(dtype)
        inp = x
        tensors = {"W": W, "A": A, "B": B, "x": x}
        if bias:
            tensors["bias"] = b

    m = None
    if dora:
        dora_layer = layer.lora_magnitude_vector[ADAPTER]
        m_init = dora_layer.weight.detach().clone()
        assert m_init.dtype == dtype, m_init.dtype
        # m_init must be PEFT's magnitude at creation: the norms of W + s B A with B != 0
        with torch.no_grad():
            if layer_type == "embedding":
                _, nrm0 = ref_embedding(torch, F, W.double(), A.double(), B.double(), torch.ones(D, dtype=torch.float64),
                                        scaling, ids, pad, True, True)
            else:
                nrm0 = conv_norm(torch, W.double(), A.double(), B.double(), scaling)
        check_close(torch, "m_init == norm(W + s B A)", m_init.reshape(-1), nrm0, dtype, checks)
        expect_m_shape = (D,) if layer_type == "embedding" else (1, cout) + (1,) * nd
        assert tuple(m_init.shape) == expect_m_shape, (m_init.shape, expect_m_shape)
        noise = torch.randn(m_init.numel(), generator=gen, dtype=torch.float64).reshape(m_init.shape)
        m = (m_init.double() * (1.0 + 0.2 * noise)).to(dtype)
        with torch.no_grad():
            dora_layer.weight.copy_(m)
        tensors["m_init"] = m_init
        tensors["m"] = m.clone()
        with torch.no_grad():
            if layer_type == "embedding":
                wn = dora_layer.get_weight_norm(W, (B @ A).detach(), scaling)
            else:
                try:
                    lw = dora_layer.get_lora_weight(la, lb).reshape(W.shape)
                except Exception as e:  # signature changed: use the literal formula of PEFT 0.20/0.21
                    print(f"    note: get_lora_weight(la, lb) failed ({e!r}); using mm(B.view(-1, r), A.view(r, -1))")
                    lw = torch.mm(B.reshape(-1, r), A.reshape(r, -1)).reshape(W.shape)
                wn = dora_layer.get_weight_norm(W, lw.detach(), scaling)
        weight_norm = wn.detach().clone().reshape(-1)
        assert weight_norm.dtype == dtype, weight_norm.dtype
        tensors["weight_norm"] = weight_norm

    # PEFT forward and backward of sum(y * dy), train mode (dropout 0)
    model.train()
    model.zero_grad(set_to_none=True)
    if layer_type == "embedding":
        xv = ids
    else:
        xv = x.clone().requires_grad_(True)
    try:
        y = model(xv)
    except Exception as e:
        raise PeftRefused("forward", e)
    assert y.dtype == dtype, y.dtype
    dy = torch.randn(tuple(y.shape), generator=gen, dtype=torch.float64).to(dtype)
    tensors["dy"] = dy
    (y * dy).sum().backward()
    tensors["y"] = y.detach().clone()
    if layer_type != "embedding":
        tensors["grad_x"] = xv.grad.detach().clone()
    tensors["grad_A"] = A_p.grad.detach().clone()
    tensors["grad_B"] = B_p.grad.detach().clone()
    assert base_mod.weight.grad is None, "base weight must be frozen by PEFT"
    if dora:
        tensors["grad_m"] = layer.lora_magnitude_vector[ADAPTER].weight.grad.detach().clone()
    if pad is not None:
        z = tensors["grad_A"][:, pad].abs().max().item()
        print(f"    PEFT grad_A[:, padding_idx] max|.| = {z:.3e} (F.embedding gives padding_idx no gradient)")
        checks["grad_A[:, padding_idx] max abs"] = z

    # eval forward equals the training forward (dropout is 0)
    model.eval()
    with torch.no_grad():
        y_eval = model(inp)
    model.train()
    check_close(torch, "PEFT eval forward == train forward", y_eval, tensors["y"], dtype, checks)

    # independent float64 re-implementation: detached (must give PEFT's gradients) and exact
    def run_ref(detach):
        Ae = A.double().clone().requires_grad_(True)
        Be = B.double().clone().requires_grad_(True)
        me = m.double().clone().requires_grad_(True) if dora else None
        if layer_type == "embedding":
            ye, nrm = ref_embedding(torch, F, W.double(), Ae, Be, me, scaling, ids, pad, dora, detach)
            xe = None
        else:
            xe = x.double().clone().requires_grad_(True)
            ye, nrm = ref_conv(torch, F, geo, W.double(), b.double() if bias else None, Ae, Be, me, scaling, xe,
                               dora, detach)
        (ye * dy.double()).sum().backward()
        out = {"y": ye.detach(), "grad_A": Ae.grad, "grad_B": Be.grad}
        if dora:
            out["grad_m"] = me.grad
            out["norm"] = nrm.detach()
        if xe is not None:
            out["grad_x"] = xe.grad
        return out

    det = run_ref(True)
    for k in ("y", "grad_A", "grad_B", "grad_m", "grad_x"):
        if k in det:
            check_close(torch, f"float64 re-implementation (norm detached) {k} == PEFT {k}", det[k], tensors[k],
                        dtype, checks)
    if dora:
        check_close(torch, "weight_norm == float64 norm", tensors["weight_norm"], det["norm"], dtype, checks)
        ex = run_ref(False)
        check_close(torch, "exact forward (float64, norm not detached) == PEFT y", ex["y"], tensors["y"], dtype,
                    checks)
        for k in ("y", "grad_A", "grad_B", "grad_m", "grad_x"):
            if k in ex:
                tensors[k + "_exact"] = ex[k].to(dtype)
        check_close(torch, "grad_m_exact == grad_m", ex["grad_m"], tensors["grad_m"], dtype, checks)
        if "grad_x" in ex:
            check_close(torch, "grad_x_exact == grad_x", ex["grad_x"], tensors["grad_x"], dtype, checks)
        for k in ("grad_A", "grad_B"):
            rel = ((ex[k] - det[k]).norm() / det[k].norm()).item()
            print(f"    {k} exact vs detached: relative difference {rel:.3e} (should be clearly > 0)")
            checks[f"{k} exact vs detached relative difference"] = rel
        if layer_type == "embedding":
            # the detached formulas of /work/shared/MATH.md, as a cross-check
            with torch.no_grad():
                Wd, Ad, Bd, dyd = W.double(), A.double(), B.double(), dy.double()
                nrm = det["norm"]
                g = m.double() / nrm
                h = Wd[ids] + scaling * Ad.T[ids] @ Bd.T
                check_close(torch, "grad_m == sum_t dy*h / n", (dyd * h).sum(0) / nrm, tensors["grad_m"], dtype,
                            checks)
                Gg = dyd * g
                check_close(torch, "grad_B == s Gg^T A^T[ids]", scaling * Gg.T @ Ad.T[ids], tensors["grad_B"],
                            dtype, checks)
                gA = torch.zeros_like(Ad)
                gA.index_add_(1, ids, scaling * (Gg @ Bd).T)
                if pad is not None:
                    gA[:, pad] = 0.0
                check_close(torch, "grad_A == scatter-add s (Gg B)^T over ids", gA, tensors["grad_A"], dtype, checks)

    # PEFT merge on a deep copy
    merge_status = "ok"
    try:
        merged_model = copy.deepcopy(model).merge_and_unload()
    except Exception as e:
        merged_model = None
        merge_status = f"refused: {type(e).__name__}: {e}"
        print(f"    PEFT merge_and_unload {merge_status}")
    if merged_model is not None:
        ml = merged_model.layer
        assert type(ml) is type(base_mod), type(ml)
        W_merged = ml.weight.detach().clone()
        tensors["W_merged"] = W_merged
        with torch.no_grad():
            y_merged = ml(inp)
        grouped = layer_type != "embedding" and geo["groups"] > 1
        if not check_close(torch, "merged forward == PEFT y", y_merged, tensors["y"], dtype, checks,
                           fatal=not grouped):
            notes.append("PEFT merged this grouped conv, but the merged layer's forward differs from the unmerged one")
        with torch.no_grad():
            if layer_type == "embedding":
                Vm = W.double() + scaling * (B.double() @ A.double()).T
                if dora:
                    Vm = Vm * (m.double() / det["norm"]).view(1, -1)
            else:
                rr = A.shape[0]
                Vm = W.double() + scaling * torch.mm(B.double().reshape(-1, rr), A.double().reshape(rr, -1)).reshape(
                    W.shape)
                if dora:
                    Vm = Vm * (m.double().reshape(-1) / det["norm"]).view((-1,) + (1,) * (nd + 1))
        if not grouped:
            check_close(torch, "W_merged == closed form", W_merged, Vm, dtype, checks)

    for k, v in tensors.items():
        if k != "ids":
            assert v.dtype == dtype, (k, v.dtype)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out_dir, name + ".safetensors"))
    meta = {
        "kind": kind,
        "layer": layer_type,
        "r": r,
        "alpha": alpha,
        "scaling": scaling,
        "use_rslora": use_rslora,
        "bias": bias,
        "dtype": dtype_name,
        "seed": seed,
    }
    if layer_type == "embedding":
        meta.update({"num_embeddings": V, "embedding_dim": D, "n": n, "padding_idx": pad})
    else:
        meta.update({"in_channels": cin, "out_channels": cout, "kernel_size": list(ksize),
                     "stride": list(geo["stride"]), "padding": list(geo["padding"]),
                     "dilation": list(geo["dilation"]), "groups": geo["groups"],
                     "lora_A_stride": list(geo["A_stride"]), "lora_A_padding": list(geo["A_padding"]),
                     "lora_A_dilation": list(geo["A_dilation"]), "lora_B_groups": geo["B_groups"],
                     "padding_idx": None})
    meta.update({
        "merge": merge_status,
        "shapes": {k: list(v.shape) for k, v in tensors.items()},
        "tensor_dtypes": {k: str(v.dtype).replace("torch.", "") for k, v in tensors.items()},
        "convention": CONVENTION["embedding" if layer_type == "embedding" else "conv"],
        "exact_computed_in": "float64 from the case's tensors, rounded to the case dtype" if dora else None,
        "notes": notes,
        "self_checks": checks,
        "peft_version": peft.__version__,
        "torch_version": torch.__version__,
    })
    with open(os.path.join(out_dir, name + ".json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    print(f"    wrote {name}: {sorted(tensors)}")


def probes(torch, peft):
    """Things PEFT may refuse or handle specially; returns a list of {probe, result} records."""
    from torch import nn
    out = []

    def rec(probe, fn):
        try:
            res = fn()
        except Exception as e:
            res = f"PEFT raised {type(e).__name__}: {e}"
        print(f"== probe {probe}: {res}")
        out.append({"probe": probe, "result": res})

    def grouped_rank_not_divisible():
        build(torch, nn, torch.float64, 7, lambda: nn.Conv2d(4, 6, 3, groups=2),
              dict(r=3, lora_alpha=6, use_dora=True))
        return "accepted"

    def depthwise_dora():
        model = build(torch, nn, torch.float64, 8, lambda: nn.Conv2d(4, 4, 3, padding=1, groups=4),
                      dict(r=4, lora_alpha=8, use_dora=True))
        y = model(torch.randn(1, 4, 5, 5, dtype=torch.float64))
        try:
            copy.deepcopy(model).merge_and_unload()
            merge = "merge ok"
        except Exception as e:
            merge = f"merge refused: {type(e).__name__}: {e}"
        return f"created, forward ok (y {tuple(y.shape)}); {merge}"

    def padding_mode_reflect():
        model = build(torch, nn, torch.float64, 9,
                      lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"),
                      dict(r=2, lora_alpha=4, use_dora=False))
        la = model.base_model.model.layer.lora_A[ADAPTER]
        x = torch.randn(1, 3, 5, 5, dtype=torch.float64)
        with torch.no_grad():
            y = model(x)
            ym = copy.deepcopy(model).merge_and_unload()(x)
        return (f"lora_A.padding_mode={la.padding_mode!r}; max|merged forward - unmerged forward| = "
                f"{(y - ym).abs().max().item():.3e}")

    def embedding_dropout():
        res = []
        for use_dora in (False, True):
            model = build(torch, nn, torch.float64, 10, lambda: nn.Embedding(10, 6),
                          dict(r=2, lora_alpha=4, use_dora=use_dora, lora_dropout=0.9))
            ids = torch.arange(10)
            model.train()
            with torch.no_grad():
                y1 = model(ids)
                y2 = model(ids)
            res.append(f"{'DoRA' if use_dora else 'LoRA'}: two train-mode forwards with lora_dropout=0.9 differ by "
                       f"{(y1 - y2).abs().max().item():.3e}")
        return "; ".join(res)

    rec("conv2d groups=2, DoRA, r=3 (not divisible by groups)", grouped_rank_not_divisible)
    rec("depthwise conv2d (groups=in=out=4), DoRA r=4", depthwise_dora)
    rec("conv2d padding_mode='reflect', LoRA", padding_mode_reflect)
    rec("embedding dropout", embedding_dropout)
    return out


def dump_source(path):
    mods = {}
    import peft.tuners.lora.layer as L
    import peft.tuners.lora.dora as Dm
    try:
        import peft.tuners.lora.variants as Vm
    except Exception:
        Vm = None
    with open(path, "w") as f:
        for mod, names in ((L, ["Embedding", "_ConvNd"]),
                           (Dm, ["DoraLinearLayer", "DoraEmbeddingLayer", "_DoraConvNdLayer"]),
                           (Vm, ["DoraEmbeddingVariant", "_DoraConvNdVariant"])):
            for nm in names:
                obj = getattr(mod, nm, None) if mod is not None else None
                try:
                    src = inspect.getsource(obj)
                except Exception as e:
                    src = f"<unavailable: {e!r}>"
                f.write(f"##### {nm}\n{src}\n")
    return mods


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join("tests", "data", "layers"), help="output directory")
    ap.add_argument("--only", nargs="*", help="make only these cases")
    ap.add_argument("--dump-source", help="also write PEFT's Embedding/Conv/DoRA source to this file")
    args = ap.parse_args()

    import torch
    import peft

    torch.set_num_threads(1)  # reproducible reductions
    print(f"torch {torch.__version__}, peft {peft.__version__}, python {sys.version.split()[0]}")
    if peft.__version__ != "0.21.0":
        print(f"WARNING: expected peft 0.21.0, got {peft.__version__}")
    os.makedirs(args.out, exist_ok=True)
    if args.dump_source:
        dump_source(args.dump_source)

    failed, names, refused = [], [], []
    specs = [(s, "embedding") for s in EMB_CASES] + [(s, "conv") for s in CONV_CASES]
    for spec, lt in specs:
        if args.only and spec[0] not in args.only:
            continue
        try:
            make_case(torch, peft, args.out, spec, lt)
            names.append(spec[0])
        except PeftRefused as e:
            print(f"    PEFT REFUSED {spec[0]} at {e.stage}: {type(e.exc).__name__}: {e.exc}")
            refused.append({"case": spec[0], "stage": e.stage, "error": f"{type(e.exc).__name__}: {e.exc}"})
        except Exception:
            traceback.print_exc()
            failed.append(spec[0])
    if not args.only:
        with open(os.path.join(args.out, "index.json"), "w") as f:
            json.dump(names, f, indent=1)
            f.write("\n")
        try:
            pr = probes(torch, peft)
        except Exception:
            traceback.print_exc()
            pr = []
            failed.append("probes")
        with open(os.path.join(args.out, "refused.json"), "w") as f:
            json.dump({"peft_version": peft.__version__, "torch_version": torch.__version__,
                       "refused_cases": refused, "probes": pr}, f, indent=1)
            f.write("\n")
    print(f"made {len(names)} cases; PEFT refused {len(refused)}: {[r['case'] for r in refused]}")
    if failed:
        print("FAILED:", failed)
        return 1
    print("all done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
