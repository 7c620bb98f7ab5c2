"""report.md + report.html (+ plots and example trajectories) from evaluation result rows."""

from __future__ import annotations

import html
import json
import re
import time
from pathlib import Path
from typing import Any

from raydistill.report import plots
from raydistill.report.results import rows_to_trajectory
from raydistill.report.summary import IN_DOMAIN, Series, failure_columns, is_agent_mode, summarize


def _fmt_pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    out = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return out


def _fence(text: str, lang: str = "") -> str:
    longest = max((len(m) for m in re.findall(r"`+|~+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{lang}\n{text.rstrip()}\n{fence}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[:120] or "x"


def write_example(row: dict[str, Any], path: Path) -> Path:
    """One trajectory as readable markdown: question, gold, each step's text, code result and vote."""
    traj = rows_to_trajectory(row)
    verdict = {True: "correct", False: "wrong", None: "ungraded"}[traj.correct]
    lines = [
        f"# {row['model_label']} / {row['mode']} / {traj.id}",
        "",
        f"- benchmark: `{row['benchmark']}` ({traj.domain})",
        f"- verdict: **{verdict}**" + (f" ({row['failure']})" if row.get("failure") else ""),
        f"- final answer: `{traj.final_answer}`" + (" (fallback after the step limit)" if traj.fallback_answer else ""),
        f"- gold: {', '.join(f'`{g}`' for g in traj.gold) or '-'}",
        f"- steps: {len(traj.steps)}, tool calls: {traj.tool_calls}, duration: {traj.duration_s:.2f}s",
    ]
    if traj.kind == "cot":
        passages = traj.sampling_dict().get("passages", 0)
        lines.append(f"- chain of thought, {passages} retrieved passages prepended" if passages
                     else "- chain of thought, no retrieval")
    if traj.scores:
        lines.append(f"- scores: `{traj.scores}`")
    if traj.error:
        lines.append(f"- error: `{traj.error}`")
    lines += ["", "## Question", "", _fence(traj.question, "text"), ""]
    for i, step in enumerate(traj.steps):
        flags = [f for f, on in (("parse error", step.parse_error), ("execution error", step.exec_error),
                                 ("final", step.is_final)) if on]
        lines += [f"## Step {i + 1}" + (f" ({', '.join(flags)})" if flags else ""), "",
                  f"gen {step.gen_s:.2f}s, exec {step.exec_s:.2f}s, {step.completion_tokens} new tokens", ""]
        lines += ["Model output:", "", _fence(step.raw_text, "text"), ""]
        if step.observation:
            lines += ["Observation:", "", _fence(step.observation, "text"), ""]
        if step.sag:
            rec = json.loads(step.sag)
            lines += [f"sag vote: {rec.get('survived')}/{rec.get('n')} candidates survived, chosen "
                      f"#{rec.get('chosen')}, groups (size, key, logprob, members):", "",
                      _fence(json.dumps(rec.get("groups"), indent=1)[:4000], "json"), ""]
    if traj.fallback_text:
        lines += ["## After the step limit", "", _fence(traj.fallback_text, "text"), ""]
    path.write_text("\n".join(lines) + "\n")
    return path


def _pick_examples(rows: list[dict[str, Any]], per_group: int) -> list[dict[str, Any]]:
    """Per (model, mode): alternate a correct and a wrong one, preferring different benchmarks."""
    if per_group <= 0:
        return []
    picked: list[dict[str, Any]] = []
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model_label"], r["mode"]), []).append(r)
    for _, group in sorted(groups.items()):
        group = sorted(group, key=lambda r: (r["benchmark"], r["id"]))
        pools = [[r for r in group if r.get("correct")], [r for r in group if not r.get("correct")]]
        used_bench: set[str] = set()
        chosen: list[dict] = []
        while len(chosen) < per_group and any(pools):
            for pool in pools:
                if not pool or len(chosen) >= per_group:
                    continue
                fresh = [r for r in pool if r["benchmark"] not in used_bench] or pool
                r = fresh[0]
                pool.remove(r)
                chosen.append(r)
                used_bench.add(r["benchmark"])
        picked += chosen
    return picked


def build_markdown(rows: list[dict[str, Any]], series: list[Series], benchmarks: list[str], figures: dict[str, str],
                   examples: list[tuple[dict, str]], title: str, notes: list[str]) -> str:
    in_dom = [b for b in benchmarks if b.startswith(IN_DOMAIN)]
    out_dom = [b for b in benchmarks if b not in in_dom]
    md = [f"# {title}", "", f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')} from {len(rows)} graded results.", ""]
    md += [f"- {n}" for n in notes]
    if notes:
        md.append("")
    md += ["## Accuracy (%)", "",
           "Cells are accuracy (correct/graded). Math: `math_equal`; QA: exact match, or the LLM judge when "
           "configured (see scores). `in-domain` = HotPotQA + MATH500 (training distributions); `OOD` = the rest.",
           ""]
    header = ["model", "size (B)", "mode", *benchmarks, "in-domain", "OOD", "average"]
    body = []
    for s in series:
        cells = []
        for b in benchmarks:
            c = s.cells.get(b)
            cells.append("-" if c is None or c.accuracy is None else f"{_fmt_pct(c.accuracy)} ({c.correct}/{c.graded})")
        body.append([s.model_label, "-" if s.model_size_b is None else f"{s.model_size_b:g}", s.mode, *cells,
                     _fmt_pct(s.macro_accuracy(in_dom)), _fmt_pct(s.macro_accuracy(out_dom)),
                     _fmt_pct(s.macro_accuracy(benchmarks))])
    md += _table(header, body) + [""]
    qa = [b for b in benchmarks if any(b in s.cells and s.cells[b].f1 is not None for s in series)]
    if qa:
        md += ["### QA token F1 (%)", ""]
        md += _table(["model", "mode", *qa], [[s.model_label, s.mode, *[_fmt_pct(s.cells[b].f1) if b in s.cells
                                                                          else "-" for b in qa]] for s in series])
        md.append("")
    md += ["## Agent behaviour", ""]
    beh = []
    for s in series:
        n = max(s.n, 1)
        steps = max(s.total_steps, 1)
        agent = is_agent_mode(s.mode)
        beh.append([s.model_label, s.mode, s.n, f"{s.steps_sum / n:.2f}" if agent else "-",
                    f"{s.tool_calls_sum / n:.2f}" if agent else "-", s.tool_calls_sum if agent else "-",
                    f"{100 * s.max_steps / n:.1f}" if agent else "-",
                    f"{100 * s.parse_error_steps / steps:.1f}" if agent else "-",
                    f"{100 * s.exec_error_steps / steps:.1f}" if agent else "-",
                    f"{s.sag_survived}/{s.sag_candidates}" if s.sag_candidates else "-",
                    f"{s.duration_sum / n:.2f}"])
    md += _table(["model", "mode", "questions", "avg steps", "avg tool calls", "tool calls", "max steps reached %",
                  "parse-error steps %", "exec-error steps %", "sag survivors", "avg seconds"], beh) + [""]
    md += ["## Failure reasons", "",
           "Counts per outcome: `error` = the episode failed (engine/sandbox/context), `no_answer` = no final "
           "answer, `max_steps_reached` = wrong after hitting the step limit, `wrong_answer` = answered wrongly.", ""]
    cols = failure_columns(series)
    md += _table(["model", "mode", *cols], [[s.model_label, s.mode, *[s.failures.get(c, 0) for c in cols]]
                                            for s in series]) + [""]
    errs = [(s, k, v) for s in series for k, v in s.errors.most_common(5)]
    if errs:
        md += ["Most frequent episode errors:", ""]
        md += _table(["model", "mode", "error", "count"], [[s.model_label, s.mode, f"`{k}`", v] for s, k, v in errs])
        md.append("")
    md += ["## Plots", ""]
    for name, rel in figures.items():
        md += [f"### {name}", "", f"![{name}]({rel})", ""]
    if examples:
        md += ["## Example trajectories", ""]
        for r, rel in examples:
            verdict = "correct" if r.get("correct") else (r.get("failure") or "wrong")
            md.append(f"- [{r['model_label']} / {r['mode']} / {r['id']}]({rel}) - {verdict}, "
                      f"{r.get('num_steps', 0)} steps, answer `{str(r.get('final_answer'))[:60]}`")
        md.append("")
    return "\n".join(md)


_CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}th,td{border:1px solid #ccc;padding:3px 7px;
text-align:right}th{background:#f3f3f3}td:first-child,td:nth-child(2),td:nth-child(3){text-align:left}
img{max-width:100%;border:1px solid #eee}code{background:#f6f6f6;padding:0 3px}"""


def markdown_to_html(md: str, title: str) -> str:
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(md)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body>{body}</body></html>\n")


def write_report(rows: list[dict[str, Any]], out_dir: str | Path, *, title: str = "Evaluation report",
                 examples_per_group: int = 2, notes: list[str] | None = None) -> dict[str, Any]:
    """Write report.md, report.html, plots/*.png and examples/*.md under `out_dir`; return their paths."""
    if not rows:
        raise ValueError("no evaluation results to report")
    out = Path(out_dir)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    (out / "examples").mkdir(parents=True, exist_ok=True)
    series, benchmarks = summarize(rows)
    figures: dict[str, str] = {}
    plots.accuracy_by_benchmark(series, benchmarks, out / "plots" / "accuracy_by_benchmark.png")
    figures["Accuracy per benchmark"] = "plots/accuracy_by_benchmark.png"
    if plots.accuracy_vs_size(series, benchmarks, out / "plots" / "accuracy_vs_size.png"):
        figures["Accuracy vs model size"] = "plots/accuracy_vs_size.png"
    if plots.sag_on_off(series, benchmarks, out / "plots" / "sag_on_off.png"):
        figures["sag off vs on"] = "plots/sag_on_off.png"
    examples = []
    for r in _pick_examples(rows, examples_per_group):
        name = _slug(f"{r['model_label']}__{r['mode']}__{r['id']}") + ".md"
        write_example(r, out / "examples" / name)
        examples.append((r, f"examples/{name}"))
    md = build_markdown(rows, series, benchmarks, figures, examples, title, notes or [])
    (out / "report.md").write_text(md)
    (out / "report.html").write_text(markdown_to_html(md, title))
    return {"report_md": str(out / "report.md"), "report_html": str(out / "report.html"),
            "plots": [str(out / p) for p in figures.values()], "examples": [str(out / p) for _, p in examples],
            "series": [{"model": s.model_label, "mode": s.mode, "n": s.n,
                        "accuracy": s.macro_accuracy(benchmarks)} for s in series]}
