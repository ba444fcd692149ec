import copy
import os
from dataclasses import replace

import pytest
import torch

from cmkit.checkpoint import build_model
from cmkit.config import validate
from cmkit.errors import CmkitError
from cmkit.methods import (
    REGISTRY,
    CDConfig,
    CTConfig,
    ECTConfig,
    EDMConfig,
    ICTConfig,
    SCDConfig,
    SCTConfig,
    TCMConfig,
    method_entry,
    teacher_methods,
)
from cmkit.precond import TrigFlow
from cmkit.rng import BatchNoise
from cmkit.train import Intervals, Run, ema_update, local_batch, log_record, save_run, train

CPU = torch.device("cpu")
METHODS = {
    "edm": EDMConfig(p_mean=-1.2, p_std=1.2),
    "ct": CTConfig(s0=2, s1=10, mu0=0.9, distance="l2"),
    "ict": ICTConfig(s0=2, s1=8),
    "cd": CDConfig(num_scales=18, distance="l2"),
    "ect": ECTConfig(stage_kimg=0.064),
    "sct": SCTConfig(tangent_warmup_kimg=0.064),
    "scd": SCDConfig(tangent_warmup_kimg=0.064),
    "tcm": TCMConfig(stage_kimg=0.064, start_stage=2),  # its stage one here: _teacher's random EDM model
}
SCM = [name for name in METHODS if REGISTRY[name].wrapper is TrigFlow]


def _teacher(config):
    """A diffusion model of the student's architecture (random weights), frozen."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        return build_model(replace(config, method=METHODS["edm"])).eval().requires_grad_(False)


def _with(config, *, method=None, **train):
    return replace(config, method=method or config.method, train=replace(config.train, **train))


def _run(config):
    takes = method_entry(config.method.name).teacher.takes_teacher
    return Run(config, CPU, teacher=_teacher(config) if takes else None)


def _batch(config):
    return torch.rand(config.train.batch, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1


def _steps(config, n, seed=0):
    run, x0 = _run(config), _batch(config)
    losses = []
    for _ in range(n):
        torch.manual_seed(seed + run.step)
        losses.append(run.optimizer_step(x0, None))
    return run, losses


def _params(module):
    return {k: v.detach().clone() for k, v in module.named_parameters()}


class Recorder:
    """A run's loss that keeps the arguments of every call (the noise as its seed and rows)."""

    def __init__(self, loss):
        self.loss, self.calls = loss, []

    def __getattr__(self, name):
        return getattr(self.loss, name)

    def __call__(self, model, x0, cond, *, images_seen, target=None, noise=None):
        self.calls.append({"x0": x0, "cond": cond, "images_seen": images_seen, "target": target,
                           "noise": (noise.seed, noise.start, noise.total)})
        return self.loss(model, x0, cond, images_seen=images_seen, target=target, noise=noise)

    def replay(self, call, model, target):
        """The loss of ``call`` again, for ``model`` against ``target``, with the same noise."""
        seed, start, total = call["noise"]
        return self.loss(model, call["x0"], call["cond"], images_seen=call["images_seen"], target=target,
                         noise=BatchNoise(seed, start=start, total=total)).mean()

    def replay_scm(self, call, model, before):
        """sCM's loss of ``call`` for ``model`` with its stop-grad parts (F- and the tangent g) those of ``before``:
        e^w ||F - F- - g||^2 / D - w, the function whose gradient the step at ``before`` followed."""
        loss, (seed, start, total), x0, cond = self.loss, call["noise"], call["x0"], call["cond"]
        noise, sd = BatchNoise(seed, start=start, total=total), loss.sigma_data
        t = loss.times(len(x0), noise, x0.device)  # the draws of SCMLoss.__call__, in its order
        z = noise.randn(*x0.shape) * sd
        x_t = t.cos().view(-1, 1, 1, 1) * x0 + t.sin().view(-1, 1, 1, 1) * z
        g = loss.tangent(before, x_t, t, loss.velocity(x0, z, x_t, t, cond), cond, call["images_seen"])
        f_minus, f, w = before.raw(x_t / sd, t, cond)[0], *model.raw(x_t / sd, t, cond)
        return (w.exp() * (f - f_minus - g).flatten(1).pow(2).mean(1) - w).mean()


