"""Training: the SPLITZ objective (noise at the split + local-Lipschitz penalty on f1) and the
randomized-smoothing baseline (split at the input: noise on the pixels), from the same loop.

loss = (1 - kappa) R + kappa L_bar   when L_bar > theta, else R,
with R the recipe's loss on m noisy copies f2(f1(x) + delta_k) (recipes.py: Gaussian
augmentation, consistency regularization, or SmoothMix, whose adversary moves x first), L_bar
the batch mean of a (differentiable, power-iteration) estimate of f1's local Lipschitz
constant on B(x, gamma); kappa ramps kappa_start -> kappa_end and gamma 0 -> gamma_end.
The estimate only steers training; certificates use the sound bounds of lipschitz.py.
"""

import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Literal, Self

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from . import checkpoint, data, recipes
from .nets import SplitModel, create_model
from .smoothing import native_bfloat16, parse_device

STATE = "train_state.pt"
# Fields that say where and how a run is carried out, not which model it makes: left out of the
# card's recorded config, and free to differ when a run resumes (in another folder, with another
# data copy, on a machine with more cores).
RUN_ONLY = frozenset({"out", "data_root", "loader_workers", "precision"})


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not a default

    id: str
    out: Path
    arch: str = "lenet"
    arch_kwargs: dict[str, Any] = Field(default_factory=dict)
    dataset: str = "mnist"
    split: str = "conv1"
    sigma: float = Field(0.5, gt=0)
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(0.01, gt=0)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = True
    schedule: Literal["onecycle", "step", "cosine"] = "onecycle"  # stepped every batch
    lr_step_epochs: int = Field(30, ge=1)  # "step": lr *= lr_gamma every lr_step_epochs
    lr_gamma: float = Field(0.1, gt=0)
    recipe: Literal[recipes.RECIPES] = "gaussian"
    noise_copies: int = Field(1, ge=1)  # m noisy copies of each image per step
    consistency_lambda: float = Field(10.0, ge=0)
    consistency_eta: float = Field(0.5, ge=0)
    # SmoothMix (recipes.py): the adversary's steps, step size (l2, pixels) and the step whose
    # point starts the mix, the mix loss weight, and the epochs over which that weight (and
    # the start's distance from x) ramp up
    smoothmix_steps: int = Field(8, ge=1)
    smoothmix_step_size: float = Field(1.0, gt=0)
    smoothmix_mix_step: int = Field(0, ge=0)
    smoothmix_eta: float = Field(1.0, ge=0)
    smoothmix_warmup: int = Field(10, ge=1)
    theta: float = 0.5  # penalty threshold on the local Lipschitz estimate
    kappa_start: float = 1.0
    kappa_end: float = 0.7
    gamma_end: float = 0.05  # training ball radius, ramped from 0
    ramp_epochs: int = 5  # epochs over which kappa and gamma ramp
    power_iters: int = 5
    mask_temperature: float = 0.0  # > 0: a soft mask in the penalty (see lipschitz_estimate)
    stability_weight: float = Field(0.0, ge=0)  # beta * stability_slack on B(x, gamma)
    train_limit: int | None = None  # use only the first N training images (quick models)
    # a new batch order each epoch (published recipes); False: one shuffled order for every
    # epoch, what the models trained before this field used
    reshuffle: bool = False
    seed: int = 0
    data_root: Path | None = None
    loader_workers: int = Field(0, ge=0)  # DataLoader processes; 0: load in the training one
    # the networks' forward passes in bfloat16 autocast (weights, gradients, the recipe's losses
    # and the Lipschitz terms stay float32): ResNet-20 epochs 1.5-2x faster on a CPU with
    # AVX512-BF16, 8-10x slower where torch emulates bfloat16; "auto": bfloat16 only where
    # the device has it in hardware. The card counts the epochs trained so.
    precision: Literal["float32", "bfloat16", "auto"] = "float32"
    description: str = ""

    @model_validator(mode="after")
    def _copies_for_recipe(self) -> Self:
        if self.recipe == "consistency" and self.noise_copies < 2:
            raise ValueError("recipe 'consistency' needs noise_copies >= 2")
        return self


