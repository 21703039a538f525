"""The ``lmgym`` command: ``train``, ``bench``, ``list``, ``reward-model train`` and ``label``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from lmgym.run_folders import DEFAULT_LOGDIR, agent_of, let_go, run_folder

DEFAULT_BENCH = dict(tasks=["lmgym/TargetToken-v0", "lmgym/Guess-v0", "lmgym/Arithmetic-v0"],
                     agents=["ppo", "grpo", "reinforce", "rloo", "a2c", "nlpo", "rft", "online-dpo"],
                     seeds=[0, 1], steps=20_000)
"""The default ``lmgym bench`` grid (the README states how long it took on this project's machine)."""




def _split_overrides(extra: list[str]) -> list[tuple[str, str]]:
    """``--agent.name value`` (or ``--agent.name=value``) pairs from the arguments argparse did not know."""
    pairs, i = [], 0
    while i < len(extra):
        arg = extra[i]
        if not arg.startswith("--agent."):
            raise ValueError(f"unrecognised argument {arg!r} (hyper-parameters are --agent.NAME VALUE)")
        key = arg[len("--agent."):]
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        elif i + 1 < len(extra):
            value, i = extra[i + 1], i + 2
        else:
            raise ValueError(f"{arg} needs a value")
        pairs.append((key, value))
    return pairs


class ConfigFileError(ValueError):
    """A --config file that is missing, of an unsupported format, or malformed."""


def _read_config(path: str | None) -> list[tuple[str, object]]:
    """``(name, value)`` hyper-parameters from a JSON or TOML file: ``{"agent": {...}}`` or flat."""
    if path is None:
        return []
    file = Path(path)
    if not file.exists():
        raise ConfigFileError(f"config file {file} does not exist")
    if not file.is_file():
        raise ConfigFileError(f"config file {file} is not a file")
    suffix = file.suffix.lower()
    if suffix in (".yaml", ".yml"):
        raise ConfigFileError(f"{file}: YAML config files are not supported; write the same keys as JSON "
                              "(cfg.json) or TOML (cfg.toml), e.g. [agent] learning_rate = 3e-4")
    text = file.read_text()
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigFileError(f"{file}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from err
    elif suffix == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            try:
                import tomli as tomllib
            except ImportError:
                raise ConfigFileError(f"{file}: reading TOML needs Python 3.11+ or the tomli package; "
                                      "or write the file as JSON") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ConfigFileError(f"{file}: invalid TOML: {err}") from err
    else:
        raise ConfigFileError(f"{file}: config files must end in .json or .toml, not {file.suffix or 'nothing'!r}")
    if not isinstance(data, dict):
        raise ConfigFileError(f"{file}: expected a table of hyper-parameters, got {type(data).__name__}")
    if "agent" in data:
        if set(data) != {"agent"}:
            raise ConfigFileError(f"{file}: besides the 'agent' table it has {sorted(set(data) - {'agent'})}; "
                                  "put every hyper-parameter inside 'agent' (or write them all at the top level)")
        data = data["agent"]
        if not isinstance(data, dict):
            raise ConfigFileError(f"{file}: 'agent' must be a table of hyper-parameters, got {type(data).__name__}")
    return list(data.items())


def _train(args, extra) -> int:
    args.agent = agent_of(args)
    if args.model is not None or args.task is None:
        return _train_own(args, extra)
    from lmgym.bench.grid import parse_overrides, run

    overrides = parse_overrides(_read_config(args.config) + _split_overrides(extra), args.agent)
    parallel = _data_parallel(args.device)
    checkpoint, logdir, lock = run_folder(args, args.task.split("/")[-1], parallel)
    try:
        result = run(args.task, args.agent, steps=args.steps, seconds=args.seconds, seed=args.seed,
                     device=args.device, logdir=logdir, overrides=overrides, resume=checkpoint,
                     progress=parallel.is_main)
    finally:
        if lock is not None:
            let_go(lock)
    if not parallel.is_main:
        return 0
    s, e = result["start"], result["end"]
    print(f"\n{args.agent} on {args.task}, seed {args.seed}")
    print(f"  score      {s['score']:.4f} -> {e['score']:.4f}")
    print(f"  KL to ref  {s['kl']:.4f} -> {e['kl']:.4f}")
    print(f"  return     {s['return']:.4f} -> {e['return']:.4f}"
          + (f"  ({result['fraction_of_optimum']:.1%} of the exact optimum {result['optimum']:.4f})"
             if result["fraction_of_optimum"] is not None else ""))
    print(f"  wall time  {result['wall_seconds']:.1f} s, {result['tokens_per_s']:.0f} tokens/s, "
          f"peak memory {result['peak_memory_mib']:.0f} MiB ({result['memory_kind']})")
    print(f"  logs       {logdir} (tensorboard --logdir {logdir})")
    if result["checkpoint"]:
        print(f"  checkpoint {result['checkpoint']} (continue with --resume {logdir} --steps N)")
    return 0


def _data_parallel(device: str):
    """This process's place in a torchrun / accelerate launch (a no-op object without one)."""
    from lmgym.agents.scale.distributed import DataParallel
    from lmgym.models import resolve_device

    return DataParallel.from_environment(resolve_device(device))


def _bench(args, extra) -> int:
    from lmgym.bench.grid import bench, parse_overrides
    from lmgym.bench.report import update_readme

    if args.throughput:
        return _throughput(args)
    grid = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in DEFAULT_BENCH.items()}
    steps = grid["steps"] if args.seconds is None or args.steps is not None else None
    pairs = _read_config(args.config) + _split_overrides(extra)
    overrides = {a: parse_overrides(pairs, a) for a in grid["agents"]} if pairs else {}
    report = bench(args.out, tasks=grid["tasks"], agents=grid["agents"], seeds=grid["seeds"], steps=steps,
                   seconds=args.seconds, device=args.device, overrides=overrides)
    if not _data_parallel(args.device).is_main:  # process 0 of a launch reports
        return 0
    out = Path(args.out)
    print((out / "results.md").read_text())
    wall = sum(r["wall_seconds"] for r in report["runs"])
    print(f"{len(report['runs'])} runs, {wall:.0f} s of training. Wrote {out / 'results.md'}, results.json, "
          f"curves.png, frontier.png; TensorBoard: tensorboard --logdir {out / 'tensorboard'}")
    if args.readme:
        update_readme(args.readme, out / "results.json")
        print(f"Rewrote the results block of {args.readme} from {out / 'results.json'}")
    return 0


def _throughput(args) -> int:
    from lmgym.bench import throughput

    size = args.size
    print(f"Speed ratios, each against a baseline measured in the same run ({size} model, device {args.device}):")
    env = throughput.environment_rollout(size, batch=256 if size == "100M" else 64, device=args.device)
    print(f"  env rollout, submission path / (generate + ref forward): {env['ratio_b_over_a']:.2f}  "
          f"({env['b_submission_s'] * 1e3:.0f} vs {env['a_generate_plus_ref_s'] * 1e3:.0f} ms)")
    print(f"  env rollout, per-token step   / (generate + ref forward): {env['ratio_c_over_a']:.2f}  "
          f"({env['c_per_token_step_s'] * 1e3:.0f} vs {env['a_generate_plus_ref_s'] * 1e3:.0f} ms)")
    results = {"environment": env}
    for algo in ("grpo", "ppo"):
        r = throughput.agent_iteration(algo, size, device=args.device)
        results[algo] = r
        print(f"  one {algo.upper()} iteration / hand-written floor: {r['ratio']:.2f}  "
              f"({r['lmgym_s'] * 1e3:.0f} vs {r['floor_s'] * 1e3:.0f} ms)")
    sb3 = throughput.sb3_bridge()
    results["sb3"] = sb3
    print(f"  SB3 PPO steps/s, VecEnv bridge / DummyVecEnv: {sb3['ratio_bridge_over_dummy']:.2f}  "
          f"({sb3['bridge_steps_per_s']:.0f} vs {sb3['dummy_vec_env_steps_per_s']:.0f})")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "throughput.json").write_text(json.dumps(results, indent=1))
    return 0


