"""DPO (offline and online): losses and gradients against float64 loops, the offline data as the environment's
episodes, reaching the KL-regularised optimum from Bradley-Terry preferences, resume, and clear errors."""

import copy
import json
import math

import gymnasium as gym
import numpy as np
import pytest
import torch
from exact import GradientRecorder, assert_gradients_match, episodes, exact_return, float64_copies, \
    unpadded_forward64

from lmgym.agents import DPO, RFT, OnlineDPO
from lmgym.agents.dpo import dpo_loss


def diagnostic_env(num_envs=64, group_size=1, **kwargs):
    return gym.make_vec("lmgym/TargetToken-v0", num_envs=num_envs, group_size=group_size, device="cpu", **kwargs)


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def bradley_terry_rankings(num_batches: int, k: int, seed: int, **env_kwargs) -> list[dict]:
    """Rankings of k completions sampled from pi_ref, ordered by a Plackett-Luce draw with utilities R: every
    pair's order is then a Bradley-Terry draw, P(y_i above y_j) = sigmoid(R_i - R_j). An empty completion is
    written as the stop token's text."""
    venv = diagnostic_env(256, k, **env_kwargs)
    sampler = RFT(venv, seed=seed, keep_top=1)  # an untrained policy: samples from pi_ref
    gen = np.random.default_rng(seed)
    records = []
    for _ in range(num_batches):
        rollout = sampler.collect()
        scores = rollout.scores.double().numpy()
        for g in range(0, len(rollout), k):
            order = np.argsort(-(scores[g:g + k] + gen.gumbel(size=k)))
            texts = [c or venv.tokenizer.eos_token for c in rollout.completions[g:g + k]]
            records.append({"prompt": rollout.prompts[g], "completions": texts, "ranking": order.tolist()})
    return records


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# ----------------------------------------------------------------------------- the loss
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_losses_and_gradients_by_hand(loss_type):
    beta = 0.3
    chosen = torch.tensor([0.4, -1.0, 2.0], dtype=torch.float64, requires_grad=True)
    rejected = torch.tensor([0.1, 0.5, 2.0], dtype=torch.float64, requires_grad=True)
    q = torch.tensor([1.0, 0.9, 0.25], dtype=torch.float64)
    losses = dpo_loss(chosen, rejected, beta=beta, loss_type=loss_type, target=q)
    losses.sum().backward()
    for i in range(3):
        h = chosen[i].item() - rejected[i].item()
        if loss_type == "sigmoid":
            want = -q[i].item() * math.log(sigmoid(beta * h)) - (1 - q[i].item()) * math.log(sigmoid(-beta * h))
            grad = -beta * (q[i].item() - sigmoid(beta * h))
        else:
            want = q[i].item() * (h - 1 / (2 * beta)) ** 2 + (1 - q[i].item()) * (h + 1 / (2 * beta)) ** 2
            grad = 2 * q[i].item() * (h - 1 / (2 * beta)) + 2 * (1 - q[i].item()) * (h + 1 / (2 * beta))
        assert losses[i].item() == pytest.approx(want, rel=1e-12)
        assert chosen.grad[i].item() == pytest.approx(grad, rel=1e-12)
        assert rejected.grad[i].item() == pytest.approx(-grad, rel=1e-12)
    # The plain DPO loss with q = 1 is -log sigmoid(beta * h) (Rafailov et al. eq. 7); IPO's is (h - 1/(2 beta))^2.
    one = dpo_loss(torch.tensor([1.0]), torch.tensor([0.0]), beta=beta, loss_type=loss_type)
    expected = -math.log(sigmoid(beta)) if loss_type == "sigmoid" else (1 - 1 / (2 * beta)) ** 2
    assert one.item() == pytest.approx(expected, rel=1e-6)