# sCT and sCD share one loss (SCMLoss), whose steps cost 2.5 others': each precision once for it, bf16 with sCD,
# whose teacher then runs under autocast too.
PRECISIONS = [*((name, p) for name in METHODS if name not in SCM for p in ("fp32", "bf16")), ("sct", "fp32"),
              ("scd", "bf16")]


@pytest.mark.parametrize(("name", "precision"), PRECISIONS)
def test_every_method_trains_and_is_deterministic(tiny_config, name, precision):
    """3 steps move every parameter; a second run repeats them bit for bit.

    Adam here: RAdam's first five steps are SGD steps lr g, below float32 resolution for the layers behind the
    near-zero initialised convolutions, so most weights would not move yet (its steps: the clipping test).
    """
    config = _with(tiny_config, method=METHODS[name], precision=precision, optimizer="adam")
    start = _params(_run(config).model)
    run_a, losses = _steps(config, 3)
    run_b, again = _steps(config, 3)
    assert all(torch.isfinite(torch.tensor(losses))) and losses == again
    for a, b in zip(run_a.model.state_dict().values(), run_b.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    unmoved = [k for k, v in _params(run_a.model).items() if torch.equal(v, start[k])]
    assert not unmoved
    assert (run_a.target is not None) == (name == "ct")


@pytest.mark.parametrize("name", METHODS)
def test_a_step_lowers_the_loss_it_was_taken_on(tiny_config, name):
    """The loss of the step's batch and noise, against the target as it was, is lower after the step.

    sCT and sCD have no target network: their target is the student as it was, moved along the tangent g, and
    the loss's value does not show F (F - stopgrad(F) = 0); so their loss here holds F- and g at the student as
    it was (:meth:`Recorder.replay_scm`), which is the loss's value before the step.
    """
    run = _run(_with(tiny_config, method=METHODS[name]))
    run.loss = recorder = Recorder(run.loss)
    before = copy.deepcopy(run.model)
    target = copy.deepcopy(run.target if run.target is not None else run.model)  # stop-grad: the student as it was
    loss = run.optimizer_step(_batch(run.config), None)
    call = recorder.calls[0]
    with torch.no_grad():
        if name in SCM:
            old, new = (recorder.replay_scm(call, model, before) for model in (before, run.model))
            assert old.item() == pytest.approx(loss, rel=1e-5)
        else:
            old, new = (recorder.replay(call, model, target) for model in (before, run.model))
    assert new < old


def test_ct_target_is_the_mu_k_moving_average(tiny_config):
    """After a step at k images, target = mu(k) old_target + (1 - mu(k)) model, with mu(k) = mu0^(s0 / N(k)).

    8 steps of 32 (K = 256), s0 = 2, s1 = 10: N(0) = 2, so mu = 0.9; N(128) = ceil(sqrt(0.5 (11^2 - 4) + 4) - 1)
    + 1 = ceil(6.906) + 1 = 8, so mu = 0.9^(1/4).
    """
    run, x0 = _run(_with(tiny_config, method=METHODS["ct"], lr=0.01)), _batch(tiny_config)
    for step, mu in ((0, 0.9), (4, 0.9 ** (2 / 8))):
        run.step = step
        old = copy.deepcopy(run.target.state_dict())
        run.optimizer_step(x0, None)
        new = run.model.state_dict()
        for key, value in run.target.state_dict().items():
            torch.testing.assert_close(value, mu * old[key] + (1 - mu) * new[key], rtol=1e-6, atol=1e-8)
        wrong = 0.9 ** (2 / 7)  # the rate for N - 1 levels: told apart at this tolerance
        assert any(not torch.allclose(v, wrong * old[k] + (1 - wrong) * new[k], rtol=1e-6, atol=1e-8)
                   for k, v in run.target.state_dict().items())


class PairSpy:
    """A loss's pair sampler that keeps what it drew."""

    def __init__(self, pairs):
        self.pairs, self.drawn = pairs, []

    def __getattr__(self, name):
        return getattr(self.pairs, name)

    def __call__(self, n, images_seen, noise, device):
        r, t = self.pairs(n, images_seen, noise, device)
        self.drawn.append((r, t))
        return r, t


def test_ect_stage_advances_during_a_run(tiny_config):
    """A stage every 64 images at batch 32: steps 0 and 1 draw pairs of stage 0, steps 2 and 3 of stage 1, and
    after 4 steps (128 images) the logged stage is 2. The stage is read back from the pairs: where r > 0,
    (t - r) / t = q^-(stage + 1) (1 + 8 sigmoid(-t)) with q = 2."""
    run, x0 = _run(_with(tiny_config, method=METHODS["ect"])), _batch(tiny_config)
    run.loss.pairs = spy = PairSpy(run.loss.pairs)
    losses = [run.optimizer_step(x0, None) for _ in range(4)]
    stages = []
    for r, t in spy.drawn:
        ratio = ((t - r) / t / (1 + 8 * torch.sigmoid(-t)))[r > 0]
        assert len(ratio) > 0
        implied = -ratio.log2() - 1
        stages.append(implied.round().unique().tolist())
        torch.testing.assert_close(implied, implied.round(), rtol=0, atol=1e-3)
    assert stages == [[0.0], [0.0], [1.0], [1.0]]
    assert log_record(run, losses, busy=1.0)["stage"] == 2


def test_learning_rate_warms_up_in_the_loop(tiny_config):
    """warmup 0.128 kimg at batch 32: a step taken after k images runs at lr k / 128, so the first step (k = 0)
    leaves the weights as they were (as in EDM), and the rate is reached at the fifth."""
    config = _with(tiny_config, warmup_kimg=0.128)
    run, x0 = _run(config), _batch(config)
    start = _params(run.model)
    rates = []
    for _ in range(6):
        run.optimizer_step(x0, None)
        rates.append(run.optimizer.param_groups[0]["lr"])
        if run.step == 1:
            assert all(torch.equal(v, start[k]) for k, v in _params(run.model).items())
    assert rates == pytest.approx([0, 0.25e-3, 0.5e-3, 0.75e-3, 1e-3, 1e-3], abs=1e-12)
    no_warmup = _run(tiny_config)
    no_warmup.optimizer_step(x0, None)
    assert no_warmup.optimizer.param_groups[0]["lr"] == 1e-3
    assert not all(torch.equal(v, start[k]) for k, v in _params(no_warmup.model).items())


def _first_update(config):
    run = _run(config)
    start = torch.cat([p.detach().flatten().clone() for p in run.model.parameters()])
    run.optimizer_step(_batch(config), None)
    return start - torch.cat([p.detach().flatten() for p in run.model.parameters()])


def test_gradient_clipping_in_the_loop(tiny_config):
    """RAdam's first step is plain SGD (its variance estimate is not used before rho_t > 5): the update is lr g.
    With grad_clip at a tenth of ||g||, the update is the same direction at a tenth of the length, lr grad_clip."""
    lr = 0.1
    config = _with(tiny_config, optimizer="radam", lr=lr)
    free = _first_update(config)
    norm = free.norm().item() / lr
    clip = norm / 10
    clipped = _first_update(_with(config, grad_clip=clip))
    assert clipped.norm().item() == pytest.approx(lr * clip, rel=1e-3)
    torch.testing.assert_close(clipped, free / 10, rtol=0, atol=1e-3 * clipped.abs().max().item())
    loose = _first_update(_with(config, grad_clip=10 * norm))  # a bound above ||g||: no effect
    torch.testing.assert_close(loose, free, rtol=0, atol=0)


# LCM's student adds a w input to the teacher's network: test_lcm.py::test_the_student_starts_as_its_teacher_at_every_w
@pytest.mark.parametrize("name", [n for n in teacher_methods() if REGISTRY[n].config().guidance_range is None])
def test_student_starts_from_the_teacher(tiny_config, name):
    """CD and ECT students take the teacher's backbone weights; a TrigFlow student (sCT, sCD) becomes the
    teacher's denoiser (its last layer negated) with a log-variance head at 0."""
    config = replace(tiny_config, method=METHODS[name])
    teacher = _teacher(config)
    run = Run(config, CPU, teacher=teacher)
    if name not in SCM:
        for ours, theirs in ((run.model.net, teacher.net), (run.ema.net, teacher.net)):
            torch.testing.assert_close(ours.state_dict(), theirs.state_dict(), rtol=0, atol=0)
        return
    x, sigma = torch.randn(4, 1, 28, 28), torch.tensor([0.01, 0.5, 3.0, 70.0])
    with torch.no_grad():
        for model in (run.model.eval(), run.ema):
            torch.testing.assert_close(model(x, sigma), teacher(x, sigma), rtol=1e-5, atol=1e-5)
            assert torch.equal(model.net.logvar(sigma), torch.zeros(4))


class Pair(torch.nn.Module):
    """Two parameters and two buffers of one shape, registered in the order ``order`` names them."""

    def __init__(self, order: str, a: float, b: float, count: int = 0) -> None:
        super().__init__()
        values = {"a": a, "b": b}
        for name in order:
            self.register_parameter(name, torch.nn.Parameter(torch.full((2,), values[name])))
            self.register_buffer(f"{name}_mean", torch.full((2,), 10 * values[name]))
        self.register_buffer("count", torch.tensor(count))


def test_ema_update_pairs_entries_by_name_not_by_position():
    """The EMA registers a before b, the model b before a: pairing by position would mix a with b (a = 0.9 * 0
    + 0.1 * 2 = 0.2, where by name it is 0.1). Float buffers average likewise; the integer count is copied."""
    ema, model = Pair("ab", a=0.0, b=0.0), Pair("ba", a=1.0, b=2.0, count=7)
    ema_update(ema, model, 0.9)
    assert torch.allclose(ema.a, torch.full((2,), 0.1)) and torch.allclose(ema.b, torch.full((2,), 0.2))
    assert torch.allclose(ema.a_mean, torch.full((2,), 1.0)) and torch.allclose(ema.b_mean, torch.full((2,), 2.0))
    assert ema.count.item() == 7
    assert torch.equal(model.a.detach(), torch.full((2,), 1.0))  # the model is read, never written


def test_ema_update_refuses_models_whose_entries_differ():
    extra = Pair("ab", 0.0, 0.0)
    extra.register_parameter("c", torch.nn.Parameter(torch.zeros(2)))
    with pytest.raises(CmkitError, match=r"EMA update: .* differ in 1 state_dict entries \(first 'c'\)"):
        ema_update(Pair("ab", 0.0, 0.0), extra, 0.9)
    with pytest.raises(CmkitError, match="first 'weight'"):
        ema_update(torch.nn.Linear(2, 3), torch.nn.Linear(3, 2), 0.9)


def test_a_saved_run_resumes_to_the_same_state(tiny_config, tmp_path):
    """save_run writes the training state and the EMA's export from explicit data; a new Run that loads the
    state holds every tensor and count bit for bit, and the export holds the EMA's weights."""
    from safetensors.torch import load_file

    from cmkit.checkpoint import list_states, load_state

    run, _ = _steps(_with(tiny_config, method=METHODS["ct"]), 2)
    run.evaluations.append({"step": 2, "fid_1step": 1.0})
    save_run(run, tmp_path)
    (path,) = list_states(tmp_path)
    assert path.name == f"state-{run.images_seen:010d}.pt"
    state = load_state(path)
    assert set(state) == {"config", "step", "nonfinite", "model", "ema", "optimizer", "target", "scaler",
                          "evaluations"}
    again = _run(run.config)
    again.load_state_dict(state, path)
    ours, theirs = again.state_dict(), run.state_dict()
    for key in ("model", "ema", "target", "optimizer", "scaler"):
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0, msg=key)
    assert [ours[k] for k in ("config", "step", "nonfinite", "evaluations")] == \
        [theirs[k] for k in ("config", "step", "nonfinite", "evaluations")]
    torch.testing.assert_close(load_file(tmp_path / "model.safetensors"), run.ema.state_dict(), rtol=0, atol=0)