def _list(args, extra) -> int:
    import gymnasium as gym

    import lmgym  # noqa: F401
    from lmgym.zoo import smollm, entries as zoo
    from lmgym.tasks import DEFAULT_ZOO_MODELS, describe

    import re
    import shutil

    rows = []
    for env_id in sorted(k for k in gym.registry if k.startswith("lmgym/")):
        needs = DEFAULT_ZOO_MODELS.get(env_id)
        if needs is None:
            status = "no build needed" if env_id != "lmgym/TextGen-v0" else "bring your own model"
        elif all(zoo.shipped_path(n) is not None and zoo.card(n) is not None for n in needs):
            status = "default model shipped"
        else:
            built = all(zoo.card(n) is not None for n in needs)
            status = "default model built" if built else "default model builds on first use"
            if not built and smollm.ZOO_NAME in needs and smollm.missing():
                status = f"needs the smollm extra: {smollm.INSTALL_HINT}"
        summary = describe(env_id).strip().splitlines()[0].split(": ", 1)[-1]
        rows.append((env_id, re.sub(r"``([^`]*)``", r"\1", summary), status))  # rst literals as plain text
    # the description takes what the terminal leaves beside the id and the status, cut with an ellipsis
    width = shutil.get_terminal_size((120, 24)).columns
    id_width, status_width = max(len(r[0]) for r in rows), max(len(r[2]) for r in rows) + 2
    room = max(20, width - id_width - status_width - 2)
    for env_id, summary, status in rows:
        if len(summary) > room:
            summary = summary[:room - 1] + "…"
        print(f"{env_id:{id_width}s} {summary:{room}s} [{status}]")
    return 0


