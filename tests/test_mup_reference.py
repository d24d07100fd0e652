"""μP parity with the official μP-DiT code (ML-GSAI/Scaling-Diffusion-Transformers-muP, commit 6d1583d, the code of
Zheng et al., "Scaling Diffusion Transformers Efficiently via μP").

The reference is tests/data/mup_reference.json, made by tests/reference/make_mup_reference.py from their
DiT/models_mup.py with the `mup` 1.0.0 package, as DiT/train_mup.py uses them: base shapes from a base and a delta
model, mup.set_base_shapes, MuAdamW(lr, weight_decay=0). Their μP DiTs have head size 16 and 2 / 4 / 8 heads (widths
32 / 64 / 128, depth 2), base width 32; ours are models.build_model(...) with the same shapes under param=mup,
base_width=32. With MUP_DIT_OFFICIAL_PATH set to a checkout, the reference is also recomputed live.

Compared, by parameter name (the names are the same in both codebases):
  * every trainable parameter of each model has a counterpart in the other (no unmatched name, same shapes);
  * its role (input / hidden / output / vector) and its Adam learning-rate multiplier: ours `param_groups` lr_scale,
    theirs MuAdamW's lr / base lr, equal exactly, at widths 1x, 2x, 4x, and for DiT-XL/2 (width 1152) against their
    shipped base shapes DiT/width288_d28.bsh (base_width 288);
  * the readout's output multiplier: ours `readout_scale` = base / width and what our FinalLayer does with it, theirs
    what MuReadout does to a plain linear map (output_mult / width_mult, output_mult = 1, their default);
  * how the init scales with width: for every hidden matrix the ratio of its init RMS at 2x / 4x width to the base
    width equals theirs (within a sampling tolerance computed from the number of values drawn), and both are
    √(base / width); every input and vector parameter is width-independent in both.

Intended differences (models/mup.py's docstring; the reason is that ours equals the official DiT at the base width):
  * pos_embed: theirs is an nn.Parameter with requires_grad=False (MuAdamW holds it, but it gets no gradient and is
    never updated); ours is a buffer. The only unmatched name, and the test checks it is exactly this one.
  * adaLN modulation (every block's and the final layer's adaLN_modulation.1.weight): ours keeps DiT's adaLN-Zero
    (zero at every width; zero is a valid μP init of a hidden matrix, and its learning rate is the same η/m as
    theirs); theirs is kaiming N(0, 1/n). So for these the init ratio is theirs √(base/n) vs ours 0/0.
  * Hidden matrices at the base width: ours keeps DiT's xavier-uniform, variance 2 / (fan_in + fan_out), theirs
    kaiming-normal, variance 1 / fan_in, and t_embedder.mlp.2 is N(0, 0.02²·base/n) in ours, N(0, 1/n) in theirs.
    Width-free constant factors apart, both have variance ∝ 1/n: the ratios match, the base-width values do not.
  * Input weights at the base width: ours keep DiT's N(0, 0.02²) label table and t_embedder.mlp.0, and the patch
    embedding's xavier variance held at its base-width value; theirs N(0, 1) (PyTorch's Embedding default),
    N(0, 1/256) and N(0, 1/(C·p²)). Both are width-independent.
  * Weight decay: MuAdamW multiplies a hidden matrix's weight decay by m (so lr·wd stays constant); ours keeps the
    optimizer's weight decay in every group (lr·wd ∝ 1/m, as nanoGPT-mup). Both codebases train with weight decay
    0 (their train_mup.py, our conf/optim/adamw.yaml), where this makes no difference; the test pins both behaviours.
The readout itself (zero weight and bias, multiplier base / width) and all biases (zero) agree at every width.
"""

import json
import math
import os
from pathlib import Path

import pytest
import torch

from conftest import load_reference_script
from models import build_model, create_model
from models.mup import classify, param_groups

REFERENCE = Path(__file__).parent / "data" / "mup_reference.json"
gen = load_reference_script("make_mup_reference")
ADALN = ("adaLN_modulation.1.weight",)
UNMATCHED = {"pos_embed"}   # theirs only: a frozen nn.Parameter; ours: a buffer


@pytest.fixture(scope="module")
def reference():
    return json.loads(REFERENCE.read_text())


def ours(width, base, seed=0):
    """Our DiT with the shapes of their width-`width` model, under param=mup."""
    small = gen.SMALL
    torch.manual_seed(seed)
    return build_model(dict(name="DiT-S/2", **small, hidden_size=width, num_heads=width // gen.DIM_HEADS,
                            param="mup", base_width=base))


