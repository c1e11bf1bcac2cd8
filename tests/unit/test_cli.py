import json
from dataclasses import asdict

import pytest
import torch

from splitz import checkpoint, smoothing
from splitz.cli import main
from splitz.errors import InputError
from splitz.images import save_image
from splitz.nets import create_model

from ..conftest import ROOT, SHIPPED_MNIST


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "tiny"
    card = checkpoint.ModelCard(id="tiny", arch="lenet", dataset="mnist", split="conv1", sigma=0.5)
    return checkpoint.save(create_model("lenet", "mnist", "conv1", 0.5), card, path)


@pytest.fixture
def digit(tmp_path):
    path = tmp_path / "digit.png"
    save_image(torch.rand(1, 28, 28), path)
    return path


def test_certify_prints_a_table_with_audit_fields(model_dir, digit, capsys):
    assert main(["certify", str(digit), "--model", str(model_dir), "--n", "200", "--n0", "20",
                 "--radius", "0.1", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "pA_lower" in out and "L_gamma" in out and "r=0.1" in out and "sha256" in out


def test_certify_json_has_every_audit_field(model_dir, digit, capsys):
    assert main(["certify", str(digit), str(digit), "--model", str(model_dir), "--n", "100",
                 "--n0", "10", "--json", "--seed", "5"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [d["seed"] for d in lines] == [5, 6]
    for key in ("prediction", "radius", "p_a_lower", "n_a", "n", "n0", "alpha", "sigma",
                "lipschitz", "gamma", "model_id", "model_sha256", "time_s", "bound",
                "bound_level", "bound_u", "stopping", "budget"):
        assert key in lines[0]


def test_certify_adaptive_with_the_randomized_bound_records_both(model_dir, digit, capsys):
    assert main(["certify", str(digit), "--model", str(model_dir), "--n", "900", "--n0", "10",
                 "--batch", "100", "--tolerance", "0.05", "--bound",
                 "randomized-clopper-pearson", "--json", "--seed", "2"]) == 0
    c = json.loads(capsys.readouterr().out)
    assert c["stopping"] == "adaptive(tolerance=0.05,looks=300,900)" and c["budget"] == 900
    assert c["n"] <= 900 and c["bound"] in ("randomized-clopper-pearson", "beta-binomial-cs")
    assert main(["certify", str(digit), "--model", str(model_dir), "--n", "100",
                 "--tolerance", "2"]) == 2
    assert "tolerance must be in (0, 1)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["certify", str(digit), "--model", str(model_dir), "--bound", "wald"])


@pytest.mark.parametrize("command", ["certify", "query"])
def test_a_chosen_seed_with_the_randomized_bound_is_warned_of_in_one_line(
        model_dir, digit, capsys, command):
    args = [command, str(digit), "--model", str(model_dir), "--n", "100", "--n0", "10",
            "--radius", "0.1", "--quiet", "--bound", "randomized-clopper-pearson"]
    assert main([*args, "--seed", "3"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("splitz: warning: --bound "
                                               "randomized-clopper-pearson with --seed")
    assert "in advance" in err[0]
    assert main(args) == 0  # a drawn seed: nothing to warn of
    assert main([*args[:-1], "clopper-pearson", "--seed", "3"]) == 0
    assert capsys.readouterr().err == ""


def test_predict_and_lipschitz(model_dir, digit, capsys):
    assert main(["predict", str(digit), "--model", str(model_dir), "--n", "100"]) == 0
    assert main(["lipschitz", "--model", str(model_dir)]) == 0
    out = capsys.readouterr().out
    assert "p-value" in out and "f1.1 Conv2d" in out and "f2.7 Linear" in out


@pytest.mark.parametrize("make_bad,match", [
    (lambda p: p.write_bytes(b"hello"), "not a readable"),
    (lambda p: save_image(torch.rand(3, 32, 32), p), "32x32"),
    (lambda p: None, "cannot read"),
])
def test_bad_images_exit_2_with_one_line(model_dir, tmp_path, capsys, make_bad, match):
    bad = tmp_path / "bad.png"
    make_bad(bad)
    assert main(["certify", str(bad), "--model", str(model_dir), "--n", "10"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("splitz: error:") and match in err and "\n" not in err


def test_bad_model_and_arguments(digit, tmp_path, capsys):
    assert main(["certify", str(digit), "--model", str(tmp_path / "none")]) == 2
    assert "not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["certify", str(digit), "--model", str(tmp_path), "--n", "0"])
    assert e.value.code == 2


@pytest.mark.skipif(not SHIPPED_MNIST.exists(), reason="shipped model not built yet")
def test_readme_main_command_certifies_a_shipped_digit(capsys):
    examples = sorted((ROOT / "examples").glob("mnist-*.png"))
    assert examples
    assert main(["certify", *map(str, examples[:2]), "--model", str(SHIPPED_MNIST), "--n", "2000",
                 "--json", "--quiet"]) == 0
    certs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    labels = [int(p.stem.split("-")[1]) for p in examples[:2]]
    assert [c["prediction"] for c in certs] == labels
    assert all(c["radius"] > 0 for c in certs)


def test_evaluate_writes_tsv_table_and_plot_and_resumes(model_dir, fake_mnist, tmp_path, capsys):
    tsv = tmp_path / "run.tsv"
    args = ["evaluate", "--model", str(model_dir), "--out", str(tsv), "--every", "16", "--n", "50",
            "--n0", "10", "--data-root", str(fake_mnist)]
    assert main([*args, "--limit", "2"]) == 0
    assert main(args) == 0  # resumes: only the two missing images are certified
    rows = tsv.read_text().splitlines()
    assert rows[0].split("\t") == ["idx", "label", "predict", "radius", "correct", "time", "L",
                                   "pA_lower"]
    assert [r.split("\t")[0] for r in rows[1:]] == ["0", "16", "32", "48"]
    assert "ε=2.5" in capsys.readouterr().out
    png = tmp_path / "plot.png"
    assert main(["plot", str(tsv), "--out", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert main([*args[:4], str(tmp_path / "c.tsv"), "--data", "cifar10-exact1000"]) == 2
    assert "is for mnist, not cifar10-exact1000" in capsys.readouterr().err


def test_evaluate_resumes_only_the_same_subset_order_and_protocol(fake_mnist, tmp_path, capsys):
    from splitz.evaluate import subset

    spread = subset(64, 16, "spread")  # fake_mnist has 64 test images: 0, 16, 32, 48
    assert sorted(spread) == subset(64, 16) == [0, 16, 32, 48] and set(spread[:2]) != {0, 16}
    card = checkpoint.ModelCard(id="input", arch="lenet", dataset="mnist", split="input",
                                sigma=0.5)  # input smoothing: no local bound to search, fast
    model = checkpoint.save(create_model("lenet", "mnist", "input", 0.5), card, tmp_path / "m")
    tsv = tmp_path / "run.tsv"
    args = ["evaluate", "--model", str(model), "--out", str(tsv), "--every", "16",
            "--n", "50", "--n0", "10", "--data-root", str(fake_mnist), "--order", "spread"]
    assert main([*args, "--limit", "2"]) == 0 and main(args) == 0  # resumes in spread order
    assert [int(r.split("\t")[0]) for r in tsv.read_text().splitlines()[1:]] == spread
    half = tmp_path / "half.tsv"
    assert main([*args[:4], str(half), *args[5:-2], "--limit", "2"]) == 0  # index order: 0, 16
    assert main([*args[:4], str(half), *args[5:]]) == 2  # spread would mix the two subsets
    assert "resume it with the options that wrote it" in capsys.readouterr().err
    assert len(half.read_text().splitlines()) == 3  # nothing added
    # a recorded run resumes only with the protocol its card recorded
    rec = tmp_path / "rec.tsv"
    assert main([*args[:4], str(rec), *args[5:], "--limit", "1", "--record"]) == 0
    assert main([*args[:4], str(rec), *args[5:], "--seed", "7", "--n", "60"]) == 2
    assert "was written with n 50 (now 60), seed 0 (now 7)" in capsys.readouterr().err
    assert main([*args[:4], str(rec), *args[5:], "--record"]) == 0  # same protocol: resumes
    assert len(rec.read_text().splitlines()) == 5
    # one not recorded, by the protocol written beside it
    assert main([*args[:4], str(half), *args[5:-2], "--batch", "7"]) == 2
    assert "was written with batch 1000 (now 7)" in capsys.readouterr().err
    assert json.loads(half.with_suffix(".protocol.json").read_text())["n"] == 50


def test_the_library_call_checks_the_protocol_like_the_command(fake_mnist, tmp_path):
    from splitz import evaluate, load_model

    card = checkpoint.ModelCard(id="input", arch="lenet", dataset="mnist", split="input",
                                sigma=0.5)
    loaded = load_model(checkpoint.save(create_model("lenet", "mnist", "input", 0.5), card,
                                        tmp_path / "m"))
    tsv = tmp_path / "run.tsv"
    protocol = evaluate.Protocol.of(loaded, every=16, n0=10, n=50)
    assert protocol.every == 16 and protocol.batch == card.batch_size
    assert evaluate.evaluate(loaded, tsv, protocol, 1, fake_mnist).images == 1
    other = evaluate.Protocol.of(loaded, every=16, n0=10, n=50, seed=3)
    with pytest.raises(InputError, match=r"written with seed 0 \(now 3\)"):
        evaluate.evaluate(loaded, tsv, other, None, fake_mnist)  # e.g. bench/precision.py
    assert evaluate.evaluate(loaded, tsv, protocol, None, fake_mnist).images == 4
    # a file with more keys (bench/samples.py: tolerance, radii) is held to all of them
    wider = asdict(protocol) | {"tolerance": 0.02}
    samples = tmp_path / "samples.tsv"
    evaluate.claim(samples, wider)
    samples.write_text("idx\n")
    evaluate.claim(samples, wider)
    with pytest.raises(InputError, match=r"tolerance 0.02 \(now 0.01\)"):
        evaluate.claim(samples, wider | {"tolerance": 0.01})
    assert evaluate.Protocol.of(loaded).every == 10  # the standard MNIST subset
    with pytest.raises(InputError, match="no test set for data set 'svhn'"):
        evaluate.Protocol.of(loaded, "svhn")
    cifar = evaluate.Protocol("cifar10", 20, "index", 10, 50, 0.001, 0, "float32", 100)
    with pytest.raises(InputError, match="is for mnist, not cifar10"):  # built by hand
        evaluate.evaluate(loaded, tmp_path / "cifar.tsv", cifar, None, fake_mnist)


def test_a_resume_where_the_default_precision_differs_is_refused(fake_mnist, tmp_path,
                                                                 monkeypatch, capsys):
    card = checkpoint.ModelCard(id="input", arch="lenet", dataset="mnist", split="input",
                                sigma=0.5, precision="bfloat16")
    model = checkpoint.save(create_model("lenet", "mnist", "input", 0.5), card, tmp_path / "m")
    args = ["evaluate", "--model", str(model), "--out", str(tmp_path / "run.tsv"), "--every",
            "16", "--n", "50", "--n0", "10", "--data-root", str(fake_mnist)]
    monkeypatch.setattr(smoothing, "native_bfloat16", lambda device: False)
    assert main([*args, "--limit", "1"]) == 0  # float32 on this device
    monkeypatch.setattr(smoothing, "native_bfloat16", lambda device: True)
    assert main(args) == 2  # a device with bfloat16 would mix the two classifiers
    assert "precision float32 (now bfloat16)" in capsys.readouterr().err
    assert main([*args, "--precision", "float32"]) == 0


def test_a_recorded_evaluation_is_in_the_card_after_every_image(fake_mnist, tmp_path,
                                                                  monkeypatch, capsys):
    from splitz import Smooth

    card = checkpoint.ModelCard(id="input", arch="lenet", dataset="mnist", split="input",
                                sigma=0.5)
    model = checkpoint.save(create_model("lenet", "mnist", "input", 0.5), card, tmp_path / "m")
    tsv = tmp_path / "rec.tsv"
    args = ["evaluate", "--model", str(model), "--out", str(tsv), "--every", "16", "--n", "50",
            "--n0", "10", "--data-root", str(fake_mnist), "--record"]
    certify, calls = Smooth.certify, []

    def killed_at_the_fourth(self, *a, **k):  # the process dies certifying its fourth image
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return certify(self, *a, **k)

    monkeypatch.setattr(Smooth, "certify", killed_at_the_fourth)
    assert main(args) == 130
    recorded = checkpoint.read_card(model).metrics["rec"]
    assert recorded["images"] == 3 == len(tsv.read_text().splitlines()) - 1
    monkeypatch.undo()
    assert main(args) == 0  # resumes under the recorded protocol
    assert checkpoint.read_card(model).metrics["rec"]["images"] == 4


def test_query_answers_with_fewer_samples(model_dir, digit, capsys):
    assert main(["query", str(digit), "--model", str(model_dir), "--radius", "0.01",
                 "--n", "4000", "--batch", "200", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["samples"] <= 4000 and answer["looks"] >= 1 and "p_needed" in answer
    assert answer["bound"] in ("beta-binomial-cs", "clopper-pearson")
    assert main(["query", str(digit), "--model", str(model_dir), "--radius", "-1"]) == 2


def test_printed_numbers_never_claim_more_than_the_certificate(model_dir, digit, capsys,
                                                               monkeypatch):
    """The table rounds radii and lower bounds down and L up (to nearest, 0.78756 printed as
    0.7876: above the certificate)."""
    import dataclasses

    from splitz.smoothing import Smooth

    certify = Smooth.certify

    def fixed(self, *args, **kwargs):
        return [dataclasses.replace(c, prediction=7, radius=0.78756, p_a_lower=0.9999996,
                                    lipschitz=0.57114061, gamma=0.78756)
                for c in certify(self, *args, **kwargs)]

    monkeypatch.setattr(Smooth, "certify", fixed)
    assert main(["certify", str(digit), "--model", str(model_dir), "--n", "20", "--n0", "5",
                 "--quiet"]) == 0
    row = capsys.readouterr().out.splitlines()[1].split()
    assert row[2:4] == ["0.7875", "0.999999"] and row[5:7] == ["0.5712", "0.7875"]


def test_seed_is_drawn_unless_given(model_dir, digit, capsys):
    args = ["certify", str(digit), "--model", str(model_dir), "--n", "20", "--n0", "5", "--json"]
    assert main(args) == 0 and main(args) == 0 and main([*args, "--seed", "3"]) == 0
    drawn, again, chosen = (json.loads(x) for x in capsys.readouterr().out.splitlines())
    assert drawn["seed_source"] == again["seed_source"] == "random"
    assert drawn["seed"] != again["seed"]
    assert (chosen["seed"], chosen["seed_source"]) == (3, "client")


def test_resource_and_config_errors_exit_2_with_one_line(model_dir, digit, tmp_path, capsys):
    assert main(["certify", str(digit), "--model", str(model_dir), "--batch", "100000000",
                 "--n", "100000000"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--batch 100000000 needs" in err and "\n" not in err
    config = tmp_path / "bad.json"
    config.write_text('{"sigma": "loud"}')
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("splitz: error: invalid TrainConfig") and "\n" not in err
    config.write_text('{"id": "t", "recipe": "smoothmix", "smoothmix_etaa": 5}')  # misspelt
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert "smoothmix_etaa: Extra inputs are not permitted" in err and "\n" not in err


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("splitz: error:") and "\n" not in err, err
    return err


@pytest.mark.parametrize("alpha", ["nan", "0", "2"])
def test_evaluate_with_a_bad_alpha_writes_nothing_that_blocks_a_resume(
        model_dir, fake_mnist, tmp_path, capsys, alpha):
    args = ["evaluate", "--model", str(model_dir), "--out", str(tmp_path / "run.tsv"),
            "--every", "16", "--n", "20", "--n0", "10", "--limit", "1",
            "--data-root", str(fake_mnist)]
    assert main([*args, "--alpha", alpha]) == 2
    assert "alpha must be in (0, 1)" in one_line_error(capsys)
    assert list(tmp_path.iterdir()) == []
    assert main(args) == 0  # the same file, with a valid alpha


def test_plot_and_train_say_what_is_wrong_with_their_files(model_dir, tmp_path, capsys):
    tsv, png = tmp_path / "run.tsv", tmp_path / "p.png"
    cases = [
        (["plot", str(tmp_path / "none.tsv"), "--out", str(png)], "No such file"),
        (["plot", str(tmp_path), "--out", str(png)], "not a readable TSV"),
        (["plot", str(model_dir / "model.safetensors"), "--out", str(png)], "not a readable TSV"),
        (["plot", str(tsv), "--out", str(tmp_path / "p.xyz")], "writes a PNG"),
        (["plot", str(tsv), "--out", str(tmp_path / "no" / "p.png")], "No such file"),
        (["train", "--config", str(tmp_path / "none.json")], "not a readable JSON file"),
        (["train", "--config", str(tsv)], "not a readable JSON file"),
        (["train", "--config", str(tmp_path / "list.json")], "must hold a JSON object"),
    ]
    (tmp_path / "list.json").write_text("[1]")
    tsv.write_text("a\tb\n1\t2\n")
    for args, match in cases[:3]:
        assert main(args) == 2 and match in one_line_error(capsys), args
    assert main(["plot", str(tsv), "--out", str(png)]) == 2
    assert "no column idx, radius, correct" in one_line_error(capsys)
    tsv.write_text("idx\tradius\tcorrect\n0\twide\t1\n")
    assert main(["plot", str(tsv), "--out", str(png)]) == 2
    assert "without its correct and radius numbers" in one_line_error(capsys)
    tsv.write_text("idx\tradius\tcorrect\n0\t0.5\t1\n")
    for args, match in cases[3:]:
        assert main(args) == 2 and match in one_line_error(capsys), args
    assert main(["plot", str(tsv), "--out", str(png)]) == 0


def test_a_model_folder_whose_files_are_folders_is_a_one_line_error(model_dir, digit, tmp_path,
                                                                    capsys):
    import shutil

    for name in ("card.json", "model.safetensors"):
        broken = tmp_path / name.split(".")[0]
        shutil.copytree(model_dir, broken)
        (broken / name).unlink()
        (broken / name).mkdir()
        assert main(["certify", str(digit), "--model", str(broken), "--n", "10"]) == 2
        assert f"cannot read {broken / name}" in one_line_error(capsys)


@pytest.mark.parametrize("device", ["mps", "meta", "xla"])
def test_devices_torch_knows_but_splitz_does_not_run_on_are_refused(model_dir, digit, capsys,
                                                                     device):
    with pytest.raises(SystemExit) as e:
        main(["certify", str(digit), "--model", str(model_dir), "--device", device])
    assert e.value.code == 2 and "splitz runs on cpu or cuda" in capsys.readouterr().err


def test_submit_refuses_an_api_key_no_header_can_carry(digit, capsys):
    with pytest.raises(SystemExit) as e:
        main(["submit", str(digit), "--model", "m", "--api-key", "ключ"])
    assert e.value.code == 2 and "printable ASCII" in capsys.readouterr().err