def train(cfg: TrainConfig, command: str | None = None, device: str | torch.device = "cpu") -> Path:
    """Train, checkpointing every epoch (resumable after a kill, on any device), then write
    weights and card."""
    device = parse_device(device)
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.arch, cfg.dataset, cfg.split, cfg.sigma, **cfg.arch_kwargs)
    model.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
    loader = _loader(cfg, train=True, device=device)  # one for all epochs
    sched = _scheduler(cfg, opt, len(loader))
    start_epoch, elapsed, bf16_epochs = _resume(cfg, model, opt, sched)
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        loader.sampler.set_epoch(epoch)
        stats = _epoch(cfg, model, opt, sched, loader, epoch)
        elapsed += time.perf_counter() - t0
        bf16_epochs += _bfloat16(cfg, _device(model))
        _save_state(cfg, model, opt, sched, epoch + 1, elapsed, bf16_epochs)
        tqdm.write(f"epoch {epoch + 1}/{cfg.epochs} " + json.dumps(stats))
    del loader  # its worker processes, if any, end here
    acc = clean_accuracy(model, cfg)
    card = checkpoint.ModelCard(
        id=cfg.id, arch=cfg.arch, arch_kwargs=cfg.arch_kwargs, dataset=cfg.dataset,
        split=cfg.split, sigma=cfg.sigma, description=cfg.description,
        training={"command": command or shlex.join(["splitz", *sys.argv[1:]]),
                  "config": json.loads(cfg.model_dump_json(exclude=RUN_ONLY)),
                  "train_seconds": round(elapsed, 1),
                  "hardware": _hardware(device),
                  **({"bfloat16_autocast_epochs": bf16_epochs} if bf16_epochs else {})},
        metrics={"clean_accuracy_noisy": acc},
    )
    return checkpoint.save(model, card, cfg.out)


def _scheduler(cfg: TrainConfig, opt: torch.optim.Optimizer, steps_per_epoch: int):
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    return torch.optim.lr_scheduler.StepLR(opt, cfg.lr_step_epochs * steps_per_epoch, cfg.lr_gamma)


def noisy_logits(model: SplitModel, x: Tensor, m: int, noise: Tensor | None = None) -> Tensor:
    """f2(f1(x) + delta_k) for m noise draws (new ones unless given), stacked copy-major
    (recipes.py)."""
    z = model.f1(x).repeat(m, *([1] * (x.dim() - 1))).float()  # float32 under autocast too
    return model.f2(z + (model.sigma * torch.randn_like(z) if noise is None else noise)).float()


def recipe_step(cfg: TrainConfig, model: SplitModel, x: Tensor, y: Tensor,
                epoch: int) -> tuple[Tensor, Tensor]:
    """The logits of the m noisy copies of x that the recipe trains on, and its loss."""
    m = cfg.noise_copies
    if cfg.recipe != "smoothmix":
        logits = noisy_logits(model, x, m)
        if cfg.recipe == "consistency":
            return logits, recipes.consistency_loss(logits, y, m, cfg.consistency_lambda,
                                                    cfg.consistency_eta)
        return logits, recipes.gaussian_loss(logits, y, m)
    warm = min(1.0, (epoch + 1) / cfg.smoothmix_warmup)
    model.eval()  # the adversary sees BatchNorm's running statistics, as in the authors' code
    try:
        with torch.no_grad():
            split = model.f1(x[:1]).shape[1:]
        noise = model.sigma * torch.randn(m * len(x), *split, device=x.device)
        start, adv = recipes.smoothmix_adversary(
            lambda v: noisy_logits(model, v, m, noise), x, y, m, cfg.smoothmix_steps,
            cfg.smoothmix_step_size, cfg.smoothmix_mix_step,
            warm * cfg.smoothmix_step_size * cfg.smoothmix_mix_step)
    finally:
        model.train()
    logits = noisy_logits(model, start, m, noise)
    mix = torch.rand(len(x), device=x.device) / 2
    mixed = noisy_logits(model, start.lerp(adv, mix.view(-1, *([1] * (x.dim() - 1)))), m, noise)
    return logits, recipes.smoothmix_loss(logits, mixed, y, m, mix, warm * cfg.smoothmix_eta)


def unit_reach(model: SplitModel, x: Tensor, gamma: float) -> tuple[Tensor, Tensor]:
    """f1's pre-activations u = conv(normalize(x)) and how far each can move on B(x, gamma):
    reach_i = ||a_i||_2 gamma, with a_i the unit's row of A = W S^-1 (differentiable)."""
    norm, conv, _ = model.f1
    rows = (conv.weight / norm.std.view(1, -1, 1, 1)).flatten(1).norm(dim=1)
    return conv(norm(x)), rows.view(1, -1, 1, 1) * gamma


