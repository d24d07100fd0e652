"""μP (models/mup.py): per-parameter learning-rate and init scales against their formulas and against the `mup`
package, sp untouched, the coordinate check, and exact resume through train.py with model.param=mup."""

import copy
import math

import pytest
import torch

import train as train_script
from benchmarks.mup_coordcheck import coord_data, role_means
from conftest import ROOT, TINY, assert_same_state, compose_config, final_state, rel_err
from models import DiT, build_model, create_model
from models.mup import classify, mup_init_, optimizer_params, param_groups, parametrize, width
from models.unet import UNet

HEAD = 16


def dit(width, **kwargs):
    config = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=width, depth=2, num_heads=width // HEAD,
                  num_classes=10)
    return DiT(**{**config, **kwargs})


def unet(width, **kwargs):
    config = dict(input_size=8, in_channels=1, num_classes=10, model_channels=width, channel_mult=(1, 2),
                  attention_levels=(1,), num_res_blocks=1, norm_groups=8, head_channels=HEAD)
    return UNet(**{**config, **kwargs})


def lr_scales(model, base):
    groups = param_groups(model, base)
    return {id(p): g["lr_scale"] for g in groups for p in g["params"]}


DIT_OPTIONS = [dict(), dict(block_type="adaLN"), dict(block_type="cross-attn"), dict(block_type="in-context"),
               dict(norm="rmsnorm", mlp="swiglu", rope=True, qk_norm=True, wo_shift=True)]


