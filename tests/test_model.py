"""The GPT: parameter count, causality, generation, optimizer groups, and GPT-2 loading checked
against transformers' own forward pass on a tiny random model. No test contacts a real host."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from nanorepro.config import Config, GPTConfig, resolve
from nanorepro.errors import UserError
from nanorepro.gpt import optim
from nanorepro.gpt.model import GPT
from nanorepro.gpt.pretrained import load_pretrained

REPO = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)


def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    cfg = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=101, dropout=0.0, bias=True)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg)).eval()


@pytest.fixture
def no_hub(monkeypatch, tmp_path):
    """Keep transformers away from any real host and any real cache."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")


# --- the network ------------------------------------------------------------------------------

def test_shakespeare_char_parameter_count_matches_nanogpt():
    model_cfg = resolve("shakespeare-char").model_config(vocab_size=65)
    model = GPT(model_cfg)
    assert model.get_num_params() == 10_646_784 == model_cfg.non_embedding_params
    assert model.get_num_params(non_embedding=False) == 10_646_784 + 256 * 384 == model_cfg.n_params
    assert f"number of parameters: {model.get_num_params() / 1e6:.2f}M" == "number of parameters: 10.65M"
    # PaLM FLOPs per token: 6N + 12*L*H*Q*T, times T tokens per sequence, 64 sequences per iteration
    per_seq = (6 * 10_646_784 + 12 * 6 * 6 * 64 * 256) * 256
    assert model_cfg.flops_per_token() * 256 == per_seq  # MFU from it: tests/test_bench.py


def test_vocab_size_required():
    with pytest.raises(UserError, match="vocab_size"):
        Config(n_layer=1, n_head=1, n_embd=8, block_size=8, vocab_size=None).model_config()


def test_weights_tied_and_init_scaled():
    model = tiny(n_layer=8, n_embd=64, vocab_size=1000)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.transformer.h[0].attn.c_proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.1)
    assert model.transformer.h[0].mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert model.transformer.ln_f.weight.eq(1).all() and model.transformer.h[3].attn.c_attn.bias.eq(0).all()


def test_forward_shapes_loss_and_causality():
    model = tiny()
    idx = torch.randint(0, 101, (2, 16))
    logits, loss = model(idx, torch.randint(0, 101, (2, 16)))
    assert logits.shape == (2, 16, 101)
    # random init, targets unrelated to the input: loss close to uniform over the vocabulary
    assert loss.item() == pytest.approx(torch.log(torch.tensor(101.0)).item(), abs=0.3)
    last, none = model(idx)
    assert none is None and last.shape == (2, 1, 101)
    torch.testing.assert_close(last[:, 0], logits[:, -1])
    # ignore_index=-1: masked targets do not count
    targets = idx.clone()
    targets[:, 8:] = -1
    _, partial = model(idx, targets)
    _, first_half = model(idx[:, :8], idx[:, :8])
    torch.testing.assert_close(partial, first_half)

    changed = idx.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 101
    logits2, _ = model(changed, changed)
    torch.testing.assert_close(logits2[:, :10], logits[:, :10])
    assert not torch.allclose(logits2[:, 10], logits[:, 10])


