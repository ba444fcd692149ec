"""The SD route's training loop: LCM or LCM-LoRA distillation of a diffusers text-to-image pipeline.

One step (LCM, Alg. 1, in the pipeline's discrete terms; :mod:`cmkit.sd.lcm` gives each formula's source): per
sample a latent ``z0 = scaling_factor (mean + std e)`` from the cached VAE posterior, a DDIM-grid timestep
``t = (i + 1) k - 1`` with i uniform, ``s = max(t - k, 0)``, ``x_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps``, a
guidance scale ``w ~ U[w_min, w_max]``; the teacher's guided DDIM step gives ``x_s``; the loss is
``d(f_student(x_t, t), stopgrad f_target(x_s, s))`` with d the per-value pseudo-Huber (or l2), f the boundary-scaled
consistency function, the target an EMA of the student (full LCM) or the student itself (LCM-LoRA).

As the main loop (:mod:`cmkit.train`): every random draw is a function of (seed, step, row) (:class:`cmkit.rng.
BatchNoise`) and the data order of the images seen, so a resumed run ends bit-identical to a straight one; under
torchrun each process takes its rows of the global batch, DDP averages the gradients and rank 0 writes the files.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import signal
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save
from torch import Tensor, nn
from tqdm import tqdm

from cmkit import checkpoint, data, dist, machine, rundir
from cmkit.distances import make_distance
from cmkit.errors import CmkitError
from cmkit.files import atomic_write
from cmkit.rng import BatchNoise, derive_seed
from cmkit.sd import captions, lcm
from cmkit.sd.config import LORA_TARGETS, SDConfig, validate
from cmkit.sd.model import FORMAT, STUDENT_NAME
from cmkit.sd.pipeline import TextToImage, load_pipeline
from cmkit.train import TrainingStopped, config_diff, ema_update, stop_requests

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MAX_NONFINITE = 10  # non-finite steps in a row that stop a run (as train.max_nonfinite's default)


def resolve_precision(config: SDConfig, device: torch.device, *, out: Path, resume: bool) -> SDConfig:
    """``train.precision=auto`` made concrete as :func:`cmkit.machine.resolve_precision` does (the resumed run's own
    precision, else bf16 where ``device`` computes it natively, else fp32); fp16 is refused off CUDA (no CPU
    computes it natively)."""
    if config.train.precision == "fp16" and device.type != "cuda":
        raise CmkitError(f"train.precision=fp16: {device.type} has no native fp16 arithmetic; use auto or fp32")
    stored, begun = out / "config.json", None
    if resume and stored.is_file():
        begun = SDConfig.from_dict(json.loads(stored.read_text()), where=str(stored))
    return machine.resolve_precision(config, device, stored=begun)


def lora_config(config: SDConfig):
    """peft's LoraConfig of the method: rank, alpha, LCM-LoRA's target modules, no dropout, peft's default init
    (B = 0, so the adapted UNet starts as the teacher's)."""
    from peft import LoraConfig

    m = config.method
    return LoraConfig(r=m.lora_rank, lora_alpha=m.lora_alpha, lora_dropout=0.0, target_modules=list(LORA_TARGETS))


def check_lora_rank(unet: nn.Module, rank: int) -> None:
    """Refuse a rank above the smaller side of some targeted layer (a low-rank update of it would not be low)."""
    for name, module in unet.named_modules():
        if not any(name == t or name.endswith("." + t) for t in LORA_TARGETS):
            continue
        if isinstance(module, nn.Linear):
            sides = (module.in_features, module.out_features)
        elif isinstance(module, nn.Conv2d):
            sides = (module.in_channels * math.prod(module.kernel_size), module.out_channels)
        else:
            continue
        if rank > min(sides):
            raise CmkitError(f"method.lora_rank={rank}: larger than the layer {name} of the teacher's UNet "
                             f"({sides[0]} -> {sides[1]}); expected a rank of at most {min(sides)}")


def build_student(config: SDConfig, teacher: TextToImage) -> nn.Module:
    """The student UNet in float32 (train mode): the teacher's UNet with a guidance input (full; the new
    ``time_embedding.cond_proj`` seeded by ``train.seed``) or with LoRA adapters (lora; only they train)."""
    from diffusers import UNet2DConditionModel

    base = UNet2DConditionModel.from_pretrained(teacher.folder / "unet", local_files_only=True,
                                                use_safetensors=True, torch_dtype=torch.float32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.train.seed)
        if config.lora:
            base.add_adapter(lora_config(config))
            base.requires_grad_(False)
            for name, p in base.named_parameters():
                p.requires_grad_("lora_" in name)
            student = base
        else:
            dim = base.config.time_cond_proj_dim or config.method.time_cond_proj_dim
            student = UNet2DConditionModel.from_config(base.config, time_cond_proj_dim=dim)
            missing, unexpected = student.load_state_dict(base.state_dict(), strict=False)
            assert not unexpected and all(k.startswith("time_embedding.cond_proj") for k in missing)
    if config.train.grad_checkpointing:
        student.enable_gradient_checkpointing()
    return student.train()


def trained_state(student: nn.Module) -> dict[str, Tensor]:
    """The weights training changes: every entry of a full student, the LoRA parameters of an adapted one."""
    return {k: v for k, v in student.state_dict().items() if "lora_" in k} if getattr(
        student, "peft_config", None) else student.state_dict()


class SDRun:
    """The training state of one SD-route run in this process (the loop alone changes it)."""

    def __init__(self, config: SDConfig, teacher: TextToImage, cache: dict[str, Tensor], device: torch.device):
        self.config, self.teacher, self.device = config, teacher, device
        t, m = config.train, config.method
        self.micro = dist.check_batch(t.batch, t.accum)
        self.cache = cache
        self.student = build_student(config, teacher).to(device)
        self.target = None if config.lora else copy.deepcopy(self.student).requires_grad_(False)
        self.ddp = dist.data_parallel(self.student, device)
        self.params = [p for p in self.student.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)
        self.scaler = torch.amp.GradScaler(device.type, enabled=t.precision == "fp16")
        self.dtype = DTYPES[t.precision]
        self.grid = lcm.ddim_grid(teacher.num_train_timesteps, m.ddim_steps)
        self.k = teacher.num_train_timesteps // m.ddim_steps
        self.w_dim = getattr(self.student.config, "time_cond_proj_dim", None) if not config.lora else None
        self.distance = make_distance(m.distance, dim=0, c=m.huber_c)  # c given, so dim is unused
        self.step = 0

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def _f(self, unet: nn.Module, x: Tensor, t: Tensor, text: Tensor, w_emb: Tensor | None) -> Tensor:
        """The consistency function of ``unet`` at (x, t) with prompt embeddings ``text``, float32."""
        m = self.config.method

        def predict(x_in: Tensor, t_in: Tensor) -> Tensor:
            with self._autocast():
                return unet(x_in, t_in, encoder_hidden_states=text, timestep_cond=w_emb).sample

        return lcm.consistency(predict, x, t, self.teacher.alphas_cumprod, self.teacher.prediction,
                               timestep_scaling=m.timestep_scaling)

    @torch.no_grad()
    def teacher_step(self, x: Tensor, t: Tensor, s: Tensor, text: Tensor, w: Tensor) -> Tensor:
        """The guided DDIM step of the teacher from (x, t) to timesteps s at guidance scales w [N], float32."""
        n, th = x.shape[0], self.teacher
        both = torch.cat([text, self.cache["null"].to(x.device).expand_as(text)])  # conditional, then unconditional
        with self._autocast():
            out = th.unet(torch.cat([x, x]).to(th.unet.dtype), torch.cat([t, t]),
                          encoder_hidden_states=both.to(th.unet.dtype)).sample
        x0, eps = lcm.x0_and_eps(out, torch.cat([x, x]), torch.cat([t, t]), th.alphas_cumprod, th.prediction)
        w = w.view(-1, 1, 1, 1)
        x0 = x0[n:] + w * (x0[:n] - x0[n:])
        eps = eps[n:] + w * (eps[:n] - eps[n:])
        return lcm.ddim_step(x0, eps, s, th.alphas_cumprod)

    def micro_loss(self, idx: Tensor, start: int) -> Tensor:
        """The per-sample losses float32 [n] of the rows ``idx`` [n] (cache indices) whose first row in the global
        batch is ``start``."""
        c, m, t_cfg, dev = self.cache, self.config.method, self.config.train, self.device
        n = len(idx)
        noise = BatchNoise(derive_seed(t_cfg.seed, "noise", self.step), start=start, total=t_cfg.batch)
        shape = c["mean"].shape[1:]
        z0 = self.teacher.scaling_factor * (c["mean"][idx] + c["std"][idx] * noise.randn(n, *shape)).to(dev)
        t = self.grid[noise.randint(m.ddim_steps, n)].to(dev)
        s = (t - self.k).clamp(min=0)
        eps = noise.randn(n, *shape).to(dev)
        w = (m.w_min + (m.w_max - m.w_min) * noise.rand(n)).to(dev)
        text = c["text"][c["caption"][idx]].to(dev)
        abar = self.teacher.alphas_cumprod.to(dev)[t].view(-1, 1, 1, 1)
        x_t = abar.sqrt() * z0 + (1 - abar).sqrt() * eps
        w_emb = lcm.guidance_embedding(w - 1, self.w_dim) if self.w_dim else None
        pred = self._f(self.ddp, x_t, t, text, w_emb)
        x_s = self.teacher_step(x_t, t, s, text, w)
        with torch.no_grad():
            target = self._f(self.target if self.target is not None else self.student, x_s, s, text, w_emb)
        return self.distance(pred, target)

    def optimizer_step(self) -> float | None:
        """One step on this process's rows of the global batch; the global mean loss, or None when it or the
        gradients were not finite (nothing updated). The step counter advances either way."""
        t = self.config.train
        share = t.batch // dist.world_size()
        first = dist.rank() * share
        idx = data.batch_indices(len(self.cache["mean"]), t.batch, seed=t.seed, start=self.step * t.batch)
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        for j in range(t.accum):
            rows = slice(first + j * self.micro, first + (j + 1) * self.micro)
            sync = j == t.accum - 1 or self.ddp is self.student
            with contextlib.nullcontext() if sync else self.ddp.no_sync():
                loss = self.micro_loss(idx[rows], rows.start).mean()
                self.scaler.scale(loss / t.accum).backward()
            total += loss.detach()
        loss = dist.all_reduce_mean(total / t.accum)
        finite = bool(torch.isfinite(loss))
        if finite:
            self.scaler.unscale_(self.optimizer)
            norm = nn.utils.clip_grad_norm_(self.params, t.grad_clip if t.grad_clip > 0 else math.inf)
            finite = bool(torch.isfinite(norm))
        if finite:
            for group in self.optimizer.param_groups:
                group["lr"] = t.lr * min(1.0, (self.step + 1) / t.warmup_steps) if t.warmup_steps else t.lr
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if self.target is not None:
                ema_update(self.target, self.student, self.config.method.mu)
        self.step += 1
        return loss.item() if finite else None

    def state_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "step": self.step, "student": trained_state(self.student),
                "target": None if self.target is None else self.target.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any], path: Path) -> None:
        if state["config"] != self.config.to_dict():
            raise CmkitError(f"--resume: {path} was trained with a different config "
                             f"({config_diff(state['config'], self.config.to_dict())}); resume with the same options "
                             "or train into a new --out")
        self.student.load_state_dict(state["student"], strict=not self.config.lora)
        if self.target is not None:
            self.target.load_state_dict(state["target"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = state["step"]


def save_student(student: nn.Module, config: SDConfig, path: Path) -> None:
    """The trained weights (:func:`trained_state`) with the config in the metadata, atomically."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in trained_state(student).items()}
    blob = save(tensors, metadata={"format": FORMAT, "config": json.dumps(config.to_dict())})
    with atomic_write(path) as tmp:
        tmp.write_bytes(blob)


def save_run(run: SDRun, out: Path) -> None:
    """Check that every process holds the same weights, then write the training state (the newest
    ``train.keep_ckpts`` kept) and ``student.safetensors`` into ``out`` (rank 0)."""
    dist.check_same_weights(run.student)
    state, t = run.state_dict(), run.config.train

    def write() -> None:
        checkpoint.save_state(state, out, images_seen=run.step * t.batch, keep=t.keep_ckpts)
        save_student(run.student, run.config, out / STUDENT_NAME)

    dist.on_main(write)


def _check_resolution(config: SDConfig, teacher: TextToImage) -> None:
    """The images' size must give latents the UNet can halve down to its lowest level."""
    r, f = config.data.resolution, teacher.factor
    levels = 2 ** (len(teacher.unet.config.down_block_types) - 1)
    if r % (f * levels):
        raise CmkitError(f"data.resolution={r}: expected a multiple of {f * levels} (the VAE downsamples by {f}, the "
                         f"UNet's latents halve {levels.bit_length() - 1} times)")


def prepare_cache(config: SDConfig, teacher: TextToImage, out: Path) -> dict[str, Tensor]:
    """The run's latent and text-embedding cache (:mod:`cmkit.sd.captions`): read when its key matches, else built
    and written by rank 0; every process then reads it."""
    pairs = captions.read_captions(config.data.source)
    key = captions.cache_key(pairs, config.data.resolution, teacher.folder)
    path = out / captions.CACHE_NAME

    def build() -> None:
        if captions.read_cache(path, key) is None:
            captions.write_cache(path, captions.build_cache(teacher, pairs, config.data.resolution), key)

    dist.on_main(build)
    dist.barrier()
    cache = captions.read_cache(path, key)
    assert cache is not None
    return cache


def sd_train(config: SDConfig, out: Path, *, resume: bool = False, device: str | None = None) -> Path:
    """Train the SD-route run ``config`` describes into run directory ``out``; returns the trained weights' file
    (``student.safetensors``; ``cmkit export RUN --diffusers DIR`` turns it into a diffusers folder). Checks the
    config, the teacher folder and the data before anything is written; SIGINT/SIGTERM stop after the current step
    with a checkpoint (:class:`cmkit.train.TrainingStopped`)."""
    # 1. Checks, teacher, data cache, the run's modules.
    validate(config)
    own = dist.init()
    dev = torch.device(device) if device else own
    config = resolve_precision(config, dev, out=out, resume=resume)
    captions.read_captions(config.data.source)  # bad input is refused before the run directory exists
    teacher = load_pipeline(config.teacher, device=dev, dtype=DTYPES[config.train.precision])
    _check_resolution(config, teacher)
    if config.lora:
        check_lora_rank(teacher.unet, config.method.lora_rank)
    resume_from = rundir.prepare_run_dir(config, out, resume=resume)
    run = SDRun(config, teacher, prepare_cache(config, teacher, out), dev)
    if resume_from is not None:
        run.load_state_dict(checkpoint.load_state(resume_from), resume_from)
    t, main = config.train, dist.is_main()
    total, ckpt, log_every = t.total_steps, max(1, round(t.ckpt_kimg * 1000 / t.batch)), max(
        1, round(t.log_kimg * 1000 / t.batch))
    log = rundir.MetricsLog(out, resume_step=run.step) if main else None
    losses: list[float | None] = []
    nonfinite = 0  # skipped steps in a row
    bar = tqdm(total=total, initial=run.step, unit="step", dynamic_ncols=True, mininterval=1.0, disable=not main)
    with bar, stop_requests() as stop:
        while run.step < total:
            # 2. One optimiser step (all randomness a function of seed, step and row).
            losses.append(run.optimizer_step())
            bar.update(1)
            nonfinite = nonfinite + 1 if losses[-1] is None else 0
            if nonfinite == MAX_NONFINITE:
                raise CmkitError(f"stopped at step {run.step}: {MAX_NONFINITE} steps in a row had a non-finite "
                                 "loss or gradients (all skipped): lower train.lr or set train.precision=fp32")
            stopping, last = dist.any_rank(bool(stop)), run.step == total
            # 3. Log, then checkpoint and the trained weights at their interval, at the end and on a stop request.
            if (run.step % log_every == 0 or last) and log is not None:
                finite = [v for v in losses if v is not None]
                log.write({"step": run.step, "kimg": run.step * t.batch / 1000,
                           "loss": sum(finite) / len(finite) if finite else None,
                           "skipped_steps": len(losses) - len(finite), "lr": run.optimizer.param_groups[0]["lr"]})
                losses = []
            if run.step % ckpt == 0 or last or stopping:
                save_run(run, out)
            if stopping and not last:
                signum = stop[0] if stop else signal.SIGTERM
                raise TrainingStopped(signum, run.step * t.batch, checkpoint.list_states(out)[-1])
    return out / STUDENT_NAME
