"""The FSDP2 path (moreau_pruner.distributed, the fsdp estimate strategy) against the one-process run, on CPU with gloo.

Ranks are spawned from the test (torch.multiprocessing, or torchrun for the CLI) on a free port.
The one-process reference splits the batch into the same micro-batches as the ranks, so on the
``reference`` backend the gradients, δ and Ĝ are bit-identical; sums over columns (scores of
o_proj/down_proj, the l2 log, structure groups) change order and agree to a tight tolerance, and
the kept units are identical.
"""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import moreau_kernels as mk
from moreau_pruner.estimate import MoreauConfig, estimate, gradient
from moreau_pruner import compute_scores, resolve_target
from moreau_pruner.score.importance import model_scores
from moreau_pruner.io.pruned import load_pruned
from moreau_pruner.prune.config import PruneConfig
from moreau_pruner.prune.plan import plan_local
from moreau_pruner.model.structure import discover
from moreau_pruner.score.taylor import taylor_scores

from _tiny import word_tokenizer

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the a of is to and in it that for on with as be by this are an or at from statement expression value "
         "object function name class return if else python module type list string number").split()
PRUNE = PruneConfig(ratio=0.5, attn_layers="0:3", mlp_layers="0:3")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_dir(path: Path, kind: str, **over) -> Path:
    torch.manual_seed(0)
    kw = dict(vocab_size=64, hidden_size=48, intermediate_size=40, num_hidden_layers=3, num_attention_heads=6,
              num_key_value_heads=2, head_dim=8, max_position_embeddings=128)
    kw.update(over)
    if kind == "llama":  # GQA (n_rep 3), tied embeddings
        model = LlamaForCausalLM(LlamaConfig(tie_word_embeddings=True, **kw))
    else:  # q/k/v biases, untied lm_head
        model = Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=False, **kw))
    with torch.no_grad():  # non-trivial norms and biases
        for n, p in model.named_parameters():
            if n.endswith("norm.weight") or n.endswith(".bias"):
                p.add_(0.1 * torch.randn(p.shape))
    model.save_pretrained(path)
    word_tokenizer(WORDS).save_pretrained(path)
    return path


