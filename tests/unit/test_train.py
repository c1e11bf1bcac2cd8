import pytest
import torch

from splitz import checkpoint, train
from splitz.lipschitz import F1Bound


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

    def dying_epoch(cfg, model, opt, sched, epoch):
        calls.append(epoch)
        if epoch == 1:
            raise KeyboardInterrupt  # killed during the second epoch
        return real_epoch(cfg, model, opt, sched, epoch)

    monkeypatch.setattr(train, "_epoch", dying_epoch)
    with pytest.raises(KeyboardInterrupt):
        train.train(cfg)
    assert torch.load(cfg.out / train.STATE, weights_only=True)["epoch"] == 1
    monkeypatch.setattr(train, "_epoch", lambda *a: calls.append(a[-1]) or real_epoch(*a))
    train.train(cfg)
    assert calls == [0, 1, 1, 2]  # resumed at the epoch that was killed
    with pytest.raises(ValueError, match="another config"):
        train.train(config(tmp_path, fake_mnist, epochs=3, lr=0.1))


def test_lipschitz_estimate_is_below_the_sound_bound(lenet):
    x = torch.rand(3, 1, 28, 28)
    est = train.lipschitz_estimate(lenet, x, 0.05, iters=30)
    sound = F1Bound(lenet.f1, lenet.input_shape).local(x, 0.05)
    assert (est.detach().double() <= sound).all()
    assert (est.detach().double() >= 0.9 * sound).all()