def stability_slack(model: SplitModel, x: Tensor, gamma: float) -> Tensor:
    """Per image, the mean over f1's units of how far each is from being provably constant on
    B(x, gamma): min(relu(u + reach), relu(t - u + reach)), zero iff the unit stays dead
    (u + reach <= 0) or saturated (u - reach >= t) on the whole ball (the l2 analogue of the
    ReLU-stability loss of Xiao et al., ICLR 2019). Only such units give the local bound of
    lipschitz.py anything to gain over the global one."""
    u, reach = unit_reach(model, x, gamma)
    upper = model.f1[2].upper()
    slack = torch.minimum(F.relu(u + reach), F.relu(upper - u + reach))
    return slack.flatten(1).mean(1)


def lipschitz_estimate(model: SplitModel, x: Tensor, gamma: float, iters: int,
                       temperature: float = 0.0) -> Tensor:
    """Per-image power-iteration estimate of ||M A||_2 (differentiable in the conv weight).

    A lower estimate of the sound bound: fine as a training signal, never used to certify. With
    temperature > 0 the 0/1 mask M becomes sigmoid((u + reach) / T) sigmoid((t - u + reach) / T),
    so the penalty also pushes units out of their linear band (dead or saturated on the ball)
    rather than only shrinking the weights.
    """
    norm, conv, act = model.f1
    u, reach = unit_reach(model, x, gamma)
    if temperature > 0:
        mask = torch.sigmoid((u + reach) / temperature) * torch.sigmoid(
            (act.upper() - u + reach) / temperature)
    else:
        mask = ((u + reach > 0) & (u - reach < act.upper())).float()

    def apply(v: Tensor) -> Tensor:
        return mask * F.conv2d(v / norm.std, conv.weight, None, conv.stride, conv.padding)

    v = torch.randn_like(x)
    with torch.no_grad():
        for _ in range(iters):
            w = apply(v)
            v = F.conv_transpose2d(w, conv.weight, None, conv.stride, conv.padding) / norm.std
            v = v / v.flatten(1).norm(dim=1).clamp(min=1e-12).view(-1, 1, 1, 1)
    return apply(v).flatten(1).norm(dim=1)


def clean_accuracy(model: SplitModel, cfg: TrainConfig, noise: bool = True) -> float:
    """Accuracy of the base classifier on the test set, with one noise draw at the split."""
    model.eval()
    correct = total = 0
    device = _device(model)
    with torch.inference_mode():
        for x, y in _loader(cfg, train=False, device=device):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            correct += int((model(x, noise=noise).argmax(1) == y).sum())
            total += len(y)
    return round(correct / total, 4)


def _epoch(cfg: TrainConfig, model: SplitModel, opt, sched, loader: DataLoader,
           epoch: int) -> dict[str, float]:
    model.train()
    ramp = min(1.0, epoch / max(1, cfg.ramp_epochs))
    kappa = cfg.kappa_start + (cfg.kappa_end - cfg.kappa_start) * ramp
    gamma = cfg.gamma_end * ramp
    penalize = cfg.split != "input"
    device = _device(model)
    bf16 = _bfloat16(cfg, device)
    # Summed on the device, read once per epoch: a read every batch would make the host wait
    # for the GPU before it queues the next batch's work.
    names = ("loss", "ce", "lip", "stab", "acc")
    sums = torch.zeros(len(names), dtype=torch.float64, device=device)
    bar = tqdm(loader, desc=f"epoch {epoch + 1}", unit="batch", leave=False)
    for i, (x, y) in enumerate(bar):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            logits, objective = recipe_step(cfg, model, x, y, epoch)
        y_all = y.repeat(cfg.noise_copies)
        ce = F.cross_entropy(logits.detach(), y_all)
        loss = objective
        lip = stab = torch.zeros((), device=device)
        if penalize:
            lip = lipschitz_estimate(model, x, gamma, cfg.power_iters,
                                     cfg.mask_temperature).mean()
            if lip.item() > cfg.theta:
                loss = (1 - kappa) * objective + kappa * lip
            if cfg.stability_weight:
                stab = stability_slack(model, x, gamma).mean()
                loss = loss + cfg.stability_weight * stab
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        acc = (logits.argmax(1) == y_all).float().mean()
        sums += torch.stack([loss.detach(), ce, lip.detach(), stab.detach(), acc]).double()
        if i % 50 == 0:
            bar.set_postfix(ce=f"{ce.item():.3f}", lip=f"{lip.item():.3f}", refresh=False)
    stats = {k: round(v / len(loader), 4) for k, v in zip(names, sums.tolist(), strict=True)}
    if not penalize:  # the baseline: no penalty, no schedule to report
        return {k: stats[k] for k in ("loss", "ce", "acc")}
    return stats | {"kappa": round(kappa, 3), "gamma": round(gamma, 4)}


