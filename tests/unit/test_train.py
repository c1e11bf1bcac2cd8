import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from splitz import checkpoint, data, train
from splitz.lipschitz import F1Bound
from splitz.nets import create_model


def config(tmp_path, data_root, **over):
    fields = dict(id="t", out=tmp_path / "t", epochs=2, batch_size=32, train_limit=128,
                  ramp_epochs=1, data_root=data_root, lr=0.05)
    return train.TrainConfig(**(fields | over))


@pytest.mark.slow
def test_training_writes_a_loadable_model_with_card(tmp_path, fake_mnist):
    path = train.train(config(tmp_path, fake_mnist), command="splitz train --test")
    loaded = checkpoint.load(path)
    assert loaded.card.training["command"] == "splitz train --test"
    assert 0.0 <= loaded.card.metrics["clean_accuracy_noisy"] <= 1.0
    assert loaded.card.training["config"]["epochs"] == 2
    assert "thread(s) of" in loaded.card.training["hardware"]  # the CPU that trained it


@pytest.mark.slow
def test_penalty_lowers_the_lipschitz_bound(tmp_path, fake_mnist):
    plain = checkpoint.load(train.train(config(tmp_path / "a", fake_mnist, kappa_start=0.0,
                                               kappa_end=0.0))).model
    penal = checkpoint.load(train.train(config(tmp_path / "b", fake_mnist, kappa_start=0.9,
                                               kappa_end=0.9, theta=0.1))).model
    def bound(m):
        return F1Bound(m.f1, m.input_shape).global_bound
    assert bound(penal) < 0.75 * bound(plain)


@pytest.mark.slow
def test_resumes_after_a_kill(tmp_path, fake_mnist, monkeypatch):
    cfg = config(tmp_path, fake_mnist, epochs=3)
    real_epoch, calls = train._epoch, []

    def dying_epoch(cfg, model, opt, sched, loader, epoch):
        calls.append(epoch)
        if epoch == 1:
            raise KeyboardInterrupt  # killed during the second epoch
        return real_epoch(cfg, model, opt, sched, loader, epoch)

    monkeypatch.setattr(train, "_epoch", dying_epoch)
    with pytest.raises(KeyboardInterrupt):
        train.train(cfg)
    assert torch.load(cfg.out / train.STATE, weights_only=True)["epoch"] == 1
    monkeypatch.setattr(train, "_epoch", lambda *a: calls.append(a[-1]) or real_epoch(*a))
    train.train(cfg)
    assert calls == [0, 1, 1, 2]  # resumed at the epoch that was killed
    with pytest.raises(ValueError, match="another config"):
        train.train(config(tmp_path, fake_mnist, epochs=3, lr=0.1))


