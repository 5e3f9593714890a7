"""The lr schedule and weight decay the paper recipe needs: arcface_torch's warmup-poly, decay on every parameter."""

import pytest
import torch
from tiny import TinyFaces, tiny_config

from distill.config.schema import TrainConfig
from distill.train.engine import StageSpec, _build
from distill.train.setup import create_scheduler


def _lrs(train: TrainConfig, total: int, steps_per_epoch: float) -> list:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=train.lr)
    sched = create_scheduler(opt, train, total, steps_per_epoch)
    out = []
    for step in range(total + 1):
        sched.step_update(step)
        out.append(opt.param_groups[0]["lr"])
    return out


def test_poly_decays_from_the_end_of_the_warmup_as_arcface_torch():
    train = TrainConfig(lr=0.1, scheduler="poly", poly_power=2.0, warmup_epochs=1.0, min_lr=0.0)
    lrs = _lrs(train, total=100, steps_per_epoch=10)  # warmup: 10 updates, then 90 of decay
    assert lrs[10] == pytest.approx(0.1)  # the full lr at the end of the warmup (was 0.1 * (1 - 10/100)^2 = 0.081)
    assert lrs[55] == pytest.approx(0.1 * (1 - 45 / 90) ** 2)
    assert lrs[100] == pytest.approx(0.0, abs=1e-12) and lrs[5] < lrs[10]
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))  # monotone decay after the warmup


def test_cosine_is_unchanged_by_the_poly_fix():
    train = TrainConfig(lr=0.1, scheduler="cosine", warmup_epochs=0.5, min_lr=0.0)
    lrs = _lrs(train, total=100, steps_per_epoch=10)
    assert lrs[5] == pytest.approx(0.05 * (1 + torch.cos(torch.tensor(5 / 100 * torch.pi)).item()))


@pytest.mark.parametrize("decay_all", [False, True])
def test_weight_decay_on_norm_and_bias_is_an_option(tmp_path, decay_all):
    cfg = tiny_config(train={"decay_norm_and_bias": decay_all})
    spec = StageSpec("baseline", "vargfacenet", cfg.student.model_kwargs(16), cfg.train)
    st = _build(cfg, spec, str(tmp_path), TinyFaces(), None, None)
    decay = {id(p): g["weight_decay"] for g in st.optimizer.param_groups for p in g["params"]}
    one_d = [p for p in list(st.model.parameters()) + list(st.head.parameters()) if p.ndim <= 1 and p.requires_grad]
    prelu = [p for name, p in st.model.named_parameters() if "act" in name and p.ndim == 1]
    assert one_d and prelu  # BatchNorm weights/biases, biases, PReLU slopes
    expected = cfg.train.weight_decay if decay_all else 0.0
    assert all(decay[id(p)] == expected for p in one_d)
    conv = next(p for p in st.model.parameters() if p.ndim == 4)
    assert decay[id(conv)] == cfg.train.weight_decay


def test_channels_last_switch_trains_the_same_student_on_cpu(tmp_path):
    """train.channels_last: true on CPU (the GPU default) runs the NHWC path; the student it trains equals the
    NCHW one up to float rounding, and student.pt holds ordinary weights."""
    from tiny import TinyFaces, tiny_config

    import teachers
    from distill.train.engine import StageSpec, run_stage
    from distill.train.setup import use_channels_last
    from distill.utils.checkpoint import safe_torch_load

    weights = {}
    for flag in (False, True):
        # amp off: on a bf16 CPU `auto` runs the IResNet teacher in bf16, whose NHWC/NCHW kernels round differently;
        # this test is about the memory format, in float32
        cfg = tiny_config(train={"max_steps": 2, "checkpoint_every": 2, "channels_last": flag, "amp": "off"})
        assert use_channels_last(cfg.train, torch.device("cpu")) is flag
        spec = StageSpec("gen1", "vargfacenet", cfg.student.model_kwargs(16), cfg.train, alpha=7.0, generation=1)
        torch.manual_seed(0)  # the same random teacher for both (it runs online, in NHWC too when the flag is on)
        teacher = teachers.build_teacher(cfg.teacher.spec())
        run_stage(cfg, spec, str(tmp_path / str(flag)), TinyFaces(), {}, teacher=teacher, progress=False)
        weights[flag] = safe_torch_load(tmp_path / str(flag) / "student.pt")["state_dict"]
    assert use_channels_last(tiny_config().train, torch.device("cpu")) is False  # null: only on CUDA
    for k, v in weights[False].items():
        torch.testing.assert_close(weights[True][k].contiguous(), v, rtol=1e-3, atol=1e-4)  # other kernels: rounding