def _reward_model_train(args, extra) -> int:
    from lmgym.rewards.reward_model import RewardModel, read_preferences, train_reward_model

    groups = read_preferences(args.data)
    held = read_preferences(args.eval_data) if args.eval_data else None
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"{out} already exists and is not empty; pass --overwrite or choose another --out")
    import torch

    torch.manual_seed(args.seed)  # the scalar head's initial weights: the same --seed gives the same model
    model = RewardModel.from_pretrained_lm(args.backbone, trust_remote_code=args.trust_remote_code)
    metrics = train_reward_model(model, groups, eval_groups=held, epochs=args.epochs,
                                 learning_rate=args.learning_rate, batch_pairs=args.batch_pairs, margin=args.margin,
                                 seed=args.seed)
    model.save(out, overwrite=args.overwrite)
    (out / "training_metrics.json").write_text(json.dumps(metrics, indent=1))
    print(json.dumps(metrics, indent=1))
    return 0


def _label(args, extra) -> int:
    """Serve the labelling page until Ctrl-C; rankings are appended to --out as they arrive."""
    from lmgym.label import LabelQueue, RankingStore, read_candidates, read_prompts, sample_candidates
    from lmgym.label.server import (MissingDependency, bind_socket, check_port, create_app, is_loopback,
                                    require_web_stack, serve)

    if (args.candidates is None) == (args.model is None):
        print("lmgym: give either --candidates FILE.jsonl or --model PATH with --prompts FILE", file=sys.stderr)
        return 2
    check_port(args.port)  # before sampling the candidates, which can take minutes
    if args.model is not None and args.prompts is None:
        print("lmgym: --model needs --prompts FILE (one prompt per line, or JSONL with a 'prompt' field)",
              file=sys.stderr)
        return 2
    if not is_loopback(args.host) and not args.token:
        print(f"lmgym: --host {args.host} exposes the page beyond this machine; pass --token SECRET too "
              "(the page's URL then carries it)", file=sys.stderr)
        return 2
    for given in (args.candidates, args.prompts):  # the user's own mistakes first, then the missing extra
        if given is not None and not Path(given).is_file():
            print(f"lmgym: {given} does not exist (or is not a file)", file=sys.stderr)
            return 2
    try:
        require_web_stack()
        if args.candidates is not None:
            items = read_candidates(args.candidates)
        else:
            from lmgym.models import load_model

            prompts = read_prompts(args.prompts)
            model, tokenizer = load_model(args.model, device=args.device, trust_remote_code=args.trust_remote_code)
            items = sample_candidates(model, tokenizer, prompts, args.k, max_new_tokens=args.max_new_tokens,
                                      seed=args.seed, temperature=args.temperature)
        store = RankingStore(args.out)
        queue = LabelQueue(items, store, lease_seconds=args.lease_minutes * 60)
        app = create_app(queue, token=args.token)
        sock = bind_socket(args.host, args.port)
    except (ValueError, TypeError, OSError, MissingDependency) as err:
        print(f"lmgym: {err}", file=sys.stderr)
        return 2
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}/" + (f"?token={args.token}" if args.token else "")
    done = queue.progress()
    print(f"lmgym label: {done['total']} prompts, {done['ranked']} already ranked in {args.out}", flush=True)
    print(f"lmgym label: open {url}  (Ctrl-C stops; every confirmed ranking is already on disk)", flush=True)
    try:
        serve(app, sock)
    finally:
        store.close()
    return 0