def test_intervals_of_config(tiny_config):
    every = Intervals.of(tiny_config)  # 0.256 kimg at batch 32; ckpt 0.128, snap 0.256, log 0.064
    assert (every.total, every.ckpt, every.snap, every.log) == (8, 4, 8, 2)


def test_class_conditional_batch_and_step(tiny_config):
    from cmkit.data import ImageData

    config = replace(tiny_config, net=replace(tiny_config.net, num_classes=3),
                     data=replace(tiny_config.data, xflip=True))
    images = torch.randint(0, 256, (40, 1, 28, 28), dtype=torch.uint8)
    dataset = ImageData(images=images, labels=torch.arange(40) % 3, num_classes=3, name="fake")
    run = Run(config, CPU)
    run.step = 1  # the second batch: positions 32..63 of the stream, crossing into epoch 2
    x0, labels = local_batch(run.config, dataset, run.step, run.device)
    assert x0.shape == (32, 1, 28, 28) and labels.shape == (32,) and labels.max() < 3
    assert torch.isfinite(torch.tensor(run.optimizer_step(x0, labels)))


# ------------------------------------------------------------------------------------------- compile

def test_compile_with_dropout_is_refused_for_consistency_methods(tiny_config, tmp_path):
    """A compiled network would not replay the dropout mask student and target share: refused before anything
    is written; diffusion training (no target) and consistency training without dropout may compile."""
    dropout = replace(tiny_config, net=replace(tiny_config.net, dropout=0.1))
    for name in ("ct", "ict", "cd", "ect"):
        with pytest.raises(CmkitError, match="train.compile=true with net.dropout=0.1"):
            validate(_with(dropout, method=METHODS[name], compile=True))
    validate(_with(dropout, method=METHODS["edm"], compile=True))
    validate(_with(tiny_config, compile=True))
    validate(_with(dropout, compile=False))
    with pytest.raises(CmkitError, match="compile"):
        train(_with(dropout, compile=True), tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", SCM)
def test_compile_is_allowed_for_forward_mode_losses_without_dropout(tiny_config, name):
    """sCT and sCD may compile: their JVP through the compiled network is checked when the run starts
    (tests/test_compiled_jvp.py)."""
    validate(_with(tiny_config, method=METHODS[name], compile=True))


SLOW = "inductor's C++ kernels cost 80-120 s on 2 CPU cores with a cold cache (5-8 s warm)"


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")  # inside torch's compiler
@pytest.mark.parametrize("backend", [
    "aot_eager",  # dynamo's graph capture and AOT autograd, without code generation: seconds
    pytest.param("inductor", marks=pytest.mark.skipif(not os.environ.get("CMKIT_SLOW_TESTS"),
                                                      reason=f"{SLOW}; set CMKIT_SLOW_TESTS=1")),
])
def test_compiled_forward_equals_eager(tiny_config, backend, monkeypatch):
    """train.compile=true: the backbone the loop calls is compiled in place, and answers as the eager one.
    The loop compiles with the default backend (inductor); ``aot_eager`` runs the same capture faster."""
    compile_in_place = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self: compile_in_place(self, backend=backend))
    run, eager = Run(_with(tiny_config, compile=True), CPU), Run(tiny_config, CPU)
    x, sigma = torch.randn(4, 1, 28, 28), torch.tensor([0.01, 0.5, 3.0, 70.0])
    with torch.no_grad():
        out, expected = run.ddp(x, sigma), eager.model(x, sigma)
    assert run.model.net._compiled_call_impl is not None  # compiled in place (the state_dict keys stay plain)
    assert list(run.state_dict()["model"]) == list(eager.state_dict()["model"])
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_sum_reduction_is_the_mean_times_the_values_of_a_sample(tiny_config):
    """train.loss_reduction=sum multiplies the loss (and so the gradients) by D = C * H * W, nothing else."""
    config = _with(tiny_config, method=METHODS["edm"], batch=8)
    grads = {}
    for reduction in ("mean", "sum"):
        run = _run(_with(config, loss_reduction=reduction))
        torch.manual_seed(0)
        loss = run._forward_backward(_batch(run.config)[:8], None)
        grads[reduction] = (loss, [p.grad.clone() for p in run.model.parameters()])
    dim = 1 * 28 * 28
    torch.testing.assert_close(grads["sum"][0], grads["mean"][0] * dim)
    for a, b in zip(grads["sum"][1], grads["mean"][1], strict=True):
        torch.testing.assert_close(a, b * dim, rtol=1e-4, atol=1e-6)