def _worker(rank, world, port, jobs, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from moreau_pruner.distributed.context import DataParallel, init
    from moreau_pruner.distributed.loading import load_sharded
    from moreau_pruner.distributed.scoring import FsdpScoring
    from moreau_pruner.estimate.strategies.fsdp import shard_range

    mk.set_backend("reference")
    ctx = init("cpu")
    try:
        for k, job in enumerate(jobs):
            mk.set_backend(job.get("backend", "reference"))
            sm = load_sharded(job["model"], "float32", ctx)
            scores, est, _ = compute_scores(sm.model, job["batch"], job["method"], PRUNE, job.get("moreau"),
                                            progress=False, taylor_variant=job.get("variant", "param_first"),
                                            head_score=job.get("head_score", "unit"), context=FsdpScoring(ctx))
            grads = est.grads if est else None
            if job["method"] == "taylor" and job.get("variant", "param_first") == "param_first":
                names = [n for n in dict(sm.model.named_parameters()) if n.endswith("proj.weight")]
                grads = gradient(sm.model, job["batch"], names, runner=DataParallel(ctx))
            shards = {n: (shard_range(p.shape[0], world, rank), p.to_local().detach().clone())
                      for n, p in sm.model.named_parameters()} if job.get("shards", True) else {}
            torch.save({"grads": grads, "log": est.log if est else None, "scores": scores,
                        "shards": shards}, Path(out) / f"job{k}_rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _spawn(world, jobs, out, timeout=240):
    port = _free_port()
    pc = mp.start_processes(_worker, args=(world, port, jobs, str(out)), nprocs=world, join=False,
                            start_method="spawn")
    deadline = time.time() + timeout
    while not pc.join(timeout=2):
        if time.time() > deadline:
            for p in pc.processes:
                p.kill()
            pytest.fail(f"distributed workers did not finish in {timeout} s")
    return [[torch.load(Path(out) / f"job{k}_rank{r}.pt", weights_only=False) for r in range(world)]
            for k in range(len(jobs))]


def _full(per_rank, name):
    return torch.cat([res["grads"][name] for res in per_rank])


def _single_scores(model, batch, job, world):
    """The one-process run on the same batch, micro-batched like the ranks."""
    structure = discover(model)
    names = structure.projection_names(set(range(3)))  # PRUNE's layers
    mbs = batch.shape[0] // world if batch.shape[0] % world == 0 else None
    if job["method"] == "moreau":
        cfg = job["moreau"]
        cfg = MoreauConfig(**{**cfg.__dict__, "micro_batch_size": mbs})
        est = estimate(model, batch, cfg, "reference", score=names, progress=False)
        return model_scores(structure, "moreau", est.grads, layers=set(range(3))), est.grads, est.log
    if job["method"] == "taylor":
        variant = job.get("variant", "param_first")
        if variant == "param_first":
            g = gradient(model, batch, names, mbs)
            return model_scores(structure, "taylor", g, layers=set(range(3)),
                                head_score=job.get("head_score", "unit")), g, None
        return taylor_scores(model, batch, variant, PRUNE)[0], None, None
    return model_scores(structure, job["method"], layers=set(range(3))), None, None


def _assert_same_plan(model, got, want):
    s = discover(model)
    target = resolve_target(s, PRUNE)
    a = plan_local(target, got)
    b = plan_local(target, want)
    assert [(p.kv_keep, p.mlp_keep) for p in a] == [(p.kv_keep, p.mlp_keep) for p in b]


def _check(model, jobs, results, world, exact):
    if not isinstance(model, torch.nn.Module):
        model = AutoModelForCausalLM.from_pretrained(model).eval()
    full = dict(model.named_parameters())
    for job, per_rank in zip(jobs, results):
        torch.set_num_threads(1)
        with mk.use_backend(job.get("backend", "reference")):
            want_scores, want_grads, want_log = _single_scores(model, job["batch"], job, world)
        torch.set_num_threads(2)
        # every rank holds the same scores
        for res in per_rank[1:]:
            for a, b in zip(res["scores"], per_rank[0]["scores"]):
                if b.attention is None:
                    assert a.attention is None and a.mlp is None
                else:
                    assert torch.equal(a.attention, b.attention) and torch.equal(a.mlp, b.mlp)
        # sharded loading put the right rows on each rank (uneven and empty shards included)
        for name, p in full.items():
            if name in per_rank[0]["shards"]:
                rows = [res["shards"][name] for res in per_rank]
                assert [r[0] for r in rows][0][0] == 0
                assert torch.equal(torch.cat([t for _, t in rows]), p.detach()), name
        if want_grads is not None:
            for name, g in want_grads.items():
                got = _full(per_rank, name)
                if exact[job["tag"]] == "norm":  # noise differs by ulps between backends' log/sin/cos
                    assert (got - g).norm() <= 1e-3 * g.norm(), name
                elif exact[job["tag"]]:
                    assert torch.equal(got, g), f"{job['tag']}: Ĝ of {name} differs"
                else:
                    torch.testing.assert_close(got, g, rtol=1e-5, atol=1e-9)
        if want_log is not None:
            for a, b in zip(per_rank[0]["log"], want_log):
                assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
                assert a["l2"] == pytest.approx(b["l2"], rel=1e-5, abs=1e-12)
        for a, b in zip(per_rank[0]["scores"], want_scores):
            if b.attention is None:
                assert a.attention is None and a.mlp is None
                continue
            rtol = 1e-4 if exact.get(job["tag"]) == "norm" else 1e-5
            torch.testing.assert_close(a.attention, b.attention, rtol=rtol, atol=0)
            torch.testing.assert_close(a.mlp, b.mlp, rtol=rtol, atol=0)
        _assert_same_plan(model, per_rank[0]["scores"], want_scores)


@pytest.fixture(autouse=True)
def _reference_backend():
    before = mk.get_backend()
    mk.set_backend("reference")
    yield
    mk.set_backend(before)


def test_two_ranks_match_one_process(tmp_path):
    """Llama with GQA (tied) and Qwen2 with biases and 61 vocabulary rows (not divisible by 2):
    Ĝ bit-identical in reference mode (row groups) and for the Taylor gradient; paper mode with
    structure groups and two noise samples, param_mix, magnitude and random to a tight tolerance."""
    llama = _tiny_dir(tmp_path / "llama", "llama")
    qwen = _tiny_dir(tmp_path / "qwen", "qwen2", vocab_size=61, intermediate_size=38)
    batch = torch.randint(3, 61, (4, 12), generator=torch.Generator().manual_seed(1))
    ref = MoreauConfig(iters=4, avg_last=2, seed=7)
    jobs = [dict(tag="llama-ref", model=str(llama), batch=batch, method="moreau", moreau=ref),
            dict(tag="llama-paper-structure", model=str(llama), batch=batch, method="moreau",
                 moreau=MoreauConfig(mode="paper", group="structure", n_samples=2, iters=3, avg_last=2, seed=3)),
            dict(tag="llama-taylor", model=str(llama), batch=batch, method="taylor"),
            dict(tag="llama-taylor-upstream-fold", model=str(llama), batch=batch, method="taylor",
                 head_score="llm-pruner-upstream", shards=False),
            dict(tag="llama-taylor-mix", model=str(llama), batch=batch, method="taylor", variant="param_mix"),
            dict(tag="llama-magnitude", model=str(llama), batch=batch, method="magnitude"),
            dict(tag="llama-random", model=str(llama), batch=batch, method="random"),
            dict(tag="qwen-ref", model=str(qwen), batch=batch, method="moreau", moreau=ref),
            dict(tag="qwen-paper", model=str(qwen), batch=batch, method="moreau",
                 moreau=MoreauConfig(mode="paper", iters=3, avg_last=3, seed=1))]
    results = _spawn(2, jobs, tmp_path)
    exact = {"llama-ref": True, "llama-taylor": True, "llama-taylor-upstream-fold": True, "qwen-ref": True,
             "qwen-paper": True, "llama-paper-structure": False}
    _check(llama, jobs[:7], results[:7], 2, exact)
    _check(qwen, jobs[7:], results[7:], 2, exact)


def test_three_ranks_uneven_and_empty_shards(tmp_path):
    """k/v with 4 rows on 3 ranks (2, 2 and an EMPTY shard), 22/22/20 vocabulary rows, 5 calibration
    rows split 2/2/1 (weighted): Ĝ and scores to a tight tolerance, the same kept units."""
    llama = _tiny_dir(tmp_path / "llama", "llama", num_key_value_heads=1, head_dim=4, num_attention_heads=6,
                      hidden_size=24)
    batch = torch.randint(3, 64, (5, 10), generator=torch.Generator().manual_seed(2))
    jobs = [dict(tag="uneven", model=str(llama), batch=batch, method="moreau",
                 moreau=MoreauConfig(iters=3, avg_last=2, seed=5, std=0.1, lr=1e-2))]
    results = _spawn(3, jobs, tmp_path)
    shard = results[0][2]["shards"]["model.layers.0.self_attn.k_proj.weight"]
    assert shard[1].shape[0] == 0  # the third rank really holds no k_proj rows
    _check(llama, jobs, results, 3, {"uneven": False})


@pytest.mark.slow
def test_two_ranks_smollm2(tmp_path, smollm2_shared):
    """The embedded SmolLM2 (GGUF: every rank loads it whole, then keeps its rows) on the native
    ``cpu`` backend (the pure-PyTorch one takes minutes per step at this size): the one-process run
    regenerates the noise natively while the ranks use the reference Box-Muller on the same Philox
    words, so Ĝ agrees to 1e-3 in norm, the scores to 1e-4 and the kept units exactly."""
    from moreau_kernels import _native
    from moreau_pruner.data import calibration_batch, calibration_text

    if not _native.has_op("perturb_out", "cpu"):
        pytest.skip("needs the native cpu backend (moreau_kernels/_C.so)")
    model, tok = smollm2_shared
    batch = calibration_batch(tok, calibration_text("pydoc"), 2, 32, 0)
    jobs = [dict(tag="smollm2", model=None, batch=batch, method="moreau", shards=False, backend="cpu",
                 moreau=MoreauConfig(iters=2, avg_last=1, seed=0))]
    results = _spawn(2, jobs, tmp_path, timeout=900)
    _check(model, jobs, results, 2, {"smollm2": "norm"})


# ----------------------------------------------------------------------------- launch errors
def _cli(argv):
    from moreau_pruner.cli.prune import main

    return main(argv)


def test_cli_needs_torchrun(monkeypatch, capsys):
    for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(v, raising=False)
    assert _cli(["--distributed", "fsdp", "--no-eval"]) == 2
    err = capsys.readouterr().err
    assert "RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT" in err and "torchrun --nproc-per-node" in err


@pytest.mark.parametrize("extra,words", [(["--unstructured"], "--unstructured has no distributed path"),
                                         (["--allocation", "owl"], "--allocation owl has no distributed path"),
                                         (["--noise", "torch"], "--noise torch has no distributed path"),
                                         (["--rounds", "2"], "--rounds 2 has no distributed path"),
                                         (["--uniform", "--scope", "global"], "--uniform")])
def test_cli_refuses_options_without_a_distributed_path(capsys, extra, words):
    assert _cli(["--distributed", "fsdp", "--no-eval"] + extra) == 2
    assert words in capsys.readouterr().err


def test_device_checks():
    from moreau_pruner.distributed.context import DistributedError, _device_of_rank, batch_rows
    from moreau_pruner.estimate.strategies.fsdp import shard_range

    assert _device_of_rank("cpu", 3) == ("cpu", None)
    assert "numbered device" in _device_of_rank("cuda:1", 0)[1]
    if not torch.cuda.is_available():
        assert "no CUDA device" in _device_of_rank("cuda", 0)[1]
    assert [shard_range(5, 4, r) for r in range(4)] == [(0, 2), (2, 4), (4, 5), (5, 5)]
    assert [batch_rows(5, 3, r) for r in range(3)] == [(0, 2), (2, 4), (4, 5)]
    with pytest.raises(DistributedError, match="2 rows but 3 ranks"):
        batch_rows(2, 3, 0)


# ----------------------------------------------------------------------------- the CLI end to end
def _torchrun(nproc, args, cwd, timeout=300):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "python"),
                                                        os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
           "127.0.0.1", "--master-port", str(_free_port()), "-m", "moreau_pruner.cli", "--distributed", "fsdp",
           *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("uniform", [False, True])
def test_cli_torchrun_saves_a_model_that_reloads(tmp_path, uniform):
    """torchrun, 2 ranks: the saved model reloads through both loaders with the logits of the
    one-process pruned model; only rank 0 prints the report. With --uniform the directory is a
    stock one that loads without trust_remote_code."""
    from moreau_pruner.cli.prune import main

    model_dir = _tiny_dir(tmp_path / "llama", "llama")
    # bit-equal logits need the selection alone: compensated weights agree to rounding (sums over ranks),
    # which test_compensate.py checks with a tolerance
    common = ["--model", str(model_dir), "--iters", "3", "--ratio", "0.5", "--attn-layers", "0:3", "--num-examples",
              "4", "--seq-len", "16", "--no-eval", "--generate", "", "--backend", "reference", "--quiet",
              "--no-compensate"]
    common += ["--uniform"] if uniform else []
    proc = _torchrun(2, common + ["--out", str(tmp_path / "dist"), "--json", str(tmp_path / "dist.json")], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("parameters") == 1  # one report, from rank 0
    torch.set_num_threads(1)
    assert main(common + ["--micro-batch-size", "2", "--out", str(tmp_path / "one")]) == 0
    torch.set_num_threads(2)
    rep = json.loads((tmp_path / "dist.json").read_text())
    assert rep["distributed"]["world_size"] == 2 and rep["estimator_path"] == "fsdp"
    x = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    if uniform:
        want = AutoModelForCausalLM.from_pretrained(tmp_path / "one").eval()
        a = AutoModelForCausalLM.from_pretrained(tmp_path / "dist").eval()
        b = a
        assert rep["uniform"] is not None
    else:
        want = load_pruned(tmp_path / "one")[0]
        a = load_pruned(tmp_path / "dist")[0]
        b = AutoModelForCausalLM.from_pretrained(tmp_path / "dist", trust_remote_code=True).eval()
    with torch.no_grad():
        ref = want(x).logits
        assert torch.equal(a(x).logits, ref)
        assert torch.equal(b(x).logits, ref)


def test_cli_launches_its_own_ranks(tmp_path):
    """moreau-prune --nproc-per-node 2 starts the ranks itself (torch.distributed.run in-process): the
    same files as torchrun's launch of the same options, one report, no launcher noise on stderr."""
    model_dir = _tiny_dir(tmp_path / "llama", "llama")
    common = ["--model", str(model_dir), "--iters", "2", "--ratio", "0.5", "--attn-layers", "0:3", "--num-examples",
              "4", "--seq-len", "16", "--no-eval", "--generate", "", "--backend", "reference", "--device", "cpu"]
    proc = _torchrun(2, common + ["--out", str(tmp_path / "torchrun")], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "python"),
                                                        os.environ.get("PYTHONPATH", "")])}
    env.pop("OMP_NUM_THREADS", None)  # the launcher sets torchrun's 1 itself, without its warning
    cmd = [sys.executable, "-m", "moreau_pruner.cli", "--distributed", "fsdp", "--nproc-per-node", "2", *common,
           "--out", str(tmp_path / "launched")]
    launched = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert launched.stdout.count("parameters") == 1, launched.stdout  # rank 0's report only
    assert "OMP_NUM_THREADS" not in launched.stderr and "Traceback" not in launched.stderr
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "launched" / name).read_bytes() == (tmp_path / "torchrun" / name).read_bytes(), name
    infos = [json.loads((tmp_path / d / "pruning_info.json").read_text()) for d in ("launched", "torchrun")]
    for info in infos:  # what may differ: the timings and the --out path
        del info["times_s"], info["settings"]["out"], info["compensation"]["seconds"]
        for step in info["moreau"]["log"]:
            del step["seconds"]
    assert infos[0] == infos[1]