def _add_label_parser(sub) -> None:
    p = sub.add_parser("label", help="serve a local page for ranking K completions per prompt",
                       description="Rank completions in a browser; rankings are appended to --out in the JSONL "
                                   "format `lmgym reward-model train` reads. Restarting resumes.")
    p.add_argument("--candidates", help="JSONL of {prompt, completions: [...], id?} lines to rank")
    p.add_argument("--model", help="sample the candidates from this causal LM (local path or hub name)")
    p.add_argument("--prompts", help="with --model: prompts, one per line (or JSONL with a 'prompt' field)")
    p.add_argument("-k", type=int, default=4, help="with --model: completions per prompt (2-9, default 4)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="sampling seed: the same seed gives the same candidates")
    p.add_argument("--device", default="auto")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--out", required=True, help="rankings JSONL (appended to; prompts ranked there are skipped)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8765, help="0 picks a free port")
    p.add_argument("--token", help="secret the page must present; required with a non-loopback --host")
    p.add_argument("--lease-minutes", type=float, default=10.0,
                   help="how long a prompt shown in one tab is withheld from other tabs")
    p.set_defaults(func=_label)


def add_own_model_options(p) -> None:
    """``lmgym train --model PATH --prompts FILE --reward MODULE:FUNCTION``: your own model, prompts and reward."""
    g = p.add_argument_group("your own model (instead of --task)")
    g.add_argument("--model", help="a causal LM: local folder (save_pretrained) or hub name")
    g.add_argument("--prompts", help=".txt (one prompt per line) or .jsonl (chat messages per line)")
    g.add_argument("--reward", help="MODULE:FUNCTION or path/to/file.py:FUNCTION, fn(prompts, completions) -> scores")
    g.add_argument("--reward-model", help="a reward model folder (lmgym reward-model train --out)")
    g.add_argument("--eval-prompts", help="held-out prompts (.txt / .jsonl), evaluated before, during and after")
    g.add_argument("--sample-every", type=int, default=10,
                   help="every N iterations, evaluate and write sample completions to TensorBoard (0: never)")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--kl-coef", type=float, default=0.05)
    g.add_argument("--num-envs", type=int, default=16, help="episodes per iteration")
    g.add_argument("--group-size", type=int, help="completions per prompt (default 4 for grpo / rloo, else 1)")
    g.add_argument("--dtype", default="auto", help="the reference model's dtype (the policy trains in float32)")
    g.add_argument("--trust-remote-code", action="store_true")
    g.add_argument("--lora-r", type=int, default=0,
                   help="train LoRA adapters of this rank instead of the whole model (needs lmgym[lora]; 0: off)")
    g.add_argument("--lora-alpha", type=float, help="LoRA scaling alpha (default 2 x rank)")
    g.add_argument("--lora-target-modules", default="all-linear",
                   help="comma-separated module names, or all-linear (default)")


def _lora_config(args) -> dict | None:
    if args.lora_r < 0:
        raise ValueError(f"--lora-r must be >= 0 (0: train the whole model), got {args.lora_r}")
    if args.lora_r == 0:
        return None
    targets = args.lora_target_modules
    return {"r": args.lora_r, "lora_alpha": args.lora_alpha if args.lora_alpha is not None else 2 * args.lora_r,
            "target_modules": targets if targets == "all-linear" else [t.strip() for t in targets.split(",")]}