def _device(model: SplitModel) -> torch.device:
    return next(model.parameters()).device


def _bfloat16(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether the recipe's forward passes run in bfloat16 autocast on this device."""
    return cfg.precision == "bfloat16" or (cfg.precision == "auto" and native_bfloat16(device))


def _hardware(device: torch.device) -> str:
    """What trained the model, for its card: the GPU's name, or the CPU's and the threads."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    cpu = next((x.split(":", 1)[1].strip() for x in lines if x.startswith("model name")), "CPU")
    return (f"{torch.get_num_threads()} thread(s) of {cpu} ({os.cpu_count()} cores), "
            f"torch {torch.__version__}")


def _loader(cfg: TrainConfig, train: bool, device: torch.device) -> DataLoader:
    """With loader_workers > 0, that many processes decode and augment the images, kept for all
    epochs of the training loader (persistent: each one's random augmentations go on from epoch
    to epoch, where workers made anew would be seeded alike and repeat them), into pinned memory
    when the model is on a GPU."""
    ds = data.load(cfg.dataset, train=train, root=cfg.data_root, augment=train)
    if train and cfg.train_limit:
        ds = Subset(ds, range(min(cfg.train_limit, len(ds))))
    gen = torch.Generator().manual_seed(cfg.seed)  # the workers' seeds
    workers = cfg.loader_workers
    return DataLoader(ds, batch_size=cfg.batch_size if train else 1000,
                      sampler=_Order(len(ds), cfg.seed, cfg.reshuffle) if train else None,
                      generator=gen, drop_last=train, num_workers=workers,
                      persistent_workers=train and workers > 0,
                      pin_memory=workers > 0 and device.type == "cuda")


class _Order(torch.utils.data.Sampler[int]):
    """The training order, a function of (seed, epoch) so a resumed run continues it: with
    `reshuffle`, a new permutation each epoch; without, one permutation for all epochs (as a
    DataLoader(shuffle=True) made anew each epoch with a generator seeded alike, whose first
    draw seeded its workers: what training did before `reshuffle`)."""

    def __init__(self, n: int, seed: int, reshuffle: bool):
        self.n, self.seed, self.reshuffle, self.epoch = n, seed, reshuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        gen = torch.Generator().manual_seed(
            self.seed * 100_003 + self.epoch if self.reshuffle else self.seed)
        if not self.reshuffle:  # the old loader's first draw, which seeded its workers
            torch.empty((), dtype=torch.int64).random_(generator=gen)
        return iter(torch.randperm(self.n, generator=gen).tolist())


def _save_state(cfg, model, opt, sched, epoch: int, elapsed: float,
                bf16_epochs: int = 0) -> None:
    cfg.out.mkdir(parents=True, exist_ok=True)
    tmp = cfg.out / (STATE + ".tmp")
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                "sched": sched.state_dict(), "epoch": epoch, "elapsed": elapsed,
                "bfloat16_epochs": bf16_epochs, "config": cfg.model_dump_json()}, tmp)
    tmp.replace(cfg.out / STATE)  # atomic: a kill never leaves a half-written state


def _resume(cfg, model, opt, sched) -> tuple[int, float, int]:
    """The epochs done, the seconds they took and how many of them in bfloat16 autocast."""
    path = cfg.out / STATE
    if not path.exists():
        return 0, 0.0, 0
    state = torch.load(path, weights_only=True, map_location=_device(model))
    saved = TrainConfig.model_validate_json(state["config"])  # fields added since: defaults
    if saved.model_dump(exclude=RUN_ONLY) != cfg.model_dump(exclude=RUN_ONLY):
        raise ValueError(f"{path} was written with another config; use a new --out")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    tqdm.write(f"resuming {cfg.id} after epoch {state['epoch']}")
    return state["epoch"], state["elapsed"], state.get("bfloat16_epochs", 0)
