"""benchmarks/compensation.py end to end on a tiny random-init Llama (seconds on CPU): the tuning cells on the
calibration split, the method cells on both held-out texts, resumability, and the QUALITY.md section."""

from pathlib import Path

import pytest

from _bench import load_benchmark


def _load(name):
    return load_benchmark(name)


@pytest.fixture(scope="module")
def bench():
    return _load("compensation"), _load("render_quality")


def test_compensation_benchmark_end_to_end(tmp_path, bench):
    comp, render = bench
    common = ["--model", "tiny-random", "--out", str(tmp_path / "out"), "--scores-cache", str(tmp_path / "cache"),
              "--windows", "2", "--seq-len", "64"]
    assert comp.main(["tune", *common, "--examples", "0,3", "--dampings", "0.01,1", "--modes", "weights,bias",
                      "--tune-layers", "1:4"]) == 0
    assert comp.main(["cell", *common, "--examples", "3", "--modes", "weights,weights+bias", "--layers", "1:4",
                      "--methods", "taylor,magnitude,pg-taylor", "--pg-steps", "2", "--seeds", "0,1"]) == 0
    path = tmp_path / "out" / "tiny-random" / "records.jsonl"
    recs = comp.read_records(path)
    kinds = [r["kind"] for r in recs]
    assert kinds.count("dense") == 1 and kinds.count("tune") == 1 + 2 * 2 * 2 and kinds.count("cell") == 3 * 3 * 2
    for r in recs:
        assert r["host"]["load_avg"] is not None and r["machine"] and "date" in r
        if r["kind"] == "tune":
            assert set(r["ppl"]) == {"calib-val", "fit"}
        if r["kind"] == "cell":
            assert set(r["ppl"]) == {"pydoc", "fortunes"}
            if r["mode"] == "none":
                assert r["compensation"] is None and r["flops"]["compensate"] == 0
            else:
                c = r["compensation"]
                assert c["tokens"] == 3 * 64 and c["error_after_mean"] < c["error_before_mean"]
                assert r["flops"]["compensate"] > 0 and r["cost"]["compensate_s"] > 0
    # the same units with and without compensation (the scores are cached, the policy mask too)
    cells = {(r["method"], r["seed"], r["mode"]): r for r in recs if r["kind"] == "cell"}
    for (m, s, mode), r in cells.items():
        assert r["kept"] == cells[(m, s, "none")]["kept"]
        if mode == "weights+bias":  # the switched-on biases
            assert r["params_after"] > cells[(m, s, "none")]["params_after"]
        else:
            assert r["params_after"] == cells[(m, s, "none")]["params_after"]
    assert len(list((tmp_path / "cache").glob("pg-taylor_*.pt"))) == 2
    # a rerun computes nothing
    before = path.read_bytes()
    assert comp.main(["cell", *common, "--examples", "3", "--modes", "weights,weights+bias", "--layers", "1:4",
                      "--methods", "taylor,magnitude,pg-taylor", "--pg-steps", "2", "--seeds", "0,1"]) == 0
    assert path.read_bytes() == before
    # rendered into QUALITY.md
    q = tmp_path / "quality"
    q.mkdir()
    text = render.render(q, tmp_path / "QUALITY.md", plots=False, recovery_dir=tmp_path / "none",
                         compensation_dir=tmp_path / "out")
    assert "## Weight compensation after structured pruning (tiny-random)" in text
    assert "### Choosing the damping, the token count and the mode" in text and "Lowest validation PPL" in text
    assert "| taylor | none |" in text and "| pg-taylor | weights+bias, pydoc fit, d 0.01, 3 x 64 |" in text
    assert "the target is" in text and "### Cost of the compensation" in text


def test_compensation_benchmark_refuses_unknown_names(bench, capsys):
    comp, _ = bench
    with pytest.raises(SystemExit):
        comp.main(["cell", "--model", "tiny-random", "--modes", "obs"])
    assert "unknown method or mode" in capsys.readouterr().err


@pytest.mark.skipif(not Path("/usr/share/games/fortunes").is_dir(), reason="Debian package 'fortunes' not installed")
def test_compensation_benchmark_fits_on_the_mixed_corpus(tmp_path, bench):
    """--calib mixed: tuned on the mixture's calibration split, cells compensated on its windows with the units of
    the pydoc scores, so the uncompensated cell is the one a pydoc run makes (shared); each record names its corpus."""
    comp, render = bench
    common = ["--model", "tiny-random", "--out", str(tmp_path / "out"), "--scores-cache", str(tmp_path / "cache"),
              "--windows", "2", "--seq-len", "64", "--examples", "3", "--layers", "1:4", "--tune-layers", "1:4"]
    assert comp.main(["tune", *common, "--calib", "mixed", "--dampings", "0.1"]) == 0
    assert comp.main(["cell", *common]) == 0
    assert comp.main(["cell", *common, "--calib", "mixed"]) == 0
    recs = comp.read_records(tmp_path / "out" / "tiny-random" / "records.jsonl")
    cells = [r for r in recs if r["kind"] == "cell"]
    assert sorted((r["mode"], r["calib"]) for r in cells) == [("none", None), ("weights", "mixed"),
                                                              ("weights", "pydoc")]
    assert all(r["score_calib"] == "pydoc" for r in cells)
    assert {r["calib"] for r in recs if r["kind"] in ("tune", "tune-ref")} == {"mixed"}
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [
        "taylor_s0_calib_tiny-random.pt", "taylor_s0_fit_calib-mixed_tiny-random.pt"]
    mixed, pydoc = (next(r for r in cells if r["calib"] == c) for c in ("mixed", "pydoc"))
    assert mixed["kept"] == pydoc["kept"] and mixed["ppl"] != pydoc["ppl"]
    q = tmp_path / "quality"
    q.mkdir()
    text = render.render(q, tmp_path / "QUALITY.md", plots=False, recovery_dir=tmp_path / "none",
                         compensation_dir=tmp_path / "out")
    assert "(calibration side of `mixed` only)" in text and "| taylor | weights, mixed fit, d 0.01, 3 x 64 |" in text