def _train_own(args, extra) -> int:
    from lmgym.agents import CheckpointError
    from lmgym.bench.grid import parse_overrides
    from lmgym.bench.report import BenchError
    from lmgym.rewards.functions import RewardError
    from lmgym.train_own import read_prompts, train_own_model
    from lmgym.utils.lock import LockedError

    if args.model is None:
        print("lmgym: train needs --task (a built-in task, see lmgym list) or --model (your own model, with "
              "--prompts and --reward or --reward-model)", file=sys.stderr)
        return 2
    if args.task is not None or args.prompts is None:
        print("lmgym: --model trains your own model: give --prompts FILE and no --task", file=sys.stderr)
        return 2
    lock = None
    try:
        overrides = parse_overrides(_read_config(args.config) + _split_overrides(extra), args.agent)
        env = {k: overrides.pop(k) for k in ("max_new_tokens", "kl_coef") if k in overrides}
        name = Path(args.model).name or args.model.replace("/", "_")
        parallel = _data_parallel(args.device)
        checkpoint, logdir, lock = run_folder(args, name, parallel)
        summary = train_own_model(
            model=args.model, prompts=read_prompts(args.prompts), agent=args.agent, reward=args.reward,
            reward_model=args.reward_model,
            eval_prompts=read_prompts(args.eval_prompts) if args.eval_prompts else None, steps=args.steps,
            seconds=args.seconds, seed=args.seed, device=args.device, dtype=args.dtype, logdir=logdir,
            overrides=overrides, num_envs=overrides.pop("num_envs", args.num_envs),
            group_size=overrides.pop("group_size", args.group_size),
            max_new_tokens=env.get("max_new_tokens", args.max_new_tokens), kl_coef=env.get("kl_coef", args.kl_coef),
            sample_every=args.sample_every, resume=checkpoint, trust_remote_code=args.trust_remote_code,
            lora=_lora_config(args))
    except (BenchError, CheckpointError, RewardError, LockedError, ValueError, TypeError, OSError,
            ImportError) as err:
        print(f"lmgym: {err}", file=sys.stderr)
        return 2
    finally:
        if lock is not None:
            let_go(lock)
    if not parallel.is_main:
        return 0
    print(f"\n{args.agent} on {args.model}: {summary['iterations']} iterations, {summary['env_steps']} tokens, "
          f"{summary['wall_seconds']:.1f} s")
    if summary["eval_start"]:
        s, e = summary["eval_start"], summary["eval_end"]
        print(f"  held-out score  {s['score']:.4f} -> {e['score']:.4f}   (KL to ref {s['kl']:.4f} -> {e['kl']:.4f})")
    print(f"  logs       {logdir} (tensorboard --logdir {logdir}; sample completions under TEXT)")
    if summary["checkpoint"]:
        print(f"  checkpoint {summary['checkpoint']}")
        print(f"  export     lmgym export {logdir} OUT_DIR")
    return 0


def _export(args, extra) -> int:
    from lmgym.agents import CheckpointError
    from lmgym.agents.export import ExportError, export_checkpoint

    try:
        out = export_checkpoint(args.source, args.out, model=args.model, dtype=args.dtype,
                                merge=not args.adapter_only, overwrite=args.overwrite, device=args.device)
    except (ExportError, CheckpointError, FileExistsError, OSError, ValueError, ImportError) as err:
        print(f"lmgym: {err}", file=sys.stderr)
        return 2
    print(f"exported to {out}: load it with AutoModelForCausalLM.from_pretrained({str(out)!r}) or "
          f"transformers.pipeline('text-generation', model={str(out)!r})")
    return 0


def add_export_command(sub) -> None:
    """``lmgym export CHECKPOINT_OR_RUN OUT``: a trained policy as a Hugging Face model folder."""
    p = sub.add_parser("export", help="write a trained policy as a Hugging Face model folder",
                       description="Export the policy of a checkpoint (or of a run folder's latest checkpoint) as a "
                                   "standard Hugging Face folder: safetensors weights, config, tokenizer and a "
                                   "generation config with the environment's stop tokens.")
    p.add_argument("source", help="a checkpoint folder (checkpoints/iter-NNNNNN) or a run's log folder")
    p.add_argument("out", help="the folder to write")
    p.add_argument("--model", help="the base model the run started from, when the run folder does not record it")
    p.add_argument("--dtype", help="cast the weights, e.g. bfloat16 (default: float32 as trained)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty out folder")
    p.add_argument("--adapter-only", action="store_true",
                   help="for a LoRA run: write the adapters alone (peft) instead of the merged model")
    p.set_defaults(func=_export)


