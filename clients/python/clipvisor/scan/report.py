"""``report.html``: one self-contained page (inline SVG plots, inline CSS, a few lines of script
to filter tables) that opens from disk in any browser, with no server and nothing fetched.

The figures come from one streaming pass over the rows (:class:`Summary` keeps numbers per clip
for the histograms, and at most ``LIST_LIMIT`` rows of each problem list).
"""

from __future__ import annotations

import html
import io
from array import array
from collections import Counter
from typing import Any, Dict, Iterable, List, Mapping, Optional

from .buckets import BucketConfig, summarize

__all__ = ["Summary", "write_report"]

LIST_LIMIT = 2000


class Summary:
    """What the report shows, gathered row by row."""

    def __init__(self, buckets: Optional[BucketConfig] = None, ranks: int = 1, max_tokens: Optional[int] = None):
        self.buckets = buckets
        self.ranks = ranks
        self.max_tokens = max_tokens
        self.clips = 0
        self.samples = 0
        self.ok = 0
        self.reasons: Counter = Counter()
        self.verify: Counter = Counter()
        self.durations = array("d")
        self.fps = array("d")
        self.aspect = array("d")
        self.sizes: Counter = Counter()
        self.clip_tokens = array("d")
        self.sample_tokens = array("d")
        self.bucket_counts: Counter = Counter()
        self.unbucketed: Counter = Counter()
        self.bad: List[Mapping[str, Any]] = []
        self.disagree: List[Mapping[str, Any]] = []
        self.partial: List[Mapping[str, Any]] = []
        self.over_budget: List[Mapping[str, Any]] = []
        self.unbucketed_rows: List[Mapping[str, Any]] = []
        self.bytes = 0
        self.seconds = 0.0
        self.options: Dict[str, Any] = {}

    def add(self, row: Mapping[str, Any]) -> None:
        self.clips += 1
        if row.get("clip", 0) == 0:
            self.samples += 1
            st = row.get("qwen_sample_tokens")
            if st is not None:
                self.sample_tokens.append(float(st))
                if self.max_tokens is not None and st > self.max_tokens and len(self.over_budget) < LIST_LIMIT:
                    self.over_budget.append(row)
        if row.get("status") != "ok":
            self.reasons[row.get("reason") or "unknown"] += 1
            if len(self.bad) < LIST_LIMIT:
                self.bad.append(row)
            return
        self.ok += 1
        self.bytes += int(row.get("size_bytes") or 0)
        if row.get("duration") is not None:
            self.durations.append(float(row["duration"]))
            self.seconds += float(row["duration"])
        if row.get("fps") is not None:
            self.fps.append(float(row["fps"]))
        if row.get("aspect_ratio") is not None:
            self.aspect.append(float(row["aspect_ratio"]))
        if row.get("width") and row.get("height"):
            self.sizes[f"{row['width']}x{row['height']}"] += 1
        if row.get("verify"):
            self.verify[row["verify"]] += 1
            if row["verify"] != "clean" and len(self.partial) < LIST_LIMIT:
                self.partial.append(row)
        if row.get("frames_disagree") and len(self.disagree) < LIST_LIMIT:
            self.disagree.append(row)
        if row.get("qwen_tokens") is not None:
            self.clip_tokens.append(float(row["qwen_tokens"]))
        if row.get("bucket_resolution"):
            self.bucket_counts[(row["bucket_resolution"], int(row["bucket_frames"]), row["bucket_aspect_ratio"])] += 1
        elif row.get("bucket_reason"):
            self.unbucketed[str(row["bucket_reason"]).split(":")[0]] += 1
            if len(self.unbucketed_rows) < LIST_LIMIT:
                self.unbucketed_rows.append(row)


# -- plots -------------------------------------------------------------------------------------

def _svg(fig: Any) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]


def _hist(values: array, title: str, xlabel: str, log: bool = False) -> Optional[str]:
    if not values:
        return None
    import matplotlib.pyplot as plt
    import numpy as np

    v = np.frombuffer(values, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(5.2, 3.0))
    bins: Any = 40
    if log and v.min() > 0 and v.max() / v.min() > 20:
        bins = np.geomspace(v.min(), v.max(), 40)
        ax.set_xscale("log")
    ax.hist(v, bins=bins, color="#3b6ea8")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("clips" if "sample" not in title else "samples")
    return _svg(fig)


