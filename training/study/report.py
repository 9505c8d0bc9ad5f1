"""The study's report: per run, per model over seeds, the paper's comparisons, generation,
and what each claim of the paper looks like at this scale (``study.json``, ``study.md``,
``study.png``). Every number comes from a run's files, an eval report or a generation record;
a figure that cannot be computed is shown as such, never filled in.
"""

from __future__ import annotations

import io
import json
import math
import statistics
from typing import Any

from pipeline.manifest import Manifest
from pipeline.storage import filesystem_for, write_bytes_atomic
from training.study.config import StudyConfig
from training.study.plan import StudyPlan

PAPER = {
    "ppl_cost": "GPTHF's perplexity above the equal-size GPT's: about +18% at 10B tokens",
    "depth": "the cost is like cutting a 24-layer GPT to 12 layers (GPTHF lands at the shallower GPT)",
    "speed": "generation up to 3x faster in runtime and up to 10x fewer FLOPs than the GPT",
    "sentences": "small models struggle to finish sentences",
}
"""The GPTHF paper's claims the report checks."""


def _nan_to_none(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_nan_to_none(v) for v in x]
    return x


def _spread(values: list[float]) -> dict[str, float | None]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return {"mean": None, "min": None, "max": None, "n": 0}
    return {"mean": statistics.fmean(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def _curves(folder: str, storage: Any) -> dict[str, list[float]]:
    """Held-out validation loss against tokens seen and cumulative step wall-clock."""
    from training.train.driver import read_metrics

    records = read_metrics(folder, storage)
    wall = 0.0
    out: dict[str, list[float]] = {"tokens": [], "val_loss": [], "wall_s": []}
    seen_steps: set[int] = set()
    for r in records:
        if r.get("final") or "step" not in r or r["step"] in seen_steps:
            continue
        seen_steps.add(r["step"])
        wall += float(r.get("step_time_s") or 0.0)
        if r.get("val_loss") is not None:
            out["tokens"].append(int(r["tokens_seen"]))
            out["val_loss"].append(float(r["val_loss"]))
            out["wall_s"].append(wall)
    out["train_wall_s"] = [wall]
    seen = [float(r["tokens_seen"]) for r in records if "tokens_seen" in r and not r.get("final")]
    out["tokens_seen"] = seen[-1:]
    return out


def build_report(
    cfg: StudyConfig,
    plan: StudyPlan,
    manifest: Manifest,
    data: str,
    evals: dict[str, Any],
    generation: dict[str, Any],
    prompts: Any,
    env: dict[str, Any],
) -> dict[str, Any]:
    from training.model.flops import flops_per_token

    totals = manifest.totals("train")
    mean_sentence = totals["tokens"] / max(1, totals.get("sentences", 0) or 1)
    sentence_len = max(1, round(mean_sentence))
    runs = []
    for run in plan.runs:
        rep = evals[run.name].checkpoints[0]
        t = rep.total
        curves = _curves(run.folder, cfg.storage)
        per_token = (
            3.0
            * flops_per_token(run.model_config, round(plan.mean_block_tokens), sentence_len).total
        )
        runs.append(
            {
                "run": run.name,
                "model": run.model.name,
                "seed": run.seed,
                "arch": run.model_config.arch,
                "layers": run.model_config.n_layers,
                "encoder_layers": run.model_config.n_encoder_layers,
                "d_model": run.model_config.d_model,
                "parameters": rep.parameters,
                "lr": run.train.optim.lr,
                "steps": rep.step,
                "tokens_seen": int(curves["tokens_seen"][0]) if curves["tokens_seen"] else None,
                "train_wall_s": curves["train_wall_s"][0],
                "train_flops_per_token": per_token,
                "heldout_tokens": t.tokens,
                "token_ppl": t.token_perplexity,
                "bits_per_byte": t.bits_per_byte,
                "eos_accuracy": t.eos_accuracy,
                # Per held-out file: which documents a difference between models comes from.
                "heldout_files": {
                    sh.shard.rsplit("/", 1)[-1]: {
                        "token_ppl": sh.sums.token_perplexity,
                        "bits_per_byte": sh.sums.bits_per_byte,
                        "tokens": sh.sums.tokens,
                    }
                    for sh in rep.shards
                },
                "eval_report": f"{cfg.output.rstrip('/')}/eval/{run.name}/report.json",
                "curve": {
                    "tokens": curves["tokens"],
                    "flops": [x * per_token for x in curves["tokens"]],
                    "wall_s": curves["wall_s"],
                    "val_loss": curves["val_loss"],
                },
            }
        )
    by_model: dict[str, dict[str, Any]] = {}
    for m in cfg.models:
        mine = [r for r in runs if r["model"] == m.name]
        by_model[m.name] = {
            "arch": mine[0]["arch"],
            "layers": mine[0]["layers"],
            "parameters": mine[0]["parameters"],
            **{
                k: _spread([r[k] for r in mine])
                for k in ("token_ppl", "bits_per_byte", "eos_accuracy", "train_wall_s")
            },
        }
    comparisons = []
    for hf, eq in plan.roles.equal_gpt.items():
        sh = plan.roles.shallow_gpt[hf]
        ppl = {r["seed"]: r["token_ppl"] for r in runs if r["model"] == hf}
        eq_ppl = {r["seed"]: r["token_ppl"] for r in runs if r["model"] == eq}
        ratios = [ppl[s] / eq_ppl[s] for s in cfg.seeds if s in ppl and s in eq_ppl]
        by_file: dict[str, list[float]] = {}
        for r in runs:
            if r["model"] == hf:
                other = next(x for x in runs if x["model"] == eq and x["seed"] == r["seed"])
                for f, v in r["heldout_files"].items():
                    if f in other["heldout_files"]:
                        by_file.setdefault(f, []).append(
                            v["token_ppl"] / other["heldout_files"][f]["token_ppl"]
                        )
        item: dict[str, Any] = {
            "ppl_ratio_per_file": {f: _spread(v) for f, v in sorted(by_file.items())},
            "gpthf": hf,
            "equal_gpt": eq,
            "shallow_gpt": sh,
            "ppl_ratio": _spread(ratios),
            "ppl_ratio_per_seed": ratios,
        }
        # What seeds alone move a model's perplexity by (largest range over mean among the
        # models compared): a difference inside it is not a finding. Two seeds make this a
        # rough floor, not an interval.
        item["seed_spread"] = max(
            (s["max"] - s["min"]) / s["mean"]
            for s in (by_model[m]["token_ppl"] for m in (hf, eq, sh) if m is not None)
            if s["mean"]
        )
        if sh is not None:
            a = by_model[hf]["token_ppl"]["mean"]
            b = by_model[eq]["token_ppl"]["mean"]
            c = by_model[sh]["token_ppl"]["mean"]
            item["shallow_ratio"] = c / b
            # Where GPTHF lands between the two GPTs only means something when depth moves
            # perplexity by more than the seeds do.
            item["depth_resolved"] = abs(c / b - 1) > item["seed_spread"]
            pos = (a - b) / (c - b) if item["depth_resolved"] else math.nan
            le, ls = by_model[eq]["layers"], by_model[sh]["layers"]
            item["position"] = pos
            item["equivalent_gpt_layers"] = le - pos * (le - ls) if math.isfinite(pos) else None
        comparisons.append(item)
    gen = _generation_tables(cfg, plan, generation, mean_sentence)
    reach = {
        str(ctx): sum(1 for n in plan.block_tokens if n >= ctx) / len(plan.block_tokens)
        for ctx in cfg.generation.contexts
    }
    report = {
        "environment": env,
        "config": cfg.to_dict(redact=True),
        "data": {
            "uri": data,
            "manifest_version": manifest.version,
            "train_tokens": totals["tokens"],
            "heldout_tokens": manifest.totals("heldout")["tokens"],
            "mean_block_tokens": plan.mean_block_tokens,
            "max_block_tokens": max(plan.block_tokens),
            "mean_sentence_tokens": mean_sentence,
            "blocks_reaching_context": reach,
        },
        "schedule": {
            "steps": plan.steps,
            "tokens_per_step": plan.tokens_per_step,
            "epochs": plan.steps * plan.tokens_per_step / max(1, totals["tokens"]),
        },
        "runs": runs,
        "models": by_model,
        "comparisons": comparisons,
        "generation": gen,
        "prompts_skipped": {str(k): v for k, v in prompts.skipped.items()},
    }
    report["claims"] = _claims(report)
    return _nan_to_none(report)


def _generation_tables(
    cfg: StudyConfig, plan: StudyPlan, generation: dict[str, Any], mean_sentence: float
) -> dict[str, Any]:
    speed = []
    for run in plan.runs:
        for row in generation[run.name]["speed"]:
            speed.append({"model": run.model.name, "arch": run.model_config.arch, **row})
    # The equal-size GPT's kv mode at the same context is every row's reference.
    ref: dict[tuple[str, int], dict[str, Any]] = {}
    for hf, eq in plan.roles.equal_gpt.items():
        for row in speed:
            if row["model"] == eq and row["mode"] == "kv":
                for model in (hf, eq, plan.roles.shallow_gpt.get(hf)):
                    if model is not None:
                        ref.setdefault((model, row["context"]), row)
    for row in speed:
        base = ref.get((row["model"], row["context"]))
        row["speedup_vs_gpt_kv"] = (
            row["median_tokens_per_s"] / base["median_tokens_per_s"] if base else None
        )
        row["flops_ratio_vs_gpt_kv"] = (
            base["decode_flops_per_token"] / row["decode_flops_per_token"] if base else None
        )
    text = []
    for m in cfg.models:
        runs = [r for r in plan.runs if r.model.name == m.name]
        for ctx in cfg.generation.contexts:
            stats = [t for r in runs for t in generation[r.name]["text"] if t["context"] == ctx]
            if not stats:
                continue
            text.append(
                {
                    "model": m.name,
                    "context": ctx,
                    "natural_end_rate": _spread(
                        [s["natural_end_rate"] for s in stats if s["natural_end_rate"] is not None]
                    ),
                    "mean_sentence_tokens": _spread(
                        [
                            s["mean_sentence_tokens"]
                            for s in stats
                            if s["mean_sentence_tokens"] is not None
                        ]
                    ),
                    "stopped_at_eod": sum(s["stopped_at_eod"] for s in stats),
                }
            )
    samples = []
    for m in cfg.models:
        run = next(r for r in plan.runs if r.model.name == m.name)
        for t in generation[run.name]["text"]:
            if t["context"] == min(x["context"] for x in generation[run.name]["text"]):
                samples.append(
                    {
                        "model": m.name,
                        "run": run.name,
                        "context": t["context"],
                        "samples": t["samples"],
                    }
                )
    return {
        "speed": speed,
        "text": text,
        "data_mean_sentence_tokens": mean_sentence,
        "samples": samples,
    }


def _verdict_sign(values: list[float], above: str, below: str, mixed: str) -> str:
    if values and all(v > 1 for v in values):
        return above
    if values and all(v < 1 for v in values):
        return below
    return mixed


def _claims(r: dict[str, Any]) -> list[dict[str, str]]:
    claims = []
    for c in r["comparisons"]:
        ratios = c["ppl_ratio_per_seed"]
        here = (
            f"{c['gpthf']} / {c['equal_gpt']} perplexity {c['ppl_ratio']['mean']:.3f} "
            f"(seeds: {', '.join(f'{x:.3f}' for x in ratios)})"
        )
        gap, noise = abs(c["ppl_ratio"]["mean"] - 1), c["seed_spread"]
        here += f"; seeds alone move a model's perplexity by up to {noise:.1%}"
        verdict = _verdict_sign(
            ratios,
            "agrees in direction: GPTHF pays a perplexity cost at every seed",
            "contradicts: GPTHF is ahead of the equal-size GPT at every seed",
            "undecided: the seeds disagree on the sign",
        )
        if ratios and gap <= noise:
            verdict = (
                f"level: the {gap:.1%} gap is inside the seed spread, so this scale cannot "
                "tell the two apart"
            )
        claims.append({"claim": PAPER["ppl_cost"], "here": here, "verdict": verdict})
        if c.get("shallow_gpt") is not None and not c.get("depth_resolved"):
            here = (
                f"{c['shallow_gpt']} / {c['equal_gpt']} perplexity {c['shallow_ratio']:.3f}: "
                f"halving the GPT's depth moves perplexity less than the seeds do ({noise:.1%})"
            )
            verdict = (
                "not measurable at this scale: depth does not pay yet, so there is no cost of "
                "depth for GPTHF to land on"
            )
            claims.append({"claim": PAPER["depth"], "here": here, "verdict": verdict})
        elif c.get("position") is not None:
            pos = c["position"]
            here = (
                f"{c['gpthf']} lands at {pos:.2f} of the way from {c['equal_gpt']} (0) to "
                f"{c['shallow_gpt']} (1): like a GPT of {c['equivalent_gpt_layers']:.1f} layers"
            )
            verdict = (
                "agrees: about the shallower GPT" if 0.5 <= pos <= 1.5
                else "smaller cost than the paper's" if pos < 0.5
                else "larger cost than the paper's"
            )  # fmt: skip
            claims.append({"claim": PAPER["depth"], "here": here, "verdict": verdict})
    speed = r["generation"]["speed"]
    for c in r["comparisons"]:
        rows = [s for s in speed if s["model"] == c["gpthf"] and s["speedup_vs_gpt_kv"] is not None]
        if not rows:
            continue
        # The fastest mode and the cheapest mode at each context, each against the GPT's kv
        # cache (they need not be the same mode).
        best: dict[int, dict[str, Any]] = {}
        cheapest: dict[int, dict[str, Any]] = {}
        for s in rows:
            ctx = s["context"]
            if ctx not in best or s["median_tokens_per_s"] > best[ctx]["median_tokens_per_s"]:
                best[ctx] = s
            if (
                ctx not in cheapest
                or s["flops_ratio_vs_gpt_kv"] > cheapest[ctx]["flops_ratio_vs_gpt_kv"]
            ):
                cheapest[ctx] = s
        parts = [
            f"{ctx}: {s['speedup_vs_gpt_kv']:.2f}x the tokens/s ({s['mode']}), "
            f"{cheapest[ctx]['flops_ratio_vs_gpt_kv']:.2f}x fewer FLOPs ({cheapest[ctx]['mode']})"
            for ctx, s in sorted(best.items())
        ]
        ups = [s["speedup_vs_gpt_kv"] for s in best.values()]
        verdict = _verdict_sign(
            ups,
            "agrees in direction: GPTHF decodes faster than the GPT's kv cache at every context",
            "contradicts: GPTHF decodes slower at every context",
            "mixed: faster at some contexts only",
        )
        claims.append(
            {
                "claim": PAPER["speed"],
                "here": f"{c['gpthf']} vs {c['equal_gpt']} kv, by context: " + "; ".join(parts),
                "verdict": verdict,
            }
        )
    text = r["generation"]["text"]
    data_len = r["generation"]["data_mean_sentence_tokens"]
    for c in r["comparisons"]:

        def rate(model: str) -> list[float]:
            return [
                t["natural_end_rate"]["mean"]
                for t in text
                if t["model"] == model and t["natural_end_rate"]["mean"] is not None
            ]

        def length(model: str) -> list[float]:
            return [
                t["mean_sentence_tokens"]["mean"]
                for t in text
                if t["model"] == model and t["mean_sentence_tokens"]["mean"] is not None
            ]

        hf_rate, gpt_rate = rate(c["gpthf"]), rate(c["equal_gpt"])
        hf_len, gpt_len = length(c["gpthf"]), length(c["equal_gpt"])
        if not (hf_rate and gpt_rate and hf_len and gpt_len):
            continue
        a, b = statistics.fmean(hf_rate), statistics.fmean(gpt_rate)
        la, lb = statistics.fmean(hf_len), statistics.fmean(gpt_len)
        here = (
            f"natural sentence ends {a:.0%} ({c['gpthf']}) vs {b:.0%} ({c['equal_gpt']}); "
            f"mean sentence {la:.1f} vs {lb:.1f} tokens (held-out data: {data_len:.1f})"
        )
        # Two points of natural-end rate is a handful of sentences over a few prompts: a
        # smaller gap is not a struggle.
        struggles = a < b - 0.02 or la > 1.5 * max(data_len, lb)
        verdict = (
            "agrees: GPTHF ends fewer sentences itself or writes much longer ones"
            if struggles
            else "not seen at this scale: GPTHF ends its sentences as the GPT does, and not "
            "with longer ones"
        )
        claims.append({"claim": PAPER["sentences"], "here": here, "verdict": verdict})
    return claims


# ---------------------------------------------------------------------------- formats


def _f(x: Any, fmt: str = ".3f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, fmt)


def _x(x: Any) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def _pm(s: dict[str, Any], fmt: str = ".3f") -> str:
    if s.get("mean") is None:
        return "n/a"
    if s["n"] < 2:
        return _f(s["mean"], fmt)
    return f"{_f(s['mean'], fmt)} [{_f(s['min'], fmt)}-{_f(s['max'], fmt)}]"


def format_markdown(r: dict[str, Any]) -> str:
    env, d, sch = r["environment"], r["data"], r["schedule"]
    lines = [
        "# GPTHF against the GPT: the study",
        "",
        f"`{env['command']}` at commit `{(env['commit'] or 'unknown')[:12]}`; "
        f"{env['path']}; {env['cpus']} CPUs"
        + (f", {env['gpu']}" if env["gpu"] else "")
        + f"; torch {env['versions'].get('torch')}, ray {env['versions'].get('ray')}, "
        f"deepspeed {env['versions'].get('deepspeed')}.",
        "",
        f"Data: {d['uri']} (manifest v{d['manifest_version']}): {d['train_tokens']:,} training "
        f"tokens, {d['heldout_tokens']:,} held-out; blocks of {d['mean_block_tokens']:.0f} tokens "
        f"on average (longest {d['max_block_tokens']}), sentences of {d['mean_sentence_tokens']:.1f}. "
        f"Every run: {sch['steps']} steps of ~{sch['tokens_per_step']:,.0f} tokens "
        f"({sch['epochs']:.2f} epochs), the same data order, batch and schedule; seeds change the "
        "initialisation only.",
        "",
        "## Held-out scores per model (mean [min-max] over seeds)",
        "",
        "| model | arch | layers | parameters | token ppl | bits/byte | EOS-S acc | train s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, m in r["models"].items():
        lines.append(
            f"| {name} | {m['arch']} | {m['layers']} | {m['parameters']:,} | {_pm(m['token_ppl'], '.2f')} "
            f"| {_pm(m['bits_per_byte'])} | {_pm(m['eos_accuracy'])} | {_pm(m['train_wall_s'], '.0f')} |"
        )
    lines += [
        "",
        "## Per run",
        "",
        "| run | lr | steps | tokens | token ppl | bits/byte | EOS-S acc |",
        "|---|---|---|---|---|---|---|",
    ]
    for x in r["runs"]:
        lines.append(
            f"| {x['run']} | {x['lr']:g} | {x['steps']} | {_f(x['tokens_seen'], ',')} | {_f(x['token_ppl'], '.2f')} "
            f"| {_f(x['bits_per_byte'])} | {_f(x['eos_accuracy'])} |"
        )
    lines += ["", "## GPTHF against the GPTs", ""]
    for c in r["comparisons"]:
        lines.append(
            f"- {c['gpthf']} / {c['equal_gpt']} token perplexity: {_pm(c['ppl_ratio'])} "
            f"(per seed: {', '.join(_f(x) for x in c['ppl_ratio_per_seed'])})."
        )
        if c.get("shallow_gpt") is not None and not c.get("depth_resolved"):
            lines.append(
                f"- {c['shallow_gpt']} / {c['equal_gpt']}: {_f(c['shallow_ratio'])}, inside the "
                f"seed spread ({_f(c['seed_spread'], '.1%')}): where {c['gpthf']} lands between "
                "them is not defined at this scale."
            )
        elif c.get("position") is not None:
            lines.append(
                f"- {c['shallow_gpt']} / {c['equal_gpt']}: {_f(c['shallow_ratio'])}; {c['gpthf']} lands "
                f"at {_f(c['position'], '.2f')} between {c['equal_gpt']} (0) and {c['shallow_gpt']} (1), "
                f"like a GPT of {_f(c['equivalent_gpt_layers'], '.1f')} layers (linear in perplexity)."
            )
    for c in r["comparisons"]:
        if c.get("ppl_ratio_per_file"):
            lines += [
                "",
                f"Per held-out file, {c['gpthf']} / {c['equal_gpt']} token perplexity "
                "(mean [min-max] over seeds):",
                "",
                "| held-out file | tokens | ratio |",
                "|---|---|---|",
            ]
            first = next(x for x in r["runs"] if x["model"] == c["gpthf"])
            for f, v in c["ppl_ratio_per_file"].items():
                lines.append(f"| {f} | {first['heldout_files'][f]['tokens']:,} | {_pm(v)} |")
    g = r["generation"]
    lines += [
        "",
        "## Generation",
        "",
        "Decode tokens/s (after the prefill; median [min-max] over the repeats, modes interleaved, "
        "one warm-up each), every mode on the same prompts and number of new tokens; FLOPs are "
        "analytic per decode step and sequence; cache bytes per sequence at the end.",
        "",
        "Ratios are against the equal-size GPT's kv mode at the same context: speed = these "
        "tokens/s over its, FLOPs = its FLOPs over these (above 1: fewer).",
        "",
        "| model | context | mode | prompt tokens | tokens/s | speed vs GPT kv | decode MFLOP/token | FLOPs saved vs GPT kv | cache KiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in g["speed"]:
        rng = f"{s['median_tokens_per_s']:.0f} [{s['min_tokens_per_s']:.0f}-{s['max_tokens_per_s']:.0f}]"
        lines.append(
            f"| {s['model']} | {s['context']} | {s['mode']} | {s['prompt_tokens']:.0f} | {rng} "
            f"| {_x(s['speedup_vs_gpt_kv'])} | {s['decode_flops_per_token'] / 1e6:.2f} "
            f"| {_x(s['flops_ratio_vs_gpt_kv'])} | {_f(None if s['cache_bytes'] is None else s['cache_bytes'] / 1024, '.0f')} |"
        )
    reach = d["blocks_reaching_context"]
    beyond = [c for c, f in reach.items() if f < 0.01]
    lines += [
        "",
        "Positions restart at every block in training: "
        + ", ".join(
            f"{float(f):.0%} of the training blocks reach position {c}" for c, f in reach.items()
        )
        + "."
        + (f" Contexts {', '.join(beyond)} lie beyond what training saw." if beyond else ""),
    ]
    for ctx, why in r["prompts_skipped"].items():
        lines.append(f"Context {ctx}: not measured ({why}).")
    lines += [
        "",
        f"Text (seeded sampling, kv mode, {r['config']['generation']['new_tokens']} new tokens per prompt; "
        f"held-out sentences average {g['data_mean_sentence_tokens']:.1f} tokens):",
        "",
        "| model | context | natural sentence ends | mean sentence tokens | ended the document |",
        "|---|---|---|---|---|",
    ]
    for t in g["text"]:
        lines.append(
            f"| {t['model']} | {t['context']} | {_pm(t['natural_end_rate'], '.2f')} | {_pm(t['mean_sentence_tokens'], '.1f')} | {t['stopped_at_eod']} |"
        )
    lines += ["", "Samples (the prompt's last sentences, then the continuation):", ""]
    for s in g["samples"]:
        for x in s["samples"]:
            lines.append(
                f"- **{s['model']}** ({s['run']}, {s['context']}-token prompt): …{x['prompt_end'][-200:]} ⟶ _{x['continuation'][:400]}_"
            )
    lines += [
        "",
        "## The paper's claims at this scale",
        "",
        "| claim (paper) | here | verdict |",
        "|---|---|---|",
    ]
    for c in r["claims"]:
        lines.append(f"| {c['claim']} | {c['here']} | {c['verdict']} |")
    lines += [
        "",
        "Curves: study.png (held-out loss against tokens, training FLOPs and wall-clock).",
    ]
    return "\n".join(lines) + "\n"


def plot_png(r: dict[str, Any]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    models = list(r["models"])
    styles = ["-", "--", ":", "-."]
    seeds = sorted({x["seed"] for x in r["runs"]})
    for x in r["runs"]:
        color = colors[models.index(x["model"]) % len(colors)]
        ls = styles[seeds.index(x["seed"]) % len(styles)]
        cur = x["curve"]
        for ax, key in zip(axes[:3], ("tokens", "flops", "wall_s"), strict=True):
            ax.plot(cur[key], cur["val_loss"], ls, color=color, label=x["run"])
    for ax, label in zip(
        axes[:3], ("tokens seen", "training FLOPs", "training wall-clock (s)"), strict=True
    ):
        ax.set_xlabel(label)
        ax.set_ylabel("held-out loss (nats/token)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    ax = axes[3]
    for s_model in models:
        rows = [s for s in r["generation"]["speed"] if s["model"] == s_model]
        for mode in sorted({s["mode"] for s in rows}):
            pts = sorted(
                (s["context"], s["median_tokens_per_s"]) for s in rows if s["mode"] == mode
            )
            if pts:
                ax.plot(*zip(*pts, strict=True), "o-", color=colors[models.index(s_model) % len(colors)],
                        alpha=1.0 if mode == "kv" else 0.5, label=f"{s_model} {mode}")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("decode tokens/s")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write_report(report: dict[str, Any], output: str, storage: Any = None) -> None:
    fs, root = filesystem_for(output, storage)
    fs.makedirs(root, exist_ok=True)
    write_bytes_atomic(fs, f"{root}/study.png", plot_png(report))
    write_bytes_atomic(fs, f"{root}/study.md", format_markdown(report).encode())
    # Last: its presence means the report is whole.
    write_bytes_atomic(
        fs, f"{root}/study.json", json.dumps(report, indent=1, allow_nan=False).encode()
    )