def build_parser() -> argparse.ArgumentParser:
    from lmgym.bench.grid import AGENT_NAMES

    parser = argparse.ArgumentParser(prog="lmgym", description="Language-model generation as a Gymnasium RL problem.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train one agent on one task",
                       description="Train one agent; hyper-parameters as --agent.NAME VALUE or --config FILE.")
    p.add_argument("--task", help="e.g. lmgym/Sentiment-v0 (see lmgym list); or train your own --model")
    p.add_argument("--agent", help=f"one of {', '.join(AGENT_NAMES)} (with --resume: the run's own, by default)")
    p.add_argument("--steps", type=int, default=20_000, help="environment steps (generated tokens)")
    p.add_argument("--seconds", type=float, help="wall-clock budget; stops at whichever comes first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--logdir", default=None, help=f"TensorBoard logs and checkpoints go under this folder (default "
                   f"{DEFAULT_LOGDIR}; with --resume, a folder other than the run's own starts a new run there)")
    p.add_argument("--resume", metavar="RUN_OR_CHECKPOINT",
                   help="continue an earlier run of the same task and agent: its run folder (takes its latest "
                        "checkpoint) or one checkpoint folder; --steps is the total, so it must exceed the "
                        "checkpoint's steps")
    p.add_argument("--config", help="JSON or TOML file of hyper-parameters ({'agent': {...}} or flat)")
    add_own_model_options(p)
    p.set_defaults(func=_train)

    p = sub.add_parser("bench", help="compare agents over seeds and tasks under one budget",
                       description="Run a grid of agents x seeds x tasks and write results.md/json, curves.png, "
                                   "frontier.png and TensorBoard runs. Re-running skips finished runs.")
    p.add_argument("--tasks", nargs="+", help=f"default: {' '.join(DEFAULT_BENCH['tasks'])}")
    p.add_argument("--agents", nargs="+", metavar="AGENT",
                   help=f"any of {', '.join(AGENT_NAMES)} (default: {' '.join(DEFAULT_BENCH['agents'])})")
    p.add_argument("--seeds", nargs="+", type=int, help="default: 0 1")
    p.add_argument("--steps", type=int, help=f"environment steps per run (default {DEFAULT_BENCH['steps']})")
    p.add_argument("--seconds", type=float, help="wall-clock budget per run instead of (or with) --steps")
    p.add_argument("--out", default="bench-out", help="output folder (default bench-out)")
    p.add_argument("--device", default="auto")
    p.add_argument("--config", help="JSON or TOML file of hyper-parameters applied to every agent")
    p.add_argument("--throughput", action="store_true", help="run the speed benchmarks instead")
    p.add_argument("--size", default="4M", choices=["4M", "100M"], help="model size for --throughput")
    p.add_argument("--readme", metavar="README.md",
                   help="also rewrite the marked results block of this README from OUT/results.json "
                        "(re-running a finished grid only re-renders)")
    p.set_defaults(func=_bench)

    p = sub.add_parser("list", help="the registered tasks, one line each")
    p.set_defaults(func=_list)

    rm = sub.add_parser("reward-model", help="train reward models").add_subparsers(dest="action", required=True)
    p = rm.add_parser("train", help="train a Bradley-Terry reward model on preference pairs (JSONL)")
    p.add_argument("--data", required=True, help="JSONL: {prompt, chosen, rejected} or {prompt, completions, "
                                                 "ranking|scores} per line")
    p.add_argument("--backbone", required=True, help="a causal LM: local path or hub name")
    p.add_argument("--out", required=True, help="folder to write the reward model to")
    p.add_argument("--eval-data", help="held-out JSONL for pairwise accuracy")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--batch-pairs", type=int, default=64, help="pairs per batch (a prompt's pairs stay together)")
    p.add_argument("--margin", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument("--trust-remote-code", action="store_true")
    p.set_defaults(func=_reward_model_train)

    _add_label_parser(sub)
    add_export_command(sub)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """Failures a user causes and can fix (bad settings, files, folders, checkpoints, a diverging run, an optional
    extra not installed)."""
    from lmgym.agents import CheckpointError, TrainingError
    from lmgym.agents.scale.distributed import DistributedError
    from lmgym.utils.lock import LockedError
    from lmgym.zoo.smollm import MissingExtraError

    return (ValueError, TypeError, OSError, CheckpointError, TrainingError, LockedError, MissingExtraError,
            DistributedError)


def main(argv: list[str] | None = None) -> int:
    """Run the ``lmgym`` command. A user-caused failure prints one line, ``lmgym: <what is wrong>``, and returns 2
    (set ``LMGYM_TRACEBACK=1`` to see the full traceback instead)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in ("train", "bench"):
        parser.error(f"unrecognised arguments: {' '.join(extra)}")
    try:
        return args.func(args, extra)
    except KeyboardInterrupt:
        print("\nlmgym: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if not isinstance(err, _user_errors()) or os.environ.get("LMGYM_TRACEBACK"):
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"lmgym: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