def lr_scales_by_name(model, base):
    by_id = {id(p): g["lr_scale"] for g in param_groups(model, base) for p in g["params"]}
    return {name: by_id[id(p)] for name, p in model.named_parameters()}


def widths(reference):
    return sorted(int(w) for w in reference["widths"])


def test_the_reference_is_from_the_commit_read_and_covers_1x_2x_4x(reference):
    assert reference["meta"]["commit"] == gen.COMMIT_READ
    assert reference["meta"]["mup"] == "1.0.0"
    base = reference["config"]["base_width"]
    assert widths(reference) == [base, 2 * base, 4 * base]
    assert REFERENCE.stat().st_size < 200_000


@pytest.mark.parametrize("factor", [1, 2, 4])
def test_every_parameter_is_matched_and_has_their_lr_multiplier_and_role(reference, factor):
    base = reference["config"]["base_width"]
    width = factor * base
    theirs = reference["widths"][str(width)]["params"]
    model = ours(width, base)
    mine = dict(model.named_parameters())
    # Every parameter accounted for: theirs only pos_embed (frozen; a buffer of the same shape in ours).
    assert set(theirs) - set(mine) == UNMATCHED and not set(mine) - set(theirs)
    for name in UNMATCHED:
        assert not theirs[name]["requires_grad"] and list(model.get_buffer(name).shape) == theirs[name]["shape"]
    scales, roles = lr_scales_by_name(model, base), classify(model)
    lr = reference["config"]["base_lr"]
    for name, p in mine.items():
        t = theirs[name]
        assert list(p.shape) == t["shape"], name
        assert roles[name] == t["role"], (name, roles[name], t["role"])
        assert scales[name] == t["lr_mult"], (name, scales[name], t["lr_mult"])
        assert lr * scales[name] == t["lr"], name   # the trainer's lr x lr_scale is MuAdamW's lr, bit for bit
    # Both give η / m exactly to the hidden matrices and η to everything else.
    assert {t["lr_mult"] for t in theirs.values() if t["role"] == "hidden"} == {base / width}
    assert {t["lr_mult"] for t in theirs.values() if t["role"] != "hidden"} == {1.0}


def test_dit_xl2_lr_multipliers_match_their_shipped_base_shapes(reference):
    """Their DiT-XL-2-μP setting: width 1152 against DiT/width288_d28.bsh (base 288: m = 4)."""
    xl2 = reference["xl2"]
    config = dict(xl2["config"])
    with torch.device("meta"):
        model = create_model("DiT-XL/2", input_size=config["input_size"], num_classes=config["num_classes"])
    assert (model.x_embedder.proj.out_channels, len(model.blocks), model.num_heads, model.patch_size) == \
        (config["hidden_size"], config["depth"], config["num_heads"], config["patch_size"])
    theirs, scales = xl2["params"], lr_scales_by_name(model, xl2["base_width"])
    assert set(theirs) - set(scales) == UNMATCHED and not set(scales) - set(theirs)
    for name, p in model.named_parameters():
        assert list(p.shape) == theirs[name]["shape"], name
        assert scales[name] == theirs[name]["lr_mult"], (name, scales[name], theirs[name]["lr_mult"])
        # Their .bsh marks a parameter hidden (lr / m) exactly when both of its dims are width dims.
        two_width_dims = sum(d is not None for d in theirs[name]["infshape"]) == 2
        assert (scales[name] == 0.25) == two_width_dims, name
    assert sum(s == 0.25 for s in scales.values()) == 28 * 5 + 2   # 5 per block, t_embedder.mlp.2, final adaLN


@pytest.mark.parametrize("factor", [1, 2, 4])
def test_readout_multiplier_equals_mureadout(reference, factor):
    base = reference["config"]["base_width"]
    width = factor * base
    theirs = reference["widths"][str(width)]["readout"]
    assert theirs["residual"] == 0.0 and theirs["output_mult"] == 1.0
    assert theirs["multiplier"] == theirs["output_mult"] / theirs["width_mult"]
    model = ours(width, base)
    assert model.readout_scale == theirs["multiplier"]
    # What our final layer does with it: the same factor against a plain readout (readout_scale 1).
    g = torch.Generator().manual_seed(factor)
    layer = model.final_layer
    with torch.no_grad():
        layer.linear.weight.copy_(torch.randn(layer.linear.weight.shape, generator=g))
        x, c = torch.randn(2, 5, width, generator=g), torch.randn(2, width, generator=g)
        scaled, plain = layer(x, c, model.readout_scale).double(), layer(x, c, 1.0).double()
    assert float((scaled * plain).sum() / (plain * plain).sum()) == pytest.approx(theirs["multiplier"], rel=1e-6)
    assert torch.allclose(scaled, theirs["multiplier"] * plain, rtol=1e-5, atol=1e-6)