@pytest.mark.parametrize("options", DIT_OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_dit_roles_follow_the_official_mup_dit(options):
    roles = classify(dit(64, **options))
    assert roles["x_embedder.proj.weight"] == roles["t_embedder.mlp.0.weight"] == "input"
    assert roles["y_embedder.embedding_table.weight"] == "input"
    assert roles["t_embedder.mlp.2.weight"] == roles["final_layer.adaLN_modulation.1.weight"] == "hidden"
    assert roles["final_layer.linear.weight"] == "output"
    assert all(r == "vector" for n, r in roles.items() if n.endswith(".bias") or "norm" in n)
    blocks = {n: r for n, r in roles.items() if n.startswith("blocks.") and n.endswith("weight") and "norm" not in n}
    assert blocks and all(r == "hidden" for r in blocks.values()), blocks
    assert "pos_embed" not in roles   # a fixed buffer, not trained


@pytest.mark.parametrize("n", [64, 128])
def test_dit_lr_and_init_scales_follow_their_formulas(n):
    base = 32
    torch.manual_seed(0)
    model = parametrize(dit(n), "mup", base)
    roles, scales = classify(model), lr_scales(model, base)
    for name, p in model.named_parameters():
        assert scales[id(p)] == (base / n if roles[name] == "hidden" else 1.0), name
    assert width(model) == n and model.readout_scale == base / n
    # Input: the patch embedding keeps its base-width xavier variance 2 / (base + C p^2).
    fan_in = 4 * 2 * 2
    w = model.x_embedder.proj.weight
    assert w.abs().max() <= math.sqrt(6 / (base + fan_in))
    assert w.std().item() == pytest.approx(math.sqrt(2 / (base + fan_in)), rel=0.1)
    assert model.t_embedder.mlp[0].weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.y_embedder.embedding_table.weight.std().item() == pytest.approx(0.02, rel=0.1)
    # Hidden: xavier (variance 2 / (fan_in + fan_out), i.e. ∝ 1/n), and t_embedder.mlp.2's 0.02 · sqrt(base / n).
    assert model.t_embedder.mlp[2].weight.std().item() == pytest.approx(0.02 * math.sqrt(base / n), rel=0.05)
    qkv = model.blocks[0].attn.qkv.weight
    assert qkv.std().item() == pytest.approx(math.sqrt(2 / (n + 3 * n)), rel=0.05)
    # adaLN-Zero and the zero readout stay zero.
    for p in (model.blocks[0].adaLN_modulation[-1].weight, model.final_layer.adaLN_modulation[-1].weight,
              model.final_layer.linear.weight, model.final_layer.linear.bias):
        assert not p.any()


def test_mup_at_the_base_width_is_the_official_dit():
    torch.manual_seed(0)
    sp = dit(64)
    torch.manual_seed(0)
    mup = parametrize(dit(64), "mup", 64)
    assert all(torch.equal(a, b) for a, b in zip(sp.state_dict().values(), mup.state_dict().values()))
    assert mup.readout_scale == 1.0 and {g["lr_scale"] for g in param_groups(mup, 64)} == {1.0}


@pytest.mark.parametrize("n", [32, 64])
def test_unet_lr_and_init_scales_follow_their_formulas(n):
    base = 16
    torch.manual_seed(0)
    plain = unet(n)
    torch.manual_seed(0)
    model = parametrize(unet(n), "mup", base)
    roles, scales = classify(model), lr_scales(model, base)
    assert roles["unet.conv_in.weight"] == roles["unet.class_embedding.weight"] == "input"
    assert roles["unet.conv_out.weight"] == "output"
    assert roles["unet.time_embedding.linear_1.weight"] == "hidden"   # its sinusoidal input has C0 features
    assert sum(r == "hidden" for r in roles.values()) > 10
    for name, p in model.named_parameters():
        assert scales[id(p)] == (base / n if roles[name] == "hidden" else 1.0), name
    assert width(model) == n and model.readout_scale == base / n
    # Weights keep PyTorch's fan-in init; hidden biases are held at their base-width scale (x sqrt(n / base)).
    ours, before = dict(model.named_parameters()), dict(plain.named_parameters())
    for name, p in ours.items():
        factor = math.sqrt(n / base) if name.endswith(".bias") and roles.get(name[:-5] + ".weight") == "hidden" else 1.0
        assert torch.equal(p, before[name] * factor) if factor != 1.0 else torch.equal(p, before[name]), name
    assert not model.unet.conv_out.weight.any()


def test_learning_rates_and_init_scales_agree_with_the_mup_package():
    mup = pytest.importorskip("mup")
    base, delta, n, lr = 32, 48, 128, 1e-3
    # Learning rates: MuAdamW's per-parameter lr for a DiT with base shapes from two narrow ones.
    torch.manual_seed(0)
    model = mup.set_base_shapes(dit(n), dit(base), delta=dit(delta), rescale_params=False, do_assert=False)
    theirs = {id(p): g["lr"] for g in mup.MuAdamW(model.parameters(), lr=lr).param_groups for p in g["params"]}
    ours = {id(p): lr * s for p, s in ((p, lr_scales(model, base)[id(p)]) for p in model.parameters())}
    assert theirs.keys() == ours.keys()
    for name, p in model.named_parameters():
        assert ours[id(p)] == pytest.approx(theirs[id(p)], rel=1e-12), name
    # Init scales: mup.init's drop-ins of the official init (xavier_uniform_, normal_(0.02)) against ours.
    torch.manual_seed(1)
    ref = mup.set_base_shapes(dit(n), dit(base), delta=dit(delta), rescale_params=False, do_assert=False)
    for name, m in ref.named_modules():
        if isinstance(m, torch.nn.Linear) and name.startswith("blocks.") and "adaLN" not in name:
            mup.init.xavier_uniform_(m.weight)
    mup.init.normal_(ref.t_embedder.mlp[0].weight, std=0.02)
    mup.init.normal_(ref.t_embedder.mlp[2].weight, std=0.02)
    torch.manual_seed(2)
    mine = parametrize(dit(n), "mup", base)
    checked = 0
    for (name, a), b in zip(ref.named_parameters(), mine.parameters()):
        if name.startswith(("blocks.", "t_embedder.")) and a.ndim == 2 and a.any():
            assert b.std().item() == pytest.approx(a.std().item(), rel=0.08), name
            checked += 1
    assert checked >= 9
    # U-Net biases: mup's rescale of PyTorch's default init (set_base_shapes(rescale_params=True)) equals ours.
    torch.manual_seed(0)
    theirs_u = mup.set_base_shapes(unet(64), unet(16), delta=unet(32), rescale_params=True,
                                   do_assert=False)
    torch.manual_seed(0)
    ours_u = parametrize(unet(64), "mup", 16)
    for (name, a), b in zip(theirs_u.named_parameters(), ours_u.parameters()):
        assert torch.allclose(a, b, rtol=1e-6, atol=0), name
    ours_lr = lr_scales(ours_u, 16)
    groups = mup.MuAdamW(theirs_u.parameters(), lr=lr).param_groups
    theirs_lr = {id(p): g["lr"] / lr for g in groups for p in g["params"]}
    for (name, a), b in zip(theirs_u.named_parameters(), ours_u.parameters()):
        if name != "unet.conv_out.weight":   # mup has no conv readout: it treats conv_out as a vector (same lr here)
            assert ours_lr[id(b)] == pytest.approx(theirs_lr[id(a)]), name


def test_sp_leaves_the_official_dit_bit_identical():
    stored = torch.load(ROOT / "tests" / "data" / "official_reference.pt", weights_only=True)["model"]
    torch.manual_seed(0)
    plain = DiT(**stored["config"])
    torch.manual_seed(0)
    built = build_model({"name": "DiT-S/2", **stored["config"], "param": "sp", "base_width": None})
    assert built.readout_scale == 1.0
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), built.state_dict().values()))
    built.load_state_dict({k: v.float() for k, v in stored["state_dict"].items()}, strict=True)
    with torch.no_grad():
        out = built.eval()(stored["x"], stored["t_int"], stored["y"])
    assert rel_err(out, stored["out_int"]) <= 1e-5
    plain.load_state_dict(built.state_dict())
    with torch.no_grad():
        assert torch.equal(plain.eval()(stored["x"], stored["t_int"], stored["y"]), out)
    # sp's optimizer takes the parameters as one group, as before; a U-Net's output is untouched too.
    assert len(torch.optim.AdamW(optimizer_params(built, "sp")).param_groups) == 1
    torch.manual_seed(0)
    a = create_model("UNet-T8", input_size=8, in_channels=1, num_classes=10)
    torch.manual_seed(0)
    b = build_model(dict(name="UNet-T8", input_size=8, in_channels=1, num_classes=10, param="sp", base_width=None))
    for m in (a, b):
        torch.manual_seed(3)
        torch.nn.init.normal_(m.unet.conv_out.weight)
    x, y = torch.randn(2, 1, 8, 8), torch.tensor([1, 10])
    with torch.no_grad():
        assert torch.equal(a(x, torch.tensor([3, 700]), y), b(x, torch.tensor([3, 700]), y))