# ----------------------------------------------------------------------------- offline DPO
def test_offline_sequences_are_the_environments_episodes(tmp_path):
    """Completions read from a file become exactly the token sequences (stop token, truncation) and reference
    log-probs the environment gives the same episodes."""
    venv = diagnostic_env(32, 2)
    rollout = RFT(venv, seed=4, keep_top=1).collect()
    texts = [c or venv.tokenizer.eos_token for c in rollout.completions]
    assert "" in rollout.completions and any(n == venv.max_new_tokens for n in rollout.lengths.tolist())
    records = [{"prompt": rollout.prompts[i], "chosen": texts[i], "rejected": texts[i + 1]}
               for i in range(0, len(rollout), 2) if texts[i] != texts[i + 1]]
    agent = DPO(diagnostic_env(8), preferences=str(write_jsonl(tmp_path / "p.jsonl", records)), batch_pairs=10_000)
    batch = agent.training_batch()
    by_text = {}
    for i in range(len(rollout)):
        by_text[(rollout.prompts[i], texts[i])] = i
    seen = 0
    for row in range(len(batch.tokens)):
        prompt = venv.tokenizer.decode(batch.query_ids[row][batch.query_mask[row].bool()].tolist())
        n = int(batch.lengths[row])
        completion = venv.tokenizer.decode(batch.tokens[row, :n].tolist(), skip_special_tokens=True)
        i = by_text[(prompt, completion or venv.tokenizer.eos_token)]
        assert n == int(rollout.lengths[i])
        assert batch.tokens[row, :n].tolist() == rollout.tokens[i, :n].tolist()
        torch.testing.assert_close(batch.ref_logprobs[row, :n], rollout.ref_logprobs[i, :n], rtol=1e-5, atol=1e-6)
        seen += 1
    assert seen == len(batch.tokens) > 0


@pytest.mark.parametrize("loss_type, label_smoothing", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0)])
def test_offline_dpo_gradient_matches_a_float64_reference(tmp_path, loss_type, label_smoothing):
    records = [{"prompt": "a", "completions": ["a a", "b", "c c c c c c", "<eos>"], "ranking": [2, 0, 3, 1]},
               {"prompt": "b", "chosen": "a b c", "rejected": "c"},
               {"prompt": "c", "completions": ["a", "b b", "a"], "scores": [1.0, 0.5, 1.0]},
               # a ranking that holds one completion twice: its pair with itself states no preference
               {"prompt": "a", "completions": ["b", "c", "b"], "ranking": [0, 1, 2]}]
    path = write_jsonl(tmp_path / "p.jsonl", records)
    venv = diagnostic_env(8)
    agent = DPO(venv, preferences=str(path), batch_pairs=1000, beta=0.5, loss_type=loss_type,
                label_smoothing=label_smoothing)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for p in agent.policy.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    copies = float64_copies(agent)
    reference64 = copy.deepcopy(venv.reference_model).double()
    recorder = GradientRecorder(agent)
    agent.update(agent.training_batch())

    # Independently: each pair by hand, sequences tokenized word by word, the stop token appended when shorter
    # than max_new_tokens (6 here), "<eos>" alone the empty episode; the loss is the mean over the pairs of two
    # different completions ("b" above "b" is no pair).
    vocab = {"<eos>": 0, "a": 1, "b": 2, "c": 3}

    def episode(text):
        ids = [vocab[w] for w in text.split()]
        return ids if ids[-1:] == [0] else ids + [0] if len(ids) < 6 else ids

    pairs = [("a", "c c c c c c", "a a"), ("a", "c c c c c c", "<eos>"), ("a", "c c c c c c", "b"),
             ("a", "a a", "<eos>"), ("a", "a a", "b"), ("a", "<eos>", "b"), ("b", "a b c", "c"),
             ("c", "a", "b b"), ("c", "a", "b b"), ("a", "b", "c"), ("a", "c", "b")]
    loss = 0.0
    for prompt, chosen, rejected in pairs:
        h = []
        for text in (chosen, rejected):
            pol, _ = unpadded_forward64(copies["policy"], [vocab[prompt]], episode(text))
            ref, _ = unpadded_forward64(reference64, [vocab[prompt]], episode(text))
            h.append((pol - ref.detach()).sum())
        diff, q, beta = h[0] - h[1], 1 - label_smoothing, 0.5
        if loss_type == "sigmoid":
            pair_loss = -q * torch.log(torch.sigmoid(beta * diff)) - (1 - q) * torch.log(torch.sigmoid(-beta * diff))
        else:
            pair_loss = (diff - 1 / (2 * beta)) ** 2
        loss = loss + pair_loss / len(pairs)
    loss.backward()
    assert len(recorder.grads) == 1
    assert_gradients_match(recorder.grads[0], copies)