def test_sequence_longer_than_block_size_refused():
    model = tiny()
    with pytest.raises(UserError, match="block_size=16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_crop_block_size():
    model = tiny()
    with pytest.raises(UserError, match="16"):
        model.crop_block_size(32)
    logits, _ = model(torch.arange(8)[None], torch.arange(8)[None])
    model.crop_block_size(8)
    assert model.transformer.wpe.weight.shape == (8, 32) and model.config.block_size == 8
    cropped, _ = model(torch.arange(8)[None], torch.arange(8)[None])
    torch.testing.assert_close(cropped, logits)  # the first 8 positions are unchanged
    with pytest.raises(UserError):
        model(torch.zeros(1, 9, dtype=torch.long))


# --- options from nanoGPT's successors (rope, qk_norm, relu_squared) ------------------------------

@pytest.mark.parametrize("options", [dict(rope=True), dict(qk_norm=True), dict(relu_squared=True),
                                     dict(rope=True, qk_norm=True, relu_squared=True)])
def test_options_count_their_parameters_and_keep_causality(options):
    model = tiny(**options)
    assert sum(p.numel() for p in model.parameters()) == model.config.n_params
    assert ("wpe" in model.transformer) is not options.get("rope", False)
    assert not any("rotary" in k for k in model.state_dict())  # recomputed, not saved
    idx = torch.randint(0, 101, (2, 16))
    logits, _ = model(idx, idx)
    changed = idx.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 101
    logits2, _ = model(changed, changed)
    torch.testing.assert_close(logits2[:, :10], logits[:, :10])
    assert not torch.allclose(logits2[:, 10:], logits[:, 10:])


def test_rope_scores_depend_only_on_distance():
    model = tiny(rope=True)
    rotary = model.transformer.h[0].attn.rotary
    q, k = torch.randn(1, 1, 16, 16), torch.randn(1, 1, 16, 16)
    # the same q and k vectors at every position: rotated scores depend on i - j only
    q, k = q[:, :, :1].expand(-1, -1, 16, -1), k[:, :, :1].expand(-1, -1, 16, -1)
    scores = rotary(q) @ rotary(k).transpose(-1, -2)
    torch.testing.assert_close(scores[0, 0, 5, 2], scores[0, 0, 12, 9])
    assert not torch.allclose(scores[0, 0, 5, 2], scores[0, 0, 5, 3])


def test_qk_norm_makes_attention_blind_to_the_scale_of_queries_and_keys():
    idx = torch.randint(0, 101, (2, 16))
    for qk_norm in (True, False):
        model = tiny(qk_norm=qk_norm)
        before, _ = model(idx, idx)
        with torch.no_grad():
            for block in model.transformer.h:
                block.attn.c_attn.weight[:64] *= 10  # the q and k rows (n_embd=32 each)
                block.attn.c_attn.bias[:64] *= 10
        after, _ = model(idx, idx)
        assert torch.allclose(before, after, atol=1e-4) is qk_norm


def test_relu_squared_mlp():
    mlp = tiny(relu_squared=True).transformer.h[0].mlp
    x = torch.tensor([-2.0, -0.5, 0.0, 0.5, 3.0])
    assert mlp.gelu(x).tolist() == [0.0, 0.0, 0.0, 0.25, 9.0]


def test_options_refused_with_pretrained_weights():
    with pytest.raises(UserError, match="rope.*do not fit"):
        resolve("finetune-shakespeare-cpu", {"rope": True})
    assert resolve("tiny", {"rope": True, "qk_norm": True}).model_config(65).rope


# --- generation ------------------------------------------------------------------------------

def test_generate_length_greedy_crop_and_seed():
    model = tiny()
    prompt = torch.randint(0, 101, (2, 5))
    out = model.generate(prompt, 7)
    assert out.shape == (2, 12) and torch.equal(out[:, :5], prompt)

    # top_k=1 is greedy decoding; the prompt is longer than block_size, so only its tail is seen
    long_prompt = torch.randint(0, 101, (1, 40))
    out = model.generate(long_prompt, 6, temperature=0.7, top_k=1)
    ids = long_prompt
    for _ in range(6):
        logits, _ = model(ids[:, -16:], ids[:, -16:])
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert out.shape == (1, 46) and torch.equal(out, ids)

    def sample(seed: int) -> torch.Tensor:
        return model.generate(prompt, 20, temperature=1.5, top_k=50, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(sample(1), sample(1))
    assert not torch.equal(sample(1), sample(2))
    with pytest.raises(UserError):
        model.generate(prompt, 1, temperature=0.0)


# --- optimizer -------------------------------------------------------------------------------

def test_optimizer_groups():
    model = tiny()
    opt = optim.build(model, "adamw", 0.1, 1e-3, (0.9, 0.95), "cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    # 2-D: wte (= lm_head), wpe, and 4 matrices per block; 1-D: 8 per block (2 LayerNorms, 4 biases) + ln_f
    assert len(decay["params"]) == 2 + 4 * 2 and len(no_decay["params"]) == 8 * 2 + 2
    n = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n == model.get_num_params(non_embedding=False)
    assert opt.defaults.get("fused") is True  # the one-pass kernel, on CPU as on CUDA (measured faster)
    # one step keeps the tie
    _, loss = model(torch.randint(0, 101, (2, 8)), torch.randint(0, 101, (2, 8)))
    loss.backward()
    opt.step()
    assert model.lm_head.weight is model.transformer.wte.weight


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    model = tiny()
    opt = optim.build(model, "muon", 0.1, 1e-3, (0.9, 0.95), "cpu")
    muon, adamw = opt.optimizers
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    blocks = {id(p) for n, p in model.named_parameters() if n.startswith("transformer.h.") and p.dim() == 2}
    assert {id(p) for g in muon.param_groups for p in g["params"]} == blocks  # 4 matrices per block
    assert len(blocks) == 4 * 2
    rest = [p for g in adamw.param_groups for p in g["params"]]
    assert {id(p) for p in rest} == {id(p) for p in model.parameters()} - blocks  # wte (= lm_head), wpe, gains, biases
    before = [p.detach().clone() for p in model.parameters()]
    for g in opt.param_groups:  # train.py sets the scheduled rate through the combined groups
        g["lr"] = 1e-2
    assert all(g["lr"] == 1e-2 for o in opt.optimizers for g in o.param_groups)
    _, loss = model(torch.randint(0, 101, (2, 8)), torch.randint(0, 101, (2, 8)))
    loss.backward()
    opt.step()
    opt.zero_grad()
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert model.lm_head.weight is model.transformer.wte.weight and all(p.grad is None for p in model.parameters())
    state = opt.state_dict()
    fresh = optim.build(tiny(), "muon", 0.1, 1e-3, (0.9, 0.95), "cpu")
    fresh.load_state_dict(state)
    assert torch.equal(fresh.optimizers[0].state_dict()["state"][0]["momentum_buffer"],
                       state["chain"][0]["state"][0]["momentum_buffer"])
    with pytest.raises(ValueError, match="not from the same optimizer"):
        fresh.load_state_dict(optim.build(model, "adamw", 0.1, 1e-3, (0.9, 0.95), "cpu").state_dict())


# --- pretrained loading ----------------------------------------------------------------------

def test_load_local_hf_folder_matches_transformers(tmp_path, no_hub):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf_cfg = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=101,
                        bos_token_id=0, eos_token_id=0, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    hf = GPT2LMHeadModel(hf_cfg)
    with torch.no_grad():  # make every weight matter, LayerNorm gains and biases included
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(tmp_path / "tiny-gpt2")
    hf.eval()

    model, shape = load_pretrained(str(tmp_path / "tiny-gpt2"), dropout=0.1)
    assert shape.to_dict() == dict(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=101, bias=True,
                                   dropout=0.1, rope=False, qk_norm=False, relu_squared=False)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())
    model.eval()
    idx = torch.randint(0, 101, (3, 64))
    with torch.no_grad():
        want = hf(idx, labels=idx)
        logits, loss = model(idx[:, :-1], idx[:, 1:])
        full, _ = model(idx, idx)
    torch.testing.assert_close(full, want.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(logits, want.logits[:, :-1], atol=1e-4, rtol=0)
    torch.testing.assert_close(loss, want.loss, atol=1e-4, rtol=0)
    model.train()  # dropout from the argument is live
    assert not torch.equal(model(idx, idx)[0], full)


def test_unknown_name_refused(no_hub):
    with pytest.raises(UserError, match="gpt2-xl"):
        load_pretrained("gpt3-turbo")


def test_folder_without_config_refused(tmp_path, no_hub):
    with pytest.raises(UserError, match="config.json"):
        load_pretrained(str(tmp_path))


# Records every connection opened and every download transformers is allowed to try, so the test
# checks the mechanism (offline flag honoured, one probe, no retries) rather than the wall time.
_OFFLINE_SCRIPT = textwrap.dedent("""
    import json, socket
    import transformers
    from nanorepro.errors import UserError
    from nanorepro.gpt.pretrained import load_pretrained
    connects, downloads = [], []
    _connect = socket.socket.connect
    def connect(self, address):
        connects.append(list(address)[:2])
        return _connect(self, address)
    socket.socket.connect = connect
    _from_pretrained = transformers.GPT2LMHeadModel.from_pretrained.__func__
    def from_pretrained(cls, name, *args, **kwargs):
        if not kwargs.get("local_files_only"):
            downloads.append(name)
        return _from_pretrained(cls, name, *args, **kwargs)
    transformers.GPT2LMHeadModel.from_pretrained = classmethod(from_pretrained)
    try:
        load_pretrained("gpt2-xl")
        result = {"error": None}
    except UserError as e:
        result = {"error": str(e), "fix": e.fix}
    result.update(connects=connects, downloads=downloads)
    print(json.dumps(result))
""")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("offline", [True, False], ids=["HF_HUB_OFFLINE", "endpoint-unreachable"])
def test_pretrained_name_not_available_offline_fails_fast(tmp_path, offline):
    # A fresh process: huggingface_hub reads HF_HOME and HF_HUB_OFFLINE when first imported.
    port = _closed_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_")) and "proxy" not in k.lower()}
    env.update(HF_HOME=str(tmp_path / "empty_hf_home"), HF_ENDPOINT=f"http://127.0.0.1:{port}",
               PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    proc = subprocess.run([sys.executable, "-c", _OFFLINE_SCRIPT], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["error"] and "gpt2-xl is not available offline" in result["error"]
    assert "local Hugging Face folder" in result["fix"]
    assert ("HF_HUB_OFFLINE" in result["error"]) == offline
    # huggingface_hub's own download retries would take ~23 s: it is never asked to download. With
    # HF_HUB_OFFLINE set nothing connects; otherwise only the endpoint is tried, by our one probe and
    # at most one more attempt (huggingface_hub's one-shot, never-retried agent-registry fetch)
    assert result["downloads"] == []
    if offline:
        assert result["connects"] == []
    else:
        assert ["127.0.0.1", port] in result["connects"] and len(result["connects"]) <= 2
        assert all(c == ["127.0.0.1", port] for c in result["connects"]), result["connects"]


def test_a_shallow_start_computes_the_same_with_or_without_its_idle_blocks_which_learn_nothing_until_they_join():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=4, n_head=2, n_embd=32, block_size=16, vocab_size=65, rope=True, qk_norm=True))
    model.start_shallow(1)
    x = torch.randint(0, 65, (3, 16))
    _, shallow = model(x, x)
    shallow.backward()
    idle = [p for name, p in model.named_parameters() if name.startswith(("transformer.h.1.", "transformer.h.2.",
                                                                          "transformer.h.3."))]
    assert idle and all(p.grad is None for p in idle)  # the optimizer skips them: they stay neutral
    assert all(p.grad is not None for p in model.transformer.h[0].parameters())
    model.zero_grad(set_to_none=True)
    model.active_layers = 4
    _, deep = model(x, x)
    assert deep.item() == pytest.approx(shallow.item(), abs=1e-6)  # the joining blocks add nothing yet
    deep.backward()
    assert model.transformer.h[3].mlp.c_proj.weight.grad.abs().sum() > 0  # but they learn from here on


def test_stacking_makes_each_later_block_a_copy_of_one_of_the_first_with_its_own_weights():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=5, n_head=2, n_embd=32, block_size=16, vocab_size=65, rope=True, qk_norm=True))
    model.start_shallow(2)
    model.stack(2)
    blocks = model.transformer.h
    for i, source in ((2, 0), (3, 1), (4, 0)):
        for (name, mine), theirs in zip(blocks[i].named_parameters(), blocks[source].parameters()):
            assert torch.equal(mine, theirs), (i, name)
            assert mine.data_ptr() != theirs.data_ptr()  # copies, not shared: they train apart
    assert not torch.equal(blocks[0].attn.c_attn.weight, blocks[1].attn.c_attn.weight)