def _bar(counter: Counter, title: str, top: int = 15) -> Optional[str]:
    if not counter:
        return None
    import matplotlib.pyplot as plt

    items = counter.most_common(top)
    fig, ax = plt.subplots(figsize=(5.2, 0.3 * len(items) + 1.0))
    ax.barh([k for k, _ in reversed(items)], [v for _, v in reversed(items)], color="#3b6ea8")
    ax.set_title(title)
    ax.set_xlabel("clips")
    return _svg(fig)


def _heatmap(counts: Counter, config: BucketConfig) -> Optional[str]:
    """Samples per (resolution, frames) bucket, all configured buckets shown (empty ones too)."""
    import matplotlib.pyplot as plt
    import numpy as np

    res = list(config.probs)
    frames = sorted({t for p in config.probs.values() for t in p})
    grid = np.zeros((len(res), len(frames)))
    for (hw, t, _), n in counts.items():
        grid[res.index(hw), frames.index(t)] += n
    fig, ax = plt.subplots(figsize=(max(4.0, 0.7 * len(frames) + 2), max(2.5, 0.45 * len(res) + 1.2)))
    ax.imshow(grid, cmap="Blues", aspect="auto")
    ax.set_xticks(range(len(frames)), [str(t) for t in frames])
    ax.set_yticks(range(len(res)), res)
    ax.set_xlabel("frames")
    ax.set_title("samples per bucket (resolution × frames)")
    top = grid.max() if grid.size else 0
    for i in range(len(res)):
        for j in range(len(frames)):
            configured = frames[j] in config.probs[res[i]]
            label = f"{int(grid[i, j])}" if configured else "·"
            ax.text(j, i, label, ha="center", va="center", fontsize=8,
                    color="white" if top and grid[i, j] > top / 2 else "black")
    return _svg(fig)


# -- page ---------------------------------------------------------------------------------------

_CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:12px;margin:8px 0}
td,th{border:1px solid #ddd;padding:3px 6px;text-align:left;vertical-align:top}
th{background:#f3f5f8}.grid{display:flex;flex-wrap:wrap;gap:12px}.fig{border:1px solid #eee;padding:4px}
.bad{color:#a02020}.minority{background:#fff3d6}.muted{color:#777}input{margin:4px 0;padding:3px;width:320px}
svg{max-width:100%;height:auto}"""

_JS = """document.querySelectorAll('input[data-filter]').forEach(function(box){
  var table=document.getElementById(box.getAttribute('data-filter'));
  box.addEventListener('input',function(){var q=box.value.toLowerCase();
    table.querySelectorAll('tbody tr').forEach(function(tr){
      tr.style.display=tr.textContent.toLowerCase().indexOf(q)>=0?'':'none';});});});
document.body.setAttribute('data-ready','1');"""


def _e(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return html.escape(f"{v:.4g}")
    return html.escape(str(v))


def _table(tid: str, header: List[str], rows: Iterable[List[Any]], total: Optional[int] = None,
           filterable: bool = True, classes: Optional[List[str]] = None) -> str:
    rows = list(rows)
    out = []
    if filterable and rows:
        out.append(f'<input type="search" placeholder="filter" data-filter="{tid}">')
    out.append(f'<table id="{tid}"><thead><tr>' + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr></thead><tbody>")
    for i, r in enumerate(rows):
        cls = f' class="{classes[i]}"' if classes and classes[i] else ""
        out.append(f"<tr{cls}>" + "".join(f"<td>{_e(c)}</td>" for c in r) + "</tr>")
    out.append("</tbody></table>")
    if total is not None and total > len(rows):
        out.append(f'<p class="muted">{len(rows)} of {total} shown; all are in scan.jsonl.</p>')
    return "".join(out)


def _figures(figs: List[Optional[str]], names: List[str]) -> str:
    parts = [f'<div class="fig" id="plot-{n}">{f}</div>' for f, n in zip(figs, names) if f]
    return '<div class="grid">' + "".join(parts) + "</div>" if parts else '<p class="muted">no data</p>'


def write_report(s: Summary, path: str, title: str = "clipvisor scan") -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams["svg.fonttype"] = "path"  # text as paths: the same in every browser, no fonts needed
    body: List[str] = [f"<h1>{_e(title)}</h1>"]
    failed = s.clips - s.ok
    overview = [["samples", s.samples], ["clips", s.clips], ["readable", s.ok], ["failed", failed],
                ["hours of media (readable clips)", round(s.seconds / 3600, 3)], ["bytes", s.bytes]]
    for k, v in sorted(s.verify.items()):
        overview.append([f"verify: {k}", v])
    for k, v in s.options.items():
        overview.append([k, v])
    body.append("<h2>Overview</h2>" + _table("overview", ["", ""], overview, filterable=False))
    body.append("<h2>Distributions</h2>" + _figures(
        [_hist(s.durations, "duration", "seconds", log=True), _hist(s.fps, "frame rate", "fps", log=True),
         _hist(s.aspect, "aspect ratio (height / width)", "height / width"),
         _bar(s.sizes, "resolutions (upright width x height)")],
        ["duration", "fps", "aspect", "resolution"]))
    if s.clip_tokens:
        body.append("<h2>Qwen visual tokens</h2>" + _figures(
            [_hist(s.clip_tokens, "visual tokens per clip", "tokens"),
             _hist(s.sample_tokens, "visual tokens per sample", "tokens")], ["tokens-clip", "tokens-sample"]))
        if s.over_budget:
            body.append(f"<p>{len(s.over_budget)} samples over {s.max_tokens} visual tokens:</p>" + _table(
                "over", ["sample", "id", "tokens"],
                [[r.get("sample"), r.get("sample_id"), r.get("qwen_sample_tokens")] for r in s.over_budget]))
    if s.buckets is not None:
        rows = summarize(s.bucket_counts, s.buckets, s.ranks)
        body.append("<h2>Buckets</h2>" + _figures([_heatmap(s.bucket_counts, s.buckets)], ["buckets"]))
        body.append(_table("bucket-table", ["resolution", "frames", "aspect ratio", "target HxW", "samples",
                                            "batch size", "batches per rank", "minority"],
                           [[r["resolution"], r["frames"], r["aspect_ratio"], f"{r['target'][0]}x{r['target'][1]}",
                             r["samples"], r["batch_size"], r["batches_per_rank"], "yes" if r["minority"] else ""]
                            for r in rows], classes=["minority" if r["minority"] else "" for r in rows]))
        if s.unbucketed:
            body.append("<p>Clips that fit no bucket:</p>" + _table(
                "unbucketed-reasons", ["reason", "clips"], [[k, v] for k, v in sorted(s.unbucketed.items())],
                filterable=False))
            body.append(_table("unbucketed", ["path", "frames", "height", "width", "reason"],
                               [[r.get("path"), r.get("num_frames"), r.get("height"), r.get("width"),
                                 r.get("bucket_reason")] for r in s.unbucketed_rows],
                               total=sum(s.unbucketed.values())))
    if s.reasons:
        reasons = [[k, v] for k, v in sorted(s.reasons.items())]
        body.append("<h2>Failed clips</h2>" + _table("reasons", ["reason", "clips"], reasons, filterable=False))
        body.append(_table("bad", ["sample", "path", "reason", "detail"],
                           [[r.get("sample"), r.get("path"), r.get("reason"), r.get("detail")] for r in s.bad],
                           total=failed, classes=["bad"] * len(s.bad)))
    if s.partial:
        body.append("<h2>Verify: damaged clips</h2>" + _table(
            "partial", ["path", "verify", "frames decoded", "counted", "breaks at (s)", "detail"],
            [[r.get("path"), r.get("verify"), r.get("verify_frames"), r.get("num_frames"), r.get("verify_break_s"),
              r.get("verify_detail") or r.get("verify_reason")] for r in s.partial],
            total=sum(v for k, v in s.verify.items() if k != "clean")))
    if s.disagree:
        body.append("<h2>Frame counts: header vs packets</h2>" + _table(
            "disagree", ["path", "packets", "header", "source"],
            [[r.get("path"), r.get("num_frames"), r.get("header_frames"), r.get("frame_count_source")]
             for r in s.disagree]))
    page = (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{_e(title)}</title>"
            f"<style>{_CSS}</style></head><body>{''.join(body)}<script>{_JS}</script></body></html>")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(page)
    import os

    os.replace(tmp, path)