@pytest.mark.slow
def test_offline_dpo_from_bradley_terry_preferences_reaches_90_percent_of_the_optimum(tmp_path):
    """Pairs labelled by the task's own Bradley-Terry model and beta = kl_coef: DPO's implicit objective is the
    environment's, so the exact return of the trained policy reaches 90% of the exact optimum.

    The data: 3,200 rankings of 32 completions of pi_ref, 1.5 million pairs of two different completions (a
    ranking's pairs of a completion with itself state nothing and are dropped). A Plackett-Luce ranking's pairs
    are correlated, but each pair's marginal is exactly the Bradley-Terry probability, so the loss over all of
    them is unbiased. The labels are weak (P = 0.5 to 0.73 for a [0, 1] score) and beta = 0.05 turns a reward
    error into 20 times that error in log-probability: the optimum puts about 60% of its mass on `a a a a a a`,
    which pi_ref samples once in 6,000 (8 nats of log-ratio).

    What held DPO below 90% was optimisation, not bias. Trained on 1.4 million completion tokens (about three
    passes, 657 Adam steps, learning rate annealed to 0) it reached 93.5, 93.8, 90.3, 95.0, 91.7% with seeds
    1-5, and every hard-label run analysed stopped short of the optimum on every prompt (seed 3: pi(a a a a a a)
    = 0.07-0.19 instead of 0.56-0.61, KL to pi_ref 2.8-4.2 nats instead of 6.2-6.8). The tail where the optimum
    lives is a flat direction of the loss (pi_ref rarely samples it), and a hard label makes each pair's gradient
    mostly noise; Adam, which scales its steps by the gradient's RMS, then moves the policy there slowly. The
    same completions with soft labels sigmoid(R_w - R_l) reached 94.3-97.3% in the same budget; twice the data
    in the same 4.2 million tokens did not help (seed 3: 90.0%), more steps did. Seed 3, the hardest: 90.3% at
    1.4 million tokens, 90.1% at 4.2 million (about ten passes), 95.5% at 8.4 million (about 20 passes, 3,772
    steps). At 8.4 million tokens, seeds 1-5: 96.9, 95.1, 95.5, 95.9, 94.3% (2.5 minutes on one core).
    """
    records = bradley_terry_rankings(num_batches=400, k=32, seed=1)
    path = write_jsonl(tmp_path / "bt.jsonl", records)
    venv = diagnostic_env()
    agent = DPO(venv, preferences=str(path), learning_rate=1e-2, batch_pairs=8192, anneal_lr=True, seed=1)
    start = exact_return(agent.policy, venv)
    agent.learn(8_400_000, progress=False)  # about 20 passes over the data's completion tokens
    end = exact_return(agent.policy, venv)
    print(f"offline DPO: {end / venv.optimal_return:.1%} of the exact optimum")
    assert start / venv.optimal_return < 0.5
    assert end / venv.optimal_return >= 0.9, f"offline DPO reached {end / venv.optimal_return:.1%} of the optimum"


def test_offline_dpo_learns_from_bradley_terry_preferences_quickly(tmp_path):
    """The fast version of the test above: a tenth of the data, one pass; the return must rise well above pi_ref's."""
    path = write_jsonl(tmp_path / "bt.jsonl", bradley_terry_rankings(num_batches=40, k=8, seed=2))
    venv = diagnostic_env()
    agent = DPO(venv, preferences=str(path), learning_rate=1e-2, batch_pairs=512, seed=2)
    start = exact_return(agent.policy, venv)
    agent.learn(50_000, progress=False)
    end = exact_return(agent.policy, venv)
    assert start / venv.optimal_return < 0.3
    assert end / venv.optimal_return >= 0.7, f"offline DPO reached {end / venv.optimal_return:.1%} of the optimum"