def _state_for(cfg):
    model = create_model("lenet_small", "mnist", "input", sigma=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    return model, opt, train._scheduler(cfg, opt, steps_per_epoch=4)


def test_a_run_saved_before_loader_workers_resumes_elsewhere_with_workers(tmp_path):
    old = train.TrainConfig(id="t", out=tmp_path / "gpu" / "t", arch="lenet_small",
                            split="input", epochs=3)
    train._save_state(old, *_state_for(old), epoch=2, elapsed=5.0)
    path = old.out / train.STATE
    state = torch.load(path, weights_only=True)
    fields = json.loads(state["config"])
    del fields["loader_workers"]  # as written before the fields existed
    del state["bfloat16_epochs"]
    state["config"] = json.dumps(fields)
    moved = tmp_path / "here" / "t"  # fetched from the GPU machine into another folder
    moved.mkdir(parents=True)
    torch.save(state, moved / train.STATE)

    now = old.model_copy(update={"out": moved, "loader_workers": 4, "data_root": tmp_path})
    assert train._resume(now, *_state_for(now)) == (2, 5.0, 0)
    with pytest.raises(ValueError, match="another config"):  # one that changes the model
        changed = now.model_copy(update={"lr": 0.5})
        train._resume(changed, *_state_for(changed))


def test_loader_workers_keep_the_order_and_draw_new_augmentations_each_epoch(monkeypatch):
    class Noisy(torch.utils.data.Dataset):  # an "augmentation": a fresh draw per access
        def __len__(self):
            return 24

        def __getitem__(self, i):
            return torch.rand(()), i

    monkeypatch.setattr(train.data, "load", lambda *a, **k: Noisy())
    # the order of a loader made anew each epoch, as training ran before loader_workers
    before = DataLoader(Noisy(), batch_size=8, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    order = torch.cat([i for _, i in before]).tolist()
    assert order != list(range(24))
    for workers in (0, 2):
        cfg = train.TrainConfig(id="t", out=Path("unused"), batch_size=8,
                                loader_workers=workers)
        loader = train._loader(cfg, train=True, device=torch.device("cpu"))
        assert loader.persistent_workers == (workers > 0) and not loader.pin_memory
        (draws0, order0), (draws1, order1) = (
            [torch.cat(t) for t in zip(*loader, strict=True)] for _ in range(2))
        assert order0.tolist() == order1.tolist() == order
        assert not torch.equal(draws0, draws1)
        del loader


def test_reshuffle_draws_a_new_order_each_epoch_that_a_resume_repeats():
    fixed, fresh, again = (train._Order(24, 0, reshuffle) for reshuffle in (False, True, True))
    orders = {}
    for epoch in (0, 1):
        for name, sampler in (("fixed", fixed), ("fresh", fresh)):
            sampler.set_epoch(epoch)
            orders[name, epoch] = list(sampler)
    assert orders["fixed", 0] == orders["fixed", 1]  # the order training used before the field
    assert orders["fresh", 0] != orders["fresh", 1]
    assert sorted(orders["fresh", 1]) == list(range(24))
    again.set_epoch(1)  # a run resumed at epoch 1 sees what it would have seen
    assert list(again) == orders["fresh", 1]


@pytest.mark.slow
def test_loader_workers_train_and_stay_off_the_card(tmp_path, fake_mnist):
    cfg = config(tmp_path, fake_mnist, arch="lenet_small", split="input", loader_workers=2)
    card = checkpoint.load(train.train(cfg)).card
    assert {"loader_workers", "out", "data_root"}.isdisjoint(card.training["config"])
    train.train(cfg.model_copy(update={"loader_workers": 0}))  # the same run, done: resumes


@pytest.mark.slow
def test_a_run_resumed_in_bfloat16_autocast_counts_those_epochs_on_its_card(
        tmp_path, fake_mnist, monkeypatch):
    cfg = config(tmp_path, fake_mnist, split="conv1", recipe="consistency", noise_copies=2)
    real_epoch, real_step, seen = train._epoch, train.recipe_step, []

    def dying_epoch(cfg, model, opt, sched, loader, epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        return real_epoch(cfg, model, opt, sched, loader, epoch)

    def step(*args):
        logits, loss = real_step(*args)
        seen.append((torch.is_autocast_enabled("cpu"), logits.dtype, loss.dtype))
        return logits, loss

    monkeypatch.setattr(train, "_epoch", dying_epoch)
    monkeypatch.setattr(train, "recipe_step", step)
    with pytest.raises(KeyboardInterrupt):
        train.train(cfg)  # one epoch in float32
    monkeypatch.setattr(train, "_epoch", real_epoch)
    card = checkpoint.load(train.train(cfg.model_copy(update={"precision": "bfloat16"}))).card
    assert card.training["bfloat16_autocast_epochs"] == 1  # of 2
    assert "precision" not in card.training["config"]  # how it was run, not which model
    per_epoch = len(seen) // 2
    assert set(seen[:per_epoch]) == {(False, torch.float32, torch.float32)}
    assert set(seen[per_epoch:]) == {(True, torch.float32, torch.float32)}  # losses in float32


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bfloat16_only_where_the_device_has_it(monkeypatch, native):
    monkeypatch.setattr(train, "native_bfloat16", lambda device: native)
    cpu = torch.device("cpu")
    assert train._bfloat16(train.TrainConfig(id="t", out="t", precision="auto"), cpu) is native
    assert train._bfloat16(train.TrainConfig(id="t", out="t", precision="bfloat16"), cpu)
    assert not train._bfloat16(train.TrainConfig(id="t", out="t"), cpu)


def test_lipschitz_estimate_is_below_the_sound_bound(lenet):
    x = torch.rand(3, 1, 28, 28)
    est = train.lipschitz_estimate(lenet, x, 0.05, iters=30)
    sound = F1Bound(lenet.f1, lenet.input_shape).local(x, 0.05)
    assert (est.detach().double() <= sound).all()
    assert (est.detach().double() >= 0.9 * sound).all()


@pytest.mark.slow
@pytest.mark.parametrize("split", ["input", "conv1"])
@pytest.mark.parametrize("recipe", ["gaussian", "consistency", "smoothmix"])
def test_each_recipe_trains_at_each_split(tmp_path, fake_mnist, recipe, split):
    cfg = config(tmp_path, fake_mnist, arch="lenet_small", split=split, recipe=recipe,
                 noise_copies=2, epochs=1, kappa_start=0.0, kappa_end=0.0)
    loaded = checkpoint.load(train.train(cfg))
    assert loaded.card.training["config"]["recipe"] == recipe
    assert loaded.card.metrics["clean_accuracy_noisy"] > 0.1  # learnt something in one epoch


def test_consistency_needs_two_copies_in_the_config(tmp_path):
    with pytest.raises(ValueError, match="noise_copies >= 2"):
        train.TrainConfig(id="t", out=tmp_path, recipe="consistency", noise_copies=1)


@pytest.mark.parametrize("schedule", ["onecycle", "step", "cosine"])
def test_schedules_decay_the_learning_rate(tmp_path, schedule):
    cfg = train.TrainConfig(id="t", out=tmp_path, lr=0.1, epochs=4, lr_step_epochs=2,
                            schedule=schedule)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.lr)
    sched, lrs = train._scheduler(cfg, opt, steps_per_epoch=10), []
    for _ in range(40):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[-1] <= 0.1 * max(lrs) + 1e-12
    if schedule == "step":  # x0.1 after exactly two epochs (20 steps), flat in between
        assert lrs[:20] == [0.1] * 20 and lrs[20] == pytest.approx(0.01)


def test_smoothmix_step_attacks_with_frozen_batchnorm_and_trains_on_m_copies(tmp_path,
                                                                              monkeypatch):
    cfg = train.TrainConfig(id="t", out=tmp_path, arch="resnet", dataset="cifar10",
                            split="input", recipe="smoothmix", noise_copies=2,
                            smoothmix_steps=2, smoothmix_mix_step=1, smoothmix_eta=5.0,
                            smoothmix_warmup=4)
    model = create_model("resnet", "cifar10", "input", 0.5, depth=8).train()
    bn = next(mod for mod in model.modules() if isinstance(mod, torch.nn.BatchNorm2d))
    x, y = torch.rand(3, 3, 32, 32), torch.tensor([0, 1, 2])
    noises, etas = [], []
    logits_of, loss_of = train.noisy_logits, train.recipes.smoothmix_loss
    monkeypatch.setattr(train, "noisy_logits",
                        lambda mdl, v, m, noise=None: noises.append(noise) or logits_of(
                            mdl, v, m, noise))
    monkeypatch.setattr(train.recipes, "smoothmix_loss",
                        lambda *a: etas.append(a[-1]) or loss_of(*a))
    logits, loss = train.recipe_step(cfg, model, x, y, epoch=1)
    assert model.training and logits.shape == (6, 10) and loss.requires_grad
    # two training passes (clean, mixed) count in BatchNorm's statistics, the adversary's none
    assert int(bn.num_batches_tracked) == 2
    # one noise draw for the adversary's two steps and both training passes; eta warms up
    assert len(noises) == 4 and all(n is noises[0] for n in noises) and noises[0].shape[0] == 6
    assert etas == [pytest.approx(5.0 * 2 / 4)]


def test_noisy_copies_are_stacked_copy_major():
    model = create_model("lenet_small", "mnist", "input", sigma=1e-6).eval()
    x = torch.rand(3, 1, 28, 28)
    logits = train.noisy_logits(model, x, 2)
    a, b = logits.chunk(2)
    assert torch.allclose(a, model(x), atol=1e-4) and torch.allclose(b, model(x), atol=1e-4)


def test_stability_slack_vanishes_exactly_where_the_sound_bound_sees_constant_units():
    model = create_model("lenet_small", "mnist", "conv1", sigma=0.5).eval()
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        model.f1[1].bias.fill_(-50.0)  # every unit dead on B(x, 0.5)
    bound = F1Bound(model.f1, model.input_shape)
    assert train.stability_slack(model, x, 0.5).eq(0).all()
    assert bound.local(x, 0.5).eq(0).all()
    with torch.no_grad():
        model.f1[1].bias.fill_(0.0)  # units in their linear band: slack, and L_gamma > 0
    bound = F1Bound(model.f1, model.input_shape)
    assert (train.stability_slack(model, x, 0.5) > 0).all()
    assert (bound.local(x, 0.5) > 0).all()


@pytest.mark.slow
def test_stability_penalty_leaves_fewer_units_that_can_change(tmp_path, fake_mnist):
    test = data.load("mnist", train=False, root=fake_mnist)

    def changeable(weight):
        cfg = config(tmp_path / str(weight), fake_mnist, arch="lenet_small", kappa_start=0.0,
                     kappa_end=0.0, gamma_end=0.3, stability_weight=weight, epochs=3,
                     batch_size=16, train_limit=256)
        model = checkpoint.load(train.train(cfg)).model
        bound = F1Bound(model.f1, model.input_shape)
        x = torch.stack([test[i][0] for i in range(16)])
        gamma = torch.full((16,), 0.3, dtype=torch.float64)
        return bound.can_change(bound.preactivation(x), gamma).double().mean()

    assert changeable(10.0) < 0.25 * changeable(0.0)


def test_every_config_in_the_repository_is_a_valid_training_config(tmp_path):
    from ..conftest import ROOT

    paths = sorted((ROOT / "configs").rglob("*.json"))
    assert len(paths) >= 10
    for path in paths:
        cfg = train.TrainConfig(**json.loads(path.read_text()), out=tmp_path)
        assert cfg.id and cfg.dataset in path.parts[-2], path  # configs/<data set>/<name>.json