def test_cli_launch_refusals(monkeypatch, capsys):
    monkeypatch.delenv("RANK", raising=False)
    assert _cli(["--nproc-per-node", "2", "--no-eval"]) == 2
    assert "add --distributed fsdp" in capsys.readouterr().err
    assert _cli(["--distributed", "fsdp", "--nproc-per-node", "0", "--no-eval"]) == 2
    assert "--nproc-per-node must be >= 1, got 0" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "0")
    assert _cli(["--distributed", "fsdp", "--nproc-per-node", "2", "--no-eval"]) == 2
    assert "under torchrun leave it out" in capsys.readouterr().err


def test_launch_rank_arguments():
    from moreau_pruner.cli.launch import rank_arguments

    argv = ["--model", "m", "--nproc-per-node", "2", "--np=3", "--nproc", "4", "--noise", "philox", "--num-examples", "4"]
    assert rank_arguments(argv) == ["--model", "m", "--noise", "philox", "--num-examples", "4"]


def test_cli_torchrun_rejects_bad_device(tmp_path):
    proc = _torchrun(2, ["--device", "cuda:1", "--no-eval"], tmp_path, timeout=120)
    assert proc.returncode != 0
    assert "not a numbered device" in proc.stderr


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("shape,offset", [((7, 5), 10), ((3,), 5), ((2, 3, 2), 13), ((4, 4), 0)])
def test_shard_noise_is_the_full_tensors_slice(monkeypatch, shape, offset, native):
    from moreau_kernels import _native
    from moreau_kernels.reference import normal_noise
    from moreau_pruner.estimate.strategies.fsdp import shard_noise

    if not native:  # the pure-PyTorch words
        monkeypatch.setattr(_native, "has_op", lambda op, device_type: False)
    elif not _native.has_op("philox_bits", "cpu"):
        pytest.skip("the native library is not built")

    n = torch.Size(shape).numel()
    full = normal_noise((offset + n + 3,), 11, 4, 6)
    assert torch.equal(shard_noise(shape, 11, 4, 6, offset, "cpu"), full[offset:offset + n].reshape(shape))