def init_rms(base, seeds):
    """{width: {name: (pooled RMS over the seeds, number of values)}} of our mup-initialised DiTs."""
    out = {}
    for width in (base, 2 * base, 4 * base):
        sums, counts = {}, {}
        for seed in seeds:
            for name, p in ours(width, base, seed).named_parameters():
                sums[name] = sums.get(name, 0.0) + float(p.detach().double().pow(2).sum())
                counts[name] = counts.get(name, 0) + p.numel()
        out[width] = {n: (math.sqrt(sums[n] / counts[n]), counts[n]) for n in sums}
    return out


def rel_sd(count):
    """Relative standard deviation of the RMS of `count` iid zero-mean values (normal: the larger of normal and
    uniform, the two distributions drawn here)."""
    return 1 / math.sqrt(2 * count)


def test_init_scales_with_width_as_theirs(reference):
    base = reference["config"]["base_width"]
    mine = init_rms(base, reference["config"]["seeds"])
    theirs = {int(w): {n: (t["init_rms"], t["init_count"]) for n, t in d["params"].items()}
              for w, d in reference["widths"].items()}
    roles = {n: t["role"] for n, t in reference["widths"][str(base)]["params"].items()}
    checked = {"hidden": 0, "adaLN": 0, "width-free": 0}
    for width in (2 * base, 4 * base):
        expected = math.sqrt(base / width)
        for name, role in roles.items():
            if name in UNMATCHED:
                continue
            (o_b, on_b), (o_n, on_n) = mine[base][name], mine[width][name]
            (t_b, tn_b), (t_n, tn_n) = theirs[base][name], theirs[width][name]
            if role == "hidden" and name.endswith(ADALN):
                # Intended: adaLN-Zero in ours at every width; theirs N(0, 1/n).
                assert o_b == o_n == 0.0, name
                assert t_n / t_b == pytest.approx(expected, rel=5 * math.hypot(rel_sd(tn_b), rel_sd(tn_n))), name
                checked["adaLN"] += 1
            elif role == "hidden":
                tol = 5 * math.sqrt(sum(rel_sd(k) ** 2 for k in (on_b, on_n, tn_b, tn_n)))
                assert o_b > 0 and t_b > 0, name
                assert o_n / o_b == pytest.approx(t_n / t_b, rel=tol), (name, o_n / o_b, t_n / t_b)
                assert o_n / o_b == pytest.approx(expected, rel=tol) and t_n / t_b == pytest.approx(expected, rel=tol)
                checked["hidden"] += 1
            else:
                # input, vector and the (zero) readout: width-independent in both.
                for (a, na), (b, nb) in (((o_b, on_b), (o_n, on_n)), ((t_b, tn_b), (t_n, tn_n))):
                    assert b == a == 0.0 or b / a == pytest.approx(1.0, rel=5 * math.hypot(rel_sd(na), rel_sd(nb))), \
                        (name, a, b)
                if role in ("vector", "output"):
                    assert o_b == o_n == t_b == t_n == 0.0, name   # zero biases, zero readout in both
                checked["width-free"] += 1
    depth = gen.SMALL["depth"]
    # Per block 4 hidden matrices, 1 adaLN; plus t_embedder.mlp.2 and the final adaLN; the rest less pos_embed.
    assert checked == {"hidden": 2 * (4 * depth + 1), "adaLN": 2 * (depth + 1),
                       "width-free": 2 * (len(roles) - 5 * depth - 3)}


def test_weight_decay_difference_is_pinned(reference):
    """MuAdamW scales a hidden matrix's weight decay by m; ours leaves weight decay to the optimizer (one value for
    every group). Irrelevant at weight decay 0, what both codebases train with."""
    base = reference["config"]["base_width"]
    for w, d in reference["widths"].items():
        for name, t in d["params"].items():
            assert t["wd_mult"] == (int(w) / base if t["role"] == "hidden" else 1.0), name
    assert all("weight_decay" not in g for g in param_groups(ours(4 * base, base), base))


@pytest.mark.skipif(not os.environ.get(gen.ENV),
                    reason=f"set {gen.ENV} to a Scaling-Diffusion-Transformers-muP checkout")
def test_live_official_code_gives_the_stored_reference(reference):
    live = json.loads(json.dumps(gen.make_reference(gen.load_official(os.environ[gen.ENV]))))
    assert live == {k: v for k, v in reference.items() if k != "meta"}