def test_the_output_multiplier_survives_deepcopy_and_scales_the_readout_input():
    torch.manual_seed(0)
    model = parametrize(unet(32), "mup", 16)
    torch.nn.init.normal_(model.unet.conv_out.weight)
    torch.nn.init.zeros_(model.unet.conv_out.bias)
    ema = copy.deepcopy(model)
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([5, 500]), torch.tensor([0, 3])
    with torch.no_grad():
        half = ema(x, t, y)
        ema.readout_scale = 1.0
        full = ema(x, t, y)
        assert torch.allclose(half, 0.5 * full, atol=1e-6) and model.readout_scale == 0.5   # the copy's own scale
    torch.manual_seed(0)
    d = parametrize(dit(64), "mup", 32)
    torch.nn.init.normal_(d.final_layer.linear.weight)
    with torch.no_grad():
        xs, ts = torch.randn(2, 4, 8, 8), torch.tensor([5, 500])
        half = copy.deepcopy(d)(xs, ts, y)
        d.readout_scale = 1.0
        assert torch.allclose(half, 0.5 * d(xs, ts, y), atol=1e-6)


def test_coordinate_check_mup_update_sizes_stay_flat_while_sp_grows():
    base, widths, steps = 32, [32, 64, 128], 5
    for param, check in (("mup", lambda r: 0.6 < r < 1.5), ("sp", lambda r: r > 2.5)):
        rows = coord_data("dit", param, widths, base, steps=steps, lr=1e-3)
        upd = role_means(rows, steps, "update")
        hidden = [upd[("dit", param, "hidden", w)] for w in widths]
        assert hidden[0] > 0 and check(hidden[-1] / hidden[0]), (param, hidden)
        act = role_means(rows, steps, "act")
        assert 0.5 < act[("dit", param, "hidden", 128)] / act[("dit", param, "hidden", 32)] < 2, param


def test_training_with_mup_resumes_exactly_and_records_its_parametrization(tmp_path):
    mup = ["model.param=mup", "model.base_width=64"]   # DiT-Mini/2 is 128 wide: hidden lr x 0.5, readout x 0.5
    train_script.train(compose_config(overrides=[*TINY, *mup, f"run_dir={tmp_path}/ref"]))
    train_script.train(compose_config(overrides=[*TINY, *mup, "train.steps=2", f"run_dir={tmp_path}/split"]))
    train_script.train(compose_config(overrides=[*TINY, *mup, f"run_dir={tmp_path}/split"]))
    ref = final_state(tmp_path / "ref")
    assert_same_state(ref, final_state(tmp_path / "split"))
    assert ref["model_args"]["param"] == "mup" and ref["model_args"]["base_width"] == 64
    assert sorted(g["lr_scale"] for g in ref["opt"]["param_groups"]) == [0.5, 1.0]
    hidden = next(g for g in ref["opt"]["param_groups"] if g["lr_scale"] == 0.5)
    other = next(g for g in ref["opt"]["param_groups"] if g["lr_scale"] == 1.0)
    assert hidden["lr"] == pytest.approx(0.5 * other["lr"])
    rebuilt = build_model(ref["model_args"])   # what sample.py's load_sampling_model does
    assert rebuilt.readout_scale == 0.5
    rebuilt.load_state_dict(ref["ema"])
    # sp records itself too, and keeps one optimizer group.
    sp = compose_config(overrides=[*TINY, "train.steps=1", f"run_dir={tmp_path}/sp"])
    train_script.train(sp)
    state = final_state(tmp_path / "sp")
    assert state["model_args"]["param"] == "sp" and len(state["opt"]["param_groups"]) == 1


def test_mup_init_is_the_identity_at_the_base_width_for_unets_too():
    torch.manual_seed(0)
    a = unet(32)
    torch.manual_seed(0)
    b = mup_init_(unet(32), 32)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_runs_from_before_model_param_resume_as_sp_and_refuse_mup():
    from utils.checkpoint import check_resume
    from utils.errors import ConfigError
    old = {"model": {"name": "DiT-Mini/2", "kwargs": {}}, "diffusion": {}, "repa": {}, "vae": {}}
    check_resume(old, {**old, "model": {**old["model"], "param": "sp", "base_width": None}}, "ckpt")
    with pytest.raises(ConfigError, match="param"):
        check_resume(old, {**old, "model": {**old["model"], "param": "mup", "base_width": 64}}, "ckpt")