def test_offline_dpo_resumes_exactly_mid_epoch(tmp_path):
    path = write_jsonl(tmp_path / "bt.jsonl", bradley_terry_rankings(num_batches=1, k=4, seed=3))

    def fresh():
        return DPO(diagnostic_env(16), preferences=str(path), batch_pairs=40, learning_rate=1e-2)

    straight = fresh()
    straight.learn(3000, progress=False)
    first = fresh()
    first.learn(1000, progress=False)
    first.save(tmp_path / "ckpt")
    resumed = fresh().load(tmp_path / "ckpt")
    assert (resumed.data_epoch, resumed.data_cursor) == (first.data_epoch, first.data_cursor)
    resumed.learn(3000, progress=False)
    assert straight.data_epoch >= 1  # the run went past the end of the data
    assert (resumed.global_step, resumed.data_epoch, resumed.data_cursor) == \
        (straight.global_step, straight.data_epoch, straight.data_cursor)
    for key, value in straight.policy.state_dict().items():
        assert torch.equal(value, resumed.policy.state_dict()[key]), key


def test_offline_dpo_errors(tmp_path):
    env = diagnostic_env(8)
    with pytest.raises(ValueError, match="pass preferences=PATH"):
        DPO(env)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="empty.jsonl is empty"):
        DPO(env, preferences=str(tmp_path / "empty.jsonl"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DPO(env, preferences=str(tmp_path / "nowhere.jsonl"))
    long_prompt = " ".join(["a"] * 30)  # 30 prompt tokens + 3 completion tokens > the context of 32
    path = write_jsonl(tmp_path / "long.jsonl", [{"prompt": long_prompt, "chosen": "a a", "rejected": "b"}])
    with pytest.raises(ValueError, match=r"long.jsonl: prompt #0 .*need 33 positions, more than the policy's "
                                         r"context of 32"):
        DPO(env, preferences=str(path))
    path = write_jsonl(tmp_path / "same.jsonl", [{"prompt": "a", "chosen": "a a", "rejected": "a a"},
                                                 {"prompt": "b", "completions": ["c", "c"], "ranking": [1, 0]}])
    with pytest.raises(ValueError, match="same.jsonl holds no pairs of two different completions"):
        DPO(env, preferences=str(path))
    # different texts, the same episode (the tokenizer splits on whitespace): no preference either
    path = write_jsonl(tmp_path / "same_tokens.jsonl", [{"prompt": "a", "chosen": "a a", "rejected": "a  a"}])
    with pytest.raises(ValueError, match="same_tokens.jsonl compares a completion with itself"):
        DPO(env, preferences=str(path))
    path = write_jsonl(tmp_path / "ok.jsonl", [{"prompt": "a", "chosen": "a a", "rejected": "b"}])
    with pytest.raises(ValueError, match="loss_type must be one of"):
        DPO(env, preferences=str(path), loss_type="hinge")
    with pytest.raises(ValueError, match=r"label_smoothing must be >= 0 and < 0.5"):
        DPO(env, preferences=str(path), label_smoothing=0.5)
    with pytest.raises(ValueError, match="beta > 0"):
        DPO(diagnostic_env(8, kl_coef=0.0), preferences=str(path))
    with pytest.raises(ValueError, match="top_k / top_p truncation"):
        DPO(env, preferences=str(path), top_k=2)


# ----------------------------------------------------------------------------- online DPO
def test_online_pairs_and_targets_by_hand():
    agent = OnlineDPO(diagnostic_env(8, 4))
    rollout = agent.collect()
    rollout.scores = torch.tensor([0.5, 0.0, 0.5, 1.0, 0.2, 0.2, 0.2, 0.2])
    batch = agent.pairs(rollout)
    got = sorted(zip(batch.chosen.tolist(), batch.rejected.tolist(), batch.target.tolist()))
    want = []
    for g in (0, 4):
        for i in range(g, g + 4):
            for j in range(i + 1, g + 4):
                si, sj = rollout.scores[i].item(), rollout.scores[j].item()
                w, l = (i, j) if si >= sj else (j, i)
                want.append((w, l, sigmoid(abs(si - sj))))
    assert [(w, l) for w, l, _ in got] == [(w, l) for w, l, _ in sorted(want)]
    np.testing.assert_allclose([t for *_, t in got], [t for *_, t in sorted(want)], rtol=1e-6)

    ranking = OnlineDPO(diagnostic_env(8, 4), labels="ranking", label_smoothing=0.1)
    batch = ranking.pairs(rollout)
    assert sorted(zip(batch.chosen.tolist(), batch.rejected.tolist())) == \
        sorted((w, l) for w, l, t in want if t > 0.5)  # ties make no pair
    assert batch.target.tolist() == pytest.approx([0.9] * len(batch))


def test_online_dpo_gradient_matches_a_float64_reference():
    venv = diagnostic_env(8, 4)
    agent = OnlineDPO(venv, loss_type="sigmoid")
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for p in agent.policy.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    rollout = agent.collect()
    copies = float64_copies(agent)
    reference64 = copy.deepcopy(venv.reference_model).double()
    recorder = GradientRecorder(agent)
    agent.update(rollout)

    eps, beta = episodes(rollout), venv.kl_coef
    h = []
    for prompt, completion, _ in eps:
        pol, _ = unpadded_forward64(copies["policy"], prompt, completion)
        ref, _ = unpadded_forward64(reference64, prompt, completion)
        h.append((pol - ref.detach()).sum())
    loss, pairs = 0.0, 0
    for g in range(0, len(eps), 4):
        for i in range(g, g + 4):
            for j in range(i + 1, g + 4):
                si, sj = rollout.scores[i].item(), rollout.scores[j].item()
                w, l = (i, j) if si >= sj else (j, i)
                q = sigmoid(abs(si - sj))
                diff = h[w] - h[l]
                loss = loss - q * torch.log(torch.sigmoid(beta * diff)) \
                    - (1 - q) * torch.log(torch.sigmoid(-beta * diff))
                pairs += 1
    (loss / pairs).backward()
    assert_gradients_match(recorder.grads[0], copies)


def test_online_dpo_reaches_90_percent_of_the_exact_optimum():
    torch.manual_seed(0)
    venv = diagnostic_env(64, 8)
    agent = OnlineDPO(venv, learning_rate=3e-3, seed=1)
    start = exact_return(agent.policy, venv)
    agent.learn(30_000, progress=False)
    end = exact_return(agent.policy, venv)
    assert start / venv.optimal_return < 0.5
    assert end / venv.optimal_return >= 0.9, f"online DPO reached {end / venv.optimal_return:.1%} of the optimum"


def test_online_dpo_errors():
    with pytest.raises(ValueError, match="group_size >= 2"):
        OnlineDPO(diagnostic_env(8))
    with pytest.raises(ValueError, match=r"labels must be one of \['bradley_terry', 'ranking'\]"):
        OnlineDPO(diagnostic_env(8, 2), labels="votes")
    with pytest.raises(ValueError, match="label_smoothing applies to hard labels"):
        OnlineDPO(diagnostic_env(8, 2), label_smoothing=0.1)


def test_lmgym_train_runs_both_dpo_agents(tmp_path):
    from lmgym.bench.grid import run

    path = write_jsonl(tmp_path / "bt.jsonl", bradley_terry_rankings(num_batches=1, k=4, seed=5))
    offline = run("lmgym/TargetToken-v0", "dpo", steps=2000, overrides={"preferences": str(path), "num_envs": 16},
                  progress=False, device="cpu", logdir=tmp_path / "dpo")
    online = run("lmgym/TargetToken-v0", "online-dpo", steps=2000, overrides={"num_envs": 16}, progress=False,
                 device="cpu", logdir=tmp_path / "online")
    for result in (offline, online):
        assert result["env_steps"] >= 2000 and result["fraction_of_optimum"] is not None
    assert offline["curve"] == [] and len(online["curve"]) > 1
